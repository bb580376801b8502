"""One interface over the runtimes: a trained model answers ``predict(texts)`` the same way whether it runs in
PyTorch (a run folder, or a ``transformers`` export folder) or in ONNX Runtime (an ONNX export folder, or a run
exported once to a cache folder inside it).

:func:`load_predictor` picks the runtime from what it is given:

* an ONNX export folder (it holds ``dact_lab_onnx.json``) → ONNX Runtime (``deploy.runtime.OnnxModel``);
* a run (id or folder) or an hf export folder (``dact_lab_run.json``) → PyTorch (``models.load_model``), unless
  ``runtime="onnx"`` or ``int8=True``: then the model is exported once to ``<folder>/deploy/onnx-<version>/``
  (fp32 + int8 graphs; reused while the weights and the halting choice are unchanged) and served by ONNX Runtime.

Exit policies are text here (``deploy.policy``: ``dact``, ``entropy:S``, ``patience:T``, ``fixed:K``). torch and
transformers are imported only on the PyTorch path, so an ONNX folder is served without them.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Callable

from ..errors import DactLabError
from ..front import report_points
from .policy import format_policy, parse_policy

log = logging.getLogger(__name__)

ONNX_MANIFEST = "dact_lab_onnx.json"   # written by deploy.onnx_export into an ONNX export folder
HF_MANIFEST = "dact_lab_run.json"      # written by deploy.hf into a transformers export folder
RUN_MODEL_FILE = "model.safetensors"   # models.MODEL_FILE (not imported: that module needs torch)
CACHE_DIR = "deploy"                   # <run folder>/deploy/onnx-<version>/: the ONNX export cache of a run
RUNTIMES = ("torch", "onnx")
DEFAULT_BATCH_SIZE = 32


class Predictor:
    """A loaded model behind one interface. Build it with :func:`load_predictor` (or :func:`from_loaded`).

    Attributes: ``kind`` ("backbone" | "dact" | "multitask"), ``tasks`` (task names), ``labels`` (task → class
    names), ``num_layers`` (DACT: N; else None), ``policy`` (DACT: the exit policy as text; else None), ``runtime``
    ("pytorch" | "onnxruntime-fp32" | "onnxruntime-int8"), ``source`` (what was loaded, as text)."""

    def __init__(self, *, kind: str, tasks: list[str], labels: dict[str, list[str]], num_layers: int | None,
                 policy: str | None, runtime: str, source: str, run_dir: Path | None,
                 predict_batch: Callable[[list[str], bool], list[dict]], batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        self.kind = kind
        self.tasks = list(tasks)
        self.labels = {t: list(v) for t, v in labels.items()}
        self.num_layers = num_layers
        self.policy = policy
        self.runtime = runtime
        self.source = source
        self.run_dir = run_dir
        self.batch_size = batch_size
        self._predict_batch = predict_batch
        self._front: list[dict] | None = None
        self._lock = threading.Lock()  # one prediction at a time (torch modules and ORT sessions are shared)

    def __repr__(self) -> str:
        return f"Predictor({self.kind}, {self.runtime}, policy={self.policy}, source={self.source!r})"

    def predict(self, texts: list[str] | str, *, trace: bool = False, batch_size: int | None = None) -> list[dict]:
        """One dict per text, in the order given: ``label``, ``probability``, ``probabilities`` (name → p); for
        multi-task ``tasks`` (task → the same); for DACT ``exit_layer`` (1-based) and ``num_layers``. The per-layer
        trace ``layers`` (DACT) only with ``trace=True``. Texts are run in batches of similar length."""
        texts = check_texts(texts)
        size = int(batch_size or self.batch_size)
        if size < 1:
            raise DactLabError(f"batch_size = {size}: give a whole number >= 1.")
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding per batch
        results: dict[int, dict] = {}  # text position -> its answer
        with self._lock:
            for start in range(0, len(order), size):
                idx = order[start:start + size]
                for i, res in zip(idx, self._predict_batch([texts[i] for i in idx], trace)):
                    results[i] = res if trace else {k: v for k, v in res.items() if k != "layers"}
        return [results[i] for i in range(len(texts))]

    def front(self) -> list[dict]:
        """The measured exit front of the run (its report.json's halting fit: the points not beaten on both average
        exit layer and validation accuracy), fastest first; [] when unknown."""
        if self._front is None:
            self._front = exit_front(self.run_dir) if self.kind == "dact" else []
        return self._front

    def describe(self) -> dict:
        return {"kind": self.kind, "tasks": list(self.tasks), "labels": {t: list(v) for t, v in self.labels.items()},
                "num_layers": self.num_layers, "policy": self.policy, "runtime": self.runtime,
                "source": self.source, "front": self.front()}


def check_texts(texts: Any) -> list[str]:
    """A list of non-blank strings (one string is a list of one), or a DactLabError naming the bad item."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)) or not texts:
        raise DactLabError("Nothing to predict: give at least one non-empty sentence.")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise DactLabError(f"Text {i + 1} is a {type(t).__name__}, not a string: give every text as a string.")
        if not t.strip():
            raise DactLabError(f"Text {i + 1} is empty: give every text some words, or leave the empty one out.")
        if not encodable(t):
            raise DactLabError(f"Text {i + 1} holds a lone surrogate code point (e.g. \\ud800), not text: send it "
                               "as UTF-8 text.")
    return list(texts)


def encodable(text: str) -> bool:
    """False for a string a tokenizer cannot take: a lone surrogate (from a JSON escape such as "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def exit_front(run_dir: str | Path | None) -> list[dict]:
    """``[{avg_exit_layer, accuracy, lambda?, threshold?}]``: the non-dominated halting points of a DACT run's
    report.json (fitted λ points, calibrated and threshold points), fastest first; [] when the folder has none."""
    if run_dir is None:
        return []
    try:
        rep = json.loads((Path(run_dir) / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    halting = rep.get("halting") if isinstance(rep, dict) else None
    if not isinstance(halting, dict):
        return []
    pts = []
    for fp in report_points(halting):
        if fp.val_avg_exit_layer is None or fp.val_accuracy is None:
            continue
        pt: dict = {"avg_exit_layer": fp.val_avg_exit_layer, "accuracy": fp.val_accuracy}
        for extra, value in (("lambda", fp.front_lambda), ("threshold", fp.threshold)):
            if value is not None:
                pt[extra] = value
        pts.append(pt)
    front = [p for p in pts if not any(q["avg_exit_layer"] <= p["avg_exit_layer"] and q["accuracy"] >= p["accuracy"]
                                       and (q["avg_exit_layer"] < p["avg_exit_layer"] or q["accuracy"] > p["accuracy"])
                                       for q in pts)]
    seen, out = set(), []
    for p in sorted(front, key=lambda p: (p["avg_exit_layer"], -p["accuracy"])):
        key = (p["avg_exit_layer"], p["accuracy"])
        if key not in seen:  # the same measured point fitted twice (two λ) is shown once
            seen.add(key)
            out.append(p)
    return out


# ---------------------------------------------------------------------------------------------------------------
# What a folder is
# ---------------------------------------------------------------------------------------------------------------


def folder_kind(folder: str | Path) -> str:
    """``"onnx"`` (an ONNX export), ``"hf"`` (a transformers export), ``"run"`` (a run folder), or a DactLabError
    saying what a model folder holds."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise DactLabError(f"{str(path)!r} is not a folder: give a run folder, or a folder written by `python -m "
                           "dact_lib export` (--format hf or onnx).")
    if (path / ONNX_MANIFEST).is_file():
        return "onnx"
    if (path / HF_MANIFEST).is_file():
        return "hf"
    if (path / RUN_MODEL_FILE).is_file():
        return "run"
    raise DactLabError(f"{str(path)!r} holds no model: a run folder holds {RUN_MODEL_FILE}, an export folder "
                       f"{HF_MANIFEST} (--format hf) or {ONNX_MANIFEST} (--format onnx). Give such a folder, or "
                       "--run with a run id.")


def _run_folder(run: str | int | Path, home) -> Path:
    """A run id is ``<home>/runs/<id>``; anything else is a folder path."""
    from ..home import resolve_home, runs_dir

    text = str(run).strip()
    if isinstance(run, int) or text.isdigit():
        path = runs_dir(home) / str(int(text))
        if not (path / RUN_MODEL_FILE).is_file():
            raise DactLabError(f"Run {text} has no saved model ({path / RUN_MODEL_FILE} is missing): pick a "
                               f"finished run from `python -m dact_lib runs --home {resolve_home(home)}`.")
        return path
    path = Path(text).expanduser()
    if not path.is_dir():
        raise DactLabError(f"Run {text!r} is neither a run id of {resolve_home(home)} nor a folder: give the id "
                           f"shown by `python -m dact_lib runs --home {resolve_home(home)}` or a model folder.")
    return path


def _policy_text(policy: str | None) -> tuple[str, float | int | None] | None:
    return None if policy is None or not str(policy).strip() else parse_policy(policy)


def _check_policy(parsed, kind: str, num_layers: int | None) -> None:
    if parsed is None:
        return
    if kind != "dact":
        raise DactLabError(f"An exit policy ({format_policy(*parsed)}) only applies to DACT models; this model is "
                           f"a {kind} model, which always runs every layer: drop the policy.")
    name, value = parsed
    if name in ("fixed", "patience") and num_layers is not None and int(value) > num_layers:
        raise DactLabError(f"exit policy {format_policy(*parsed)}: this model has {num_layers} layers; give a "
                           f"value from 1 to {num_layers}.")


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def load_predictor(run: str | int | Path | None = None, model_dir: str | Path | None = None, *, home=None,
                   runtime: str = "torch", int8: bool = False, policy: str | None = None, device: str = "cpu",
                   threads: int | None = None) -> Predictor:
    """Load a model for prediction. Exactly one of ``run`` (a run id of ``home`` or a run folder) and
    ``model_dir`` (a run folder, an hf export folder or an ONNX export folder).

    ``runtime``: "torch" (default) or "onnx"; an ONNX export folder always runs on ONNX Runtime. ``int8``: the
    int8-quantised ONNX graphs (implies ONNX Runtime). ``policy``: the exit policy text of a DACT model (default: the
    export's policy, else the DACT halting rule); an error for other kinds. ``device``: where PyTorch runs (ONNX
    Runtime runs on the CPU). ``threads``: intra-op threads (torch: ``torch.set_num_threads``, process-wide)."""
    if (run is None) == (model_dir is None):
        raise DactLabError("Give exactly one model: a run (--run N, a run id or folder) or a model folder (--model "
                           "DIR, a run folder or a folder written by `python -m dact_lib export`).")
    if runtime not in RUNTIMES:
        raise DactLabError(f"runtime {runtime!r}: choose torch (PyTorch) or onnx (ONNX Runtime).")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise DactLabError(f"threads = {threads!r}: give a whole number >= 1, or leave it out.")
    parsed = _policy_text(policy)
    folder = _run_folder(run, home) if run is not None else Path(str(model_dir)).expanduser()
    kind = folder_kind(folder)
    source = str(folder)
    if kind == "onnx":
        if device not in ("cpu", "auto"):
            raise DactLabError(f"{source} is an ONNX export, which runs on the CPU with ONNX Runtime: drop "
                               f"--device {device}, or serve the run itself with the torch runtime.")
        # int8 None: the export's own default variant (int8 when it was exported with --int8)
        return _onnx_predictor(folder, int8=True if int8 else None, threads=threads, parsed=parsed, source=source,
                               run_dir=None)
    if runtime == "onnx" or int8:
        if device not in ("cpu", "auto"):
            raise DactLabError(f"ONNX Runtime runs on the CPU here: drop --device {device} (or use the torch "
                               "runtime without --int8 to run on the GPU).")
        cache = onnx_cache(folder)
        return _onnx_predictor(cache, int8=bool(int8), threads=threads, parsed=parsed, source=source,
                               run_dir=folder if kind == "run" else None)
    from ..models import load_model

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    loaded = load_model(folder, home, device)
    return from_loaded(loaded, policy=None if parsed is None else format_policy(*parsed), source=source)


def from_loaded(loaded, *, policy: str | None = None, source: str | None = None) -> Predictor:
    """A PyTorch :class:`Predictor` over a ``models.LoadedModel`` (e.g. one a page already holds). ``policy``: the
    exit policy text (default: the loaded export's policy, else ``dact``)."""
    from .. import dact
    from ..models import model_task, predict

    model = loaded.model
    kind = loaded.kind
    num_layers = int(model.num_layers) if kind == "dact" else None
    parsed = _policy_text(policy)
    _check_policy(parsed, kind, num_layers)
    torch_policy = None
    text = None
    if kind == "dact":
        if parsed is None:
            default = getattr(loaded, "policy", None)  # an hf export's default policy
            parsed = parse_policy(default)
            _check_policy(parsed, kind, num_layers)
        text = format_policy(*parsed)
        torch_policy = dact.make_policy(*parsed)  # also "dact": None would mean an hf export's own default
    tasks = list(loaded.label_maps) if kind == "multitask" else [model_task(loaded.config, loaded.label_maps)]
    labels = {t: list(loaded.label_maps[t]) for t in tasks}

    def predict_batch(texts: list[str], trace: bool = False) -> list[dict]:
        return predict(loaded, texts, torch_policy, trace=trace)

    run_dir = Path(loaded.run_dir)
    return Predictor(kind=kind, tasks=tasks, labels=labels, num_layers=num_layers, policy=text, runtime="pytorch",
                     source=source or str(run_dir), run_dir=run_dir if (run_dir / "report.json").is_file() else None,
                     predict_batch=predict_batch)


def _onnx_predictor(folder: Path, *, int8: bool | None, threads: int | None, parsed, source: str,
                    run_dir: Path | None) -> Predictor:
    from .runtime import OnnxModel

    policy = None if parsed is None else format_policy(*parsed)
    if parsed is not None:  # a policy on a non-DACT export is refused before the graphs are loaded
        kind = _manifest_kind(folder)
        if kind is not None and kind != "dact":
            _check_policy(parsed, kind, None)
    om = OnnxModel(folder, int8=int8, threads=threads, policy=policy)
    kind = om.kind
    num_layers = int(om.num_layers) if kind == "dact" and om.num_layers is not None else None
    _check_policy(parsed, kind, num_layers)
    variant = getattr(om, "variant", "int8" if int8 else "fp32")
    if int8 and variant != "int8":
        raise DactLabError(f"{folder} has no int8 graphs: export it again with `python -m dact_lib export --format "
                           "onnx --int8`, or drop --int8.")

    def predict_batch(texts: list[str], trace: bool = False) -> list[dict]:
        return om.predict(texts, batch_size=max(len(texts), 1))

    tasks = list(om.tasks)
    return Predictor(kind=kind, tasks=tasks, labels={t: list(om.labels[t]) for t in tasks}, num_layers=num_layers,
                     policy=(om.policy or "dact") if kind == "dact" else None, runtime=f"onnxruntime-{variant}",
                     source=source, run_dir=run_dir, predict_batch=predict_batch)


def _manifest_kind(folder: Path) -> str | None:
    try:
        man = json.loads((folder / ONNX_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return man.get("kind") if isinstance(man, dict) and isinstance(man.get("kind"), str) else None


# ---------------------------------------------------------------------------------------------------------------
# The ONNX export cache of a run
# ---------------------------------------------------------------------------------------------------------------

_CACHE_LOCK = threading.Lock()


def cache_version(folder: str | Path) -> str:
    """What the ONNX cache of a model folder is keyed by: ``models.model_version`` (the weights file and the user's
    halting choice); for an export folder without ``model.safetensors``, the sizes and times of its weight files."""
    folder = Path(folder)
    if (folder / RUN_MODEL_FILE).is_file():
        from ..models import model_version

        return model_version(folder)
    stats = [f.stat() for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))]
    if not stats:
        raise DactLabError(f"{folder} holds no weights file (*.safetensors): export the run again.")
    return f"{max(s.st_mtime_ns for s in stats)}-{sum(s.st_size for s in stats)}"


def onnx_cache(folder: str | Path) -> Path:
    """``<folder>/deploy/onnx-<version>/``: the model of a run (or hf export) folder exported to ONNX (fp32 and
    int8) once, and reused while its weights and halting choice are unchanged. The export is written to a
    temporary folder and renamed into place, so a crash leaves no half cache and two processes exporting at once
    keep one copy; caches of older versions are removed."""
    folder = Path(folder)
    version = cache_version(folder)
    base = folder / CACHE_DIR
    target = base / f"onnx-{version}"
    if (target / ONNX_MANIFEST).is_file():
        return target
    with _CACHE_LOCK:
        if (target / ONNX_MANIFEST).is_file():
            return target
        try:
            base.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DactLabError(f"Cannot create the ONNX cache folder {base} ({exc.strerror}): export the model "
                               "once with `python -m dact_lib export --format onnx --out DIR` and use --model DIR.") \
                from None
        from ..models import load_model
        from .onnx_export import export_onnx

        log.info("exporting %s to ONNX once (fp32 + int8) into %s", folder, target)
        tmp = base / f".onnx-{version}.{os.getpid()}.{threading.get_ident()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            loaded = load_model(folder, None, "cpu")
            export_onnx(loaded, tmp, int8=True)
            if not (tmp / ONNX_MANIFEST).is_file():
                raise DactLabError(f"The ONNX export of {folder} wrote no {ONNX_MANIFEST}: the export failed; see "
                                   "the log above.")
            try:
                os.rename(tmp, target)
            except OSError:
                if not (target / ONNX_MANIFEST).is_file():  # another process won the race: keep its copy
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in base.glob("onnx-*"):
            if old != target and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)  # the weights changed: an older cache is never read again
    return target
