"""The torch-free runtime of an ONNX export (``deploy/onnx_export.py``): ONNX Runtime + numpy + ``tokenizers``.

This module imports neither torch nor transformers (nor any dact_lib module that does): an exported folder runs
where only ``pip install onnxruntime tokenizers numpy`` was done. ::

    from dact_lib.deploy.runtime import OnnxModel
    m = OnnxModel("export/sst2", threads=1)            # int8 graphs when the export has them
    m.predict(["a gorgeous, moving film"])            # [{'label': ..., 'probability': ..., 'exit_layer': 2, ...}]
    m.predict(texts, policy="entropy:0.3")

A DACT export runs layer by layer: ``embed.onnx``, then ``layer_{n}.onnx`` (the layer with its exit classifier
and halting unit) until the exit policy halts a row; halted rows leave the batch (hidden states, mask, a_{n-1} and
the policy's state are sliced), so their remaining layers are skipped; ``fixed:K`` runs K layers only. The
policies are numpy ports of ``dact.py`` in float32 (the DACT rule with d = N − n, entropy, patience, fixed depth),
so exit layers and answers match ``dact_lib.models.predict``. Texts are sorted by token length into batches and
the answers returned in the input order, one dict per text in the format of ``dact_lib.models.predict``.

The manifest, ``dact_lab_onnx.json``::

    format "dact-lab-onnx", version 1, kind ("dact" | "backbone" | "multitask"),
    tasks [task, ...], labels {task: [label, ...]} (index = class id), num_layers, pooling, max_seq_len,
    policy (the default exit policy text; null unless DACT), DACT: num_classes, halting_input,
    tokenizer {file, max_length, pad_id, pad_token, padding_side, truncation_side},
    graphs {role: {inputs: [...], outputs: [...]}}  roles: "embed", "layer_1".."layer_N" (DACT) or "model",
    variants {"fp32": {role: file}, "int8": {role: file}}  (int8 only when exported with it),
    outputs {task: output name} (backbone / multitask), quantization (or null), opset, config (the RunConfig),
    source_run {run_dir, run, halting_choice}, check {max_abs_diff, ...}, exported_with {...}, export_seconds.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DactLabError
from .policy import canonical, parse_policy

MANIFEST_FILE = "dact_lab_onnx.json"
FORMAT = "dact-lab-onnx"
FORMAT_VERSION = 1
# batch-1 latency is the target: on 2 cores (bundled MiniLM, SST-2 sentences) one thread was as fast as two at batch 1
# and faster at batch 32 (each graph has its own pool); ORT's default (all cores, spinning) was ~10x slower
DEFAULT_THREADS = 1
EXPORT_HINT = ("export a run first: dact_lib.deploy.onnx_export.export_onnx(dact_lib.models.load_model(RUN), "
               "FOLDER), or the CLI's ONNX export")
_NOTHING = "Nothing to predict: give at least one non-empty sentence."


def read_manifest(folder: str | Path) -> dict:
    """The manifest of an ONNX export folder; DactLabError naming the fix when ``folder`` is not one."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DactLabError(f"{folder} is not a folder: give the folder of an ONNX export of DACT Lab ({EXPORT_HINT}).")
    path = folder / MANIFEST_FILE
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DactLabError(f"{folder} is not an ONNX export of DACT Lab (it has no {MANIFEST_FILE}): "
                           f"{EXPORT_HINT}.") from None
    except (ValueError, UnicodeDecodeError):
        raise DactLabError(f"{path} is damaged (not JSON): export the run again.") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise DactLabError(f"{path} is not the manifest of a DACT Lab ONNX export (format {FORMAT!r}): "
                           f"{EXPORT_HINT}.")
    if man.get("version") != FORMAT_VERSION:
        raise DactLabError(f"{path} is format version {man.get('version')!r}; this DACT Lab reads version "
                           f"{FORMAT_VERSION}: export the run again with this version.")
    need = ["kind", "tasks", "labels", "num_layers", "graphs", "variants", "tokenizer"]
    need += ["num_classes"] if man.get("kind") == "dact" else ["outputs"]
    missing = [k for k in need if k not in man]
    labels = man.get("labels")
    if missing or man.get("kind") not in ("dact", "backbone", "multitask") or not isinstance(labels, dict) or \
            not all(isinstance(labels.get(t), list) and labels.get(t) for t in man.get("tasks") or [None]):
        raise DactLabError(f"{path} is damaged (missing or bad: {missing or ['kind / tasks / labels']}): export the "
                           "run again.")
    return man


def _import(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise DactLabError(f"The ONNX runtime of DACT Lab needs the {module} package: pip install {module}") from None


class _Layer:
    """One layer graph and what its hot loop needs, looked up once."""

    __slots__ = ("run", "outputs", "hidden_only", "a_prev")

    def __init__(self, sess, spec: dict) -> None:
        self.run = sess.run
        self.outputs = list(spec["outputs"])
        self.hidden_only = ["hidden_out"] if "hidden_out" in self.outputs else self.outputs
        self.a_prev = "a_prev" in spec["inputs"]


class OnnxModel:
    """An ONNX export, loaded: ``predict(texts, policy=None, batch_size=32)``. ``int8`` None takes the int8 graphs
    when the export has them; ``threads`` is ONNX Runtime's intra-op thread count (default 1); ``policy`` the default
    exit policy text (DACT; default the manifest's)."""

    def __init__(self, folder: str | Path, *, int8: bool | None = None, threads: int | None = None,
                 policy: str | None = None) -> None:
        ort = _import("onnxruntime")
        tokenizers = _import("tokenizers")
        self.folder = Path(folder).expanduser()
        man = read_manifest(self.folder)
        self.manifest = man
        variants = man.get("variants") or {}
        if int8 is None:
            variant = "int8" if "int8" in variants else "fp32"
        elif int8:
            if "int8" not in variants:
                raise DactLabError(f"{self.folder} has no int8 graphs: export the run again with int8 (--int8), or "
                                   "load it with int8=False.")
            variant = "int8"
        else:
            variant = "fp32"
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ConfigError(f"threads = {threads!r}: give a whole number >= 1, or None for the default "
                              f"({DEFAULT_THREADS}).")
        self._variant = variant
        self._kind = man["kind"]
        self._tasks = list(man["tasks"])
        self._labels = {t: list(man["labels"][t]) for t in self._tasks}
        self._num_layers = int(man["num_layers"])
        self._policies: dict[str, tuple[str, tuple[str, float | int | None]]] = {}
        self._policy_text: str | None
        if self._kind == "dact":
            self._policy_text = self._parse(policy if policy is not None else (man.get("policy") or "dact"))[0]
        elif policy is not None:
            raise ConfigError(f"exit policy {policy!r}: this export is a {self._kind} model, which does not exit "
                              "early; give no policy.")
        else:
            self._policy_text = None
        self._sessions = self._load_sessions(ort, man, variants.get(variant) or {}, threads or DEFAULT_THREADS)
        self._tok, self._pad_id, self._pad_left = self._load_tokenizer(tokenizers, man["tokenizer"])
        if self._kind == "dact":
            self._num_classes = int(man["num_classes"])
            graphs = man["graphs"]
            self._embed_run = self._sessions["embed"].run
            self._embed_in = list(graphs["embed"]["inputs"])
            self._layers = [_Layer(self._sessions[f"layer_{n}"], graphs[f"layer_{n}"])
                            for n in range(1, self._num_layers + 1)]
        else:
            self._model_run = self._sessions["model"].run
            self._model_out = [man["outputs"][t] for t in self._tasks]

    # -- loading ---------------------------------------------------------------------------------------------------
    def _load_sessions(self, ort, man: dict, files: dict, threads: int) -> dict:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        if threads > 1:  # one thread pool per graph: spinning pools starve each other (measured: 10x slower at batch 1)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        sessions = {}
        for role, spec in man["graphs"].items():
            rel = files.get(role)
            path = self.folder / rel if rel else None
            if path is None or not path.is_file():
                raise DactLabError(f"{self.folder} is incomplete (the {self._variant} graph {role!r}, "
                                   f"{rel or 'not listed'}, is missing): export the run again.")
            try:
                sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types for damaged graphs
                raise DactLabError(f"ONNX Runtime cannot load {path} ({type(exc).__name__}: {str(exc)[:200]}): the "
                                   "export is damaged; export the run again.") from None
            names = [i.name for i in sess.get_inputs()]
            if sorted(names) != sorted(spec["inputs"]):
                raise DactLabError(f"{path} takes the inputs {names}, its manifest says {spec['inputs']}: the export "
                                   "is damaged; export the run again.")
            sessions[role] = sess
        return sessions

    def _load_tokenizer(self, tokenizers, info: dict):
        path = self.folder / info.get("file", "tokenizer.json")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - missing or damaged tokenizer.json
            raise DactLabError(f"{path} cannot be read ({type(exc).__name__}: {str(exc)[:200]}): the export is "
                               "incomplete; export the run again.") from None
        tok.no_padding()
        tok.enable_truncation(int(info["max_length"]), stride=0, strategy="longest_first",
                              direction=info.get("truncation_side", "right"))
        return tok, int(info["pad_id"]), info.get("padding_side", "right") == "left"

    # -- properties ------------------------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self._kind

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    @property
    def labels(self) -> dict[str, list[str]]:
        return {t: list(v) for t, v in self._labels.items()}

    @property
    def num_layers(self) -> int:
        return self._num_layers

    @property
    def policy(self) -> str | None:
        """The default exit policy (text); None for a model that does not exit early."""
        return self._policy_text

    @property
    def variant(self) -> str:
        return self._variant

    def __repr__(self) -> str:
        return (f"OnnxModel({str(self.folder)!r}, kind={self._kind!r}, variant={self._variant!r}, "
                f"policy={self._policy_text!r})")

    # -- policies --------------------------------------------------------------------------------------------------
    def _parse(self, text: str) -> tuple[str, tuple[str, float | int | None]]:
        got = self._policies.get(text)
        if got is None:
            name, value = parse_policy(text)
            if name == "fixed" and value is not None and value > self._num_layers:
                raise ConfigError(f"exit policy {text!r}: the model has {self._num_layers} layers; use fixed:1 to "
                                  f"fixed:{self._num_layers}.")
            got = (canonical(text), (name, value))
            if len(self._policies) > 64:  # a sweep over many thresholds: keep the cache small
                self._policies.clear()
            self._policies[text] = got
        return got

    # -- prediction ------------------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """input_ids, attention_mask (int64 [B, T], padded to the longest) as the run's HF tokenizer gives them
        with ``truncation=True, max_length=max_seq_len, padding=True``."""
        return self._pad(self._encode(texts))

    def _encode(self, texts: list[str]):
        if len(texts) == 1:
            return [self._tok.encode(texts[0])]
        return self._tok.encode_batch(texts)

    def _pad(self, encs) -> tuple[np.ndarray, np.ndarray]:
        if len(encs) == 1:
            ids = np.array([encs[0].ids], dtype=np.int64)
            return ids, np.ones_like(ids)
        width = max(len(e.ids) for e in encs)
        ids = np.full((len(encs), width), self._pad_id, dtype=np.int64)
        am = np.zeros((len(encs), width), dtype=np.int64)
        for i, e in enumerate(encs):
            n = len(e.ids)
            if self._pad_left:
                ids[i, width - n:] = e.ids
                am[i, width - n:] = 1
            else:
                ids[i, :n] = e.ids
                am[i, :n] = 1
        return ids, am

    def predict(self, texts: list[str], policy: str | None = None, batch_size: int = 32) -> list[dict]:
        """One dict per text (the format of ``dact_lib.models.predict``): ``label``, ``probability``,
        ``probabilities`` (name → p), ``task``; DACT: ``exit_layer`` (1-based) and ``num_layers``; multitask:
        ``tasks`` (task → label, probability, probabilities). ``policy``: an exit policy text for this call."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise DactLabError(_NOTHING)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size = {batch_size!r}: give a whole number >= 1.")
        pol = None
        if self._kind == "dact":
            pol = self._parse(policy if policy is not None else (self._policy_text or "dact"))[1]
        elif policy is not None:
            raise ConfigError(f"exit policy {policy!r}: this export is a {self._kind} model, which does not exit "
                              "early; give no policy.")
        encs = self._encode(list(texts))
        if len(encs) == 1:
            return self._answers(*self._pad(encs), pol)
        order = sorted(range(len(encs)), key=lambda i: len(encs[i].ids))
        results: dict[int, dict] = {}  # text position -> its answer
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            got = self._answers(*self._pad([encs[i] for i in idx]), pol)
            for i, r in zip(idx, got):
                results[i] = r
        return [results[i] for i in range(len(encs))]

    def _answers(self, ids: np.ndarray, am: np.ndarray, pol) -> list[dict]:
        if self._kind == "dact":
            probs, exits = self._run_dact(ids, am, pol)
            task = self._tasks[0]
            names = self._labels[task]
            n_layers = self._num_layers
            return [{**_top(probs[b], names), "exit_layer": int(exits[b]), "num_layers": n_layers, "task": task}
                    for b in range(ids.shape[0])]
        outs = self._model_run(self._model_out, {"input_ids": ids, "attention_mask": am})
        results = []
        for b in range(ids.shape[0]):
            per_task = {t: _top(o[b], self._labels[t]) for t, o in zip(self._tasks, outs)}
            res = dict(per_task[self._tasks[0]])
            if len(per_task) > 1:
                res["tasks"] = per_task
            res["task"] = self._tasks[0]
            results.append(res)
        return results

    def _run_dact(self, ids: np.ndarray, am: np.ndarray, pol) -> tuple[np.ndarray, np.ndarray]:
        """Early exit over one batch: (answers [B, K] float32, exit layers [B], 1-based)."""
        name, value = pol
        n_layers, k = self._num_layers, self._num_classes
        b = ids.shape[0]
        feed = {"input_ids": ids, "attention_mask": am}
        hidden = self._embed_run(None, {n: feed[n] for n in self._embed_in})[0]
        stop = int(value) if name == "fixed" else n_layers
        probs = np.empty((b, k), dtype=np.float32)
        exits = np.empty(b, dtype=np.int64)
        rows = np.arange(b)
        a = np.zeros((b, k), dtype=np.float32)  # a_{n-1}: the DACT accumulation; zeros for the halting input otherwise
        p = np.ones(b, dtype=np.float32)  # p_{n-1}: the DACT rule's; patience: last argmax and its run length
        prev = np.full(b, -1, dtype=np.int64)
        count = np.zeros(b, dtype=np.int64)
        for n in range(1, stop + 1):
            layer = self._layers[n - 1]
            feed = {"hidden": hidden, "attention_mask": am}
            if layer.a_prev:
                feed["a_prev"] = a
            if n < stop and name == "fixed":
                hidden = layer.run(layer.hidden_only, feed)[0]
                continue
            outs = layer.run(layer.outputs, feed)
            if n == n_layers:
                y = outs[0]
            else:
                hidden, y = outs[0], outs[1]
            if name == "dact":  # dact.accumulate_step, then dact.should_halt with d = N - n
                w = p[:, None]
                answer = w * y + (1.0 - w) * a
                if n == n_layers:
                    halt = None
                else:
                    p_n = outs[2] * p
                    halt = _dact_halt(answer, p_n, n_layers - n)
                    a, p = answer, p_n
            else:
                answer = y
                if n == stop:
                    halt = None
                elif name == "entropy":
                    halt = _entropy(y) < value
                else:  # patience (PABEE): consecutive layers with the same argmax
                    pred = y.argmax(-1)
                    same = (pred == prev) & (prev >= 0)
                    count = np.where(same, count + 1, 0)
                    prev = pred
                    halt = count >= value
            if halt is None or halt.all():
                probs[rows] = answer
                exits[rows] = n
                break
            if halt.any():
                done = rows[halt]
                probs[done] = answer[halt]
                exits[done] = n
                keep = ~halt
                rows, hidden, am, a, p = rows[keep], hidden[keep], am[keep], a[keep], p[keep]
                prev, count = prev[keep], count[keep]
        return probs, exits


def _dact_halt(a_n: np.ndarray, p_n: np.ndarray, d: int) -> np.ndarray:
    """``best * (1 - p_n) ** d > runner_up + p_n * d`` in float32 (``dact.should_halt``, d >= 1); the powers
    torch computes by multiplication (d = 1, 2, 3) are computed the same way."""
    if a_n.shape[-1] >= 2:
        top = np.sort(a_n, axis=-1)
        best, runner_up = top[:, -1], top[:, -2]
    else:
        best, runner_up = a_n[:, 0], np.zeros_like(a_n[:, 0])
    q = 1.0 - p_n
    if d == 1:
        power = q
    elif d == 2:
        power = q * q
    elif d == 3:
        power = q * q * q
    else:
        power = q ** np.float32(d)
    return best * power > runner_up + p_n * np.float32(d)


def _entropy(y: np.ndarray) -> np.ndarray:
    """Shannon entropy in nats per row, 0 · log 0 = 0 (``torch.special.entr`` summed), float32."""
    safe = np.where(y > 0, y, np.float32(1.0))
    return (-(y * np.log(safe))).sum(-1)


def _top(probs: np.ndarray, names: list[str]) -> dict:
    values = probs.tolist()
    k = int(probs.argmax())
    return {"label": names[k], "probability": values[k], "probabilities": dict(zip(names, values))}
