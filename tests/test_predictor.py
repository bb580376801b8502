"""deploy/predictor.py: one interface over the runtimes (tiny-encoder runs). The ONNX path is tested with stand-ins
for deploy.runtime / deploy.onnx_export (the cache: exported once, reused, replaced when the weights change); the
tests with the real ONNX modules skip until those modules exist."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import pytest

from dact_lib.cli import main
from dact_lib.deploy.predictor import (HF_MANIFEST, ONNX_MANIFEST, exit_front, folder_kind, from_loaded,
                                       load_predictor)
from dact_lib.errors import DactLabError
from deploy_runs import run_copy, tiny_run

TEXTS = ["sunny rain today", "the goal and the match", "pasta soup cheese", "storm"]


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


# --------------------------------------------------------------------------------------------- torch


def test_torch_predictor_of_a_dact_run():
    from dact_lib.models import load_model, predict

    home, run = tiny_run("dact")
    p = load_predictor(run=run, home=home)
    assert (p.kind, p.tasks, p.num_layers, p.policy, p.runtime) == ("dact", ["label"], 2, "dact", "pytorch")
    assert p.labels == {"label": ["food", "sport", "weather"]} and p.source == str(home / "runs" / str(run))
    got = p.predict(TEXTS, batch_size=3)  # batches of similar length, answers in the order given
    ref = predict(load_model(run, home, "cpu"), TEXTS)
    assert [g["label"] for g in got] == [r["label"] for r in ref]
    assert [g["exit_layer"] for g in got] == [r["exit_layer"] for r in ref]
    assert all("layers" not in g for g in got)
    traced = p.predict(TEXTS[:1], trace=True)[0]
    assert [lay["layer"] for lay in traced["layers"]] == list(range(1, traced["exit_layer"] + 1))
    info = p.describe()
    assert set(info) == {"kind", "tasks", "labels", "num_layers", "policy", "runtime", "source", "front"}
    assert info["front"] and all({"avg_exit_layer", "accuracy"} <= set(pt) for pt in info["front"])
    json.dumps(info)  # served as /model: plain JSON

    fixed = load_predictor(run=run, home=home, policy="fixed:1")
    assert fixed.policy == "fixed:1" and {r["exit_layer"] for r in fixed.predict(TEXTS)} == {1}
    assert load_predictor(run=str(home / "runs" / str(run)), policy=" Entropy:0.50 ").policy == "entropy:0.5"
    with pytest.raises(DactLabError, match="this model has 2 layers; give a value from 1 to 2"):
        load_predictor(run=run, home=home, policy="fixed:3")
    with pytest.raises(DactLabError, match="entropy:0.35"):
        load_predictor(run=run, home=home, policy="entropy:x")


def test_other_kinds_take_no_policy_and_have_no_layers():
    home, run = tiny_run("backbone")
    p = load_predictor(model_dir=home / "runs" / str(run))
    assert (p.kind, p.num_layers, p.policy, p.describe()["front"]) == ("backbone", None, None, [])
    assert set(p.predict(["hello"])[0]) >= {"label", "probability", "probabilities"}
    with pytest.raises(DactLabError, match="only applies to DACT models.*drop the policy"):
        load_predictor(run=run, home=home, policy="entropy:0.3")
    home, run = tiny_run("multitask")
    p = load_predictor(run=run, home=home)
    assert p.tasks == ["class_label", "sentiment_label"] and set(p.predict(["hi"])[0]["tasks"]) == set(p.tasks)


def test_exactly_one_model_and_clear_errors(tmp_path):
    home, run = tiny_run("dact")
    for kwargs in ({}, {"run": run, "model_dir": tmp_path}):
        with pytest.raises(DactLabError, match="Give exactly one model"):
            load_predictor(home=home, **kwargs)
    with pytest.raises(DactLabError, match="holds no model.*dact_lab_run.json"):
        load_predictor(model_dir=tmp_path)
    with pytest.raises(DactLabError, match="is not a folder"):
        load_predictor(model_dir=tmp_path / "nope")
    with pytest.raises(DactLabError, match="has no saved model"):
        load_predictor(run=999, home=home)
    with pytest.raises(DactLabError, match="runtime 'tf'"):
        load_predictor(run=run, home=home, runtime="tf")
    with pytest.raises(DactLabError, match="ONNX Runtime runs on the CPU"):
        load_predictor(run=run, home=home, runtime="onnx", device="cuda")
    p = load_predictor(run=run, home=home)
    for bad, msg in (([], "Nothing to predict"), (["ok", " "], "Text 2 is empty"), (["ok", 3], "Text 2 is a int")):
        with pytest.raises(DactLabError, match=msg):
            p.predict(bad)


def test_the_exit_front_is_the_non_dominated_points(tmp_path):
    rep = {"halting": {"points": [{"avg_exit_layer": 2.0, "accuracy": 0.9, "lambda": 0.0},
                                  {"avg_exit_layer": 1.5, "accuracy": 0.8, "lambda": 0.1},
                                  {"avg_exit_layer": 1.8, "accuracy": 0.7, "lambda": 0.05},  # dominated
                                  {"avg_exit_layer": 1.5, "accuracy": 0.8, "lambda": 0.2}],  # the same point
                       "threshold_points": [{"avg_exit_layer": 1.1, "accuracy": 0.6, "threshold": 0.4}]}}
    (tmp_path / "report.json").write_text(json.dumps(rep))
    assert exit_front(tmp_path) == [{"avg_exit_layer": 1.1, "accuracy": 0.6, "threshold": 0.4},
                                    {"avg_exit_layer": 1.5, "accuracy": 0.8, "lambda": 0.1},
                                    {"avg_exit_layer": 2.0, "accuracy": 0.9, "lambda": 0.0}]
    (tmp_path / "report.json").write_text("{broken")
    assert exit_front(tmp_path) == [] and exit_front(None) == []


def test_from_loaded_wraps_a_model_a_page_holds():
    from dact_lib.models import load_model

    home, run = tiny_run("dact")
    loaded = load_model(run, home, "cpu")
    loaded.policy = "patience:1"  # what an hf export's LoadedModel carries: its default policy
    p = from_loaded(loaded)
    assert p.policy == "patience:1" and from_loaded(loaded, policy="dact").policy == "dact"


# --------------------------------------------------------------------------------------------- the ONNX path


class FakeOnnxModel:
    """Stands in for deploy.runtime.OnnxModel: reads the manifest the fake export wrote, answers like the run."""
    made: list = []

    def __init__(self, folder, *, int8=None, threads=None, policy=None):
        man = json.loads((Path(folder) / ONNX_MANIFEST).read_text())
        self.folder, self.kind, self.tasks, self.labels = Path(folder), man["kind"], man["tasks"], man["labels"]
        self.num_layers = man.get("num_layers")
        self.variant = "int8" if (int8 if int8 is not None else man.get("int8_default", False)) else "fp32"
        self.policy = policy or ("dact" if self.kind == "dact" else None)
        FakeOnnxModel.made.append({"folder": self.folder, "int8": int8, "threads": threads, "policy": policy})

    def predict(self, texts, policy=None, batch_size=32):
        task = self.tasks[0]
        name = self.labels[task][0]
        return [{"label": name, "probability": 1.0, "probabilities": {name: 1.0}, "exit_layer": 1,
                 "num_layers": self.num_layers, "task": task, "layers": []} for _ in texts]


@pytest.fixture
def fake_onnx(monkeypatch):
    exports: list = []

    def export_onnx(loaded, out_dir, *, int8=False, policy=None):
        out = Path(out_dir)
        out.mkdir(parents=True)
        man = {"kind": loaded.kind, "tasks": list(loaded.label_maps)[:1], "labels": loaded.label_maps,
               "num_layers": getattr(loaded.model, "num_layers", None), "int8": int8}
        (out / ONNX_MANIFEST).write_text(json.dumps(man))
        exports.append({"out": out, "int8": int8, "run_dir": loaded.run_dir})
        return out

    runtime = types.ModuleType("dact_lib.deploy.runtime")
    runtime.OnnxModel = FakeOnnxModel
    export = types.ModuleType("dact_lib.deploy.onnx_export")
    export.export_onnx = export_onnx
    monkeypatch.setitem(sys.modules, "dact_lib.deploy.runtime", runtime)
    monkeypatch.setitem(sys.modules, "dact_lib.deploy.onnx_export", export)
    FakeOnnxModel.made = []
    return exports


def test_a_run_is_exported_to_onnx_once_and_the_cache_follows_its_weights(fake_onnx, tmp_path):
    from dact_lib.models import model_version

    run_dir = run_copy("dact", tmp_path / "run")
    p = load_predictor(run=run_dir, runtime="onnx", threads=2)
    cache = run_dir / "deploy" / f"onnx-{model_version(run_dir)}"
    assert p.runtime == "onnxruntime-fp32" and p.kind == "dact" and p.num_layers == 2 and p.policy == "dact"
    assert (cache / ONNX_MANIFEST).is_file() and len(fake_onnx) == 1 and fake_onnx[0]["int8"] is True  # + int8
    assert fake_onnx[0]["out"].parent == cache.parent and not fake_onnx[0]["out"].exists()  # a temp folder, renamed
    assert FakeOnnxModel.made[-1] == {"folder": cache, "int8": False, "threads": 2, "policy": None}
    assert p.predict(["x"])[0]["exit_layer"] == 1 and p.describe()["front"]  # the run's measured front

    q = load_predictor(model_dir=run_dir, int8=True, policy="fixed:2")  # int8 alone means ONNX
    assert q.runtime == "onnxruntime-int8" and q.policy == "fixed:2" and len(fake_onnx) == 1  # the cache reused
    assert FakeOnnxModel.made[-1]["int8"] is True and FakeOnnxModel.made[-1]["policy"] == "fixed:2"
    with pytest.raises(DactLabError, match="this model has 2 layers"):
        load_predictor(model_dir=run_dir, int8=True, policy="fixed:9")

    weights = run_dir / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # new weights: a new export
    load_predictor(run=run_dir, runtime="onnx")
    assert len(fake_onnx) == 2
    assert [d.name for d in (run_dir / "deploy").iterdir()] == [f"onnx-{model_version(run_dir)}"]  # old one gone


def test_an_onnx_export_folder_runs_on_onnx_runtime(fake_onnx, tmp_path):
    run_dir = run_copy("backbone", tmp_path / "run")
    out = tmp_path / "export"
    out.mkdir()
    (out / ONNX_MANIFEST).write_text(json.dumps({"kind": "backbone", "tasks": ["label"],
                                                 "labels": {"label": ["a", "b"]}, "int8_default": True}))
    assert folder_kind(out) == "onnx" and folder_kind(run_dir) == "run"
    p = load_predictor(model_dir=out)  # runtime "torch" is the default: an ONNX folder still runs on ONNX Runtime
    assert p.runtime == "onnxruntime-int8" and FakeOnnxModel.made[-1]["int8"] is None  # the export's default
    assert p.policy is None and p.num_layers is None and p.describe()["front"] == []
    with pytest.raises(DactLabError, match="only applies to DACT models"):
        load_predictor(model_dir=out, policy="dact")
    assert fake_onnx == []  # nothing exported


@pytest.mark.skipif(not (_has("dact_lib.deploy.runtime") and _has("dact_lib.deploy.onnx_export")),
                    reason="deploy/runtime.py and deploy/onnx_export.py are not in this checkout yet")
def test_the_real_onnx_runtime_answers_like_torch(tmp_path):
    run_dir = run_copy("dact", tmp_path / "run")
    torch_p = load_predictor(run=run_dir)
    for int8 in (False, True):
        onnx_p = load_predictor(run=run_dir, runtime="onnx", int8=int8)
        assert onnx_p.runtime == f"onnxruntime-{'int8' if int8 else 'fp32'}"
        got, ref = onnx_p.predict(TEXTS), torch_p.predict(TEXTS)
        assert all({"label", "probability", "probabilities", "exit_layer"} <= set(g) for g in got)
        if not int8:
            assert [g["label"] for g in got] == [r["label"] for r in ref]
            assert [g["exit_layer"] for g in got] == [r["exit_layer"] for r in ref]
    assert len(list((run_dir / "deploy").iterdir())) == 1  # one cache for both variants


@pytest.mark.skipif(not _has("dact_lib.deploy.hf"), reason="deploy/hf.py is not in this checkout yet")
def test_an_hf_export_folder_runs_on_torch_with_its_policy(tmp_path):
    from dact_lib.deploy.hf import export_hf
    from dact_lib.models import load_model

    home, run = tiny_run("dact")
    out = export_hf(load_model(run, home, "cpu"), tmp_path / "hf", policy="fixed:1")
    assert (Path(out) / HF_MANIFEST).is_file() and folder_kind(out) == "hf"
    p = load_predictor(model_dir=out)
    assert p.runtime == "pytorch" and p.policy == "fixed:1" and {r["exit_layer"] for r in p.predict(TEXTS)} == {1}


# --------------------------------------------------------------------------------------------- the CLI


def test_predict_json_trace_has_the_per_layer_trace(capsys):
    """Issue "predict --json drops the per-layer trace"; issue 26: ``--trace`` asks for it (the answer alone takes
    the untraced fast path), in JSON and on the terminal; a model without layers to trace refuses it."""
    home, run = tiny_run("dact")
    code = main(["predict", "--run", str(run), "--home", str(home), "--json", "--trace", "sunny rain", "pasta"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and len(rows) == 2
    for row in rows:
        assert set(row) == {"label", "probability", "probabilities", "exit_layer", "layers"}
        assert [lay["layer"] for lay in row["layers"]] == list(range(1, row["exit_layer"] + 1))
        assert set(row["layers"][0]) == {"layer", "y", "h", "p", "label"}
        assert abs(sum(row["layers"][0]["y"].values()) - 1) < 1e-5 and 0 <= row["layers"][0]["h"] <= 1
    code = main(["predict", "--run", str(run), "--home", str(home), "--json", "sunny rain", "pasta"])
    plain = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and plain == [{k: v for k, v in r.items() if k != "layers"} for r in rows]
    code = main(["predict", "--run", str(run), "--home", str(home), "--trace", "sunny rain"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and out[0].endswith("<- sunny rain")
    assert [line.split(":")[0].strip() for line in out[1:]] == [f"layer {n}" for n in range(1, rows[0]["exit_layer"] + 1)]
    assert f"h={rows[0]['layers'][0]['h']:.3f}" in out[1]
    home_b, run_b = tiny_run("backbone")
    code = main(["predict", "--run", str(run_b), "--home", str(home_b), "--json", "--trace", "x"])
    assert code == 3 and "--trace shows a DACT model's layers up to its exit; this is a backbone model" in \
        capsys.readouterr().err
    code = main(["predict", "--model", str(home / "runs" / str(run)), "--policy", "fixed:1", "sunny rain"])
    out = capsys.readouterr().out
    assert code == 0 and "exit layer 1/2" in out and out.rstrip().endswith("<- sunny rain")
    code = main(["predict", "--run", str(run), "--home", str(home), "--policy", "dact", "--latency-budget-ms", "5",
                 "x"])
    assert code == 3 and "give one of them" in capsys.readouterr().err


def test_the_latency_budget_picks_the_policy(monkeypatch, capsys):
    home, run = tiny_run("dact")
    calls = []

    def choose_for_budget(run_, budget_ms, *, runtime="torch", int8=False, home=None):
        calls.append((str(run_), budget_ms, runtime, int8))
        if budget_ms < 1:
            return {"policy": None, "point": None, "points": [],
                    "message": "No measured point fits 0.5 ms: the fastest takes 2.0 ms per text."}
        return {"policy": "fixed:1", "point": {"policy": "fixed:1"}, "points": [],
                "message": "fixed:1: accuracy 0.8, 1.0 ms per text (p50)."}

    monkeypatch.setitem(sys.modules, "dact_lib.deploy.budget",
                        types.SimpleNamespace(choose_for_budget=choose_for_budget))
    code = main(["predict", "--run", str(run), "--home", str(home), "--latency-budget-ms", "3", "--json", "rain"])
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out)["exit_layer"] == 1 and "fixed:1: accuracy 0.8" in err
    code = main(["predict", "--run", str(run), "--home", str(home), "--latency-budget-ms", "0.5", "rain"])
    assert code == 3 and "the fastest takes 2.0 ms" in capsys.readouterr().err
    assert calls == [(str(run), 3.0, "torch", False), (str(run), 0.5, "torch", False)]


def test_the_folder_markers_are_the_exporters_file_names():
    from dact_lib.deploy.runtime import MANIFEST_FILE
    from dact_lib.models import HF_RUN_FILE, MODEL_FILE
    from dact_lib.deploy.predictor import RUN_MODEL_FILE

    assert (ONNX_MANIFEST, HF_MANIFEST, RUN_MODEL_FILE) == (MANIFEST_FILE, HF_RUN_FILE, MODEL_FILE)
