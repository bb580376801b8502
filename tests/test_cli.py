"""``python -m dact_lib`` end to end on the tiny encoder: core commands and the tuning commands."""
from __future__ import annotations

import json
import re

import pytest

from dact_lib.cli import main
from dact_lib.tracker import Tracker

TINY = ["--encoder", "tiny", "--max-rows", "120", "--device", "cpu"]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def last_run_id(stdout: str) -> int:
    last = stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"run id: (\d+)", last)
    assert m, f"last stdout line is {last!r}"
    return int(m.group(1))


@pytest.fixture
def space_file(tmp_path):
    path = tmp_path / "space.json"
    path.write_text(json.dumps({"epochs": [1, 1], "batch_size": [16, 32]}))
    return path


def test_train_predict_runs_evaluate_report(home, capsys, tmp_path):
    code, out, _ = run_cli(capsys, "train", *TINY, "--epochs", 1, "--run-name", "first-try", "--home", home)
    assert code == 0
    run = last_run_id(out)
    assert Tracker(home).get_run(run)["name"] == "first-try"

    code, out, _ = run_cli(capsys, "predict", "--run", run, "--json", "--home", home, "great food", "rude staff")
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert code == 0 and len(rows) == 2
    assert all({"label", "probability", "probabilities"} <= set(r) for r in rows)
    assert all(r["label"] in r["probabilities"] for r in rows)

    code, out, _ = run_cli(capsys, "runs", "--json", "--home", home)
    assert code == 0 and [r["id"] for r in json.loads(out)] == [run]
    code, out, _ = run_cli(capsys, "runs", "--home", home)
    assert code == 0 and "backbone" in out and "finished" in out
    header, row = out.splitlines()[:2]
    assert header.split()[:2] == ["id", "name"] and row.split()[:2] == [str(run), "first-try"]

    code, out, _ = run_cli(capsys, "evaluate", "--run", run, "--json", "--home", home)
    rep = json.loads(out)
    assert code == 0 and list(rep["tasks"]) == ["class_label"]  # a single-task model learns the first task
    assert 0.0 <= rep["tasks"]["class_label"]["accuracy"] <= 1.0

    html = tmp_path / "report.html"
    code, out, _ = run_cli(capsys, "report", "--run", run, "--out", html, "--home", home)
    page = html.read_text(encoding="utf-8")
    assert code == 0 and "plotly" in page.lower()
    # self-contained: plotly.js is inlined, nothing is loaded from a CDN
    assert len(page) > 1_000_000 and not re.search(r"<script[^>]+src=[\"']https?://", page)
    code, _, err = run_cli(capsys, "report", "--run", "abc", "--out", html, "--home", home)
    assert code == 3 and "not a run id" in err


def test_dact_predict_reports_exit_layer(home, capsys):
    code, out, _ = run_cli(capsys, "train", "--kind", "dact", *TINY, "--epochs", 1, "--ponder-lambda", 0.02,
                           "--layer-loss-weight", 0.5, "--home", home)
    run = last_run_id(out)
    model_cfg = Tracker(home).get_run(run)["config"]["model"]
    assert model_cfg["ponder_lambda"] == 0.02 and model_cfg["layer_loss_weight"] == 0.5  # saved with the run
    code, out, _ = run_cli(capsys, "predict", "--run", run, "--json", "--home", home, "the soup was cold")
    (row,) = [json.loads(line) for line in out.strip().splitlines()]
    assert code == 0 and {"label", "probability", "probabilities", "exit_layer"} <= set(row)
    assert 1 <= row["exit_layer"] <= 2  # the tiny encoder has two layers; exit layers are 1-based

    code, out, _ = run_cli(capsys, "evaluate", "--run", run, "--policies", "--json", "--home", home)
    sweep = json.loads(out)["exit_policies"]
    assert code == 0
    assert sorted(r["value"] for r in sweep if r["policy"] == "patience") == [1, 2]  # t = 1..N
    assert sorted(r["value"] for r in sweep if r["policy"] == "fixed") == [1, 2]
    assert all(1 <= r["avg_exit_layer"] <= 2 and "latency_ms_p50" not in r for r in sweep)  # untimed unless asked
    code, out, _ = run_cli(capsys, "evaluate", "--run", run, "--policies", "--timed", "--latency-rows", 5, "--home",
                           home)
    assert code == 0 and "batch-1" in out and "× vs full depth" in out and "5 sentences at batch 1" in out
    code, out, _ = run_cli(capsys, "evaluate", "--run", run, "--policies", "--timed", "--latency-rows", 5, "--json",
                           "--home", home)
    sweep = json.loads(out)["exit_policies"]
    assert all(0 < r["latency_ms_p50"] <= r["latency_ms_p90"] and r["latency_rows"] == 5 for r in sweep)


def test_tune_backbone_then_studies(home, capsys, space_file):
    code, out, err = run_cli(capsys, "tune-backbone", *TINY, "--trials", 2, "--space", space_file, "--home", home)
    assert code == 0
    final = last_run_id(out)
    parent = int(re.search(r"^parent run id: (\d+)$", out, re.M).group(1))
    assert re.search(r"^trial 0: complete value=", err, re.M) and re.search(r"^trial 1: ", err, re.M)
    tracker = Tracker(home)
    assert tracker.get_run(final)["tag"] == "final" and tracker.get_run(final)["parent_id"] == parent
    assert tracker.get_run(parent)["kind"] == "tune-backbone"
    assert (home / "runs" / str(final) / "encoder.safetensors").exists()

    code, out, err = run_cli(capsys, "studies", "--json", "--home", home)
    (study,) = json.loads(out)
    assert code == 0 and study["name"] == f"tune-backbone-{parent}" and study["n_trials"] == 2
    assert study["parent_run_id"] == parent and study["storage_url"].endswith("experiments.db")
    assert study["directions"] == ["minimize"] and study["best_value"] is not None
    assert f"optuna-dashboard sqlite:///{home / 'experiments.db'}" in err

    code, out, _ = run_cli(capsys, "studies", "--home", home)
    assert code == 0 and f"tune-backbone-{parent}" in out
    assert out.strip().splitlines()[-1] == f"optuna-dashboard sqlite:///{home / 'experiments.db'}"

    code, out, _ = run_cli(capsys, "train", "--kind", "dact", *TINY, "--epochs", 1, "--init-from-run", final,
                           "--home", home)
    assert code == 0 and tracker.get_run(last_run_id(out))["config"]["init_from_run"] == final


def test_multitask_flags(home, capsys):
    code, out, err = run_cli(capsys, "multitask", *TINY, "--epochs", 1, "--pooling", "cls", "--normalize",
                             "--task-weights", "class_label=1,sentiment_label=0.5", "--home", home)
    assert code == 0
    run = Tracker(home).get_run(last_run_id(out))
    assert run["kind"] == "multitask" and run["status"] == "finished"
    model = run["config"]["model"]
    assert (model["pooling"], model["normalize"]) == ("cls", True)
    assert model["task_weights"] == {"class_label": 1.0, "sentiment_label": 0.5}
    assert run["config"]["train"]["encoder_lr"] == 5e-5  # the measured multi-task defaults
    assert "val_loss" in err
    # `runs` shows each task's accuracy and macro-F1, and marks the mean (it used to print only the mean, unlabelled)
    best = run["summary"]["best"]
    code, out, _ = run_cli(capsys, "runs", "--home", home)
    row = next(line for line in out.splitlines() if line.split()[:1] == [str(run["id"])])
    assert f"{best['val_accuracy']:.4f}*" in row
    for task in ("class_label", "sentiment_label"):
        assert f"{task} {best[f'val_accuracy/{task}']:.4f} / F1 {best[f'val_macro_f1/{task}']:.4f}" in row
    assert "* multi-task: the mean over its tasks" in out


def test_errors_exit_2_with_a_clear_message(home, capsys, tmp_path):
    missing = tmp_path / "nope.csv"
    code, out, err = run_cli(capsys, "train", *TINY, "--data", missing, "--home", home)
    assert code == 3 and err.startswith("error: ") and "nope.csv" in err
    code, out, err = run_cli(capsys, "tune-backbone", *TINY, "--data", missing, "--trials", 1, "--home", home)
    assert code == 3 and "nope.csv" in err
    single = tmp_path / "single.csv"
    single.write_text("text,label\n" + "\n".join(f"row {i},{'ab'[i % 2]}" for i in range(40)) + "\n")
    code, out, err = run_cli(capsys, "multitask", *TINY, "--data", single, "--home", home)
    assert code == 3 and "two-task CSV" in err
    code, out, err = run_cli(capsys, "multitask", *TINY, "--task-weights", "class_label", "--home", home)
    assert code == 3 and "task=weight" in err
    code, out, err = run_cli(capsys, "train", *TINY, "--layer-loss-weight", 1, "--home", home)
    assert code == 3 and "--layer-loss-weight only applies to --kind dact" in err
    assert Tracker(home).list_runs() == []


def parse(*argv):
    from dact_lib.cli import build_parser

    return build_parser().parse_args([str(a) for a in argv])


def test_dact_pipeline_flags_build_the_pipeline_config():
    from dact_lib.tuning.cli import pipeline_arguments

    cfg, pipeline = pipeline_arguments(parse("dact-pipeline", *TINY, "--trials", 3, "--lambdas-trials", 4,
                                             "--timeout-min", 2, "--min-steps", 50, "--guards", "warn", "--name", "p"))
    assert cfg.kind == "dact" and cfg.encoder == "tiny" and cfg.data.max_rows == 120
    assert (pipeline.name, pipeline.trials_stage1, pipeline.trials_stage2, pipeline.trials_stage3,
            pipeline.timeout_min, pipeline.min_steps, pipeline.guards) == ("p", 3, 3, 4, 2.0, 50, "warn")
    _, pipeline = pipeline_arguments(parse("dact-pipeline", *TINY))
    assert pipeline.name.startswith("dact-pipeline-")  # a new pipeline unless --name
    # the documented defaults (README / PipelineConfig docstring), written out, not read from the code
    assert (pipeline.trials_stage1, pipeline.trials_stage2, pipeline.trials_stage3, pipeline.guards) == (20, 6, 32, "stop")


def test_pbt_flags_build_the_pbt_config():
    from dact_lib.tuning.cli import pbt_arguments

    cfg, settings = pbt_arguments(parse("pbt", "--kind", "dact", *TINY, "--population", 3, "--epochs", 2))
    assert (settings.population, settings.epochs) == (3, 2) and cfg.train.epochs == 2 and cfg.kind == "dact"
    _, settings = pbt_arguments(parse("pbt", *TINY))
    assert settings.population == 4  # the documented default


def test_pbt_command_for_real(home, capsys):
    code, out, err = run_cli(capsys, "pbt", *TINY, "--population", 2, "--epochs", 1, "--home", home)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("parent run id: ")
    parent, best = int(lines[0].split(": ")[1]), last_run_id(out)
    tr = Tracker(home)
    members = tr.list_runs(parent_id=parent)
    assert tr.get_run(parent)["kind"] == "pbt" and tr.get_run(parent)["status"] == "finished"
    assert sorted(m["id"] for m in members) == sorted(int(x) for x in re.findall(r"\(run (\d+)\)", err))
    assert best in {m["id"] for m in members} and {m["status"] for m in members} == {"finished"}
    assert re.search(r"best member \d: val_accuracy [0-9.]+\n", err)
    code, out, err = run_cli(capsys, "pbt", *TINY, "--population", 1, "--home", home)
    assert code == 3 and "pbt.population = 1" in err


def write_download(tmp_path, doc: dict, suffix: str) -> str:
    """The file a user gets from a page's config download (the same texts as ui.forms.config_downloads)."""
    import yaml

    path = tmp_path / f"download{suffix}"
    path.write_text(json.dumps(doc, indent=2) if suffix == ".json" else yaml.safe_dump(doc, sort_keys=False))
    return str(path)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_engine_page_downloads_round_trip_through_the_cli(tmp_path, suffix):
    """Bug: a config downloaded from the Backbone-tuning, Pipeline or PBT page was refused by the CLI."""
    from dact_lib.config import default_config
    from dact_lib.tuning.cli import backbone_arguments, pbt_arguments, pipeline_arguments

    base = default_config("dact", encoder="tiny").to_dict()
    base["train"]["epochs"] = 3
    doc = {"config": base, "options": {"pipeline": {"name": "from-page", "trials_stage3": 5, "min_steps": 40}}}
    cfg, pipeline = pipeline_arguments(parse("dact-pipeline", "--config", write_download(tmp_path, doc, suffix)))
    assert (cfg.encoder, cfg.train.epochs, pipeline.name, pipeline.trials_stage3, pipeline.min_steps) == \
        ("tiny", 3, "from-page", 5, 40)
    cfg, pipeline = pipeline_arguments(parse("dact-pipeline", "--config", write_download(tmp_path, doc, suffix),
                                             "--lambdas-trials", 7, "--name", "mine"))
    assert (pipeline.name, pipeline.trials_stage3, pipeline.min_steps) == ("mine", 7, 40)  # flags win when given

    doc = {"config": base, "options": {"pbt": {"population": 3, "quantile": 0.5}}}
    cfg, settings = pbt_arguments(parse("pbt", "--config", write_download(tmp_path, doc, suffix)))
    assert (cfg.kind, settings.population, settings.quantile) == ("dact", 3, 0.5)

    bb = default_config("backbone", encoder="tiny").to_dict()
    doc = {"config": bb, "options": {"trials": 3, "timeout_min": None, "study_name": "s1", "final": False,
                                     "space": {"epochs": [1, 2]}}}
    cfg, kw = backbone_arguments(parse("tune-backbone", "--config", write_download(tmp_path, doc, suffix)))
    assert (kw.trials, kw.study_name, kw.final, kw.space.epochs) == (3, "s1", False, [1, 2])
    cfg, kw = backbone_arguments(parse("tune-backbone", "--config", write_download(tmp_path, doc, suffix),
                                       "--trials", 5))
    assert kw.trials == 5

    # an engine download given to `train` says which command runs it; a bad option names itself
    from dact_lib.cli import config_from_args
    from dact_lib.errors import ConfigError, DactLabError

    with pytest.raises(DactLabError, match="dact-pipeline --config FILE"):
        config_from_args(parse("train", "--config", write_download(tmp_path, doc, suffix)))
    doc = {"config": base, "options": {"pbt": {"population": 3}, "bogus": 1}}
    with pytest.raises(ConfigError, match="bogus"):
        pbt_arguments(parse("pbt", "--config", write_download(tmp_path, doc, suffix)))


def test_member_printer_tags_lines_with_the_run(capsys):
    from dact_lib.callbacks import LoopState
    from dact_lib.tuning.cli import MemberPrinter

    printer = MemberPrinter(1)
    printer.on_eval(LoopState(run_id=5, step=3), {"val_loss": 1.0, "val_accuracy": 0.5, "epoch": 1})
    printer.on_eval(LoopState(run_id=5, step=3), {"test_loss": 1.0})  # the test split: not a progress line
    printer.on_end(LoopState(run_id=5), "finished")
    assert capsys.readouterr().err.splitlines() == ["[run 5] step 3: val_loss=1.0000, val_accuracy=0.5000",
                                                    "[run 5] finished"]


@pytest.mark.parametrize("command", ["train", "pbt", "multitask"])
def test_time_limit_flag_reaches_the_run_config(command):
    from dact_lib.cli import build_parser, config_from_args

    flag = "--time-limit-min" if command == "train" else "--timeout-min"
    args = build_parser().parse_args([command, flag, "1.5"])
    kind = "multitask" if command == "multitask" else "backbone"
    args.kind = getattr(args, "kind", None) or kind
    assert config_from_args(args, kind).train.time_limit_min == 1.5


def test_studies_text_lists_the_front_of_a_two_objective_study(home, capsys):
    import optuna

    from dact_lib.home import optuna_storage_url

    study = optuna.create_study(study_name="lam", storage=optuna_storage_url(home), directions=["minimize"] * 2)
    for lam, (nll, exit_layer) in [(0.01, (0.30, 5.0)), (0.1, (0.40, 2.0)), (0.05, (0.45, 4.0))]:  # last dominated
        study.enqueue_trial({"lam": lam})
        study.optimize(lambda t: (nll, exit_layer) if t.suggest_float("lam", 1e-4, 1.0, log=True) else None,
                       n_trials=1)
    code, out, _ = run_cli(capsys, "studies", "--home", home)
    assert code == 0 and "2 Pareto-optimal" in out
    fronts = [line.strip() for line in out.splitlines() if line.strip().startswith("trial ")]
    assert fronts == ["trial 0: (0.3, 5) {'lam': 0.01}", "trial 1: (0.4, 2) {'lam': 0.1}"]


def test_dact_early_exit_flags_and_predict_policy(home, capsys):
    code, out, _ = run_cli(capsys, "train", "--kind", "dact", *TINY, "--epochs", 1, "--distill-weight", 0.5,
                           "--halting-input", "both", "--halting-tolerance", 2, "--home", home)
    run = last_run_id(out)
    m = Tracker(home).get_run(run)["config"]["model"]
    assert (m["distill_weight"], m["halting_input"], m["halting_tolerance"], m["fit_halting"]) == (0.5, "both", 2.0,
                                                                                                 True)
    code, out, _ = run_cli(capsys, "predict", "--run", run, "--json", "--policy", "fixed:1", "--home", home, "ok")
    assert code == 0 and json.loads(out.strip())["exit_layer"] == 1  # fixed depth 1: exactly layer 1
    code, out, err = run_cli(capsys, "predict", "--run", run, "--policy", "entropy:x", "--home", home, "ok")
    assert code == 3 and "entropy:0.35" in err
    code, out, _ = run_cli(capsys, "train", "--kind", "dact", *TINY, "--epochs", 1, "--no-fit-halting",
                           "--home", home)
    assert Tracker(home).get_run(last_run_id(out))["config"]["model"]["fit_halting"] is False
    code, out, _ = run_cli(capsys, "train", "--kind", "dact", *TINY, "--epochs", 1, "--exit-temperature",
                           "--exit-refit-epochs", 0, "--home", home)
    assert Tracker(home).get_run(last_run_id(out))["config"]["model"]["exit_temperature"] is True
    rep = json.loads((Tracker(home).run_dir(last_run_id(out)) / "report.json").read_text())
    assert len(rep["exit_refit"]["temperature"]["temperatures"]) == 2  # calibrated, then the halting fit
    code, _, err = run_cli(capsys, "train", "--kind", "dact", *TINY, "--epochs", 1, "--exit-temperature",
                           "--no-fit-halting", "--home", home)
    assert code == 3 and "turn model.fit_halting on" in err  # units trained on uncalibrated exits: refused
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", 1, "--halting-input", "both", "--home", home)
    assert code == 3 and "only applies to --kind dact" in err
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", 1, "--exit-temperature", "--home", home)
    assert code == 3 and "--exit-temperature only applies to --kind dact" in err


def test_dact_pipeline_for_real_then_choose_a_point(home, capsys, tmp_path):
    """A real `dact-pipeline` run on the tiny encoder (easy keyword data), then `--choose` of another stage-3 point:
    its halting units are used for prediction without training."""
    import random

    from easydata import easy_csv

    from dact_lib.models import halting_choice

    data = easy_csv(tmp_path / "easy.csv", n=240)
    small = ["--encoder", "tiny", "--device", "cpu", "--data", data, "--home", home, "--trials", 2,
             "--lambdas-trials", 14, "--min-steps", 40, "--no-single-run", "--name", "cli-pipe"]
    code, out, err = run_cli(capsys, "dact-pipeline", *small, "--guards", "warn")
    assert code == 0, err
    final = last_run_id(out)
    assert "chosen " in err and "final test" in err
    tr = Tracker(home)
    parent = tr.get_run(final)["parent_id"]
    chosen = tr.get_run(parent)["summary"]["chosen"]["trial"]
    from dact_lib.tuning.dact_pipeline import pareto_points, load_stage3

    front = [p.trial for p in pareto_points(load_stage3(parent, tracker=tr)[0])]
    other = next((t for t in front if t != chosen), None)
    if other is not None:
        code, out, err = run_cli(capsys, "dact-pipeline", "--home", home, "--name", "cli-pipe", "--choose", other)
        assert code == 0 and f"trial {other}'s halting units" in err, err
        assert halting_choice(tr.run_dir(final))["trial"] == other and last_run_id(out) == final
    code, out, err = run_cli(capsys, "predict", "--run", final, "--home", home, "--json", "sunny rain today")
    assert code == 0 and "exit_layer" in out
    code, out, err = run_cli(capsys, "dact-pipeline", "--home", home, "--name", "cli-pipe", "--choose", 999)
    assert code == 3 and "not on the Pareto front" in err

    # export --point K: the point's halting units baked in and named in the export; the run's choice unchanged
    point = other if other is not None else chosen
    before = halting_choice(tr.run_dir(final))
    code, out, err = run_cli(capsys, "export", "--run", parent, "--point", point, "--out", tmp_path / "pt",
                             "--home", home)
    assert code == 0, err
    import torch
    from safetensors.torch import load_file

    record = json.loads((tmp_path / "pt" / "dact_lab_run.json").read_text())
    assert record["halting"]["trial"] == point and halting_choice(tr.run_dir(final)) == before
    p = {q.trial: q for q in pareto_points(load_stage3(parent, tracker=tr)[0])}[point]
    want = load_file(str(tr.abs_path(p.halting_file)))
    got = load_file(str(tmp_path / "pt" / "model.safetensors"))
    assert all(torch.equal(got[f"halters.{k}"], v) for k, v in want.items())
    code, out, err = run_cli(capsys, "export", "--run", final, "--point", point, "--out", tmp_path / "pt2",
                             "--home", home)
    assert code == 3 and "DACT pipeline" in err and not (tmp_path / "pt2").exists()

    # labels that do not depend on the text: the guard stops the pipeline and says what to change
    rows = data.read_text().splitlines()
    labels = [r.rsplit(",", 1)[1] for r in rows[1:]]
    random.Random(0).shuffle(labels)
    noise = tmp_path / "noise.csv"
    noise.write_text("\n".join([rows[0]] + [r.rsplit(",", 1)[0] + "," + lab for r, lab in zip(rows[1:], labels)]))
    code, out, err = run_cli(capsys, "dact-pipeline", *[a if a != data else noise for a in small[:-1]], "noise")
    assert code == 3 and "not clearly better than always answering the largest class" in err
    assert "What to change" in err


def test_config_file_device_is_kept_unless_the_flag_is_given(tmp_path):
    """Bug: cli wrote the --device default ('auto') over a config's "device": "cpu"."""
    import argparse

    from dact_lib.cli import build_parser, config_from_args

    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(json.dumps({"kind": "backbone", "encoder": "tiny", "train": {"device": "cpu"}}))
    args = build_parser().parse_args(["train", "--config", str(cfg_file)])
    assert config_from_args(args).train.device == "cpu"
    args = build_parser().parse_args(["train", "--config", str(cfg_file), "--device", "auto"])
    assert config_from_args(args).train.device == "auto"
    assert isinstance(args, argparse.Namespace)


@pytest.mark.parametrize("argv, flag", [
    (["runs", "--device", "cpu"], "--device"),
    (["report", "--run", "1", "--out", "r.html", "--tag", "x"], "--tag"),
    (["report", "--run", "1", "--out", "r.html", "--device", "cpu"], "--device"),
    (["evaluate", "--run", "1", "--tag", "x"], "--tag"), (["predict", "--run", "1", "--tag", "x", "hi"], "--tag"),
    (["studies", "--tag", "x"], "--tag"), (["studies", "--device", "cpu"], "--device"),
])
def test_flags_are_accepted_only_where_they_do_something(argv, flag, capsys):
    from dact_lib.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2 and f"unrecognized arguments: {flag}" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["train", "--device", "cpu", "--tag", "t"], ["evaluate", "--run", "1", "--device", "cpu"],
                                  ["predict", "--run", "1", "--device", "cpu", "hi"],
                                  ["pbt", "--device", "cpu", "--tag", "t"], ["dact-pipeline", "--tag", "t"]])
def test_flags_that_do_something_are_accepted(argv):
    from dact_lib.cli import build_parser

    build_parser().parse_args(argv)


@pytest.mark.parametrize("cfg, field", [
    ({"train": {"seed": 2**64}}, "train.seed"),
    ({"data": {"split_seed": 2**40}}, "data.split_seed"),
    ({"data": {"dataset_id": 2**70}}, "data.dataset_id"),
    ({"init_from_run": 2**64}, "init_from_run"),
])
def test_out_of_range_config_values_are_refused_with_the_range(home, capsys, tmp_path, cfg, field):
    """Issue 27: train.seed = 2**64 ended in numpy's "ValueError: Seed must be between 0 and 2**32 - 1", a dataset id
    beyond 64 bits in "OverflowError: Python int too large to convert to SQLite INTEGER" — tracebacks, not messages."""
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"kind": "backbone", "encoder": "tiny", **cfg}))
    code, out, err = run_cli(capsys, "train", "--config", path, "--home", home, "--device", "cpu")
    assert code == 3 and f"{field} = " in err and "expected an integer >= " in err and "<= " in err
    assert "Traceback" not in err and Tracker(home).list_runs() == []


# --------------------------------------------------------------------------- issue 26, item 6: CLI habits
def _pyproject_version() -> str:
    import tomllib
    from pathlib import Path

    return tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["version"]


def test_version_comes_from_the_distribution_and_falls_back_to_pyproject(capsys, monkeypatch):
    from importlib import metadata

    import dact_lib

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"dact-lab {metadata.version('dact-lab')}\n"
    assert dact_lib.__version__ == metadata.version("dact-lab") == _pyproject_version()  # one version everywhere

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    from dact_lib.version import version

    version.cache_clear()
    assert version() == _pyproject_version()
    version.cache_clear()


def test_help_and_readme_list_the_exit_statuses(capsys):
    from pathlib import Path

    from dact_lib import cli

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert out.rstrip().endswith(cli.EXIT_STATUS_HELP)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("### Exit status", 1)[1].split("\n\n", 3)[2]
    rows = {int(line.split("|")[1].strip(" `")) for line in table.splitlines() if line.startswith("| `")}
    assert rows == {cli.EXIT_OK, cli.EXIT_FAILED, cli.EXIT_USAGE, cli.EXIT_REFUSED, cli.EXIT_INTERRUPTED,
                    cli.EXIT_PIPE} == {0, 1, 2, 3, 130, 141}


def test_exit_statuses(home, capsys, monkeypatch):
    from dact_lib import cli
    from dact_lib.errors import DataError

    with pytest.raises(SystemExit) as exc:  # usage: argparse's 2
        main(["runs", "--no-such-flag"])
    assert exc.value.code == 2
    capsys.readouterr()
    assert main(["train", "--data", "nope.csv", "--home", str(home)]) == 3  # refused input
    assert capsys.readouterr().err == "error: File 'nope.csv' does not exist: check the path.\n"

    def boom(args):
        raise RuntimeError("the loss went NaN")

    def refuse(args):
        raise DataError("bad file: fix it.")

    def ctrl_c(args):
        raise KeyboardInterrupt

    for fn, code in ((boom, 1), (refuse, 3), (ctrl_c, 130)):
        monkeypatch.setitem(cli.COMMANDS, "db", fn)
        assert main(["db", "--home", str(home)]) == code
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err  # a failed run shows where
    assert "error: the command failed: RuntimeError: the loss went NaN\n" in err
    assert "error: bad file: fix it.\n" in err and err.endswith("interrupted\n")


def test_a_closed_pipe_ends_quietly(home):
    """``dact-lab runs --json | head -c 800``: the reader goes away after 800 bytes; no traceback, no "Exception
    ignored" at exit, status 141."""
    import os
    import subprocess
    import sys

    tr = Tracker(home)
    for i in range(300):  # ~ 300 kB of JSON: far more than a pipe holds
        tr.create_run("backbone", {"padding": "x" * 800, "i": i}, name=f"run {i}", status="finished")
    env = {**os.environ, "DACT_LAB_HOME": str(home)}
    proc = subprocess.run(f"'{sys.executable}' -m dact_lib runs --json | head -c 800; echo \" ${{PIPESTATUS[0]}}\"",
                          shell=True, executable="/bin/bash", capture_output=True, text=True, env=env, timeout=120)
    assert proc.stderr == ""
    assert len(proc.stdout) == 800 + len(" 141\n") and proc.stdout.endswith(" 141\n")
    assert proc.stdout.startswith("[\n  {")


def test_runs_kind_names_the_kinds_and_no_runs_yet_only_for_an_empty_home(home, capsys):
    code, out, _ = run_cli(capsys, "runs", "--home", home)
    assert code == 0 and out.startswith("no runs yet")
    code, _, err = run_cli(capsys, "runs", "--kind", "foo", "--home", home)
    assert code == 3 and err == ("error: --kind 'foo': unknown kind 'foo'. The kinds of run are backbone, dact, "
                                 "multitask, tune-backbone, dact-pipeline, pbt, pbt-member; this home has no runs "
                                 "yet: give one or several, comma-separated.\n")
    tr = Tracker(home)
    a = tr.create_run("backbone", {}, name="a", status="finished")
    b = tr.create_run("dact", {}, name="b", status="finished")
    code, out, _ = run_cli(capsys, "runs", "--kind", "pbt", "--home", home)
    assert code == 0 and out == "no runs match; this home's 2 run(s) are of kind backbone, dact\n"
    code, out, _ = run_cli(capsys, "runs", "--kind", "pbt", "--json", "--home", home)
    assert code == 0 and json.loads(out) == []
    code, out, _ = run_cli(capsys, "runs", "--kind", "dact,backbone", "--json", "--home", home)
    assert code == 0 and sorted(r["id"] for r in json.loads(out)) == [a, b]
    code, _, err = run_cli(capsys, "runs", "--kind", "dact,bakbone", "--home", home)
    assert code == 3 and "unknown kind 'bakbone'" in err and "this home has runs of kind backbone, dact:" in err


def test_no_error_tells_a_cli_user_to_call_python(home, capsys, tmp_path):
    """Errors the library words for Python callers (list_runs(), list_datasets(), columns={...}) name the command
    or flag instead; --columns maps a file's columns."""
    calls = re.compile(r"\b[a-z_]+\(\)|columns=\{")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("kind: backbone\nencoder: tiny\ndata:\n  dataset_id: 99\n")
    odd = tmp_path / "odd.csv"
    odd.write_text("review,stars\n" + "".join(f"a fine review {i},{'ab'[i % 2]}\n" for i in range(60)))
    cases = {("report", "--run", "99", "--out", tmp_path / "r.html"): "list them with `python -m dact_lib runs`",
             ("train", "--resume", "99"): "list them with `python -m dact_lib runs`",
             ("train", "--config", cfg): "the dashboard's Data page lists them",
             ("train", "--data", odd, "--encoder", "tiny"): "with --columns, e.g. --columns text=review,label=stars"}
    for argv, fix in cases.items():
        code, _, err = run_cli(capsys, *argv, "--home", home)
        assert code == 3 and fix in err and not calls.search(err), (argv, err)
    code, _, err = run_cli(capsys, "train", "--data", odd, "--columns", "text=review", "--home", home)
    assert code == 3 and "No label column found" in err
    code, _, err = run_cli(capsys, "train", "--data", odd, "--columns", "text", "--home", home)
    assert code == 3 and "--columns 'text': give KEY=COLUMN pairs" in err
    code, out, _ = run_cli(capsys, "train", *TINY, "--data", odd, "--columns", "text=review,label=stars",
                           "--epochs", 1, "--home", home, "--verbosity", 0)
    assert code == 0 and Tracker(home).get_run(last_run_id(out))["config"]["data"]["columns"] == {
        "text": "review", "label": "stars"}


def test_tag_is_repeatable_and_runs_lists_the_runs_with_a_tag(home, capsys):
    """Issue 26, 5c: --tag a --tag b,c gives three tags (one --tag stays one string, as before); runs --tag X."""
    from dact_lib.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--tag", "sweep", "--tag", "lr,sweep, seed-1"])
    assert config_from_args(args).tag == ["sweep", "lr", "seed-1"]
    assert config_from_args(build_parser().parse_args(["train", "--tag", "one"])).tag == "one"
    tr = Tracker(home)
    a = tr.create_run("dact", tag=["sweep", "lr"], status="finished")
    b = tr.create_run("backbone", tag="sweep", status="finished")
    tr.create_run("backbone", tag="other", status="finished")
    code, out, _ = run_cli(capsys, "runs", "--tag", "sweep", "--json", "--home", home)
    assert code == 0 and [r["id"] for r in json.loads(out)] == [b, a]
    assert json.loads(out)[1]["tags"] == ["sweep", "lr"]
    code, out, _ = run_cli(capsys, "runs", "--tag", "sweep", "--tag", "lr", "--json", "--home", home)
    assert [r["id"] for r in json.loads(out)] == [a]
    code, out, _ = run_cli(capsys, "runs", "--tag", "sweep", "--home", home)
    assert code == 0 and "sweep, lr" in out and "other" not in out


def test_report_links_plotly_from_its_cdn_when_asked(home, capsys, tmp_path):
    """Issue 26, 5d: report --plotly-cdn writes a small page that loads plotly.js from its CDN; the default page
    stays self-contained (plotly.js inlined)."""
    tr = Tracker(home)
    rid = tr.create_run("dact", {"kind": "dact"}, status="finished")
    for step in range(1, 41):
        tr.log_metrics(rid, {"train_loss": 1.0 / step, "val_accuracy": step / 40, "lr": 1e-4}, step=step)
    inline, cdn = tmp_path / "inline.html", tmp_path / "cdn.html"
    assert run_cli(capsys, "report", "--run", rid, "--out", inline, "--home", home)[0] == 0
    assert run_cli(capsys, "report", "--run", rid, "--out", cdn, "--plotly-cdn", "--home", home)[0] == 0
    page, small = inline.read_text(), cdn.read_text()
    assert not re.search(r"<script[^>]+src=[\"']https?://", page) and len(page) > 1_000_000
    assert re.search(r"<script[^>]+src=\"https://cdn\.plot\.ly/plotly-[0-9.]+\.min\.js\"", small)
    assert len(small) < 100_000 and small.count("Plotly.newPlot") == page.count("Plotly.newPlot") == 2
