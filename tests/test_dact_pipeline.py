"""The staged DACT tuning pipeline (dact_lib/tuning/dact_pipeline/) on the tiny encoder and 240 easy rows."""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import optuna
import pytest
import torch

from dact_lib import home as home_mod
from dact_lib.callbacks import Callback, CancelToken
from dact_lib.config import default_config
from dact_lib.data import load_demo_dataset, read_csv
from dact_lib.errors import Cancelled, ConfigError, DactLabError
from dact_lib.front import FrontPoint
from dact_lib.features import cached_features
from dact_lib.models import build_model, load_model
from dact_lib.modeling_dact import DactBert
from dact_lib.tracker import Tracker
from dact_lib.tuning.dact_pipeline import (FeatureDactHeads, PipelineConfig, PipelineGuardError, apply_choice_rule,
                                           as_dact_config, choose_point, load_pipeline_result, model_from_params,
                                           run_pipeline, train_from_params, trial_points)
from easydata import easy_csv

optuna.logging.set_verbosity(optuna.logging.WARNING)


EASY_DIR = Path(tempfile.mkdtemp(prefix="dact_easy_"))
EASY_CSV = easy_csv(EASY_DIR / "easy.csv", n=240)  # a set the tiny encoder learns: the guards let it through


def tiny_cfg(path=EASY_CSV):
    cfg = default_config("dact", encoder="tiny")
    cfg.data.path = str(path)
    cfg.data.val_frac, cfg.data.test_frac = 0.2, 0.2
    cfg.data.max_seq_len = 32
    cfg.train.device = "cpu"
    cfg.train.log_every_steps = 2
    return cfg.validate()


def tiny_pipe(name, trials=(3, 2, 3), **kw):
    # the random tiny encoder needs more steps and a larger head lr than a pretrained one to learn in a test
    # single_run off: these tests read stage 3's point as the final model (the single-run candidate has its own)
    kw = {"stage1_epochs": 15, "epochs_range": (1, 2), "batch_sizes": (16, 32), "min_steps": 80,
          "head_lr_range": (2e-3, 6e-3), "single_run": False, **kw}
    return PipelineConfig(name=name, trials_stage1=trials[0], trials_stage2=trials[1], trials_stage3=trials[2],
                          **kw).validate()


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """One full pipeline run shared by the read-only checks below."""
    h = tmp_path_factory.mktemp("pipeline_home")
    mp = pytest.MonkeyPatch()
    mp.setenv("DACT_LAB_CACHE", str(h / "cache"))  # a private feature cache: stage 1 is a miss, deterministically
    try:
        # one head shared by the layers: the random tiny encoder's layer 1 then learns enough in 240 rows to exit
        res = run_pipeline(tiny_cfg(), pipeline=tiny_pipe("demo-pipe", trials=(3, 2, 14), search_share_weights=True),
                           home=h)
        yield h, res
    finally:
        mp.undo()


def children(tracker, parent):
    return tracker.list_runs(parent_id=parent)


# --- the exit rules of the DACT spec, written out per row in plain Python (independent of dact_lib.dact) ----------

def spec_dact_exit(y, h):
    """(exit layer 1..N, answer a_n) of one row under the DACT rule: a_n = p_{n-1} y_n + (1 - p_{n-1}) a_{n-1},
    p_n = h_n p_{n-1} (a_0 = 0, p_0 = 1); halt at the first n with best(a_n) (1 - p_n)^d > runner-up(a_n) + p_n d,
    d = N - n (d = 0 always halts)."""
    N, a, p = len(y), [0.0] * len(y[0]), 1.0
    for n in range(1, N + 1):
        a = [p * yk + (1.0 - p) * ak for yk, ak in zip(y[n - 1], a)]
        p = h[n - 1] * p
        d = N - n
        best, runner = sorted(a, reverse=True)[:2]
        if d == 0 or best * (1.0 - p) ** d > runner + p * d:
            return n, a
    raise AssertionError("unreachable")


def spec_policy_exit(name, value, y, h):
    """(exit layer, answer) of one row under a policy: 'dact' (above), 'entropy' (the first n with H(y_n) < S nats),
    'patience' (t consecutive layers whose argmax y_n equals the previous layer's), 'fixed' (layer k); the last
    layer always halts; the answer is y_n except for 'dact' (a_n)."""
    import math

    N = len(y)
    if name == "dact":
        return spec_dact_exit(y, h)
    if name == "fixed":
        return value, y[value - 1]
    prev, count = None, 0
    for n in range(1, N + 1):
        yn = y[n - 1]
        if name == "entropy" and -sum(v * math.log(v) for v in yn if v > 0) < value:
            return n, yn
        if name == "patience":
            arg = max(range(len(yn)), key=yn.__getitem__)
            count = count + 1 if arg == prev else 0
            prev = arg
            if count >= value:
                return n, yn
    return N, y[N - 1]


@torch.no_grad()
def layer_outputs(model, tokenizer, ds):
    """Every layer's y_n [B][N][K] and h_n [B][N] (the model run to the end, eval mode) and the targets, as lists."""
    from dact_lib.data import encode, iter_batches

    model.eval()
    enc = encode(ds, tokenizer, 32)
    y = [None] * len(enc)
    h = [None] * len(enc)
    for batch in iter_batches(enc, 64, shuffle=False):
        out = model(batch["input_ids"], batch["attention_mask"]).extras
        for i, yi, hi in zip(batch["index"].tolist(), out["y"].double().tolist(), out["h"].double().tolist()):
            y[i], h[i] = yi, hi
    return y, h, [int(t) for t in ds.targets[model.task]]


def spec_metrics(name, value, y, h, targets):
    """(per-row exit layers, average exit layer, accuracy) of a policy, from :func:`spec_policy_exit`."""
    rows = [spec_policy_exit(name, value, yi, hi) for yi, hi in zip(y, h)]
    exits = [n for n, _ in rows]
    right = [max(range(len(a)), key=a.__getitem__) == t for (_, a), t in zip(rows, targets)]
    return exits, sum(exits) / len(exits), sum(right) / len(right)


def val_split():
    from dact_lib.data import split_dataset

    d = tiny_cfg().data
    return split_dataset(read_csv(d.path), val_frac=d.val_frac, test_frac=d.test_frac, seed=d.split_seed).val


def final_model_with(h, res, halting_file):
    """The pipeline's final run with the halting units of one stage-3 trial (a file under the home)."""
    from safetensors.torch import load_file

    loaded = load_model(res.final_run_id, home=h, device="cpu")
    loaded.model.halters.load_state_dict(load_file(str(h / halting_file)))
    return loaded


# --- a full run ------------------------------------------------------------------------------------------------

def test_parent_run_events_metrics_and_stage_files(done):
    h, res = done
    tr = Tracker(h)
    parent = tr.get_run(res.parent_run_id)
    assert parent["kind"] == "dact-pipeline" and parent["name"] == "demo-pipe" and parent["status"] == "finished"
    assert parent["config"]["pipeline"]["name"] == "demo-pipe" and parent["config"]["run"]["kind"] == "dact"
    events = tr.get_events(res.parent_run_id)
    starts = [e["payload"]["stage"] for e in events if e["kind"] == "stage_start"]
    ends = [e["payload"]["stage"] for e in events if e["kind"] == "stage_end"]
    assert starts == ends == ["stage1", "stage2", "stage3", "single", "final"]
    feat = [e["payload"] for e in events if e["kind"] == "stage1_features"]
    assert len(feat) == 1 and feat[0]["used_cached_features"] is True and feat[0]["cache_hit"] is False
    assert feat[0]["build_s"] > 0 and set(feat[0]["keys"]) == {"train", "val"}
    assert set(feat[0]["keys"]["train"]) == {"cls", "mean"} and "cached" in feat[0]["message"]
    # the feature cache reports its phase and rows done (Runs shows it before stage 1's first trial)
    phases = [e["payload"] for e in events if e["kind"] == "phase"]
    assert phases[0]["phase"].startswith("caching features of") and phases[0]["rows_done"] == 0
    rows = phases[0]["rows"]
    done = [p["rows_done"] for p in phases if "rows_done" in p]
    assert done == sorted(done) and done[-1] == rows and 2 <= len(done) <= 12
    assert phases[-1]["phase"] == "stage 1: training heads on the cached features"
    trials = [e["payload"] for e in events if e["kind"] == "trial"]
    assert [sum(t["stage"] == s for t in trials) for s in ("stage1", "stage2", "stage3")] == [3, 2, 14]
    m = tr.get_metrics(res.parent_run_id)
    assert sorted(m[m.name == "stage1_value"]["step"]) == [0, 1, 2]
    assert len(m[m.name == "stage3_avg_exit_layer"]) == 14
    rd = tr.run_dir(res.parent_run_id)
    for stage in ("stage1", "stage2", "stage3", "final"):
        saved = json.loads((rd / f"{stage}.json").read_text())
        assert saved["stage"] == stage
    assert json.loads((rd / "stage1.json").read_text())["best_params"] == res.stage_best["stage1"]
    summary = parent["summary"]
    assert summary["final_run_id"] == res.final_run_id and FrontPoint.from_dict(summary["chosen"]) == res.chosen
    assert [FrontPoint.from_dict(p) for p in summary["front"]] == res.pareto
    assert summary["stages_done"] == ["stage1", "stage2", "stage3", "single", "final"]
    assert summary["feature_cache"]["used_cached_features"] is True
    sweep = summary["exit_policy_sweep"]
    assert {r["policy"] for r in sweep} == {"dact", "patience", "entropy", "fixed"}
    assert all(r["latency_ms_p50"] > 0 and r["latency_rows"] >= 1 for r in sweep)  # timed, interleaved per sentence
    # every row is what the rule computes on the final model's own per-layer outputs (validation split)
    loaded = final_model_with(h, res, res.chosen.halting_file)
    y, hh, targets = layer_outputs(loaded.model, loaded.tokenizer, val_split())
    for r in sweep:
        _, avg, acc = spec_metrics(r["policy"], r["value"], y, hh, targets)
        assert (r["avg_exit_layer"], r["accuracy"]) == (pytest.approx(avg, abs=1e-6), pytest.approx(acc, abs=1e-6)), r
    fixed = {r["value"]: r["avg_exit_layer"] for r in sweep if r["policy"] == "fixed"}
    assert fixed == {1: 1.0, 2: 2.0}
    assert len({round(r["avg_exit_layer"], 6) for r in sweep}) >= 3  # the policies do not all exit alike
    assert any(e["kind"] == "exit_policy_sweep" for e in events)


def test_stage3_fits_halting_points_on_the_best_stage2_model(done):
    h, res = done
    study = optuna.load_study(study_name="demo-pipe/stage3", storage=home_mod.optuna_storage_url(h))
    assert len(study.directions) == 2 and study.metric_names == ["val_nll", "val_avg_exit_layer"]
    trials = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert len(trials) == 14
    # 12 fitted λ log-spaced over [0.01, 10], then the first threshold units of the τ grid
    assert [t.params["halting"] for t in trials] == ["fitted"] * 12 + ["threshold"] * 2
    assert [t.params["tau"] for t in trials[12:]] == [0.1, 0.2]
    tr = Tracker(h)
    trunk = json.loads((tr.run_dir(res.parent_run_id) / "stage2.json").read_text())["best_run_id"]
    assert study.user_attrs["trunk_run_id"] == trunk
    # the 12 λ: log-spaced from 0.01 to 10 (4 significant digits)
    assert [t.params["front_lambda"] for t in trials[:12]] == \
        [float(f"{10 ** (-2 + 3 * i / 11):.4g}") for i in range(12)]
    val = val_split()
    for t in trials:
        assert t.user_attrs["run_id"] == trunk  # one trained model: every point is its weights + a halting file
        assert (h / t.user_attrs["halting_file"]).is_file()
        # each trial's recorded exits and accuracy: the DACT rule, per row, on that model with that halting file
        loaded = final_model_with(h, res, t.user_attrs["halting_file"])
        y, hh, targets = layer_outputs(loaded.model, loaded.tokenizer, val)
        _, avg, acc = spec_metrics("dact", None, y, hh, targets)
        # a fitted point's objectives are cross-fitted (out of fold); on the rows it was fitted on, as reloaded:
        seen = "seen_" if t.user_attrs.get("cross_fitted") else ""
        assert t.user_attrs["cross_fitted"] == (t.params["halting"] == "fitted")  # 48 validation rows: 2 folds
        assert t.user_attrs[f"{seen}val_avg_exit_layer"] == pytest.approx(avg, abs=1e-6)
        assert t.user_attrs[f"{seen}val_accuracy"] == pytest.approx(acc, abs=1e-6)
        assert t.user_attrs["val_avg_exit_layer"] == t.values[1]
        if t.params["halting"] == "fitted":
            n_ref, N = study.user_attrs["nll_ref"], study.user_attrs["num_layers"]
            assert t.user_attrs["train_lambda"] == pytest.approx(t.params["front_lambda"] * n_ref / N)
        else:
            assert t.user_attrs["train_lambda"] is None
    exits = sorted({round(t.user_attrs["val_avg_exit_layer"], 6) for t in trials})
    assert len(exits) >= 2 and exits[0] < 1.5  # real early exits: the trials differ, some exit mostly at layer 1
    assert sorted(p.trial for p in res.pareto) == sorted(t.number for t in study.best_trials)
    assert res.study_names == {"stage1": "demo-pipe/stage1", "stage2": "demo-pipe/stage2",
                               "stage3": "demo-pipe/stage3"}
    s1 = optuna.load_study(study_name="demo-pipe/stage1", storage=home_mod.optuna_storage_url(h))
    assert len(s1.trials) == 3 and len(s1.directions) == 1
    # stages 1 and 3 train no run: the child runs are the 2 stage-2 trials and the final run
    assert sorted(r["tag"] for r in children(tr, res.parent_run_id)) == ["final"] + ["stage2"] * 2
    # only the best stage-2 trial keeps its weights
    kept = [r["id"] for r in children(tr, res.parent_run_id) if r["tag"] == "stage2"
            and (tr.run_dir(r["id"]) / "model.safetensors").is_file()]
    assert kept == [trunk]


def test_every_stage3_point_reloads_as_a_model_that_reproduces_it(done):
    """Each front point = the final run + that point's halting file: chosen, reloaded, evaluated on the validation
    split, it gives the recorded accuracy and average exit layer."""
    from dact_lib.data import encode, split_dataset
    from dact_lib.evaluate import evaluate_encoded, metrics_of
    from dact_lib.tuning.dact_pipeline import choose_for_prediction

    h, res = done
    tr = Tracker(h)
    cfg = tiny_cfg()
    d = cfg.data
    val = split_dataset(read_csv(d.path), val_frac=d.val_frac, test_frac=d.test_frac, seed=d.split_seed).val
    try:
        for p in res.pareto:
            choose_for_prediction(res.parent_run_id, p, tracker=tr)
            loaded = load_model(res.final_run_id, home=h, device="cpu")
            ev = evaluate_encoded(loaded.model, encode(val, loaded.tokenizer, 32))
            m = metrics_of(ev, "val_")
            seen = "seen_" if p.cross_fitted else ""  # a fitted point's own numbers are out of fold
            assert m["val_accuracy"] == pytest.approx(getattr(p, f"{seen}val_accuracy"), abs=1e-6)
            assert m["val_avg_exit_layer"] == pytest.approx(getattr(p, f"{seen}val_avg_exit_layer"), abs=1e-6)
            # row by row, the exits are the DACT rule's on the reloaded model's per-layer outputs
            y, hh, targets = layer_outputs(loaded.model, loaded.tokenizer, val)
            assert ev.exit_layer.tolist() == spec_metrics("dact", None, y, hh, targets)[0]
        assert min(p.val_avg_exit_layer for p in res.pareto) < 1.5  # the front holds points that exit early
    finally:
        choose_for_prediction(res.parent_run_id, res.chosen, tracker=tr)


def test_chosen_point_obeys_the_rule(done):
    h, res = done
    front = res.pareto
    study = optuna.load_study(study_name="demo-pipe/stage3", storage=home_mod.optuna_storage_url(h))
    trials = trial_points(study)  # the rule measures from the most accurate trial, on or off the NLL front
    assert front and res.chosen.trial in {p.trial for p in trials}
    assert res.chosen.run_id == res.final_run_id  # after the final stage, every point is the final run
    best_acc = max(p.val_accuracy for p in trials)
    ok = [p for p in trials if p.val_accuracy >= best_acc - 0.01]
    assert res.chosen.val_avg_exit_layer == min(p.val_avg_exit_layer for p in ok)
    assert res.stage_best["stage3"] == {"front_lambda": res.chosen.front_lambda}  # not the training λ's name
    # a user picks a front point later
    other = choose_point(res.parent_run_id, front[-1].trial, home=h)
    want = {"halting": "fitted", "front_lambda": front[-1].front_lambda} if front[-1].front_lambda is not None else \
        {"halting": "threshold", "tau": front[-1].threshold}
    assert other.params == want
    assert other.run_id == front[-1].run_id
    assert Tracker(h).get_events(res.parent_run_id, kinds=["point_chosen"])
    study = optuna.load_study(study_name="demo-pipe/stage3", storage=home_mod.optuna_storage_url(h))
    off_front = [t.number for t in study.trials if t.number not in {p.trial for p in front}]
    if off_front:
        with pytest.raises(DactLabError, match="not on the Pareto front"):
            choose_point(study, off_front[0])


def test_choose_for_prediction_records_the_users_choice_next_to_the_pipelines(done):
    from safetensors.torch import load_file

    from dact_lib.tuning.dact_pipeline.view import chosen_prediction_run, pipeline_view
    from dact_lib.models import halting_choice
    from dact_lib.tuning.dact_pipeline import choose_for_prediction

    h, res = done
    tr = Tracker(h)
    other = [p for p in res.pareto if p.trial != res.chosen.trial] or \
        [p for p in trial_points(optuna.load_study(study_name="demo-pipe/stage3",
                                                   storage=home_mod.optuna_storage_url(h)))
         if p.trial != res.chosen.trial]
    point = other[0]
    rule_before = tr.get_run(res.parent_run_id)["summary"]["chosen"]
    got = choose_for_prediction(res.parent_run_id, point, tracker=tr)
    try:
        assert got["run_id"] == res.final_run_id and got["has_model"] and got["halting"]["trial"] == point.trial
        rd = tr.run_dir(res.final_run_id)
        assert halting_choice(rd)["trial"] == point.trial
        # it takes effect at once: the loaded model carries that point's halting weights, nothing retrained
        loaded = load_model(res.final_run_id, home=h, device="cpu")
        want = load_file(str(h / point.halting_file))
        assert all(torch.equal(v, want[k]) for k, v in loaded.model.halters.state_dict().items())
        assert loaded.halting["trial"] == point.trial
        assert chosen_prediction_run(tr, res.parent_run_id) == res.final_run_id  # what a reload restores
        # the pipeline's own choice is kept beside the user's, after a reload too
        run = tr.get_run(res.parent_run_id)
        view = pipeline_view(run, tr.get_events(res.parent_run_id))
        assert run["summary"]["chosen"] == rule_before
        assert view["pipeline_choice"].trial == res.chosen.trial
        assert view["user_choice"]["trial"] == point.trial
    finally:  # back to the pipeline's choice: the user's choice file goes, the run's own weights stay
        again = choose_for_prediction(res.parent_run_id, res.chosen, tracker=tr)
    assert again["halting"] is None and halting_choice(tr.run_dir(res.final_run_id)) is None
    loaded = load_model(res.final_run_id, home=h, device="cpu")
    rule_w = load_file(str(h / res.chosen.halting_file))
    assert all(torch.equal(v, rule_w[k]) for k, v in loaded.model.halters.state_dict().items())
    with pytest.raises(DactLabError, match="no trained run"):
        choose_for_prediction(res.parent_run_id, FrontPoint(trial=99, front_lambda=0.1), tracker=tr)


def test_choice_rule_on_a_hand_made_front():
    front = [FrontPoint(trial=0, val_accuracy=0.900, val_avg_exit_layer=6.0, val_nll=0.30, objective="val_nll"),
             FrontPoint(trial=1, val_accuracy=0.893, val_avg_exit_layer=3.1, val_nll=0.33, objective="val_nll"),
             FrontPoint(trial=2, val_accuracy=0.895, val_avg_exit_layer=4.0, val_nll=0.31, objective="val_nll"),
             FrontPoint(trial=3, val_accuracy=0.850, val_avg_exit_layer=1.2, val_nll=0.50, objective="val_nll")]
    assert apply_choice_rule(front).trial == 1  # lowest exit within 1 point of 0.900
    assert apply_choice_rule(front, tolerance=0.0).trial == 0
    assert apply_choice_rule(front, "best_objective").trial == 0
    with pytest.raises(DactLabError, match="empty"):
        apply_choice_rule([])


def test_choice_rule_measures_from_the_most_accurate_trial_even_off_the_nll_front():
    a = FrontPoint(trial=0, val_accuracy=0.88, val_avg_exit_layer=6.0, val_nll=0.30, objective="val_nll")
    b = FrontPoint(trial=1, val_accuracy=0.90, val_avg_exit_layer=6.5, val_nll=0.35, objective="val_nll")
    c = FrontPoint(trial=2, val_accuracy=0.895, val_avg_exit_layer=6.2, val_nll=0.36, objective="val_nll")
    front = [a]  # b and c are dominated in (NLL, exit layer)
    assert apply_choice_rule(front).trial == 0  # front only: a, 2 points below b
    chosen = apply_choice_rule(front, trials=[a, b, c])
    assert chosen.trial == 2  # lowest exit within 1 point of b's 0.90: c (a is 2 points below)
    nan = FrontPoint.from_dict({**a.to_dict(), "trial": 3, "val_accuracy": float("nan"),
                                "val_avg_exit_layer": 1.0})
    assert apply_choice_rule(front, trials=[a, b, c, nan]).trial == 2  # a trial without accuracy is skipped


def test_final_run_is_saved_and_loads(done):
    h, res = done
    tr = Tracker(h)
    run = tr.get_run(res.final_run_id)
    assert run["status"] == "finished" and run["tag"] == "final" and run["kind"] == "dact"
    assert run["parent_id"] == res.parent_run_id and run["dataset_id"] is not None
    assert "test_accuracy" in res.test_metrics
    loaded = load_model(res.final_run_id, home=h, device="cpu")
    assert isinstance(loaded.model, DactBert)
    # a fitted point: the run's λ is that point's spec-scale λ; a threshold point keeps the training λ
    want = res.chosen.train_lambda if res.chosen.train_lambda is not None else \
        json.loads((tr.run_dir(res.parent_run_id) / "stage1.json").read_text())["model"]["ponder_lambda"]
    assert loaded.config.model.ponder_lambda == pytest.approx(want)
    rep = json.loads((tr.run_dir(res.final_run_id) / "report.json").read_text())
    assert rep["halting"]["chosen"]["trial"] == res.chosen.trial and len(rep["halting"]["points"]) == 14
    assert all((tr.run_dir(res.final_run_id) / p["halting_file"]).is_file() for p in rep["halting"]["points"])
    assert loaded.config.model.pooling == res.stage_best["stage1"]["pooling"]
    assert loaded.config.train.encoder_lr == pytest.approx(res.stage_best["stage2"]["encoder_lr"])


def test_rerun_of_a_finished_pipeline_trains_nothing(done):
    h, res = done
    tr = Tracker(h)
    # a job manager's run of the same kind and name (the dashboard's job) is not taken for the pipeline's parent
    job = tr.create_run("dact-pipeline", tiny_cfg().to_dict(), name="demo-pipe", status="running")
    before = len(tr.list_runs())
    again = run_pipeline(tiny_cfg(), pipeline=tiny_pipe("demo-pipe"), home=h)
    assert len(tr.list_runs()) == before and again.parent_run_id != job
    tr.set_status(job, "finished")
    assert again.final_run_id == res.final_run_id and again.chosen == res.chosen
    assert again.resumed_stages == ["stage1", "stage2", "stage3", "single", "final"]
    assert load_pipeline_result("demo-pipe", home=h).pareto == res.pareto
    changed = tiny_cfg()
    changed.data.max_seq_len = 48
    with pytest.raises(ConfigError, match="different run config"):
        run_pipeline(changed, pipeline=tiny_pipe("demo-pipe"), home=h)


# --- cancellation and resume -------------------------------------------------------------------------------------

class CancelOnFirstStep(Callback):
    def __init__(self, token):
        self.token = token

    def on_step(self, state, logs):
        self.token.cancel("test cancels stage 2")


def test_cancel_then_resume_skips_finished_stages(home):
    tr = Tracker(home)
    cfg, pipe = tiny_cfg(), tiny_pipe("resumable", trials=(2, 2, 2))
    token = CancelToken()
    with pytest.raises(Cancelled):
        run_pipeline(cfg, pipeline=pipe, home=home, tracker=tr, cancel=token, callbacks=[CancelOnFirstStep(token)])
    parent = tr.list_runs(kind="dact-pipeline")[0]
    assert parent["status"] == "cancelled" and parent["summary"]["stages_done"] == ["stage1"]
    assert [r["status"] for r in children(tr, parent["id"])] == ["cancelled"]
    url = home_mod.optuna_storage_url(home)
    assert len(optuna.load_study(study_name="resumable/stage1", storage=url).trials) == 2

    res = run_pipeline(cfg, pipeline=pipe, home=home, tracker=tr)
    assert res.parent_run_id == parent["id"] and res.resumed_stages == ["stage1"]
    assert tr.get_run(parent["id"])["status"] == "finished"
    assert len(optuna.load_study(study_name="resumable/stage1", storage=url).trials) == 2  # not re-run
    s2 = optuna.load_study(study_name="resumable/stage2", storage=url)
    states = sorted(t.state.name for t in s2.trials)
    # the cancelled trial does not count, nor the slot no process had taken (dropped at the cancel, so no worker
    # runs it): two more trials ran (successive halving may prune the second)
    assert states.count("FAIL") == 2 and len(states) == 4 and "COMPLETE" in states
    assert [t.user_attrs.get("skipped") for t in s2.trials if t.state.name == "FAIL"] == [None, "the pipeline stopped"]
    assert len(tr.get_events(parent["id"], kinds=["stage1_features"])) == 1
    assert tr.get_events(parent["id"], kinds=["resumed"])[0]["payload"]["stages_done"] == ["stage1"]
    tags = sorted(r["tag"] for r in children(tr, parent["id"]))
    assert tags == ["final"] + ["stage2"] * 3


def test_cancel_in_stage3_then_resume_keeps_stages_1_2_and_the_fitted_points(home, monkeypatch):
    from dact_lib import halting

    tr = Tracker(home)
    cfg, pipe = tiny_cfg(), tiny_pipe("resume3", trials=(2, 2, 4))
    token = CancelToken()
    real, calls = halting.fit_halting, []

    def cancelling_fit(*args, **kw):
        calls.append(1)
        if len(calls) == 7:  # a fitted trial = 3 fits (every row, then 2 cross-fit folds): in the third trial
            token.cancel("test cancels stage 3's third trial")
        return real(*args, **kw)

    monkeypatch.setattr(halting, "fit_halting", cancelling_fit)
    with pytest.raises(Cancelled):
        run_pipeline(cfg, pipeline=pipe, home=home, tracker=tr, cancel=token)
    monkeypatch.setattr(halting, "fit_halting", real)
    parent = tr.list_runs(kind="dact-pipeline")[0]
    assert parent["status"] == "cancelled" and parent["summary"]["stages_done"] == ["stage1", "stage2"]
    url = home_mod.optuna_storage_url(home)
    stage2_best = parent["summary"]["stage_best"]["stage2"]
    s3 = optuna.load_study(study_name="resume3/stage3", storage=url)
    fitted = {t.number: (home / t.user_attrs["halting_file"]).read_bytes()
              for t in s3.get_trials(states=[optuna.trial.TrialState.COMPLETE])}
    assert len(fitted) == 2

    res = run_pipeline(cfg, pipeline=pipe, home=home, tracker=tr)
    assert res.parent_run_id == parent["id"] and res.resumed_stages == ["stage1", "stage2"]
    assert res.stage_best["stage2"] == stage2_best  # stage 2's choice is reused, not re-searched
    assert len(optuna.load_study(study_name="resume3/stage2", storage=url).trials) == 2  # not re-run
    s3 = optuna.load_study(study_name="resume3/stage3", storage=url)
    # the cancelled trial, and the grid point no process had taken (dropped at the cancel so no worker runs it),
    # which the resumed stage enqueued again with its λ: 4 trials complete
    states = sorted(t.state.name for t in s3.trials)
    assert states == ["COMPLETE"] * 4 + ["FAIL"] * 2
    (dropped,) = [t for t in s3.trials if t.user_attrs.get("skipped") == "the pipeline stopped"]
    (again,) = [t for t in s3.trials if t.user_attrs.get("requeues") == dropped.number]
    assert again.state.name == "COMPLETE" and again.params == dropped.system_attrs["fixed_params"]
    for n, data in fitted.items():  # the points fitted before the kill are kept as they were
        assert (home / s3.trials[n].user_attrs["halting_file"]).read_bytes() == data
    assert tr.get_run(parent["id"])["status"] == "finished" and res.final_run_id is not None


def test_already_cancelled_token_marks_parent_cancelled(home):
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        run_pipeline(tiny_cfg(), pipeline=tiny_pipe("never"), home=home, cancel=token)
    assert Tracker(home).list_runs(kind="dact-pipeline")[0]["status"] == "cancelled"


# --- pieces -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, match", [
    ("name", "", "name"), ("trials_stage3", 0, "trials_stage3"), ("timeout_min", -1, "timeout_min"),
    ("lambda_low", 20.0, "lambda_low"), ("min_steps", -1, "min_steps"), ("guard_margin", 1.5, "guard_margin"),
    ("final_finetune", "yes", "final_finetune"), ("objective3", "nll", "objective3"), ("choice_rule", "knee", "choice_rule"),
    ("stage1_epochs", 1.5, "stage1_epochs"), ("encoder_lr_range", (1e-3, 1e-4), "encoder_lr_range"),
    ("epochs_range", (0, 2), "epochs_range"), ("poolings", ("max",), "poolings"), ("seed", -1, "seed"),
])
def test_pipeline_config_validation(field, value, match):
    pipe = PipelineConfig(name="x")
    setattr(pipe, field, value)
    with pytest.raises(ConfigError, match=match):
        pipe.validate()


def test_pipeline_takes_dact_or_backbone_configs_only(home):
    with pytest.raises(ConfigError, match="dact"):
        run_pipeline(default_config("multitask", encoder="tiny"), pipeline=PipelineConfig(name="x"), home=home)
    backbone = default_config("backbone", encoder="tiny")
    backbone.model.pooling = "cls"
    backbone.train.encoder_lr = 2e-5
    converted = as_dact_config(backbone)
    assert converted.kind == "dact" and converted.model.pooling == "cls" and converted.train.encoder_lr == 2e-5
    assert backbone.kind == "backbone"  # the caller's config is not changed


def test_feature_heads_compute_what_dactbert_computes(home):
    """Stage 1's heads on cached features == DactBert's units on the live encoder (same weights)."""
    params = {"pooling": "mean", "share_weights": False, "cls_depth": 2, "cls_width": 16, "cls_layout": "bowtie",
              "cls_activation": "tanh", "cls_dropout": 0.1, "halt_depth": 1, "halt_width": 8,
              "halt_activation": "relu", "halt_dropout": 0.0}
    cfg = tiny_cfg()
    cfg.model = model_from_params(params, cfg.model)
    assert cfg.model.classifier.layout == "bowtie" and cfg.model.halting.hidden_dims == [8]
    ds = read_csv(load_demo_dataset().to_csv_bytes(), max_rows=20, name="demo")
    model, tok = build_model(cfg, ds.label_maps, home)
    model.eval()
    feats = cached_features("tiny", ds, poolings=("mean",), max_seq_len=32, home=home, seed=cfg.train.seed)
    heads = FeatureDactHeads(cfg.model, model.num_layers, model.adapter.hidden_size, model.num_classes)
    missing, unexpected = heads.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("encoder.") for k in unexpected)  # same parameter names as DactBert
    heads.eval()
    y, h = heads(feats["mean"].features)
    with torch.no_grad():
        t = tok(ds.texts, truncation=True, max_length=32, padding=True, return_tensors="pt")
        out = model(t["input_ids"], t["attention_mask"])
    assert torch.allclose(y, out.extras["y"], atol=1e-5) and torch.allclose(h, out.extras["h"], atol=1e-5)


def test_timeout_bounds_the_trials_but_every_stage_runs_one(home):
    pipe = tiny_pipe("hurried", trials=(5, 5, 5), timeout_min=0.001)  # 60 ms for the whole pipeline
    res = run_pipeline(tiny_cfg(), pipeline=pipe, home=home)
    url = home_mod.optuna_storage_url(home)
    done = [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    counts = [len(optuna.load_study(study_name=f"hurried/{s}", storage=url).get_trials(states=done))
              for s in ("stage1", "stage2", "stage3")]
    assert counts == [1, 1, 1]  # (stage 3 still holds its other queued log-spaced λ values, as WAITING trials)
    assert res.final_run_id is not None and len(res.pareto) == 1 and res.chosen.front_lambda == pytest.approx(1e-2)
    budgets = [e["payload"]["budget_s"] for e in Tracker(home).get_events(res.parent_run_id, kinds=["stage_start"])]
    assert all(b is not None and b <= 0.06 for b in budgets)


# --- guards and the collapse --------------------------------------------------------------------------------------

def test_a_model_no_better_than_the_majority_class_stops_the_pipeline(home, tmp_path):
    """Labels that do not depend on the texts: stage 1 cannot beat always answering the largest class, and the
    pipeline stops there with an event and a message that says what to change — it never trains on."""
    import random

    rows = easy_csv(tmp_path / "e.csv", n=240).read_text().splitlines()
    rng = random.Random(0)
    labels = [r.rsplit(",", 1)[1] for r in rows[1:]]
    rng.shuffle(labels)
    noise = tmp_path / "noise.csv"
    noise.write_text("\n".join([rows[0]] + [r.rsplit(",", 1)[0] + "," + lab for r, lab in zip(rows[1:], labels)]))
    tr = Tracker(home)
    with pytest.raises(PipelineGuardError, match=r"not clearly better than always answering the largest class.*"
                                                 r"What to change"):
        run_pipeline(tiny_cfg(noise), pipeline=tiny_pipe("noise"), home=home, tracker=tr)
    parent = tr.list_runs(kind="dact-pipeline")[0]
    assert parent["status"] == "failed" and "What to change" in parent["error"]
    failed = tr.get_events(parent["id"], kinds=["guard_failed"])
    assert len(failed) == 1 and failed[0]["payload"]["stage"] == "stage1"
    p = failed[0]["payload"]
    assert p["accuracy"] < p["majority_baseline"] + p["margin"] and p["rows"] == 48
    assert not [r for r in tr.list_runs(parent_id=parent["id"])]  # stage 2 never started


def test_stage2_trials_on_small_data_get_enough_steps_and_the_single_run_head_lr():
    """The collapse seen on 400 rows / 1 epoch: stage-2 trials of ~7-25 optimizer steps with head lr 1e-4-4e-4
    answered only the largest class. Today a trial runs >= min_steps steps and the head-lr range holds 1e-3."""
    pipe = PipelineConfig(name="x").validate()
    lo, hi = pipe.head_lr_range
    assert lo <= default_config("dact").train.head_lr <= hi
    base = default_config("dact").train
    for bs in (16, 32, 64):
        tc = train_from_params({"batch_size": bs, "epochs": 1, "head_lr": lo}, base, n_train=300,
                               min_steps=pipe.min_steps, max_epochs=pipe.max_epochs)
        steps = tc.epochs * -(-300 // bs)
        assert steps >= pipe.min_steps and tc.epochs <= pipe.max_epochs
    big = train_from_params({"batch_size": 16, "epochs": 2}, base, n_train=6920, min_steps=pipe.min_steps)
    assert big.epochs == 2  # large data keeps the sampled epochs


def test_guard_margin_is_two_standard_errors_or_the_floor():
    from dact_lib.tuning.dact_pipeline import guard_margin, majority_baseline

    assert majority_baseline([0, 0, 0, 1, 2, 2]) == pytest.approx(0.5)
    assert guard_margin(0.5, 100, 0.02) == pytest.approx(0.1)  # 2·sqrt(0.25/100)
    assert guard_margin(0.5, 1_000_000, 0.02) == pytest.approx(0.02)


# --- the Pareto explorer on this real pipeline record ---------------------------------------------------------

def test_pareto_explorer_choice_takes_effect_and_survives_a_reload(done, monkeypatch):
    """In the app: choosing a front point on the Pareto explorer names its halting file for the final run (no
    training), the page says so next to the pipeline's own choice, and a fresh session (a reload) shows it again."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from dact_lib.models import halting_choice

    h, res = done
    monkeypatch.setenv("DACT_LAB_HOME", str(h))
    app = str(Path(__file__).resolve().parent.parent / "app.py")
    other = next(p for p in res.pareto if p.trial != res.chosen.trial)
    st.cache_resource.clear()
    try:
        at = AppTest.from_file(app, default_timeout=60)
        at.run()
        at.switch_page("app_pages/pareto.py").run()
        at.selectbox(key="pareto_parent").set_value(res.parent_run_id).run()
        assert not at.exception, at.exception
        assert any("pipeline's choice" in c.value for c in at.caption)
        pick = at.selectbox(key=f"pareto_pick_{res.parent_run_id}")
        label = next(o for o in pick.options if o.startswith(f"trial {other.trial} "))
        pick.set_value(label).run()
        assert not at.exception, at.exception
        assert any("nothing retrained" in s.value for s in at.success)
        assert halting_choice(Tracker(h).run_dir(res.final_run_id))["trial"] == other.trial
        assert any(f"halting units of **trial {other.trial}** (your choice" in i.value for i in at.info)
        again = AppTest.from_file(app, default_timeout=60)  # a reload: a new session
        again.run()
        again.switch_page("app_pages/pareto.py").run()
        again.selectbox(key="pareto_parent").set_value(res.parent_run_id).run()
        assert any(f"trial {other.trial}** (your choice" in i.value for i in again.info)
        table = again.dataframe[0].value
        assert list(table[table["for prediction"]]["trial"]) == [other.trial]
        on_front = [p.trial for p in res.pareto if p.trial == res.chosen.trial]
        assert list(table[table["pipeline's choice"]]["trial"]) == on_front
        assert any(f"pipeline's choice: trial {res.chosen.trial} " in c.value for c in again.caption)
    finally:
        from dact_lib.tuning.dact_pipeline import choose_for_prediction

        choose_for_prediction(res.parent_run_id, res.chosen, tracker=Tracker(h))
        st.cache_resource.clear()


def test_stage1_heads_come_back_at_their_best_epoch():
    """fit_heads_on_features keeps a COPY of the best epoch's weights and returns the heads restored to it: on
    noisy features with a large lr the validation loss is lowest early, and the returned heads reproduce it."""
    from dact_lib.tuning.dact_pipeline import fit_heads_on_features
    from dact_lib.tuning.dact_pipeline.stage1 import _eval_heads

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 2, 16, generator=g), torch.randint(0, 3, (96,), generator=g)
    vx, vy = torch.randn(48, 2, 16, generator=g), torch.randint(0, 3, (48,), generator=g)
    cfg = tiny_cfg().model
    fit = fit_heads_on_features(cfg, 3, x, y, vx, vy, epochs=25, lr=0.05, batch_size=16)
    assert fit.best_epoch < 25  # training went on (and got worse) after the best epoch
    assert _eval_heads(fit.heads, vx, vy, cfg.ponder_lambda)["val_loss"] == pytest.approx(fit.val_loss, rel=1e-6)


def test_choice_rule_tie_break_prefers_the_more_accurate_of_equal_exits():
    """Mutation (issue 12): the tie-break preferring the less accurate of two equal-exit points must fail here."""
    lo = FrontPoint(trial=0, val_accuracy=0.895, val_avg_exit_layer=3.0, val_nll=0.3, objective="val_nll")
    hi = FrontPoint(trial=1, val_accuracy=0.900, val_avg_exit_layer=3.0, val_nll=0.3, objective="val_nll")
    assert apply_choice_rule([lo, hi]).trial == 1
    assert apply_choice_rule([hi, lo]).trial == 1  # whatever the order
    same = dataclasses.replace(hi, trial=2)
    assert apply_choice_rule([same, hi]).trial == 1  # equal exit and accuracy: the lower trial number


def test_stage2_trials_on_a_fraction_of_the_rows_then_the_best_params_train_on_all(home):
    """Multi-fidelity over rows: trials see a stratified share of the training rows, the best trial's parameters
    train once on every row, and that refit (not a trial) is the model stages 3 and final build on."""
    tr = Tracker(home)
    pipe = tiny_pipe("refit", trials=(2, 2, 2), stage2_fraction=0.5, stage2_min_rows=10, stage2_min_per_class=1)
    res = run_pipeline(tiny_cfg(), pipeline=pipe, home=home, tracker=tr)
    st2 = json.loads((tr.run_dir(res.parent_run_id) / "stage2.json").read_text())
    n_train = st2["train_rows"]
    assert st2["trial_rows"] == -(-n_train // 2) < n_train
    runs = {r["name"]: r for r in children(tr, res.parent_run_id)}
    refit = runs["refit/stage2/refit"]
    assert st2["best_run_id"] == st2["refit"]["run_id"] == refit["id"]
    # the refit trains as long as the epochs range allows (stage2_refit_epochs "max"), recorded as the trunk's
    assert st2["refit"]["epochs"] == st2["train"]["epochs"] >= pipe.epochs_range[1]
    assert (tr.run_dir(refit["id"]) / "model.safetensors").is_file()
    trial_runs = [r for n, r in runs.items() if "/stage2/trial" in n]
    # the best trial keeps its weights (the trunk had the time left not paid for the refit), the other none
    assert len(trial_runs) == 2 and sum((tr.run_dir(r["id"]) / "model.safetensors").is_file()
                                        for r in trial_runs) == 1

    def rows_seen(rid):
        return [e["payload"]["train_rows"] for e in tr.get_events(rid, kinds=["phase"]) if "rows" in e["payload"]]

    assert all(rows_seen(r["id"]) == [st2["trial_rows"]] for r in trial_runs)
    assert rows_seen(refit["id"]) == [n_train]
    final = json.loads((tr.run_dir(res.final_run_id) / "report.json").read_text())
    assert final["built_from"]["trunk_run_id"] == refit["id"]
    # trial 0 started from the run config's own training values (clipped to the search ranges)
    s2 = optuna.load_study(study_name="refit/stage2", storage=home_mod.optuna_storage_url(home))
    t0 = s2.trials[0]
    base = tiny_cfg().train
    assert t0.params["encoder_lr"] == base.encoder_lr and t0.params["epochs"] == min(base.epochs, 2)
    assert t0.params["head_lr"] == pipe.head_lr_range[0]  # 1e-3 clipped into the test's (2e-3, 6e-3)


def test_stage2_uses_every_row_when_the_fraction_would_be_below_the_minimum():
    from types import SimpleNamespace

    from dact_lib.tuning.dact_pipeline.stage2 import trial_rows

    ds = read_csv(EASY_CSV)
    split = SimpleNamespace(train=ds, val=ds, test=None)
    pl = SimpleNamespace(split=split, pipe=PipelineConfig(name="x", stage2_fraction=0.5).validate(), task="label")
    assert trial_rows(pl) is split  # 240 rows < stage2_min_rows: no subset, no refit
    pl.pipe = PipelineConfig(name="x", stage2_fraction=0.25, stage2_min_rows=100, stage2_min_per_class=1).validate()
    sub = trial_rows(pl).train
    assert len(sub) == 100 and set(sub.texts) <= set(ds.texts)
    counts = list(sub.class_counts().values())
    assert max(counts) - min(counts) <= 1  # stratified on the balanced easy set


def test_a_pipeline_with_its_run_folders_outside_the_home(home, tmp_path, monkeypatch):
    """--artifacts DIR (the shared folder workers on other machines see): stage 3 used to store each trial's halting
    file relative to the home and failed (ValueError) when the run folders lived elsewhere."""
    art = tmp_path / "shared-artifacts"
    monkeypatch.setenv("DACT_LAB_ARTIFACTS", str(art))
    res = run_pipeline(tiny_cfg(), pipeline=tiny_pipe("elsewhere", trials=(2, 2, 3)), home=home)
    tr = Tracker(home)
    assert tr.artifacts == art.resolve() and tr.get_run(res.parent_run_id)["status"] == "finished"
    files = [p.halting_file for p in res.pareto]
    assert files and all(not Path(f).is_absolute() for f in files)  # stored relative to the artifacts root
    assert all(tr.abs_path(f).is_file() and art.resolve() in tr.abs_path(f).parents for f in files)
    assert (tr.run_dir(res.final_run_id) / "model.safetensors").is_file()


# --- issue 27: a pipeline never worse than one run, one criterion, a timeout that is a wall ----------------------

def test_trial_rows_keep_enough_rows_of_the_smallest_class():
    """34 % of a 77-class set gave ≈35 rows per class; the share is raised until the smallest class has
    stage2_min_per_class rows (every row when a class has fewer)."""
    from dact_lib.tuning.dact_pipeline.stage2 import trial_row_count

    assert trial_row_count([500, 500], 0.34, 100, 100) == 340  # the fraction already gives 170 per class
    assert trial_row_count([130] * 77, 0.34, 1500, 100) == 7700  # 100 of each of 77 classes of 130 rows
    assert trial_row_count([1000, 100], 0.34, 10, 100) == 1100  # the small class has only 100: every row
    assert trial_row_count([1000, 300], 0.1, 10, 100) == 434  # ceil(1300 · 100 / 300)
    assert trial_row_count([1000, 300], 0.1, 10, 1) == 130  # no floor per class: the fraction
    assert trial_row_count([], 0.5, 10, 100) == 0


def test_final_choice_never_keeps_a_point_the_single_run_beats():
    from dact_lib.tuning.dact_pipeline.single import PIPELINE, SINGLE, final_choice

    pipe = FrontPoint(trial=3, val_accuracy=0.9021, val_avg_exit_layer=3.82)
    trials = [pipe, FrontPoint(trial=4, val_accuracy=0.905, val_avg_exit_layer=5.0)]
    # the case: the single run is more accurate and exits earlier
    single = FrontPoint(source=SINGLE, val_accuracy=0.9042, val_avg_exit_layer=1.63)
    d = final_choice(pipe, single, trials, "lowest_exit_within_1pt", 0.01)
    assert d["winner"] == SINGLE and "at least as accurate and exits no later" in d["why"]
    assert d["pipeline"] == pipe.to_dict() and d["single"] == single.to_dict()
    # slightly less accurate but within the tolerance and earlier: the rule over both picks the single run
    single2 = dataclasses.replace(single, val_accuracy=0.899)
    d = final_choice(pipe, single2, trials, "lowest_exit_within_1pt", 0.01)
    assert d["winner"] == SINGLE and "exits earlier" in d["why"]
    # 2 points below the best: the pipeline's point stays (and says why)
    single3 = dataclasses.replace(single, val_accuracy=0.884)
    d = final_choice(pipe, single3, trials, "lowest_exit_within_1pt", 0.01)
    assert d["winner"] == PIPELINE and "does not beat" in d["why"]
    # best_objective: only a dominating single run replaces the pipeline's point
    assert final_choice(pipe, single2, trials, "best_objective", 0.01)["winner"] == PIPELINE
    assert final_choice(pipe, single, trials, "best_objective", 0.01)["winner"] == SINGLE
    # equal points: the pipeline's
    same = dataclasses.replace(pipe, source=SINGLE)
    assert final_choice(pipe, same, trials, "lowest_exit_within_1pt", 0.01)["winner"] == PIPELINE
    assert final_choice(pipe, None, trials, "lowest_exit_within_1pt", 0.01)["winner"] == PIPELINE


def test_guard_reads_the_metric_the_checkpoint_was_restored_by():
    """The issue's case, by hand: early stopping on val_loss restores epoch 4 (67.7 %), a later epoch reached
    74.2 % at a worse loss; the accuracy guard refused the restored model. Judged by the restore's own criterion
    (its NLL against answering the class frequencies) it passes; a model that learned nothing fails either way."""
    from types import SimpleNamespace

    import numpy as np

    from dact_lib.config import EarlyStoppingConfig
    from dact_lib.train import EarlyStopping
    from dact_lib.tuning.dact_pipeline import guards

    history = [{"val_loss": 0.80, "val_nll": 0.80, "val_accuracy": 0.60},
               {"val_loss": 0.70, "val_nll": 0.70, "val_accuracy": 0.64},
               {"val_loss": 0.66, "val_nll": 0.66, "val_accuracy": 0.66},
               {"val_loss": 0.50, "val_nll": 0.50, "val_accuracy": 0.677},  # epoch 4: the best loss
               {"val_loss": 0.53, "val_nll": 0.53, "val_accuracy": 0.70},
               {"val_loss": 0.55, "val_nll": 0.55, "val_accuracy": 0.742},
               {"val_loss": 0.56, "val_nll": 0.56, "val_accuracy": 0.742}]
    stopper = EarlyStopping(EarlyStoppingConfig(metric="val_loss", patience=10, regression=1.0, trend_window=10))
    restored = None
    for h in history:
        improved, _ = stopper.update(h["val_loss"])
        restored = h if improved else restored
    assert restored["val_accuracy"] == 0.677  # the restore kept epoch 4
    events = []
    y_val = np.array([0] * 66 + [1] * 34)  # majority class 66 %: accuracy needs ≥ 68 %
    y_train = np.array([0] * 660 + [1] * 340)
    split = SimpleNamespace(val=SimpleNamespace(targets={"label": y_val}), train=SimpleNamespace(
        targets={"label": y_train}), test=None)
    pl = SimpleNamespace(split=split, task="label", num_classes=2, parent=1, summary={},
                         pipe=PipelineConfig(name="g").validate(),
                         tracker=SimpleNamespace(log_event=lambda rid, kind, payload: events.append((kind, payload))))
    with pytest.raises(PipelineGuardError, match="67.7% val accuracy"):
        guards.check(pl, "stage2", restored["val_accuracy"])  # the old criterion: accuracy
    info = guards.check(pl, "stage2", restored["val_accuracy"], metrics=restored, metric="val_loss")
    ref, _ = guards.prior_nll(y_train, y_val, 2)
    assert info["criterion"] == "nll" and info["passed"] and info["prior_nll"] == pytest.approx(ref)
    assert ref == pytest.approx(-(0.66 * np.log(661 / 1002) + 0.34 * np.log(341 / 1002)))
    nothing = {"val_nll": ref - 0.001, "val_accuracy": 0.66}  # answers the frequencies: no better than the prior
    with pytest.raises(PipelineGuardError, match="restored by val_loss") as err:
        guards.check(pl, "stage2", 0.66, metrics=nothing, metric="val_loss")
    assert "head_lr_range" not in str(err.value)  # the range already holds 1e-3: no advice to widen it
    pl.pipe = PipelineConfig(name="g", head_lr_range=(2e-3, 6e-3)).validate()
    with pytest.raises(PipelineGuardError, match="widen pipeline.head_lr_range towards 1e-3"):
        guards.check(pl, "stage2", 0.66, metrics=nothing, metric="val_loss")
    assert guards.advice("stage2", PipelineConfig(name="g", timeout_min=1.0)).startswith(
        "raise pipeline.timeout_min (1 min")  # under a wall, time first
    assert [k for k, _ in events].count("guard_failed") == 3  # the three refusals above


def test_budget_is_a_wall_split_over_the_stages_left(monkeypatch):
    from dact_lib.tuning.dact_pipeline import record

    now = [1000.0]
    monkeypatch.setattr(record.time, "monotonic", lambda: now[0])
    b = record.Budget(14.0)  # 840 s; weights 1 : 8 : 1 : 3 : 1
    assert b.share("stage1") == pytest.approx(840 / 14)
    now[0] += 60
    assert b.share("stage2") == pytest.approx(780 * 8 / 13)
    assert record.Budget(14.0, skip=("single",)).share("stage3") == pytest.approx(840 * 1 / 2)  # 1 : 1
    now[0] += 10_000
    assert b.left() == 0.0 and b.share("final") == 0.0
    assert record.Budget.limit_min(0.0) == pytest.approx(1 / 60)  # past the wall: one step, one evaluation
    # the steps get 60 % of a training's time, the rest is for its evaluation, exit refit and halting fit
    assert record.Budget.limit_min(300.0) == pytest.approx(3.0)
    assert record.Budget.limit_min(300.0, 1.5) == 1.5 and record.Budget.limit_min(None, 3.0) == 3.0
    assert record.Budget(None).share("stage2") is None and record.Budget(None).left() is None


def test_the_timeout_is_a_wall_for_every_training_and_the_refit(home, monkeypatch):
    """Every training the pipeline starts runs under a time limit taken from what is left; with the wall already
    passed at stage 2, the refit is skipped and said, and the pipeline still ends with a model."""
    from dact_lib import train as train_mod
    from dact_lib.tuning.dact_pipeline import record

    limits = []
    real_train = train_mod.train

    def spy(cfg, **kw):
        limits.append((cfg.tag, cfg.train.time_limit_min))
        return real_train(cfg, **kw)

    monkeypatch.setattr(train_mod, "train", spy)
    real_share = record.Budget.share

    def share(self, stage):  # stage 1 takes the whole budget: every later phase starts past the wall
        if stage == "stage2":
            self.deadline = record.time.monotonic() - 1.0
        return real_share(self, stage)

    monkeypatch.setattr(record.Budget, "share", share)
    pipe = tiny_pipe("wall", trials=(2, 2, 2), stage2_fraction=0.5, stage2_min_rows=10, stage2_min_per_class=1,
                     timeout_min=30.0, single_run=True)
    tr = Tracker(home)
    res = run_pipeline(tiny_cfg(), pipeline=pipe, home=home, tracker=tr)
    assert res.final_run_id is not None and limits
    assert all(lim is not None and lim <= record.Budget.FLOOR_S / 60 + 1e-9 for _, lim in limits)
    assert {t for t, _ in limits} == {"stage2", "single"}  # trials and the single run; no refit
    st2 = json.loads((tr.run_dir(res.parent_run_id) / "stage2.json").read_text())
    assert "under 25% of the refit" in st2["refit"]["skipped"]
    assert st2["best_run_id"] == json.loads((tr.run_dir(res.parent_run_id) / "stage2.json").read_text())[
        "best_user_attrs"]["run_id"]  # the best trial's own model is the trunk
    assert any("refit skipped" in w for w in tr.get_run(res.parent_run_id)["summary"]["warnings"])
    sweep = [e["payload"] for e in tr.get_events(res.parent_run_id, kinds=["exit_policy_sweep"])]
    assert sweep[0]["timed"] is False and "time budget" in sweep[0]["untimed_because"]


def test_the_single_run_is_a_candidate_and_the_choice_says_which_won(home, monkeypatch, tmp_path):
    """The single run is trained and compared; when it wins (forced here: the rule itself is tested above) the final
    model is its model, stage 3's points are refused for prediction (they fit the stage-2 model) and an export of
    one of them carries the stage-2 model it fits."""
    from dact_lib.deploy.export import _pipeline_point
    from dact_lib.tuning.dact_pipeline import choose_for_prediction, single as single_mod

    real = single_mod.final_choice
    seen = []

    def single_wins(chosen, single, trials, rule, tol):
        d = real(chosen, single, trials, rule, tol)
        seen.append(d)
        return {**d, "winner": single_mod.SINGLE, "why": "forced by the test"}

    monkeypatch.setattr(single_mod, "final_choice", single_wins)
    tr = Tracker(home)
    pipe = tiny_pipe("withsingle", trials=(2, 2, 3), single_run=True)
    res = run_pipeline(tiny_cfg(), pipeline=pipe, home=home, tracker=tr)
    parent = tr.get_run(res.parent_run_id)
    single = [r for r in children(tr, res.parent_run_id) if r["tag"] == "single"]
    assert len(single) == 1 and single[0]["status"] == "finished"
    st = json.loads((tr.run_dir(res.parent_run_id) / "single.json").read_text())
    assert st["run_id"] == single[0]["id"] and st["point"]["source"] == "single run"
    assert seen[0]["single"] == st["point"] and seen[0]["winner"] in ("pipeline", "single run") and seen[0]["why"]
    (choice,) = [e["payload"] for e in tr.get_events(res.parent_run_id, kinds=["final_choice"])]
    assert choice["winner"] == "single run" and parent["summary"]["final_source"] == "single run"
    report = json.loads((tr.run_dir(res.final_run_id) / "report.json").read_text())
    assert report["built_from"] == {"single_run_id": single[0]["id"]}
    assert report["halting"]["final_choice"] == {"winner": "single run", "why": "forced by the test"}
    # the final model's weights are the single run's
    a = load_model(res.final_run_id, home=home, device="cpu").model.state_dict()
    b = load_model(single[0]["id"], home=home, device="cpu").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    p = res.pareto[0]
    trunk = parent["summary"]["trunk_run_id"]
    assert p.run_id == trunk  # stage 3's points are the stage-2 model's
    with pytest.raises(DactLabError, match="final model is its single run"):
        choose_for_prediction(res.parent_run_id, p, tracker=tr)
    assert _pipeline_point(res.parent_run_id, p.trial, home)[0] == trunk
    choose_for_prediction(res.parent_run_id, res.chosen, tracker=tr, source="final")  # its own: fine


def test_a_same_name_start_resumes_the_run_holding_the_stages_not_a_jobs_stub(done):
    """A job's run that only resumed another (summary.engine_run_id → the real one) holds no stage: a third start
    under the same name must resume the real run, not start over in the stub."""
    h, res = done
    tr = Tracker(h)
    conf = tr.get_run(res.parent_run_id)["config"]
    stub = tr.create_run("dact-pipeline", conf, name="demo-pipe", status="finished")
    tr.update_run(stub, summary={"engine_run_id": res.parent_run_id, "resumes": "demo-pipe"})
    before = len(tr.list_runs())
    again = run_pipeline(tiny_cfg(), pipeline=tiny_pipe("demo-pipe"), home=h)
    assert again.parent_run_id == res.parent_run_id and again.final_run_id == res.final_run_id
    assert len(tr.list_runs()) == before  # nothing trained, nothing new
    assert load_pipeline_result("demo-pipe", home=h).parent_run_id == res.parent_run_id
    tr.delete_run(stub)  # the fixture home is shared


def test_stage3_lambda_has_its_own_name_and_older_studies_still_read():
    """Issue 25 (one λ): stage 3's Optuna parameter is the front's normalised λ, named ``front_lambda`` — not
    ``ponder_lambda``, the training λ's name; points of a study recorded before the rename read the same."""
    from dact_lib.tuning.dact_pipeline.settings import FRONT_LAMBDA
    from dact_lib.tuning.dact_pipeline.stage3 import trial_point

    assert FRONT_LAMBDA == "front_lambda" and FRONT_LAMBDA != "ponder_lambda"
    assert trial_point(0, {"front_lambda": 0.5}, None, {}).front_lambda == 0.5
    assert trial_point(0, {"ponder_lambda": 2}, None, {}).front_lambda == 2.0
    threshold = trial_point(0, {"halting": "threshold", "tau": 0.3}, None, {})
    assert threshold.front_lambda is None and threshold.threshold == 0.3 and threshold.kind == "threshold"
    assert FrontPoint.from_dict({"params": {"front_lambda": 0.1}}).front_lambda == 0.1
    assert FrontPoint.from_dict({"params": {"ponder_lambda": 0.1}}).front_lambda == 0.1
