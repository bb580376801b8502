"""train.report_to: one tiny DACT training reported to MLflow (a file store), TensorBoard and W&B (offline), each
read back with the tool's own reader; a failing tool never stops training; bad or missing tools are refused."""
from __future__ import annotations

import importlib.util
import json
import logging
import socket
import struct
from pathlib import Path

import pytest

from dact_lib import reporting
from dact_lib.cli import main
from dact_lib.config import default_config
from dact_lib.errors import ConfigError, DactLabError
from dact_lib.tracker import Tracker
from dact_lib.train import train
from test_train import tiny_cfg as train_tiny_cfg

HAVE = {t: importlib.util.find_spec(m) is not None for t, (m, _) in reporting.REQUIREMENTS.items()}


def tiny_cfg(kind="dact", report_to=(), epochs=2):
    """test_train's tiny run, reporting to ``report_to``, with two tags."""
    cfg = train_tiny_cfg(kind, epochs=epochs, report_to=list(report_to))
    cfg.tag = ["nightly", "tiny"]
    return cfg.validate()


def tool_env(mp: pytest.MonkeyPatch, root: Path) -> None:
    """Every tool writes under ``root``, offline."""
    mp.setenv("MLFLOW_TRACKING_URI", f"file:{root / 'mlruns'}")
    mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    mp.setenv("MLFLOW_EXPERIMENT_NAME", "reporting-test")
    for var, sub in (("WANDB_DIR", "wandb-runs"), ("WANDB_CONFIG_DIR", "wandb-config"), ("WANDB_CACHE_DIR", "wandb-cache"),
                     ("WANDB_DATA_DIR", "wandb-data"), ("WANDB_ARTIFACT_DIR", "wandb-artifacts")):
        (root / sub).mkdir(exist_ok=True)
        mp.setenv(var, str(root / sub))
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("WANDB_CONSOLE", "off")


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """One DACT run (2 epochs, halting fitted after training) reported to every installed tool."""
    tools = [t for t in ("mlflow", "tensorboard", "wandb") if HAVE[t]]
    if not tools:
        pytest.skip("none of mlflow, tensorboard, wandb is installed (requirements-dev.txt has them)")
    root = tmp_path_factory.mktemp("reporting")
    with pytest.MonkeyPatch.context() as mp:
        tool_env(mp, root)
        tr = Tracker(root / "home")
        res = train(tiny_cfg(report_to=tools), tracker=tr, home=root / "home")
    assert res.status == "finished"
    metrics = tr.get_metrics(res.run_id)
    return {"root": root, "tracker": tr, "run_id": res.run_id, "run_dir": Path(res.run_dir), "metrics": metrics,
            "train_loss": metrics[metrics["name"] == "train_loss"].sort_values("step"),
            "where": {e["payload"]["tool"]: e["payload"] for e in tr.get_events(res.run_id, ["reported_to"])}}


def test_mlflow_file_store_has_the_params_the_loss_history_the_front_and_the_model(reported):
    if not HAVE["mlflow"]:
        pytest.skip("mlflow is not installed")
    from mlflow.tracking import MlflowClient

    where = reported["where"]["mlflow"]
    assert where["tracking_uri"] == f"file:{reported['root'] / 'mlruns'}"
    client = MlflowClient(tracking_uri=where["tracking_uri"])
    exp = client.get_experiment_by_name("reporting-test")  # $MLFLOW_EXPERIMENT_NAME
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_id == where["run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["dact_lab.run_id"] == str(reported["run_id"]) and run.data.tags["dact_lab.kind"] == "dact"
    assert run.data.tags["dact_lab.tags"] == "nightly, tiny"
    params = run.data.params
    assert params["kind"] == "dact" and params["train.epochs"] == "2" and params["train.batch_size"] == "16"
    assert json.loads(params["train.report_to"])[0] == "mlflow"
    # the loss history: the tracker's steps and values
    history = sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)
    ours = reported["train_loss"]
    assert [m.step for m in history] == ours["step"].tolist()
    assert [m.value for m in history] == pytest.approx(ours["value"].tolist())
    for name in ("lr", "samples_per_s", "val_accuracy", "val_avg_exit_layer", "test_accuracy",
                 "halting/chosen_accuracy"):
        assert client.get_metric_history(run.info.run_id, name), name
    # the artefacts: the exit front and the model folder, without the TensorBoard logs
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert top == {"exit_front.json", "model"}
    model = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/model.safetensors", "model/config.json", "model/label_maps.json", "model/encoder"} <= model
    assert "model/tensorboard" not in model
    front = json.loads(Path(client.download_artifacts(run.info.run_id, "exit_front.json",
                                                       str(reported["root"]))).read_text())
    assert front["points"] and any(p["on_front"] for p in front["points"])
    assert sum(p["chosen"] for p in front["points"]) == 1


def test_tensorboard_event_files_have_the_scalars_at_the_loop_steps(reported):
    if not HAVE["tensorboard"]:
        pytest.skip("tensorboard is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = reported["run_dir"] / "tensorboard"  # the default: the run folder's tensorboard/
    assert reported["where"]["tensorboard"]["log_dir"] == str(log_dir)
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train_loss", "lr", "samples_per_s", "val_accuracy", "val_loss", "test_accuracy",
            "halting/chosen_avg_exit_layer"} <= scalars
    ours = reported["train_loss"]
    events = acc.Scalars("train_loss")
    assert [e.step for e in events] == ours["step"].tolist()
    assert [e.value for e in events] == pytest.approx(ours["value"].tolist(), rel=1e-5)
    val = reported["metrics"][reported["metrics"]["name"] == "val_accuracy"]
    assert sorted({e.step for e in acc.Scalars("val_accuracy")}) == sorted(set(val["step"]))
    assert {"config/text_summary", "exit_front/text_summary", "result/text_summary"} <= set(acc.Tags()["tensors"])


def wandb_records(run_folder: Path) -> list:
    """The records of an offline W&B run (its ``run-<id>.wandb`` file: a LevelDB-style log of protobuf Records —
    7-byte header, 32 KiB blocks, chunks with a crc32 / length / type header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_folder.glob("run-*.wandb")
    data, block, pos, part, out = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # full, last
            rec = pb.Record()
            rec.ParseFromString(part + chunk)
            out.append(rec)
            part = b""
        elif kind in (2, 3):  # first, middle
            part += chunk
        elif kind == 0 and length == 0:
            pos += (block - pos % block) % block
    return out


def test_wandb_offline_run_folder_has_the_config_the_history_the_front_and_the_model(reported):
    if not HAVE["wandb"]:
        pytest.skip("wandb is not installed")
    where = reported["where"]["wandb"]
    assert where["mode"] == "offline" and where["project"] == "dact-lab"
    folder = Path(where["dir"]).parent  # <WANDB_DIR>/wandb/offline-run-<time>-<id>/
    assert folder.parent.parent == reported["root"] / "wandb-runs" and folder.name.endswith(where["id"])
    records = wandb_records(folder)
    kinds = [r.WhichOneof("record_type") for r in records]
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.display_name == f"dact-lab run {reported['run_id']}" and {"nightly", "tiny", "dact"} <= set(run.tags)
    config = {i.key: json.loads(i.value_json) for i in run.config.update}  # the run config, nested
    assert config["kind"] == "dact" and config["train"]["epochs"] == 2 and config["train"]["report_to"][0] == "mlflow"
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    losses = [(h[reporting.STEP_KEY], h["train_loss"]) for h in history if "train_loss" in h]
    ours = reported["train_loss"]
    assert [s for s, _ in losses] == ours["step"].tolist()
    assert [v for _, v in losses] == pytest.approx(ours["value"].tolist())
    assert any("val_accuracy" in h for h in history) and any("exit_front/_type" in h for h in history)
    arts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "model"]
    assert len(arts) == 1 and arts[0].name == f"dact-lab-run-{reported['run_id']}"
    files = {m.path for m in arts[0].manifest.contents}
    assert {"model.safetensors", "config.json", "label_maps.json", "encoder/config.json"} <= files
    assert not any(f.startswith("tensorboard/") for f in files)
    assert "exit" in kinds  # finished


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


def test_a_failing_reporter_warns_once_and_the_training_finishes(home, tmp_path, monkeypatch, caplog):
    """MLflow's server is down (nothing listens on its port) and TensorBoard fails at every step: one warning
    each (log and run event), and the run finishes with all its metrics in the tracker."""
    if not (HAVE["mlflow"] and HAVE["tensorboard"]):
        pytest.skip("mlflow and tensorboard are needed")
    tool_env(monkeypatch, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    calls = []

    def broken_step(self, state, logs):
        calls.append(state.step)
        raise OSError("No space left on device")

    monkeypatch.setattr(reporting.TensorBoardReporter, "step", broken_step)
    tr = Tracker(home)
    with caplog.at_level(logging.WARNING, logger="dact_lib.reporting"):
        res = train(tiny_cfg("backbone", ["mlflow", "tensorboard"], epochs=1), tracker=tr, home=home)
    assert res.status == "finished" and tr.get_run(res.run_id)["status"] == "finished"
    warned = [r.getMessage() for r in caplog.records if r.name == "dact_lib.reporting" and r.levelno == logging.WARNING]
    assert len(warned) == 2, warned
    assert any("MLflow" in w and "starting" in w for w in warned)
    assert any("TensorBoard" in w and "No space left" in w for w in warned)
    assert len(calls) == 1  # switched off after the first failure
    events = [e["payload"] for e in tr.get_events(res.run_id, ["warning"])]
    assert sorted(e["tool"] for e in events) == ["mlflow", "tensorboard"]
    steps = tr.get_metrics(res.run_id, names=["train_loss"])["step"].tolist()
    assert steps and steps[-1] == tr.get_run(res.run_id)["summary"]["steps"]


def test_bad_names_are_refused_with_the_allowed_ones(home, capsys):
    cfg = default_config("backbone", encoder="tiny")
    cfg.train.report_to = ["mlflow", "comet"]
    with pytest.raises(ConfigError, match=r"train\.report_to .*unknown 'comet': choose among 'mlflow', 'wandb', "
                                          r"'tensorboard'.*--report-to mlflow,tensorboard"):
        cfg.validate()
    cfg.train.report_to = ["mlflow", "mlflow"]
    with pytest.raises(ConfigError, match="each tool once"):
        cfg.validate()
    code = main(["train", "--kind", "backbone", "--encoder", "tiny", "--report-to", "mlflow,Comet", "--home",
                 str(home), "--verbosity", "0"])
    assert code != 0 and "unknown 'comet'" in capsys.readouterr().err
    assert Tracker(home).list_runs() == []  # refused before a run was created


def test_a_tool_that_is_not_installed_names_the_pip_install(home, monkeypatch, capsys):
    monkeypatch.setitem(reporting.REQUIREMENTS, "wandb", ("dact_lab_no_such_module", "wandb"))
    code = main(["train", "--kind", "backbone", "--encoder", "tiny", "--report-to", "wandb", "--home", str(home),
                 "--verbosity", "0"])
    err = capsys.readouterr().err
    assert code != 0 and "wandb" in err and "pip install wandb" in err and "--report-to" in err
    assert Tracker(home).list_runs() == []
    # a run started another way (a job, the library) fails at its start with the same message, recorded
    tr = Tracker(home)
    with pytest.raises(DactLabError, match="pip install wandb"):
        train(tiny_cfg("backbone", ["wandb"], epochs=1), tracker=tr, home=home)
    (run,) = tr.list_runs()
    assert run["status"] == "failed" and "pip install wandb" in run["error"]


def test_the_cli_flag_and_no_reporters_by_default(home):
    from dact_lib.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--encoder", "tiny", "--report-to", "mlflow, tensorboard"])
    if not (HAVE["mlflow"] and HAVE["tensorboard"]):
        pytest.skip("mlflow and tensorboard are needed")
    assert config_from_args(args).train.report_to == ["mlflow", "tensorboard"]
    assert default_config("dact").train.report_to == []
    assert reporting.build_reporters(default_config("dact"), 1) == []


def test_a_resumed_run_continues_the_same_mlflow_run_and_tensorboard_folder(home, tmp_path, monkeypatch):
    """train --resume: the reporters find where the run reported (its reported_to events) and go on there."""
    if not (HAVE["mlflow"] and HAVE["tensorboard"]):
        pytest.skip("mlflow and tensorboard are needed")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dact_lib.callbacks import Callback, CancelToken
    from dact_lib.errors import Cancelled
    from dact_lib.train import resume_config

    tool_env(monkeypatch, tmp_path)
    token = CancelToken()

    class CancelAfterTheFirstEvaluation(Callback):
        def on_eval(self, state, logs):
            token.cancel("stopped by the test")

    tr = Tracker(home)
    with pytest.raises(Cancelled):
        train(tiny_cfg("backbone", ["mlflow", "tensorboard"], epochs=3), tracker=tr, home=home, cancel=token,
              callbacks=[CancelAfterTheFirstEvaluation()])
    (run,) = tr.list_runs()
    assert run["status"] == "cancelled"
    train(resume_config(tr, run["id"]), tracker=tr, home=home, run_id=run["id"], resume=True)
    assert tr.get_run(run["id"])["status"] == "finished"
    where = [e["payload"] for e in tr.get_events(run["id"], ["reported_to"])]
    mlflow_runs = {w["run_id"] for w in where if w["tool"] == "mlflow"}
    assert len(where) == 4 and len(mlflow_runs) == 1  # two starts, one MLflow run
    client = MlflowClient(tracking_uri=where[0]["tracking_uri"])
    (run_id,) = mlflow_runs
    assert client.get_run(run_id).info.status == "FINISHED"
    ours = tr.get_metrics(run["id"], names=["train_loss"]).sort_values("step")
    history = sorted(client.get_metric_history(run_id, "train_loss"), key=lambda m: m.step)
    assert [m.step for m in history] == ours["step"].tolist()
    assert len({w["log_dir"] for w in where if w["tool"] == "tensorboard"}) == 1
    acc = EventAccumulator(where[1]["log_dir"] if where[1]["tool"] == "tensorboard" else where[0]["log_dir"])
    acc.Reload()
    assert [e.step for e in acc.Scalars("train_loss")] == ours["step"].tolist()
