"""deploy/hf.py (the Hugging Face export), deploy/modeling_dact_lab.py (its self-contained model code), deploy/card.py
(the model card) and models.load_model on an export folder.

Three tiny runs (dact, backbone, multitask) are trained once for the module. Each is exported, then a fresh Python
process that cannot import dact_lib loads the folders with ``AutoModelForSequenceClassification`` and ``pipeline``
(trust_remote_code) and must give dact_lib's own predictions: labels, probabilities and — under every exit policy —
the DACT exit layers, with rows of one batch exiting at different layers."""
from __future__ import annotations

import ast
import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dact_lib import dact
from dact_lib.cli import main
from dact_lib.deploy import hf
from dact_lib.deploy.card import card_info, hub_name, model_card
from dact_lib.deploy.hf import export_hf
from dact_lib.deploy.policy import parse_policy
from dact_lib.errors import DactLabError
from dact_lib.models import LoadedModel, load_model, predict

TINY = ["--encoder", "tiny", "--max-rows", "120", "--device", "cpu", "--epochs", "1"]
TEXTS = ["great food and friendly staff", "the match went to extra time", "a new phone with a faster chip",
         "meh", "the soup was cold and the waiter rude", "they won the cup again this year",
         "this laptop battery lasts all day long", "ok"]
TEMPLATE = Path(hf.__file__).with_name("modeling_dact_lab.py")

# The fresh process: dact_lib cannot be imported, the hub is offline; it prints what transformers alone computes.
CHILD = r'''
import json, sys
class NoDactLib:
    def find_spec(self, name, path=None, target=None):
        if name == "dact_lib" or name.startswith("dact_lib."):
            raise ImportError("dact_lib must not be needed to load an export")
sys.meta_path.insert(0, NoDactLib())
import torch
torch.set_num_threads(1)
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline
spec = json.loads(sys.stdin.read())
texts, out = spec["texts"], {}
for name, job in spec["jobs"].items():
    folder = job["dir"]
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    batch = tok(texts, padding=True, truncation=True, max_length=model.config.max_seq_len, return_tensors="pt")
    res = {"class": type(model).__name__, "id2label": {str(k): v for k, v in model.config.id2label.items()},
           "policy": getattr(model.config, "exit_policy", None), "runs": {}}
    with torch.no_grad():
        for policy in job["policies"]:
            kw = {} if policy is None else {"exit_policy": policy}
            o = model(**batch, **kw)
            res["runs"][str(policy)] = {
                "probs": o.logits.softmax(-1).tolist(),
                "exit_layer": None if o.exit_layer is None else o.exit_layer.tolist(),
                "task_probs": None if o.task_logits is None else [t.softmax(-1).tolist() for t in o.task_logits]}
        labels = torch.tensor([0] * len(texts))
        res["loss"] = float(model(**batch, labels=labels).loss)
    clf = pipeline("text-classification", model=folder, trust_remote_code=True, top_k=None)
    res["pipeline"] = [{d["label"]: d["score"] for d in row} for row in clf(texts, truncation=True)]
    out[name] = res
print("RESULT " + json.dumps(out))
'''


def _train(home: Path, kind: str) -> Path:
    before = set((home / "runs").iterdir()) if (home / "runs").is_dir() else set()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(["train", "--kind", kind, *TINY, "--home", str(home)])
    assert code == 0
    (run_dir,) = set((home / "runs").iterdir()) - before
    return run_dir


def _layer1(loaded: LoadedModel) -> tuple[list[float], list[float]]:
    """Per text: the margin and the entropy of the first layer's classifier (the batch as predict runs it)."""
    rows = predict(loaded, TEXTS, dact.FixedDepthPolicy(loaded.model.num_layers))
    margins, ents = [], []
    for r in rows:
        y = sorted(r["layers"][0]["y"].values(), reverse=True)
        margins.append(y[0] - y[1])
        ents.append(-sum(v * math.log(v) for v in y if v > 0))
    return margins, ents


def _split(values: list[float], min_gap: float = 1e-4) -> float:
    """A threshold in the widest gap between the sorted values that leaves two rows or more on each side."""
    s = sorted(values)
    i = max(range(1, len(s) - 2), key=lambda j: s[j + 1] - s[j])
    assert s[i + 1] - s[i] > min_gap, f"the rows' values are too close to split: {s}"
    return (s[i] + s[i + 1]) / 2


def _set_margin_halting(loaded: LoadedModel, threshold: float) -> None:
    """Hand-set halting unit of layer 1: h_1 ≈ 0 (halt now) where the layer's margin exceeds ``threshold``, ≈ 1
    (go on) below it. The unit reads the confidence features (max, margin, entropy, agree) through one GELU layer."""
    mlp = loaded.model.halters[0]
    first, last = mlp[1], mlp[-1]
    with torch.no_grad():
        for p in list(first.parameters()) + list(last.parameters()):
            p.zero_()
        first.weight[0, 1] = 1.0  # hidden unit 0 = GELU(margin)
        last.weight[0, 0] = -1e5
        last.bias.fill_(1e5 * float(torch.nn.functional.gelu(torch.tensor(threshold))))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The three trained runs, the DACT one with hand-set halting so that a batch exits at mixed layers, and their
    exports (DACT twice: default policy 'dact' and an entropy threshold that splits the batch)."""
    root = tmp_path_factory.mktemp("hf")
    home = root / "home"
    home.mkdir()
    runs = {kind: _train(home, kind) for kind in ("dact", "backbone", "multitask")}
    loaded = {kind: load_model(d, device="cpu") for kind, d in runs.items()}
    assert loaded["dact"].config.model.halting_input == "confidence"
    margins, ents = _layer1(loaded["dact"])
    _set_margin_halting(loaded["dact"], _split(margins))
    s = float(f"{_split(ents):g}")  # the policy text's own spelling of the threshold
    entropy = f"entropy:{s:g}"
    exports = {kind: export_hf(lm, root / f"export-{kind}") for kind, lm in loaded.items()}
    exports["dact_entropy"] = export_hf(loaded["dact"], root / "export-dact-entropy", policy=entropy)
    return {"root": root, "home": home, "runs": runs, "loaded": loaded, "exports": exports, "entropy": entropy}


@pytest.fixture(scope="module")
def child(env):
    """What a fresh process with transformers only computes on the exports."""
    policies = ["dact", env["entropy"], "patience:1", "fixed:1", "fixed:2"]
    jobs = {"dact": {"dir": str(env["exports"]["dact"]), "policies": [None] + policies},
            "dact_entropy": {"dir": str(env["exports"]["dact_entropy"]), "policies": [None]},
            "backbone": {"dir": str(env["exports"]["backbone"]), "policies": [None]},
            "multitask": {"dir": str(env["exports"]["multitask"]), "policies": [None]}}
    script = env["root"] / "child.py"
    script.write_text(CHILD)
    run_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    run_env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(env["root"] / "modules"),
                   TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(script)], input=json.dumps({"texts": TEXTS, "jobs": jobs}),
                          capture_output=True, text=True, cwd=env["root"], env=run_env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _probs(rows: list[dict], names: list[str]) -> list[list[float]]:
    return [[r["probabilities"][n] for n in names] for r in rows]


# ------------------------------------------------------------------------------------------- transformers alone
def test_dact_export_matches_predict_under_every_policy(env, child):
    lm = env["loaded"]["dact"]
    names = lm.label_maps[lm.model.task]
    got = child["dact"]
    assert got["class"] == "DactLabForSequenceClassification" and got["policy"] == "dact"
    assert got["id2label"] == {str(i): n for i, n in enumerate(names)}
    mixed = set()
    for policy in ["dact", env["entropy"], "patience:1", "fixed:1", "fixed:2"]:
        want = predict(lm, TEXTS, dact.make_policy(*parse_policy(policy)))
        run = got["runs"][policy]
        assert run["exit_layer"] == [r["exit_layer"] for r in want], policy
        torch.testing.assert_close(torch.tensor(run["probs"]), torch.tensor(_probs(want, names)), atol=1e-5, rtol=0)
        if min(run["exit_layer"].count(n) for n in (1, 2)) >= 2:
            mixed.add(policy.split(":")[0])
    assert {"dact", "entropy"} <= mixed  # rows of one batch left at different layers under both
    assert got["runs"]["None"] == got["runs"]["dact"]  # config.exit_policy is the default
    assert got["loss"] > 0


def test_default_policy_of_an_export_is_its_config_and_load_models_default(env, child):
    lm, text = env["loaded"]["dact"], env["entropy"]
    want = predict(lm, TEXTS, dact.make_policy(*parse_policy(text)))
    got = child["dact_entropy"]
    assert got["policy"] == text
    assert got["runs"]["None"]["exit_layer"] == [r["exit_layer"] for r in want]
    back = load_model(env["exports"]["dact_entropy"], device="cpu")
    assert back.policy == text and load_model(env["runs"]["dact"], device="cpu").policy is None
    assert [r["exit_layer"] for r in predict(back, TEXTS)] == [r["exit_layer"] for r in want]


@pytest.mark.parametrize("kind", ["dact", "backbone", "multitask"])
def test_pipeline_and_model_give_predicts_probabilities(env, child, kind):
    lm = env["loaded"][kind]
    want = predict(lm, TEXTS)
    task = want[0]["task"]
    names = lm.label_maps[task]
    got = child[kind]
    torch.testing.assert_close(torch.tensor(got["runs"]["None"]["probs"]), torch.tensor(_probs(want, names)),
                               atol=1e-5, rtol=0)
    for row, w in zip(got["pipeline"], want):  # the pipeline runs one sentence at a time, unpadded
        assert max(row, key=row.get) == w["label"]
        assert row == pytest.approx(w["probabilities"], abs=1e-5)
    if kind == "multitask":
        tasks = list(lm.label_maps)
        for i, t in enumerate(tasks):
            per = [[r["tasks"][t]["probabilities"][n] for n in lm.label_maps[t]] for r in want]
            torch.testing.assert_close(torch.tensor(got["runs"]["None"]["task_probs"][i]), torch.tensor(per),
                                       atol=1e-5, rtol=0)
    else:
        assert got["runs"]["None"]["task_probs"] is None
    assert (got["runs"]["None"]["exit_layer"] is None) == (kind != "dact")


# ------------------------------------------------------------------------------------------------- the folder
def test_export_folder_layout_and_manifest(env):
    for kind, d in env["exports"].items():
        names = {p.name for p in d.iterdir()}
        assert {"config.json", "model.safetensors", "modeling_dact_lab.py", "tokenizer.json", "tokenizer_config.json",
                "encoder", "dact_lab_run.json", "README.md", "report.json"} <= names, kind
        assert (d / "modeling_dact_lab.py").read_bytes() == TEMPLATE.read_bytes()
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["model_type"] == "dact_lab" and cfg["architectures"] == ["DactLabForSequenceClassification"]
        assert cfg["auto_map"] == {"AutoConfig": "modeling_dact_lab.DactLabConfig",
                                   "AutoModelForSequenceClassification":
                                       "modeling_dact_lab.DactLabForSequenceClassification"}
        assert all(isinstance(k, str) for k in cfg["id2label"]) and cfg["label2id"][cfg["id2label"]["0"]] == 0
        man = json.loads((d / "dact_lab_run.json").read_text())
        run_dir = env["runs"][kind.split("_")[0]]
        assert man["format"] == "dact-lab-hf" and man["version"] == 1 and man["source_run"] == int(run_dir.name)
        assert man["config"] == json.loads((run_dir / "config.json").read_text())
        assert man["label_maps"] == json.loads((run_dir / "label_maps.json").read_text())
        assert man["policy"] == {"dact": "dact", "dact_entropy": env["entropy"]}.get(kind)
        assert not [p for p in d.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    from safetensors.torch import load_file

    for kind, lm in env["loaded"].items():  # the loaded model's weights, under the run's own keys
        saved = load_file(str(env["exports"][kind] / "model.safetensors"))
        state = lm.model.state_dict()
        assert set(saved) == set(state) == set(load_file(str(env["runs"][kind] / "model.safetensors")))
        assert all(torch.equal(saved[k], state[k]) for k in state)
    saved = load_file(str(env["exports"]["dact"] / "model.safetensors"))
    assert float(saved["halters.0.4.weight"][0, 0]) == -1e5  # the halting units the loaded model has


def test_encoder_folder_loads_alone(env):
    from transformers import AutoModel

    for kind, lm in env["loaded"].items():
        enc, info = AutoModel.from_pretrained(env["exports"][kind] / "encoder", output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        tok = lm.tokenizer(TEXTS, padding=True, return_tensors="pt")
        with torch.no_grad():
            want = lm.model.encoder(**{k: tok[k] for k in ("input_ids", "attention_mask")}).last_hidden_state
            got = enc.eval()(**{k: tok[k] for k in ("input_ids", "attention_mask")}).last_hidden_state
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["dact", "backbone", "multitask"])
def test_load_model_on_an_export_predicts_as_the_run(env, kind):
    lm = env["loaded"][kind]
    back = load_model(str(env["exports"][kind]), device="cpu")
    assert back.kind == kind and back.label_maps == lm.label_maps and back.config.to_dict() == lm.config.to_dict()
    for a, b in zip(predict(back, TEXTS), predict(lm, TEXTS)):
        assert a["label"] == b["label"] and a.get("exit_layer") == b.get("exit_layer")
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-6)
        if kind == "multitask":
            assert a["tasks"].keys() == b["tasks"].keys()
    re_export = export_hf(back, env["root"] / f"again-{kind}")  # an export exports again, same source
    assert json.loads((re_export / "dact_lab_run.json").read_text())["source_run"] == int(env["runs"][kind].name)


def test_the_model_code_imports_no_dact_lib():
    tree = ast.parse(TEMPLATE.read_text(encoding="utf-8"))
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m.startswith("dact_lib") or m.startswith(".")]
    assert {m.split(".")[0] for m in imported} <= {"__future__", "math", "dataclasses", "torch", "transformers"}


# ------------------------------------------------------------------------------------------------- refusals
def test_bad_policies_are_refused(env, tmp_path):
    with pytest.raises(DactLabError, match="2 layers"):
        export_hf(env["loaded"]["dact"], tmp_path / "a", policy="fixed:3")
    with pytest.raises(DactLabError, match="unknown name"):
        export_hf(env["loaded"]["dact"], tmp_path / "b", policy="warp:2")
    with pytest.raises(DactLabError, match="no early exit"):
        export_hf(env["loaded"]["backbone"], tmp_path / "c", policy="entropy:0.3")
    assert not list(tmp_path.iterdir())


def test_a_non_empty_folder_is_refused_and_a_previous_export_replaced(env, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(DactLabError, match="not empty.*choose a new or empty folder"):
        export_hf(env["loaded"]["backbone"], busy)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    export_hf(env["loaded"]["dact"], empty, policy="fixed:1")
    export_hf(env["loaded"]["dact"], empty, policy="patience:1")  # a previous export is replaced
    assert json.loads((empty / "dact_lab_run.json").read_text())["policy"] == "patience:1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "empty"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_interrupted_export_leaves_nothing_half_written(env, tmp_path, monkeypatch, error):
    def boom(info):
        raise error("killed while writing the card")

    monkeypatch.setattr(hf, "model_card", boom)
    with pytest.raises(error):
        export_hf(env["loaded"]["dact"], tmp_path / "new")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    export_hf(env["loaded"]["dact"], tmp_path / "old", policy="fixed:1")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir() if p.is_file()}
    monkeypatch.setattr(hf, "model_card", boom)
    with pytest.raises(error):
        export_hf(env["loaded"]["dact"], tmp_path / "old", policy="fixed:2")
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir() if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["old"]


# ------------------------------------------------------------------------------------------------- the card
def _card(path: Path) -> tuple[dict, str]:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


@pytest.mark.parametrize("kind", ["dact", "backbone", "multitask"])
def test_the_card_states_the_runs_records(env, kind):
    meta, body = _card(env["exports"][kind] / "README.md")
    rep = json.loads((env["runs"][kind] / "report.json").read_text())
    test = rep["test"]
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-classification"
    assert "dact-lab" in meta["tags"] and ("early-exit" in meta["tags"]) == (kind == "dact")
    assert "base_model" not in meta and "language" not in meta  # the tiny encoder is no hub model; language unknown
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["accuracy"] == test["test_accuracy"] and metrics["f1"] == test["test_macro_f1"]
    assert f"| accuracy | {test['test_accuracy']:.4f} |" in body
    assert f"| macro-F1 | {test['test_macro_f1']:.4f} |" in body
    if kind == "dact":
        assert metrics["avg_exit_layer"] == test["test_avg_exit_layer"] == rep["report"]["avg_exit_layer"]
        assert f"| average exit layer | {test['test_avg_exit_layer']:.4f} of 2 |" in body
        assert "## Exit policy" in body and "Default: `dact`" in body
        chosen = rep["halting"]["chosen"]
        assert f"accuracy {chosen['val_accuracy']:.4f}" in body
    else:
        assert "avg_exit_layer" not in metrics and "## Exit policy" not in body
    for task, tr in rep["report"]["tasks"].items():
        if kind == "multitask":
            assert f"| `{task}` accuracy | {tr['accuracy']:.4f} |" in body
        counts = ", ".join(f"{n}: {sum(row)}" for n, row in zip(tr["labels"], tr["confusion_matrix"]))
        if kind == "multitask" or task == "class_label":
            assert f"`{task}`: {sum(map(sum, tr['confusion_matrix']))} rows — {counts}" in body
    cfg = json.loads((env["runs"][kind] / "config.json").read_text())
    assert f"* epochs: {cfg['train']['epochs']}" in body and f"* seed: {cfg['train']['seed']}" in body
    assert f"* batch size: {cfg['train']['batch_size']}" in body
    assert f"* encoder learning rate: {cfg['train']['encoder_lr']:g}" in body
    assert "trust_remote_code=True" in body and "pipeline(\"text-classification\"" in body


def test_card_info_front_and_onnx_runtime(env):
    lm = env["loaded"]["dact"]
    front = [{"policy": "dact", "avg_exit_layer": 1.5, "accuracy": 0.75, "latency_ms_p50": 3.25},
             {"policy": "fixed:1", "avg_exit_layer": 1.0, "accuracy": 0.5}]
    info = card_info(lm, "entropy:0.5", front=front, runtime="onnx")
    rep = json.loads((env["runs"]["dact"] / "report.json").read_text())
    assert info["metrics"]["accuracy"] == rep["test"]["test_accuracy"] and info["policy"] == "entropy:0.5"
    assert info["tasks"] == {"class_label": lm.label_maps["class_label"]} and info["num_layers"] == 2
    text = model_card({**info, "language": "en", "license": "mit"})
    meta, body = _card_text(text)
    assert meta["language"] == ["en"] and meta["license"] == "mit"
    assert "| `dact` | 1.50 | 0.7500 | 3.25 |" in body and "| `fixed:1` | 1.00 | 0.5000 | — |" in body
    assert "onnxruntime" in body and "trust_remote_code" not in body
    assert hub_name("bert-base-uncased") == "bert-base-uncased"
    assert hub_name("all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_name("tiny") is None and hub_name(str(env["root"])) is None and hub_name("./models/x") is None


def _card_text(text: str) -> tuple[dict, str]:
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


# ------------------------------------------------------------------------- the model code's maths = dact.py's
def test_the_copied_maths_equals_dact_py():
    from dact_lib.deploy import modeling_dact_lab as M

    g = torch.Generator().manual_seed(0)
    for k in (1, 2, 5):
        a = torch.rand(64, k, generator=g).softmax(-1)
        a[:4] = 0.0  # a_0 = 0 rows
        y = torch.rand(64, k, generator=g).softmax(-1) if k > 1 else torch.ones(64, 1)
        y[4, 0], y[5] = 1.0, torch.nn.functional.one_hot(torch.tensor(0), k).float()  # 0 log 0 = 0
        p = torch.rand(64, generator=g)
        h = torch.rand(64, generator=g)
        for d in range(0, 6):
            assert torch.equal(M.should_halt(a, p, d), dact.should_halt(a, p, d)), (k, d)
        for got, want in zip(M.accumulate_step(a, p, y, h), dact.accumulate_step(a, p, y, h)):
            assert torch.equal(got, want)
        assert torch.equal(M.confidence_features(y, a), dact.confidence_features(y, a))
        assert torch.equal(M.entropy(y), dact.entropy(y)) and not M.entropy(y).isnan().any()
    assert M.CONFIDENCE_FEATURES == dact.CONFIDENCE_FEATURES
    for text in ["dact", "", None, "entropy:0.35", "patience:2", "fixed:3", " Fixed : 2 "]:
        assert M.parse_exit_policy(text) == parse_policy(text)
    for bad in ["warp", "dact:1", "entropy:-1", "patience:0", "fixed:1.5", "fixed:x"]:
        with pytest.raises(ValueError):
            M.parse_exit_policy(bad)
        with pytest.raises(DactLabError):
            parse_policy(bad)


# ------------------------------------------------------------------------- other shapes and encoder families
def _encoder(family: str, tokenizer):
    from transformers import AutoModel, DebertaV2Config, DistilBertConfig, RobertaConfig

    common = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64)
    if family == "roberta":
        cfg, kw = RobertaConfig(**common, pad_token_id=0), {"add_pooling_layer": False}
    elif family == "distilbert":
        cfg, kw = DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=4, n_heads=2, hidden_dim=64,
                                   max_position_embeddings=64), {}
    else:
        cfg, kw = DebertaV2Config(**common, relative_attention=True, position_buckets=16, max_relative_positions=-1,
                                  pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True,
                                  position_biased_input=False, type_vocab_size=0, conv_kernel_size=3), {}
    torch.manual_seed(1)
    return AutoModel.from_config(cfg, **kw).eval()


def _spread_units(model, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """Rescale each classifier's and halting unit's output layer so that on this batch the rows' class scores and
    halting probabilities differ widely (a random tiny encoder gives nearly equal summaries for every text), layer
    by layer as the DACT rule reads them; rows then exit at different layers."""
    g = torch.Generator().manual_seed(0)
    n_layers, shared = model.num_layers, model.cfg.share_weights
    for n in range(1, 2 if shared else n_layers + 1):
        last = model.classifiers[n - 1][-1]
        lg = model.infer(ids, mask, dact.FixedDepthPolicy(n_layers)).y[:, n - 1].clamp_min(1e-30).log()
        s = 3.0 / float(lg.std(0).mean())
        with torch.no_grad():
            last.weight.mul_(s)
            last.bias.copy_(s * (last.bias - lg.mean(0)) + torch.randn(lg.shape[1], generator=g))
        last = model.halters[n - 1][-1]
        h = model.infer(ids, mask, dact.FixedDepthPolicy(n_layers)).h[:, n - 1].clamp(1e-6, 1 - 1e-6)
        z = torch.log(h) - torch.log1p(-h)
        s = 2.0 / float(z.std())
        with torch.no_grad():
            last.weight.mul_(s)
            last.bias.copy_(s * (last.bias - z.mean()) - 1.0)


@pytest.mark.parametrize("family,model_cfg", [
    ("roberta", {"halting_input": "both", "shared_trunk": True, "pooling": "cls"}),
    ("distilbert", {"halting_input": "summary", "share_weights": True}),
    ("deberta-v2", {"halting_input": "confidence", "classifier": {"hidden_dims": [16, 8], "activation": "tanh"},
                    "halting": {"hidden_dims": [], "dropout": 0.0}}),
])
def test_other_families_and_unit_shapes_round_trip(env, tmp_path, family, model_cfg):
    """DactBert on RoBERTa / DistilBERT / DeBERTa-v2 encoders with shared trunks, shared weights, other halting
    inputs and head shapes: the exported model code (loaded in-process) exits where DactBert.infer does."""
    from dact_lib.config import RunConfig, default_config
    from dact_lib.deploy.modeling_dact_lab import DactLabForSequenceClassification
    from dact_lib.modeling_dact import DactBert

    tok = env["loaded"]["dact"].tokenizer
    base = default_config("dact").to_dict()
    base["model"].update({k: ({**base["model"][k], **v} if isinstance(v, dict) else v) for k, v in model_cfg.items()})
    cfg = RunConfig.from_dict(base)
    torch.manual_seed(2)
    labels = {"label": ["a", "b", "c", "d"]}
    model = DactBert(_encoder(family, tok), cfg.model, 4).eval()
    ids = tok(TEXTS, padding=True, return_tensors="pt")
    _spread_units(model, ids["input_ids"], ids["attention_mask"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lm = LoadedModel(model, tok, cfg, labels, run_dir, torch.device("cpu"))
    y1 = model.infer(ids["input_ids"], ids["attention_mask"], dact.FixedDepthPolicy(4)).y[:, 0]
    s = float(f"{_split(dact.entropy(y1).tolist()):g}")
    out = export_hf(lm, tmp_path / "export")
    loaded = DactLabForSequenceClassification.from_pretrained(out).eval()
    exits = {}
    for policy in ["dact", f"entropy:{s:g}", "patience:1", "patience:2", "fixed:2"]:
        want = model.infer(ids["input_ids"], ids["attention_mask"], dact.make_policy(*parse_policy(policy)))
        with torch.no_grad():
            got = loaded(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], exit_policy=policy)
        assert got.exit_layer.tolist() == want.exit_layer.tolist(), policy
        torch.testing.assert_close(got.logits.softmax(-1), want.probs, atol=1e-5, rtol=0)
        exits[policy.split(":")[0]] = set(want.exit_layer.tolist())
    assert len(exits["dact"]) >= 2 and len(exits["entropy"]) >= 2  # rows of the batch left at different layers
    from transformers import AutoModel

    _, info = AutoModel.from_pretrained(out / "encoder", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_evaluate_and_exits_of_an_export_use_its_policy(tmp_path, capsys):
    """Bug: load_model set an export's policy but evaluate (model.forward) and the Early-exit data (infer with no
    policy) ran the DACT rule: `evaluate --run EXPORT` said exit 1.0 for an export made with --policy fixed:2."""
    from deploy_runs import tiny_run

    home, run = tiny_run("dact")
    out = tmp_path / "fixed2"
    assert main(["export", "--run", str(run), "--home", str(home), "--out", str(out), "--policy", "fixed:2"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--run", str(out), "--home", str(home), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["avg_exit_layer"] == 2.0
    loaded = load_model(out)
    from dact_lib.exits import compute_exits
    from dact_lib.exits import split_of_run

    ds, _ = split_of_run(load_model(home / "runs" / str(run)), "test", home)
    assert set(compute_exits(loaded, ds)["exit_layer"]) == {2}
