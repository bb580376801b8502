"""ONNX export (per-layer graphs, int8) and the torch-free early-exit runtime, against the PyTorch model.

Tiny random BERTs trained through the CLI (DACT, backbone, multitask: the demo data has two tasks) plus a 4-layer
DACT model saved by hand (halting units reading the trunk and the confidence features, a shared trunk), so every branch of the layer graphs and every exit policy runs with real early exits."""
from __future__ import annotations

import contextlib
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dact_lib import dact, models
from dact_lib.cli import main
from dact_lib.config import default_config
from dact_lib.deploy import onnx_export
from dact_lib.deploy.onnx_export import confidence_features_onnx, export_onnx
from dact_lib.deploy.runtime import MANIFEST_FILE, OnnxModel, read_manifest
from dact_lib.encoders import tiny_encoder
from dact_lib.errors import ConfigError, DactLabError
from dact_lib.modeling_dact import DactBert

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--encoder", "tiny", "--max-rows", "120", "--device", "cpu", "--epochs", "1", "--verbosity", "0"]
TEXTS = [
    "great food",
    "the service was slow, the waiter was rude and the soup arrived cold after forty minutes of waiting",
    "ok",
    "I loved the dessert and would certainly come back with friends next week",
    "terrible",
    "the room was clean but small",
    "Überraschend gut! Café au lait 👍 — really",
    "nothing special about the music, the lighting or the chairs, honestly",
    "bad",
    "what a lovely surprise this little place turned out to be",
]


def _train(home: Path, kind: str) -> Path:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["train", "--kind", kind, *TINY, "--home", str(home)])
    assert code == 0
    run = re.fullmatch(r"run id: (\d+)", out.getvalue().strip().splitlines()[-1]).group(1)
    return home / "runs" / run


def _policy(text: str):
    name, _, value = text.partition(":")
    return dact.make_policy(name, None if not value else (float(value) if name == "entropy" else int(value)))


@torch.no_grad()
def _layer_one_margin(loaded) -> np.ndarray:
    """The margin (best - runner-up) of y_1 for TEXTS."""
    rows = models.predict(loaded, TEXTS, dact.FixedDepthPolicy(1))
    top = np.sort(np.array([list(r["probabilities"].values()) for r in rows]), axis=1)
    return top[:, -1] - top[:, -2]


def _split_point(values: np.ndarray) -> float:
    """A threshold in the widest gap of the middle of ``values`` (some rows on each side, far from ties)."""
    s = np.sort(values)
    lo, hi = len(s) // 4, len(s) - len(s) // 4
    gaps = s[lo + 1:hi] - s[lo:hi - 1]
    i = lo + int(np.argmax(gaps))
    assert s[i + 1] - s[i] > 1e-5
    return float((s[i] + s[i + 1]) / 2)


@torch.no_grad()
def _margin_gated_halting(model: DactBert, threshold: float) -> None:
    """Every halting unit: h_n ≈ 0 (halt) when the margin of y_n is above ``threshold``, ≈ 1 (go on) below — so the
    DACT rule exits some rows at layer 1 and others later. Reads the margin feature (index 1 of the confidence
    features, after the summary for 'both')."""
    feat = model.halters[0][1].in_features - 4 + 1
    for mlp in model.halters:
        first, last = mlp[1], mlp[-1]
        first.weight.zero_()
        first.bias.zero_()
        first.weight[0, feat] = 1.0
        last.weight.zero_()
        act = mlp[2]
        last.weight[0, 0] = -2000.0
        last.bias.fill_(2000.0 * float(act(torch.tensor(threshold))))


@torch.no_grad()
def _sharpen(model: DactBert, scale: float) -> None:
    """Scale every exit's logits (the classifiers' output layers) so the tiny random model is confident enough for
    the entropy policy and int8 to be meaningful."""
    for clf in model.classifiers:
        clf[-1].weight.mul_(scale)
        clf[-1].bias.mul_(scale)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    home = root / "home"
    runs = {kind: _train(home, kind) for kind in ("dact", "backbone", "multitask")}
    # a 4-layer DACT model saved by hand: shared trunk, halting units reading the trunk and the confidence features
    cfg = default_config("dact")
    cfg.encoder = "tiny"
    cfg.model.halting_input, cfg.model.shared_trunk, cfg.model.pooling = "both", True, "mean"
    enc, tok = tiny_encoder(num_layers=4, seed=3)
    labels = {"label": ["negative", "neutral", "positive"]}
    torch.manual_seed(3)
    models.save_model(root / "deep", DactBert(enc, cfg.model, 3).eval(), tok, cfg, labels)
    runs["deep"] = root / "deep"

    loaded, exports = {}, {}
    for name, run in runs.items():
        m = models.load_model(run, device="cpu")
        if name == "dact":
            _sharpen(m.model, 30.0)
            _margin_gated_halting(m.model, _split_point(_layer_one_margin(m)))
        elif name == "deep":
            _sharpen(m.model, 20.0)
            _margin_gated_halting(m.model, _split_point(_layer_one_margin(m)))
        loaded[name] = m
        exports[name] = export_onnx(m, root / f"export_{name}", int8=name in ("dact", "backbone"))
    return {"root": root, "runs": runs, "loaded": loaded, "exports": exports}


# ---------------------------------------------------------------------------------------------------------------
def test_confidence_features_onnx_equal_the_torch_ones():
    torch.manual_seed(0)
    for k in (1, 2, 3, 7):
        y = torch.softmax(torch.randn(6, k) * 3, -1)
        y[0] = 0.0
        y[0, 0] = 1.0  # one-hot: 0 · log 0 = 0
        if k > 1:
            y[1] = 1.0 / k  # a tie
        a_prev = torch.softmax(torch.randn(6, k), -1)
        a_prev[2:4] = 0.0  # rows where a_{n-1} has not started (layer 1): agree = 0
        want = dact.confidence_features(y, a_prev)
        got = confidence_features_onnx(y, a_prev)
        assert torch.allclose(got, want, atol=1e-7, rtol=0), k
        assert got[2:4, 3].eq(0).all()


def test_the_manifest_lists_every_graph_and_its_names(work):
    man = read_manifest(work["exports"]["dact"])
    assert man["format"] == "dact-lab-onnx" and man["version"] == 1 and man["kind"] == "dact"
    assert man["num_layers"] == 2 and man["tasks"] == ["class_label"]
    assert man["labels"]["class_label"] == work["loaded"]["dact"].label_maps["class_label"]
    assert man["policy"] == "dact" and man["halting_input"] == "confidence" and man["max_seq_len"] == 128
    assert set(man["variants"]) == {"fp32", "int8"}
    assert man["variants"]["fp32"] == {"embed": "embed.onnx", "layer_1": "layer_1.onnx", "layer_2": "layer_2.onnx"}
    assert man["variants"]["int8"]["layer_1"] == "int8/layer_1.onnx"
    assert man["graphs"]["embed"]["inputs"] == ["input_ids", "attention_mask"]  # BERT ignores the mask: kept, unused
    assert man["graphs"]["layer_1"] == {"inputs": ["hidden", "attention_mask", "a_prev"],
                                        "outputs": ["hidden_out", "y", "h"]}
    assert man["graphs"]["layer_2"]["outputs"] == ["y"]  # the last layer: the DACT rule always halts there
    assert man["check"]["max_abs_diff"] <= 1e-4 and man["config"]["kind"] == "dact"
    folder = work["exports"]["dact"]
    assert all((folder / f).is_file() for v in man["variants"].values() for f in v.values())
    assert (folder / "tokenizer.json").is_file()
    assert not [p for p in folder.parent.iterdir() if ".onnx-tmp-" in p.name]  # no temp folder left
    multi = read_manifest(work["exports"]["multitask"])
    assert multi["tasks"] == ["class_label", "sentiment_label"] and list(multi["variants"]) == ["fp32"]
    assert multi["outputs"] == {"class_label": "probs_0", "sentiment_label": "probs_1"} and multi["policy"] is None


def test_the_tokenizer_reproduces_the_hf_one(work):
    loaded = work["loaded"]["dact"]
    m = OnnxModel(work["exports"]["dact"], int8=False)
    texts = TEXTS + ["word " * 300, "  spaces   everywhere  ", "MiXeD CaSe, accents: naïve résumé"]
    ids, am = m.tokenize(texts)
    want = loaded.tokenizer(texts, truncation=True, max_length=128, padding=True, return_tensors="np")
    assert ids.shape[1] == 128  # the long text was truncated to max_seq_len, [SEP] kept
    assert np.array_equal(ids, want["input_ids"]) and np.array_equal(am, want["attention_mask"])
    one_ids, _ = m.tokenize(["great food"])
    assert one_ids.tolist() == loaded.tokenizer(["great food"])["input_ids"]


def _compare(got: list[dict], want: list[dict], tol: float = 1e-4) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g["label"] == w["label"] and g["task"] == w["task"]
        assert g.get("exit_layer") == w.get("exit_layer")
        assert list(g["probabilities"]) == list(w["probabilities"])
        assert max(abs(g["probabilities"][k] - w["probabilities"][k]) for k in g["probabilities"]) <= tol
        assert abs(g["probability"] - w["probability"]) <= tol
        for t in w.get("tasks", {}):
            assert g["tasks"][t]["label"] == w["tasks"][t]["label"]
            assert max(abs(g["tasks"][t]["probabilities"][k] - p)
                       for k, p in w["tasks"][t]["probabilities"].items()) <= tol


@pytest.mark.parametrize("name", ["dact", "deep"])
def test_every_policy_exits_where_pytorch_exits(work, name):
    loaded = work["loaded"][name]
    n_layers = loaded.model.num_layers
    m = OnnxModel(work["exports"][name], int8=False)
    assert m.variant == "fp32" and m.num_layers == n_layers and m.policy == "dact"
    ent = [-sum(p * math.log(p) for p in r["probabilities"].values() if p > 0)
           for r in models.predict(loaded, TEXTS, dact.FixedDepthPolicy(1))]
    policies = ["dact", f"entropy:{_split_point(np.array(ent)):.6f}", "patience:1", "fixed:1", f"fixed:{n_layers}"]
    if n_layers > 2:
        policies += ["patience:2", "fixed:2"]
    seen = {}
    for text in policies:
        want = models.predict(loaded, TEXTS, _policy(text))
        got = m.predict(TEXTS, policy=text)
        _compare(got, want)
        assert all(g["num_layers"] == n_layers for g in got)
        seen[text] = [g["exit_layer"] for g in got]
    for text in policies[:2]:  # the DACT rule and the entropy threshold: some rows leave at layer 1, others later
        assert 1 in seen[text] and max(seen[text]) > 1, (text, seen[text])
    assert set(seen["fixed:1"]) == {1} and set(seen[f"fixed:{n_layers}"]) == {n_layers}
    assert min(seen["patience:1"]) >= 2  # PABEE: the earliest exit with t = 1 is layer 2
    if n_layers > 2:
        assert len(set(seen["dact"])) >= 2 and len(set(seen["patience:1"])) >= 2
    # the default policy of the object, and answers independent of the batching (padding, sorting)
    _compare(m.predict(TEXTS), models.predict(loaded, TEXTS, dact.DactPolicy()))
    _compare(m.predict(TEXTS, batch_size=3), m.predict(TEXTS, batch_size=1), tol=1e-5)
    assert OnnxModel(work["exports"][name], int8=False, policy="fixed:1").policy == "fixed:1"


@pytest.mark.parametrize("name", ["backbone", "multitask"])
def test_one_graph_models_answer_as_pytorch(work, name):
    loaded = work["loaded"][name]
    m = OnnxModel(work["exports"][name], int8=False)
    assert m.kind == name and m.policy is None and m.tasks == list(read_manifest(m.folder)["tasks"])
    want = models.predict(loaded, TEXTS)
    got = m.predict(TEXTS)
    _compare(got, want)
    if name == "multitask":
        assert all(set(g["tasks"]) == {"class_label", "sentiment_label"} for g in got)
    _compare(m.predict(TEXTS, batch_size=4), got, tol=1e-5)


def test_int8_runs_and_mostly_agrees_with_fp32(work):
    for name in ("dact", "backbone"):
        folder = work["exports"][name]
        q = OnnxModel(folder)  # int8 by default when the export has it
        assert q.variant == "int8"
        f = OnnxModel(folder, int8=False)
        got, ref = q.predict(TEXTS), f.predict(TEXTS)
        labels = set(q.labels[q.tasks[0]])
        assert all(g["label"] in labels and abs(sum(g["probabilities"].values()) - 1) < 1e-3 for g in got)
        agree = sum(g["label"] == r["label"] for g, r in zip(got, ref)) / len(TEXTS)
        if name == "dact":
            exits = [g["exit_layer"] for g in got]
            assert all(1 <= e <= 2 for e in exits)
            print(f"int8 {name}: exits {exits} vs fp32 {[r['exit_layer'] for r in ref]}, agreement {agree:.0%}")
        assert agree >= 0.7, (name, agree)
    assert (work["exports"]["dact"] / "int8" / "layer_1.onnx").stat().st_size < \
        (work["exports"]["dact"] / "layer_1.onnx").stat().st_size


def test_the_runtime_needs_neither_torch_nor_transformers(work):
    folder = work["exports"]["dact"]
    code = (
        "import sys\n"
        "from dact_lib.deploy.runtime import OnnxModel\n"
        f"m = OnnxModel({str(folder)!r})\n"
        "out = m.predict(['great food', 'the soup was cold and the staff rude'], policy='entropy:0.5')\n"
        "assert out[0]['exit_layer'] in (1, 2)\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
        "sys.modules['onnxruntime'] = None  # as if it were not installed\n"
        "from dact_lib.errors import DactLabError\n"
        "try:\n"
        f"    OnnxModel({str(folder)!r})\n"
        "except DactLabError as e:\n"
        "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "False False"
    assert "pip install onnxruntime" in lines[1]


def test_bad_folders_texts_and_policies(work, tmp_path):
    with pytest.raises(DactLabError, match="not an ONNX export"):
        OnnxModel(tmp_path)
    with pytest.raises(DactLabError, match="not an ONNX export"):
        OnnxModel(work["runs"]["dact"])  # a run folder is not an export
    with pytest.raises(DactLabError, match="not a folder"):
        OnnxModel(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(DactLabError, match="damaged"):
        OnnxModel(bad)
    (bad / MANIFEST_FILE).write_text(json.dumps({"format": "dact-lab-onnx", "version": 1, "kind": "dact"}))
    with pytest.raises(DactLabError, match="damaged"):
        OnnxModel(bad)
    (bad / MANIFEST_FILE).write_text(json.dumps({"format": "dact-lab-onnx", "version": 99}))
    with pytest.raises(DactLabError, match="export the run again"):
        OnnxModel(bad)
    with pytest.raises(DactLabError, match="no int8 graphs"):
        OnnxModel(work["exports"]["multitask"], int8=True)
    m = OnnxModel(work["exports"]["dact"], int8=False)
    for texts in ([], [""], ["fine", "   "], "  "):
        with pytest.raises(DactLabError, match="Nothing to predict"):
            m.predict(texts)
    for policy in ("speedy", "fixed:3", "fixed:0", "entropy:-1", "patience:1.5", "dact:2"):
        with pytest.raises(ConfigError):
            m.predict(["fine"], policy=policy)
    with pytest.raises(ConfigError):
        OnnxModel(work["exports"]["dact"], policy="fixed:9")
    with pytest.raises(ConfigError, match="does not exit early"):
        OnnxModel(work["exports"]["backbone"]).predict(["fine"], policy="dact")
    with pytest.raises(ConfigError, match="threads"):
        OnnxModel(work["exports"]["dact"], threads=0)
    two = OnnxModel(work["exports"]["dact"], int8=False, threads=2)
    _compare(two.predict(TEXTS[:3]), m.predict(TEXTS[:3]), tol=1e-5)


def test_export_refuses_a_foreign_folder_and_leaves_nothing_half_done(work, tmp_path, monkeypatch):
    loaded = work["loaded"]["backbone"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DactLabError, match="not empty"):
        export_onnx(loaded, foreign)
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="only a DACT model"):
        export_onnx(loaded, tmp_path / "x", policy="entropy:0.3")
    with pytest.raises(ConfigError, match="fixed:2"):
        export_onnx(work["loaded"]["dact"], tmp_path / "x", policy="fixed:5")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    out = tmp_path / "half"
    monkeypatch.setattr(onnx_export, "_quantize", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_onnx(loaded, out, int8=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign"]  # no folder, no temp folder
    monkeypatch.undo()
    # an earlier export is replaced in place; the default policy is kept in the manifest
    again = export_onnx(work["loaded"]["dact"], out, policy="entropy:0.4")
    export_onnx(work["loaded"]["dact"], out, policy="fixed:1")
    assert read_manifest(again)["policy"] == "fixed:1" and OnnxModel(again).policy == "fixed:1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "half"]
    assert json.loads((again / MANIFEST_FILE).read_text())["variants"].keys() == {"fp32"}
