"""Tests of dact_lib.plots: figures built from small hand-made data (traces, points, front, downsampling cap) and, for
the PBT and pipeline views, from the records of real engine runs (tests/records.py)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from dact_lib import plots
from dact_lib.front import FrontPoint
from dact_lib import progress
from dact_lib.tuning.dact_pipeline.view import pipeline_view, prediction_trial, chosen_prediction_run


def _metrics(rows):
    """rows: (run_id, step, name, value[, time])."""
    out = []
    for r in rows:
        rid, step, name, value = r[:4]
        out.append({"run_id": rid, "step": step, "epoch": 0, "name": name, "value": value,
                    "time": r[4] if len(r) > 4 else 1000.0 + step})
    return pd.DataFrame(out, columns=["run_id", "step", "epoch", "name", "value", "time"])


# ------------------------------------------------------------------------------------------------ downsampling


def test_downsample_index_caps_and_keeps_extremes_and_ends():
    rng = np.random.default_rng(0)
    y = rng.normal(size=100_000)
    y[31_337], y[77_777] = 50.0, -50.0  # spikes must survive
    idx = plots.downsample_index(y, 2000)
    assert len(idx) <= 2000
    assert idx[0] == 0 and idx[-1] == len(y) - 1
    assert np.all(np.diff(idx) > 0)
    assert 31_337 in idx and 77_777 in idx


def test_downsample_index_short_series_unchanged_and_nan_safe():
    assert list(plots.downsample_index(np.arange(10.0), 2000)) == list(range(10))
    y = np.full(5000, np.nan)
    y[::7] = 1.0
    idx = plots.downsample_index(y, 100)
    assert len(idx) <= 100 and idx[0] == 0 and idx[-1] == 4999


# ------------------------------------------------------------------------------------------------ curves


def test_curves_figure_compares_runs_on_shared_panels():
    rows = []
    for rid in (1, 2):
        for s in range(1, 6):
            rows += [(rid, s, "train_loss", 1.0 / s), (rid, s, "lr", 1e-3)]
        rows += [(rid, 5, "val_loss", 0.5), (rid, 5, "val_accuracy", 0.8), (rid, 5, "val_avg_exit_layer", 3.2)]
    fig = plots.curves_figure(_metrics(rows), {1: "run A", 2: "run B"})
    data = [t for t in fig.data if t.meta != "legend"]
    names = sorted(t.name for t in data)
    metric_names = ("train_loss", "val_loss", "val_accuracy", "val_avg_exit_layer")
    assert names == sorted(f"{r} · {n}" for r in ("run A", "run B") for n in metric_names)
    assert "lr" not in " ".join(names)  # not a loss / score metric
    # three panels: loss, score, exit layer; each run keeps one colour across its traces
    axes = {t.name.split(" · ")[1]: t.xaxis for t in data}
    assert axes["train_loss"] == axes["val_loss"] != axes["val_accuracy"] != axes["val_avg_exit_layer"]
    colours = {t.name.split(" · ")[0]: set() for t in data}
    for t in data:
        colours[t.name.split(" · ")[0]].add(t.line.color)
    assert all(len(c) == 1 for c in colours.values()) and colours["run A"] != colours["run B"]
    # the legend: one entry per run (its colour) and one per metric (its dash), not one per run × metric
    legend = [t for t in fig.data if t.showlegend is not False]
    assert all(t.meta == "legend" for t in legend)
    assert [t.name for t in legend] == ["run A", "run B", *sorted(metric_names)]
    assert legend[0].line.color == next(iter(colours["run A"])) and legend[0].legendgroup == data[0].legendgroup


def test_curves_figure_multitask_names_go_to_their_panels():
    df = _metrics([(1, 1, "train_loss/class_label", 0.9), (1, 1, "val_loss/class_label", 0.8),
                   (1, 1, "val_accuracy/sentiment_label", 0.7), (1, 1, "val_macro_f1/class_label", 0.6),
                   (1, 1, "samples_per_s", 100.0), (1, 1, "hp/lr", 1e-3)])
    fig = plots.curves_figure(df)
    axis = {t.name: t.xaxis for t in fig.data}
    assert set(axis) == {"train_loss/class_label", "val_loss/class_label", "val_accuracy/sentiment_label",
                         "val_macro_f1/class_label"}
    assert axis["train_loss/class_label"] == axis["val_loss/class_label"] != axis["val_accuracy/sentiment_label"]


def test_curves_figure_downsamples_long_series_and_dedupes_steps():
    n = 20_000
    df = _metrics([(7, s, "train_loss", math.sin(s / 100)) for s in range(n)]
                  + [(7, 10, "val_loss", 1.0), (7, 10, "val_loss", 0.9)])
    fig = plots.curves_figure(df, max_points=2000)
    tl = next(t for t in fig.data if t.name == "train_loss")
    assert len(tl.x) <= 2000 and tl.x[0] == 0 and tl.x[-1] == n - 1
    vl = next(t for t in fig.data if t.name == "val_loss")
    assert list(vl.x) == [10] and list(vl.y) == [0.9]  # the same step logged twice: the last value


def test_curves_figure_empty():
    fig = plots.curves_figure(_metrics([]))
    assert not fig.data and fig.layout.annotations


def test_metric_figure_one_line_per_run():
    df = _metrics([(1, 1, "val_accuracy", 0.5), (1, 2, "val_accuracy", 0.6), (2, 1, "val_accuracy", 0.4)])
    fig = plots.metric_figure(df, "val_accuracy", {1: "a", 2: "b"})
    assert [t.name for t in fig.data] == ["a", "b"] and list(fig.data[0].y) == [0.5, 0.6]


# ------------------------------------------------------------------------------------------------ progress


def test_progress_eta_running_run():
    run = {"status": "running", "started": 1000.0, "config": {}, "summary": {}}
    events = [{"kind": "start", "payload": {"steps": 100}}]
    df = _metrics([(1, s, "train_loss", 1.0, 1000.0 + s) for s in range(10, 26)])
    p = progress.progress_eta(run, df, events, now=1030.0)
    assert p["steps_done"] == 25 and p["total_steps"] == 100 and p["fraction"] == pytest.approx(0.25)
    assert p["eta_s"] == pytest.approx(1.0 * 75)  # the measured pace (1 s / step) × the steps left
    assert "25 / 100" in p["text"] and "ETA" in p["text"]


def test_eta_is_the_pace_of_the_steps_not_of_the_loading():
    """Issue 28: 5 minutes of loading and tokenising before step 1, then 3 s a step: the ETA is 27 minutes, not
    elapsed / done × left (≈ 5 h); with one logged step the pace is unknown: no ETA rather than a wrong one."""
    run = {"status": "running", "started": 1000.0, "config": {}, "summary": {}}
    events = [{"kind": "start", "payload": {"steps": 552}}]
    one = progress.progress_eta(run, _metrics([(1, 1, "train_loss", 1.0, 1300.0)]), events, now=1310.0)
    assert one["eta_s"] is None and "ETA" not in one["text"]
    df = _metrics([(1, 1, "train_loss", 1.0, 1300.0), (1, 10, "train_loss", 0.9, 1327.0)])
    p = progress.progress_eta(run, df, events, now=1330.0)
    assert p["eta_s"] == pytest.approx(3.0 * 542) and "ETA 27" in p["text"]


def test_the_phase_after_the_last_step_is_shown():
    run = {"status": "running", "started": 1000.0, "config": {}, "summary": {}}
    events = [{"kind": "start", "payload": {"steps": 20}}, {"kind": "phase", "payload": {"phase": "training"}},
              {"kind": "phase", "payload": {"phase": "refitting the exit classifiers"}}]
    df = _metrics([(1, 10, "train_loss", 1.0, 1010.0), (1, 20, "train_loss", 0.9, 1020.0)])
    p = progress.progress_eta(run, df, events, now=1100.0)
    assert p["text"].startswith("refitting the exit classifiers… · step 20 / 20")
    mid = progress.progress_eta(run, df[df["step"] == 10], events[:2], now=1015.0)
    assert not mid["text"].startswith("training")


def test_a_phase_after_the_last_step_shows_its_own_count_and_eta():
    """Issue 28: "step 184/184 · ETA 0s" for 19 minutes of exit refit and halting fit."""
    run = {"status": "running", "started": 1000.0, "config": {}, "summary": {}}
    events = [{"kind": "start", "payload": {"steps": 20}},
              {"kind": "phase", "time": 1030.0, "payload": {"phase": "refitting (epoch)", "done": 2, "total": 30}},
              {"kind": "phase", "time": 1050.0, "payload": {"phase": "refitting (epoch)", "done": 12, "total": 30}}]
    df = _metrics([(1, 10, "train_loss", 1.0, 1010.0), (1, 20, "train_loss", 0.9, 1020.0)])
    p = progress.progress_eta(run, df, events, now=1050.0)
    # 10 epochs in 20 s: 18 epochs left = 36 s
    assert p["text"].startswith("refitting (epoch) 12/30… · step 20 / 20 · this phase ETA 36s")
    assert "· ETA 0s" not in p["text"]
    assert progress.phase_of(events[:2], now=1031.0) == ("refitting (epoch) 2/30", None)  # one count: no pace


def test_phase_progress_is_rate_limited_but_keeps_the_last_count(monkeypatch):
    from dact_lib.train import phase_progress

    got = []

    class Cbs:
        def on_event(self, state, kind, payload):
            got.append((kind, payload))

    clock = iter([0.0, 0.1, 0.2, 1.5, 1.6, 1.7])
    monkeypatch.setattr("dact_lib.train.time.monotonic", lambda: next(clock))
    report = phase_progress(Cbs(), None, min_interval_s=1.0)
    for d in (1, 2, 3, 4):
        report("refit", d, 5)
    report("refit", 5, 5)  # the last of a phase always
    report("halting", 1, 40)  # a new phase at once
    assert [(p["phase"], p["done"]) for _, p in got] == [("refit", 1), ("refit", 4), ("refit", 5), ("halting", 1)]
    assert all(k == "phase" for k, _ in got)


def test_progress_eta_finished_and_config_fallback():
    run = {"status": "finished", "started": 0.0, "ended": 50.0, "summary": {"steps": 40},
           "config": {"train": {"max_steps": 40}}}
    p = progress.progress_eta(run, None, [])
    assert p["total_steps"] == 40 and p["steps_done"] == 40 and p["fraction"] == 1.0 and p["eta_s"] == 0.0
    assert p["elapsed_s"] == 50.0
    q = progress.progress_eta({"status": "queued", "config": {}}, None, [])
    assert q["fraction"] is None and q["eta_s"] is None


def test_progress_of_a_run_whose_summary_is_not_an_object():
    """A summary the tracker reads back as a list or as text (not JSON) gives the progress of the other fields."""
    for summary in ([40], "not json"):
        run = {"status": "finished", "started": 0.0, "ended": 50.0, "summary": summary,
               "config": {"train": {"max_steps": 40}}}
        p = progress.progress_eta(run, None, [])
        assert p["total_steps"] == 40 and p["steps_done"] == 0 and p["fraction"] == 1.0 and p["eta_s"] == 0.0


def _ev(kind, **payload):
    return {"kind": kind, "payload": payload}


def test_engine_progress_backbone_tuning_counts_trials_and_the_final_run():
    run = {"kind": "tune-backbone", "status": "running", "started": 1000.0,
           "config": {"run": {}, "trials": 4, "final": True}}
    events = [_ev("study"), _ev("trial", number=0), _ev("trial", number=1)]
    p = progress.engine_progress(run, events, now=1100.0)
    assert p["steps_done"] == 2 and p["total_steps"] == 5 and p["fraction"] == pytest.approx(0.4)
    assert p["eta_s"] == pytest.approx(100.0 / 2 * 3)  # elapsed / trials done * (trials + final left)
    assert p["text"].startswith("trial 2 / 4") and "ETA" in p["text"]
    # a timeout ends the trials early: the final run is what is left
    p = progress.engine_progress(run, events + [_ev("timeout", trials_run=2)], now=1100.0)
    assert p["total_steps"] == 3 and "final training" in p["text"]
    done = progress.engine_progress({**run, "status": "finished", "ended": 1300.0}, events)
    assert done["fraction"] == 1.0 and done["eta_s"] == 0.0 and done["elapsed_s"] == 300.0


def test_engine_progress_pipeline_by_stage_without_an_eta():
    cfg = {"run": {}, "pipeline": {"trials_stage1": 4, "trials_stage2": 2, "trials_stage3": 3}}
    run = {"kind": "dact-pipeline", "status": "running", "started": 0.0, "config": cfg}
    events = [_ev("pipeline_start"), _ev("stage_start", stage="stage1")]
    events += [_ev("trial", stage="stage1", number=i) for i in range(4)] + [_ev("stage_end", stage="stage1")]
    events += [_ev("stage_start", stage="stage2"), _ev("trial", stage="stage2", number=0)]
    p = progress.engine_progress(run, events, now=60.0)
    assert p["steps_done"] == 5 and p["total_steps"] == 10 and p["fraction"] == pytest.approx(0.5)
    assert p["eta_s"] is None and p["text"].startswith("stage2: trial 1 / 2")
    # a resumed pipeline counts the stages it skips; a stage ended early by its time budget counts as done
    resumed = [_ev("resumed", stages_done=["stage1", "stage2"]), _ev("stage_start", stage="stage3"),
               _ev("trial", stage="stage3", number=0), _ev("stage_end", stage="stage3"),
               _ev("stage_start", stage="final")]
    p = progress.engine_progress(run, resumed, now=60.0)
    assert p["steps_done"] == 9 and p["text"].startswith("final model")
    single = progress.engine_progress(run, resumed[:-1] + [_ev("stage_start", stage="single")], now=60.0)
    assert single["text"].startswith("single run")
    p = progress.engine_progress(run, resumed + [_ev("stage_end", stage="final"), _ev("pipeline_end")], now=60.0)
    assert p["fraction"] == 1.0
    # before stage 1's first trial: the feature cache's phase, rows done (it used to say "trial 0 / 4" for minutes)
    caching = [_ev("pipeline_start"), _ev("stage_start", stage="stage1"),
               _ev("phase", phase="caching features: 640 / 1,280 rows")]
    assert progress.engine_progress(run, caching, now=60.0)["text"].startswith(
        "stage1: caching features: 640 / 1,280 rows")
    first = caching + [_ev("phase", phase="stage 1: training heads"), _ev("trial", stage="stage1", number=0)]
    assert progress.engine_progress(run, first, now=60.0)["text"].startswith("stage1: trial 1 / 4")


def test_engine_progress_pbt_sums_its_members():
    run = {"kind": "pbt", "status": "running", "started": 0.0, "config": {"pbt": {"population": 2}}}
    members = [{"steps_done": 30, "total_steps": 100}, {"steps_done": 10, "total_steps": 100}]
    p = progress.engine_progress(run, [], members, now=40.0)
    assert p["fraction"] == pytest.approx(0.2) and p["eta_s"] == pytest.approx(40.0 / 40 * 160)
    assert p["text"].startswith("2 members · step 40 / 200")
    unknown = progress.engine_progress(run, [], [{"steps_done": 5, "total_steps": None}], now=40.0)
    assert unknown["fraction"] is None and unknown["eta_s"] is None


def test_run_progress_reads_pbt_members_from_the_tracker(home):
    from dact_lib.tracker import Tracker

    tr = Tracker(home)
    parent = tr.create_run("pbt", {"pbt": {"population": 2}}, status="running")
    for done in (20, 60):
        kid = tr.create_run("pbt-member", {"train": {}}, parent_id=parent, status="running")
        tr.log_event(kid, "start", {"steps": 80})
        tr.log_metrics(kid, {"train_loss": 1.0}, step=done)
    p = progress.run_progress(tr, tr.get_run(parent))
    assert p["steps_done"] == 80 and p["total_steps"] == 160 and p["fraction"] == pytest.approx(0.5)
    plain = tr.create_run("backbone", {"train": {}}, status="running")
    tr.log_event(plain, "start", {"steps": 10})
    tr.log_metrics(plain, {"train_loss": 1.0}, step=4)
    assert progress.run_progress(tr, tr.get_run(plain))["fraction"] == pytest.approx(0.4)


# ------------------------------------------------------------------------------------------------ λ Pareto


POINTS = [  # trial, λ, exit layer, accuracy
    FrontPoint(trial=0, front_lambda=1e-4, val_avg_exit_layer=5.5, val_accuracy=0.90, run_id=10, val_nll=0.3),
    FrontPoint(trial=1, front_lambda=1e-3, val_avg_exit_layer=4.0, val_accuracy=0.88, run_id=11, val_nll=0.35),
    FrontPoint(trial=2, front_lambda=1e-2, val_avg_exit_layer=4.5, val_accuracy=0.85, run_id=12),  # dominated by 1
    FrontPoint(trial=3, front_lambda=5e-2, val_avg_exit_layer=2.0, val_accuracy=0.70, run_id=13),
]


def test_front_mask():
    assert plots.front_mask(POINTS) == [True, True, False, True]


def test_lambda_pareto_figure_highlights_the_computed_front():
    fig = plots.lambda_pareto_figure(POINTS)
    trials, front = fig.data[0], fig.data[1]
    assert trials.name == "λ trials" and len(trials.x) == 4
    assert front.name == "Pareto front"
    assert list(front.x) == [2.0, 4.0, 5.5] and list(front.y) == [0.70, 0.88, 0.90]  # sorted by exit layer
    assert [list(c) for c in front.customdata] == [[3, 13], [1, 11], [0, 10]]
    # coloured by log10 λ
    assert list(trials.marker.color) == pytest.approx([-4, -3, -2, math.log10(5e-2)])
    assert "trial 1" in trials.hovertext[1] and "λ = 0.001" in trials.hovertext[1]


def test_lambda_pareto_figure_uses_a_given_front_and_marks_the_chosen_run():
    front = [POINTS[1], POINTS[2]]  # e.g. the pipeline's front on (NLL, exit layer)
    fig = plots.lambda_pareto_figure(POINTS, front, chosen_run_id=12)
    fr = next(t for t in fig.data if t.name == "Pareto front")
    assert sorted(c[0] for c in fr.customdata) == [1, 2]
    chosen = next(t for t in fig.data if t.name == "chosen")
    assert list(chosen.x) == [4.5]


def test_lambda_pareto_figure_error_only_points_and_empty():
    fig = plots.lambda_pareto_figure([FrontPoint.from_dict({"number": 4, "params": {"ponder_lambda": 0.01},
                                                            "val_error": 0.2, "avg_exit_layer": 3.0})])
    assert list(fig.data[0].y) == [pytest.approx(0.8)] and list(fig.data[0].x) == [3.0]
    assert not plots.lambda_pareto_figure([]).data


# ------------------------------------------------------------------------------------------------ exit policies


def test_exit_policy_figure_one_line_per_policy():
    rows = [{"policy": "dact", "value": None, "avg_exit_layer": 3.1, "accuracy": 0.86, "wall_s": 1.0}]
    rows += [{"policy": "fixed", "value": k, "avg_exit_layer": float(k), "accuracy": 0.7 + k / 50} for k in (3, 1, 2)]
    rows += [{"policy": "entropy", "value": s, "avg_exit_layer": 2 + s, "accuracy": 0.8} for s in (0.1, 0.5)]
    rows += [{"policy": "patience", "value": t, "avg_exit_layer": 2.0 + t, "accuracy": 0.85} for t in (1, 2)]
    fig = plots.exit_policy_figure(rows, num_layers=6)
    assert [t.name for t in fig.data] == ["DACT rule", "patience (PABEE)", "entropy (DeeBERT)", "fixed depth"]
    fixed = fig.data[3]
    assert list(fixed.x) == [1.0, 2.0, 3.0] and "lines" in fixed.mode
    assert fig.data[0].mode == "markers" and "speed-up 1.94×" in fig.data[0].hovertext[0]


# ------------------------------------------------------------------------------------------------ per-sample exits


def test_exit_histogram_counts_every_layer():
    fig = plots.exit_histogram([1, 1, 3, 6, 6, 6], num_layers=6)
    bar = fig.data[0]
    assert list(bar.x) == [1, 2, 3, 4, 5, 6] and list(bar.y) == [2, 0, 1, 0, 0, 3]


def test_accuracy_per_layer():
    df = pd.DataFrame({"exit_layer": [1, 1, 2, 6], "correct": [True, False, True, True]})
    bar = plots.accuracy_per_layer(df, 6).data[0]
    assert list(bar.x) == [1, 2, 6] and list(bar.y) == [0.5, 1.0, 1.0] and list(bar.customdata) == [2, 1, 1]


# ------------------------------------------------------------------------------------------------ PBT
# (fed with the records of a real run_pbt population and DACT pipeline: tests/records.py, built once per session)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    from records import engine_records

    return engine_records(tmp_path_factory)


def _population(rec):
    """The tracker, the members (id order), the parent's events and the members' own events of the records' PBT."""
    from dact_lib.tracker import Tracker

    tr = Tracker(rec.home)
    members = sorted(tr.list_runs(parent_id=rec.pbt), key=lambda m: m["id"])
    return tr, members, tr.get_events(rec.pbt), [e for m in members for e in tr.get_events(m["id"])]


def _exploits(events) -> list[dict]:
    return [e["payload"] for e in events if e["kind"] == "pbt_exploit"]


def _expected_edges(parent_events) -> list[tuple]:
    """(donor run, recipient run, step, copied, explored) of every exploit pbt.py logged on the parent run."""
    explored = {(e["payload"]["recipient_run_id"], e["payload"]["step"]): e["payload"]["new"]
                for e in parent_events if e["kind"] == "pbt_explore"}
    return [(x["donor_run_id"], x["recipient_run_id"], x["step"], x["new"], explored[(x["recipient_run_id"], x["step"])])
            for x in _exploits(parent_events)]


def test_exploit_edges_of_a_real_population_resolve_members_and_drop_duplicates(records):
    _, members, parent_ev, member_ev = _population(records)
    expected = _expected_edges(parent_ev)
    assert expected, "the tiny population exploited at least once"
    assert len(_exploits(member_ev)) == len(expected)  # pbt.py logs each exploit on the recipient's run too
    edges = plots.exploit_edges(parent_ev + member_ev, members)
    assert [(e["donor"], e["recipient"], e["step"], e["new"], e["explored"]) for e in edges] == expected
    assert [(e["score"], e["donor_score"]) for e in edges] == [(x["score"], x["donor_score"])
                                                              for x in _exploits(parent_ev)]
    # an older layout names members by their index only: the same edges
    by_index = [{**e, "payload": {k: v for k, v in e["payload"].items() if not k.endswith("_run_id")}}
                for e in parent_ev]
    assert [(e["donor"], e["recipient"], e["step"]) for e in plots.exploit_edges(by_index, members)] == [
        t[:3] for t in expected]


def test_lineage_figure_of_a_real_population_rows_and_arrows(records):
    tr, members, parent_ev, member_ev = _population(records)
    ids = [m["id"] for m in members]
    last = tr.last_steps(ids)
    fig = plots.lineage_figure(members, parent_ev + member_ev, last)
    assert list(fig.layout.yaxis.ticktext) == [f"{m['name']} (#{m['id']})" for m in members]
    row = {rid: i for i, rid in enumerate(ids)}
    expected = _expected_edges(parent_ev)
    arrows = [(a.x, a.y, a.ay) for a in fig.layout.annotations]  # at the step, from the donor's row to the recipient's
    assert arrows == [(step, row[recipient], row[donor]) for donor, recipient, step, *_ in expected]
    marks = next(t for t in fig.data if t.name == "exploit / explore")
    assert list(marks.x) == [step for _, _, step, *_ in expected]
    lines = [t for t in fig.data if t.name != "exploit / explore"]
    assert [t.x[1] for t in lines] == [last[rid] for rid in ids]  # each member's row ends at its last step
    unnamed = plots.lineage_figure([{**m, "name": None} for m in members], parent_ev, last)
    assert list(unnamed.layout.yaxis.ticktext) == [f"member {i} (#{rid})" for i, rid in enumerate(ids)]


def test_hp_trajectories_of_a_real_population_follow_the_logged_values(records):
    tr, members, _, _ = _population(records)
    ids = [m["id"] for m in members]
    metrics = tr.get_metrics(ids)
    fig = plots.hp_trajectories(metrics, members)
    logged = sorted({n for n in metrics["name"] if n.startswith("hp/")})
    assert set(plots.HP_NAMES) <= set(logged)  # the explored ones (pbt.py logs the batch size too)
    rows = list(plots.HP_NAMES) + [n for n in logged if n not in plots.HP_NAMES]
    assert len(fig.data) == len(rows) * len(members) and all(t.line.shape == "hv" for t in fig.data)
    assert [a.text for a in fig.layout.annotations] == rows  # one row per hyperparameter
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis3.type != "log"  # lr (log), dropout (linear)
    labels = [f"{m['name']} (#{m['id']})" for m in members]
    lr = [t for t in fig.data if t.yaxis == "y"]
    assert [t.name for t in lr] == labels
    for t, rid in zip(lr, ids):  # one value per step: the last one logged
        want = metrics[(metrics.run_id == rid) & (metrics.name == "hp/lr")].drop_duplicates("step", keep="last")
        want = want.sort_values("step", kind="stable")
        assert list(t.x) == list(want["step"]) and list(t.y) == pytest.approx(list(want["value"]))
    assert not plots.hp_trajectories(metrics.iloc[0:0], members).data


def test_pbt_member_curves_of_a_real_population(records):
    tr, members, _, _ = _population(records)
    ids = [m["id"] for m in members]
    metrics = tr.get_metrics(ids)
    fig = plots.pbt_member_curves(metrics, members, "val_loss")
    assert [t.name for t in fig.data] == [f"{m['name']} (#{m['id']})" for m in members]
    for t, rid in zip(fig.data, ids):
        want = metrics[(metrics.run_id == rid) & (metrics.name == "val_loss")].drop_duplicates("step", keep="last")
        assert list(t.x) == sorted(want["step"]) and len(t.x) >= 2
        assert list(t.y) == pytest.approx(list(want.sort_values("step", kind="stable")["value"]))


# ------------------------------------------------------------------------------------------------ pipeline records


def _pipeline(home, rec):
    from dact_lib.tracker import Tracker

    tr = Tracker(home)
    return tr, tr.get_run(rec.pipeline), tr.get_events(rec.pipeline)


def _stage3_complete(home):
    import optuna

    from dact_lib.home import optuna_storage_url

    study = optuna.load_study(study_name="pipe/stage3", storage=optuna_storage_url(home))
    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def test_pipeline_view_of_a_real_pipeline_reads_its_events_and_summary(records):
    _, run, events = _pipeline(records.home, records)
    summary = run["summary"]
    view = pipeline_view(run, events)
    trials = _stage3_complete(records.home)
    assert {e["payload"]["stage"] for e in events if e["kind"] == "trial"} == {"stage1", "stage2", "stage3"}
    assert [p.trial for p in view["trials"]] == [t.number for t in trials]  # stage 3 only
    for p, t in zip(view["trials"], trials):
        assert p.front_lambda == pytest.approx(t.params["front_lambda"])
        assert p.val_avg_exit_layer == pytest.approx(t.user_attrs["val_avg_exit_layer"]) == pytest.approx(t.values[1])
        assert p.val_accuracy == pytest.approx(t.user_attrs["val_accuracy"])
        assert p.val_error == pytest.approx(1 - t.user_attrs["val_accuracy"])
        assert p.run_id == t.user_attrs["run_id"] and p.halting_file == t.user_attrs["halting_file"]
    assert [p.trial for p in view["front"]] == [p["trial"] for p in summary["front"]]
    assert view["pipeline_choice"].trial == summary["chosen"]["trial"]
    sweep_event = [e["payload"] for e in events if e["kind"] == "exit_policy_sweep"][-1]
    assert view["sweep"] == summary["exit_policy_sweep"] and view["num_layers"] == sweep_event["num_layers"] == 2
    assert view["final_run_id"] == summary["final_run_id"] == records.pipeline_final
    assert view["fitted"] is True  # stage 3 fitted halting units on one model: points carry halting files
    assert view["chosen_run_id"] is None and view["user_choice"] is None
    assert prediction_trial(view, records.pipeline_final) == summary["chosen"]["trial"]

    # a stage-3 trial that did not complete is no point
    first = next(i for i, e in enumerate(events) if e["kind"] == "trial" and e["payload"]["stage"] == "stage3")
    pruned = list(events)
    pruned[first] = {**events[first], "payload": {**events[first]["payload"], "state": "pruned"}}
    assert [p.trial for p in pipeline_view(run, pruned)["trials"]] == [t.number for t in trials[1:]]


def test_pipeline_view_after_choices_on_the_explorer(records, tmp_path):
    from dact_lib.tuning.dact_pipeline import choose_for_prediction
    from records import copy_home

    h = copy_home(records, tmp_path / "home")
    tr, run, _ = _pipeline(h, records)
    rule, final = run["summary"]["chosen"], run["summary"]["final_run_id"]
    point = next(FrontPoint.from_dict(p) for p in run["summary"]["front"] if p["trial"] != rule["trial"])
    choose_for_prediction(records.pipeline, point, tracker=tr)
    view = pipeline_view(tr.get_run(records.pipeline), tr.get_events(records.pipeline))
    assert view["chosen_run_id"] == final and view["user_choice"]["trial"] == point.trial
    assert prediction_trial(view, final) == point.trial
    assert prediction_trial(view, view["trials"][0].run_id) is None  # not the final model
    assert chosen_prediction_run(tr) == chosen_prediction_run(tr, records.pipeline) == final
    # choosing the pipeline's own point again: no user choice any more
    choose_for_prediction(records.pipeline, FrontPoint.from_dict(rule), tracker=tr)
    view = pipeline_view(tr.get_run(records.pipeline), tr.get_events(records.pipeline))
    assert view["user_choice"] is None and prediction_trial(view, final) == rule["trial"]


def test_lambda_pareto_figure_of_a_real_pipeline_draws_each_trial_once(records):
    _, run, events = _pipeline(records.home, records)
    view = pipeline_view(run, events)
    fig = plots.lambda_pareto_figure(view["trials"], view["front"], pipeline_trial=view["pipeline_choice"].trial)
    trials, front = fig.data[0], fig.data[1]
    assert sorted(cd[0] for cd in trials.customdata) == [t.number for t in _stage3_complete(records.home)]
    assert [cd[0] for cd in front.customdata] == [p.trial for p in sorted(
        view["front"], key=lambda p: p.val_avg_exit_layer)]


def test_chosen_prediction_run(tmp_path):
    from dact_lib.tracker import Tracker

    tr = Tracker(tmp_path)
    assert chosen_prediction_run(tr) is None
    p1 = tr.create_run("dact-pipeline", {})
    p2 = tr.create_run("dact-pipeline", {})
    tr.log_event(p1, "chosen", {"run_id": 3})
    tr.log_event(p2, "chosen", {"run_id": 4})
    tr.log_event(p1, "chosen", {"run_id": 5})
    assert chosen_prediction_run(tr) == 5
    assert chosen_prediction_run(tr, p2) == 4


def test_ema_smoothing_is_debiased_and_exact():
    import numpy as np

    from dact_lib.plots import ema

    v = np.array([1.0, 0.0, 0.0])
    # s1 = 0.5·0 + 0.5·1 = 0.5 → /0.5 = 1; s2 = 0.25 → /0.75 = 1/3; s3 = 0.125 → /0.875 = 1/7
    assert np.allclose(ema(v, 0.5), [1.0, 1 / 3, 1 / 7])
    assert np.array_equal(ema(v, 0.0), v)


def test_config_diff_keeps_only_differing_settings():
    from dact_lib.plots import config_diff

    a = {"train": {"epochs": 2, "lr": 1e-3}, "kind": "dact"}
    b = {"train": {"epochs": 3, "lr": 1e-3}, "kind": "dact", "tag": "x"}
    diff = config_diff({1: a, 2: b})
    assert diff.to_dict("records") == [{"setting": "tag", "run 1": "null", "run 2": '"x"'},
                                       {"setting": "train.epochs", "run 1": "2", "run 2": "3"}]


def test_curves_x_axis_step_epoch_or_wall_time():
    """The x axis: steps; fractional epochs (steps / steps per epoch, or read off the logged epoch metric);
    minutes since the run's first row (interpolated between logged steps)."""
    import numpy as np

    rows = []
    for step, t in ((10, 1000.0), (20, 1030.0), (40, 1090.0)):
        rows.append({"run_id": 1, "step": step, "epoch": 0, "name": "train_loss", "value": 1.0 / step, "time": t})
    rows += [{"run_id": 1, "step": 20, "epoch": 0, "name": "epoch", "value": 1.0, "time": 1030.0},
             {"run_id": 1, "step": 40, "epoch": 1, "name": "epoch", "value": 2.0, "time": 1090.0}]
    df = pd.DataFrame(rows)
    by_step = plots.curves_figure(df)
    assert list(by_step.data[0].x) == [10, 20, 40] and by_step.layout.xaxis.title.text == "step"
    by_epoch = plots.curves_figure(df, x_axis="epoch", steps_per_epoch={1: 20})
    assert np.allclose(by_epoch.data[0].x, [0.5, 1.0, 2.0]) and by_epoch.layout.xaxis.title.text == "epoch"
    read_off = plots.curves_figure(df, x_axis="epoch")  # no steps per epoch: the logged epoch metric
    assert np.allclose(read_off.data[0].x, [1.0, 1.0, 2.0])
    by_time = plots.curves_figure(df, x_axis="time")
    assert np.allclose(by_time.data[0].x, [0.0, 0.5, 1.5]) and by_time.layout.xaxis.title.text.startswith("minutes")
    with pytest.raises(ValueError, match="x axis 'bogus'"):
        plots.curves_figure(df, x_axis="bogus")


def _run(rid, seed, lr, acc, kind="backbone"):
    return {"id": rid, "kind": kind, "config": {"kind": kind, "name": f"r{rid}", "train": {"seed": seed, "encoder_lr": lr,
            "epochs": 3}, "data": {"split_seed": 0}}, "summary": {"best": {"val_accuracy": acc, "val_loss": 1 - acc}}}


def test_compare_table_keeps_only_differing_settings_and_the_results():
    runs = [_run(1, 0, 1e-5, 0.8), _run(2, 1, 1e-5, 0.82), _run(3, 0, 5e-5, 0.9)]
    t = plots.compare_table(runs)
    assert list(t.columns) == ["run", "train.encoder_lr", "train.seed", "val_accuracy", "val_loss"]
    assert t["train.encoder_lr"].tolist() == [1e-5, 1e-5, 5e-5] and t["val_accuracy"].tolist() == [0.8, 0.82, 0.9]
    fig = plots.parallel_coordinates_figure(t)
    (pc,) = fig.data
    assert [d.label for d in pc.dimensions] == ["train.encoder_lr", "train.seed", "val_accuracy", "val_loss"]
    assert list(pc.line.color) == [0.8, 0.82, 0.9]
    cats = plots.parallel_coordinates_figure(pd.DataFrame({"run": [1, 2], "model.pooling": ["mean", "cls"]}))
    assert list(cats.data[0].dimensions[0].ticktext) == ["cls", "mean"] and list(cats.data[0].dimensions[0].values) == [1, 0]
    assert not plots.parallel_coordinates_figure(t.head(1)).data  # one run: the empty state


def test_parallel_coordinates_of_pbt_members_show_where_explore_left_them():
    """PBT members start from the same config; exploit / explore change their hyperparameters, which are logged
    as hp/... metrics: the compare table (and its parallel coordinates) shows their last values."""
    members = [_run(5, 0, 1e-5, 0.7), _run(6, 0, 1e-5, 0.75)]
    df = pd.DataFrame([{"run_id": rid, "step": s, "epoch": 0, "name": n, "value": v, "time": 0.0}
                       for rid, n, s, v in ((5, "hp/lr", 10, 1e-5), (5, "hp/lr", 20, 1.2e-5), (6, "hp/lr", 10, 1e-5),
                                            (6, "hp/lr", 30, 0.8e-5), (6, "hp/dropout", 30, 0.12),
                                            (6, "val_accuracy", 30, 0.75))])
    latest = plots.latest_values(df)
    assert latest == {5: {"hp/lr": 1.2e-5}, 6: {"hp/lr": 0.8e-5, "hp/dropout": 0.12}}
    t = plots.compare_table(members, latest)
    assert t["hp/lr (last)"].tolist() == [1.2e-5, 0.8e-5]  # the config alone has 1e-5 for both: no axis at all
    assert "train.encoder_lr" not in t.columns
    labels = [d.label for d in plots.parallel_coordinates_figure(t).data[0].dimensions]
    assert "hp/lr (last)" in labels and "hp/dropout (last)" in labels
    assert plots.latest_values(df.iloc[0:0]) == {}


def test_seed_groups_and_their_mean_and_spread():
    runs = [_run(1, 0, 1e-5, 0.8), _run(2, 1, 1e-5, 0.82), _run(3, 0, 5e-5, 0.9), _run(4, 0, 1e-5, 0.7, kind="dact")]
    groups = plots.seed_groups(runs)
    assert groups == {"#1 ×2": [1, 2], "#3 ×1": [3], "#4 ×1": [4]}  # seeds ignored; kind and lr are not
    df = pd.DataFrame([{"run_id": rid, "step": s, "epoch": 0, "name": "val_accuracy", "value": v, "time": 0.0}
                       for rid, vals in ((1, (0.5, 0.7)), (2, (0.7, 0.9))) for s, v in zip((10, 20), vals)])
    fig = plots.grouped_curves_figure(df, {"#1 ×2": [1, 2]}, ["val_accuracy"])
    high, low, mean = fig.data
    assert list(mean.x) == [10, 20] and np.allclose(mean.y, [0.6, 0.8])
    assert np.allclose(low.y, [0.5, 0.7]) and np.allclose(high.y, [0.7, 0.9]) and mean.name == "#1 ×2 (n=2)"


def test_curves_per_task_small_multiples():
    rows = [{"run_id": 1, "step": s, "epoch": 0, "name": n, "value": 0.5, "time": 0.0} for s in (1, 2)
            for n in ("val_loss", "val_accuracy", "val_accuracy/class_label", "val_macro_f1/class_label",
                      "val_accuracy/sentiment_label")]
    df = pd.DataFrame(rows)
    one = plots.curves_figure(df)
    assert [a.text for a in one.layout.annotations] == ["loss", "validation accuracy · macro-F1"]
    split = plots.curves_figure(df, per_task=True)
    assert [a.text for a in split.layout.annotations] == [
        "loss", "validation accuracy", "class_label: accuracy · macro-F1",
        "sentiment_label: accuracy · macro-F1"]
    axis_of = {t.name: t.xaxis for t in split.data}
    assert axis_of["val_accuracy/class_label"] == axis_of["val_macro_f1/class_label"] == "x3"
    assert axis_of["val_accuracy/sentiment_label"] == "x4" and axis_of["val_accuracy"] == "x2"


def test_score_panel_title_names_what_it_draws():
    """Issue 28: the panel titled "validation accuracy · macro-F1" drew train_accuracy."""
    def titles(names):
        df = pd.DataFrame([{"run_id": 1, "step": s, "epoch": 0, "name": n, "value": 0.5, "time": 0.0}
                           for s in (1, 2) for n in ("train_loss", *names)])
        return [a.text for a in plots.curves_figure(df).layout.annotations]

    assert titles(["train_accuracy", "val_accuracy", "val_macro_f1"]) == ["loss", "train · validation accuracy · "
                                                                          "macro-F1"]
    assert titles(["train_accuracy"]) == ["loss", "train accuracy"]
    assert titles(["val_accuracy", "val_macro_f1"]) == ["loss", "validation accuracy · macro-F1"]


def test_steps_per_epoch_from_the_start_event_or_the_plan():
    run = {"config": {"train": {"epochs": 3, "max_steps": None}}}
    assert progress.steps_per_epoch(run, [{"kind": "start", "payload": {"steps": 60, "steps_per_epoch": 21}}]) == 21
    assert progress.steps_per_epoch(run, [{"kind": "start", "payload": {"steps": 60}}]) == 20  # an older run
    capped = {"config": {"train": {"epochs": 3, "max_steps": 50}}}
    assert progress.steps_per_epoch(capped, [{"kind": "start", "payload": {"steps": 50}}]) is None
    assert progress.steps_per_epoch(run, []) is None


def test_trace_figure_keeps_the_legend_off_the_exit_label():
    """Bug: the Predict trace's "exit at layer n" label sat under its legend (both at the top right)."""
    res = {"label": "pos", "exit_layer": 2, "num_layers": 3,
           "layers": [{"layer": n, "y": {"pos": 0.5 + 0.1 * n}, "h": 0.9 - 0.3 * n, "p": 0.5 ** n}
                      for n in (1, 2, 3)]}
    fig = plots.trace_figure(res)
    assert [t.name for t in fig.data] == ["yₙ: p(pos)", "hₙ go on", "pₙ = h₁⋯hₙ"]
    assert list(fig.data[0].y) == pytest.approx([0.6, 0.7, 0.8]) and list(fig.data[2].y) == [0.5, 0.25, 0.125]
    [note] = fig.layout.annotations
    assert note.text == "exit at layer 2 of 3" and note.x == 2
    # the legend is laid out below the plotting area (paper y < 0), the label inside it (top): no overlap
    assert fig.layout.legend.orientation == "h" and fig.layout.legend.y < 0 and fig.layout.legend.yanchor == "top"
    assert note.y >= 0.9 and note.xanchor == "left"  # layer 2 of 3: the label runs to the right of the line
    late = plots.trace_figure({**res, "exit_layer": 3})
    assert late.layout.annotations[0].xanchor == "right"  # the last layer: to the left, inside the plot
