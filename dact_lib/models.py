"""Build a model from a RunConfig; save a trained run to its folder and load it back; predict.

A saved run folder is self-contained (it can be zipped and used elsewhere):
``config.json`` (the RunConfig), ``label_maps.json``, ``model.safetensors`` (the best checkpoint),
``encoder/`` (the encoder's config and tokenizer, so no hub access is needed to rebuild it) and, for backbone
runs, ``encoder.safetensors`` (the encoder weights a DACT run can start from).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import dact
from .config import RunConfig
from .encoders import encoder_from_config, load_encoder
from .heads import EncoderModel
from .files import atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from .errors import ConfigError, DactLabError
from .home import resolve_home, runs_dir
from .modeling_backbone import BackboneClassifier
from .modeling_dact import DactBert
from .modeling_multitask import MultiTaskModel

if TYPE_CHECKING:
    from transformers import PreTrainedModel

MODEL_FILE = "model.safetensors"
# A DACT run whose halting units were chosen by the user among fitted points (the Pareto explorer): the run keeps
# its own halting weights in model.safetensors (the pipeline's choice) and names the user's point here; the file
# it names lives under the run folder (``halting/…``). load_model applies it.
HALTING_CHOICE_FILE = "halting_choice.json"
HALTING_DIR = "halting"
ENCODER_FILE = "encoder.safetensors"
# A Hugging Face export of a run (deploy/hf.py) names itself with this file: the RunConfig, label maps and default
# exit policy it was exported with; load_model reads a run from such a folder too.
HF_RUN_FILE = "dact_lab_run.json"
HF_FORMAT = "dact-lab-hf"


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but no CUDA GPU is visible to torch: use --device cpu or auto.")
    return torch.device(name)


def model_task(cfg: RunConfig, label_maps: dict[str, list[str]]) -> str:
    """The task a single-task model learns: ``cfg.data.task`` or the dataset's first task."""
    task = cfg.data.task or next(iter(label_maps))
    if task not in label_maps:
        raise ConfigError(f"data.task = {task!r} is not a task of this dataset: choose one of {list(label_maps)}.")
    return task


def wrap_encoder(encoder: PreTrainedModel, cfg: RunConfig, label_maps: dict[str, list[str]]) -> EncoderModel:
    if cfg.kind == "multitask":
        if len(label_maps) < 2:
            raise ConfigError("kind 'multitask' needs a two-task CSV (sentence,class_label,sentiment_label): "
                              "this dataset has one task; use kind 'backbone' or 'dact'.")
        return MultiTaskModel(encoder, cfg.model, label_maps)
    task = model_task(cfg, label_maps)
    cls = DactBert if cfg.kind == "dact" else BackboneClassifier
    return cls(encoder, cfg.model, len(label_maps[task]), task=task)


def build_model(cfg: RunConfig, label_maps: dict[str, list[str]], home=None) -> tuple[EncoderModel, Any]:
    """A fresh model for ``cfg`` (pretrained encoder + new heads) and its tokenizer.

    With ``cfg.init_from_run`` the encoder starts from that backbone run's exported weights."""
    encoder, tokenizer = load_encoder(cfg.encoder, home, seed=cfg.train.seed)
    if cfg.init_from_run is not None:
        path = runs_dir(home) / str(cfg.init_from_run) / ENCODER_FILE
        if not path.exists():
            raise ConfigError(f"init_from_run = {cfg.init_from_run!r}: {path} does not exist. Give the id of a "
                              "finished backbone run (see `python -m dact_lib runs`).")
        missing, unexpected = encoder.load_state_dict(load_file(str(path)), strict=False)
        if unexpected or [m for m in missing if "pooler" not in m]:
            raise ConfigError(f"init_from_run = {cfg.init_from_run!r}: its encoder does not match {cfg.encoder!r} "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]}). Use the same encoder.")
    if cfg.train.encoder_dropout is not None:
        from .heads import set_dropout

        set_dropout(encoder, cfg.train.encoder_dropout)
    torch.manual_seed(cfg.train.seed)
    return wrap_encoder(encoder, cfg, label_maps), tokenizer


def save_model(run_dir: str | Path, model: EncoderModel, tokenizer, cfg: RunConfig,
               label_maps: dict[str, list[str]]) -> Path:
    """Write the model checkpoint + config + label map, each atomically (temp file, fsync, rename: files.py)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(run_dir / MODEL_FILE, lambda tmp: save_file(state, str(tmp), metadata={"kind": cfg.kind}))
    atomic_write_text(run_dir / "config.json", cfg.to_json())
    atomic_write_json(run_dir / "label_maps.json", label_maps)
    enc_dir = run_dir / "encoder"
    if not (enc_dir / "config.json").exists():
        model.encoder.config.save_pretrained(enc_dir)
        tokenizer.save_pretrained(enc_dir)
    return run_dir / MODEL_FILE


MODEL_ZIP_FILES = (MODEL_FILE, "config.json", "label_maps.json", "report.json")


def zip_model(run_dir: str | Path) -> bytes:
    """A run's model as a zip (bytes): weights, config, label maps, the test report when present, and the encoder/
    folder (encoder config + tokenizer) — everything :func:`load_model` needs, unpacked into any folder."""
    import io
    import zipfile

    run_dir = Path(run_dir)
    if not (run_dir / MODEL_FILE).is_file():
        raise DactLabError(f"{run_dir} holds no {MODEL_FILE}: only a finished run with a saved model can be zipped.")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in MODEL_ZIP_FILES:
            if (run_dir / name).is_file():
                zf.write(run_dir / name, name)
        enc = run_dir / "encoder"
        if enc.is_dir():
            for f in sorted(enc.rglob("*")):
                if f.is_file():
                    zf.write(f, str(f.relative_to(run_dir)))
    return buf.getvalue()


def restore_weights(model: nn.Module, run_dir: str | Path) -> None:
    model.load_state_dict(load_file(str(Path(run_dir) / MODEL_FILE)))


def save_halting_file(run_dir: str | Path, name: str, state: dict) -> Path:
    """Write halting weights (``model.halters`` state) as ``<run_dir>/halting/<name>.safetensors``, atomically."""
    from safetensors.torch import save as save_bytes

    d = Path(run_dir) / HALTING_DIR
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.safetensors"
    atomic_write_bytes(path, save_bytes({k: v.detach().contiguous().cpu() for k, v in state.items()}))
    return path


def model_version(run_dir: str | Path) -> str:
    """What a cache of a run's model must be keyed by: the weights file and the user's halting choice."""
    run_dir = Path(run_dir)
    st = (run_dir / MODEL_FILE).stat()
    choice = run_dir / HALTING_CHOICE_FILE
    extra = f"-h{choice.stat().st_mtime_ns}" if choice.is_file() else ""
    return f"{st.st_mtime_ns}-{st.st_size}{extra}"


def halting_choice(run_dir: str | Path) -> dict | None:
    """The user's halting choice of a run (``halting_choice.json``), or None (the run's own halting units)."""
    path = Path(run_dir) / HALTING_CHOICE_FILE
    try:
        got = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError:
        raise DactLabError(f"{path} is damaged (not JSON): delete it to use the run's own halting units.") from None
    return got if isinstance(got, dict) and got.get("file") else None


def set_halting_choice(run_dir: str | Path, info: dict | None) -> None:
    """Record (``info`` with ``file`` relative to the run folder, plus trial / λ / exit / accuracy) or clear
    (None) the user's halting choice of a run. Nothing is retrained: load_model swaps the halting weights."""
    run_dir = Path(run_dir)
    path = run_dir / HALTING_CHOICE_FILE
    if info is None:
        path.unlink(missing_ok=True)
        return
    if not (run_dir / info["file"]).is_file():
        raise DactLabError(f"{run_dir / info['file']} does not exist: this point's halting weights are missing.")
    atomic_write_json(path, info)


@dataclass
class LoadedModel:
    model: EncoderModel
    tokenizer: Any
    config: RunConfig
    label_maps: dict[str, list[str]]
    run_dir: Path
    device: torch.device
    halting: dict | None = None  # the user's halting choice applied (halting_choice.json), or None
    policy: str | None = None  # a Hugging Face export's default exit policy text (dact_lab_run.json); None for a run

    @property
    def kind(self) -> str:
        return self.config.kind


def resolve_run_dir(run: str | int | Path, home=None) -> Path:
    """A run id (``5``, ``"5"``) is always ``<home>/runs/5`` — never a folder ``./5`` that happens to exist; anything
    else is a run folder path (e.g. an unpacked model zip, or a Hugging Face export of a run)."""
    text = str(run).strip()
    if isinstance(run, int) or text.isdigit():
        path = runs_dir(home) / str(int(text))
    else:
        path = Path(text).expanduser()
        if not path.is_dir():
            raise DactLabError(f"Run {run!r} is neither a run id of {resolve_home(home)} nor a run folder: give "
                               f"the id shown by `python -m dact_lib runs --home {resolve_home(home)}` or the "
                               "path of a folder holding model.safetensors.")
    if not (path / MODEL_FILE).exists():
        raise DactLabError(f"Run {run!r} has no saved model ({path / MODEL_FILE} is missing): pick a finished "
                           f"run from `python -m dact_lib runs --home {resolve_home(home)}`.")
    return path


def hf_export_manifest(folder: str | Path) -> dict | None:
    """The ``dact_lab_run.json`` of a Hugging Face export folder (deploy/hf.py), or None when ``folder`` is not one."""
    path = Path(folder) / HF_RUN_FILE
    if not path.is_file():
        return None
    got = read_json(path, "export manifest")
    if not (isinstance(got, dict) and got.get("format") == HF_FORMAT and isinstance(got.get("config"), dict)):
        raise DactLabError(f"{path} is damaged (not a DACT Lab export manifest): export the run again.")
    return got


def load_model(run: str | int | Path, home=None, device: str = "auto") -> LoadedModel:
    """Load a saved run (by id under the home, or by folder — a run folder or a Hugging Face export of one) for
    evaluation or prediction, in eval mode."""
    from transformers import AutoTokenizer

    run_dir = resolve_run_dir(run, home)
    manifest = hf_export_manifest(run_dir)
    if manifest is not None:
        cfg = RunConfig.from_dict(manifest["config"])
        label_maps = manifest.get("label_maps")
        where = run_dir / HF_RUN_FILE
    else:
        cfg = RunConfig.from_dict(read_json(run_dir / "config.json", "config"))
        label_maps = read_json(run_dir / "label_maps.json", "label map")
        where = run_dir / "label_maps.json"
    if not (isinstance(label_maps, dict) and label_maps and
            all(isinstance(v, list) and v for v in label_maps.values())):
        raise DactLabError(f"{where} is damaged (expected task -> list of labels): "
                           + ("export the run again." if manifest is not None else "retrain the run."))
    enc_dir = run_dir / "encoder"
    try:
        encoder = encoder_from_config(enc_dir)
        tokenizer = AutoTokenizer.from_pretrained(enc_dir)
    except DactLabError:
        raise
    except Exception as exc:  # noqa: BLE001 - a missing/damaged encoder/ folder becomes one clear error
        raise DactLabError(f"{enc_dir} (the run's encoder config and tokenizer) cannot be loaded "
                           f"({type(exc).__name__}: {str(exc)[:200]}): the run folder is damaged; retrain the run.") \
            from None
    model = wrap_encoder(encoder, cfg, label_maps)
    try:
        weights = load_file(str(run_dir / MODEL_FILE))
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError: a truncated weights file
        raise DactLabError(f"{run_dir / MODEL_FILE} is damaged ({str(exc)[:200]}): retrain the run, or resume it "
                           "if it was interrupted.") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or [m for m in missing if "pooler" not in m]:
        raise DactLabError(f"{run_dir / MODEL_FILE} does not match its config.json (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}): the run folder is damaged; retrain it.")
    # an export has its halting units baked in (the choice applied when it was exported)
    choice = halting_choice(run_dir) if isinstance(model, DactBert) and manifest is None else None
    if choice is not None and isinstance(model, DactBert):
        try:
            model.halters.load_state_dict(load_file(str(run_dir / choice["file"])))
        except (OSError, RuntimeError) as exc:
            raise DactLabError(f"The halting point chosen for run {run_dir.name} ({run_dir / choice['file']}) "
                               f"cannot be loaded ({exc}): choose another point, or delete "
                               f"{run_dir / HALTING_CHOICE_FILE} to use the run's own halting units.") from None
    dev = pick_device(device)
    model.to(dev).eval()
    if manifest is not None:
        if isinstance(model, DactBert) and manifest.get("policy"):
            from .deploy.policy import parse_policy

            # every path that runs the model (predict, evaluate, exits) answers with the export's policy
            model.default_policy = dact.make_policy(*parse_policy(manifest["policy"]))
        return LoadedModel(model, tokenizer, cfg, label_maps, run_dir, dev, manifest.get("halting"),
                           policy=manifest.get("policy"))
    return LoadedModel(model, tokenizer, cfg, label_maps, run_dir, dev, choice)


@torch.no_grad()
def predict(loaded: LoadedModel, texts: list[str] | str, policy: dact.ExitPolicy | None = None, *,
            trace: bool = True) -> list[dict]:
    """Predict each text. Returns one dict per text: ``label``, ``probability``, ``probabilities`` (name → p),
    for multi-task a ``tasks`` dict with the same per task, and for DACT ``exit_layer`` (1-based) and the
    per-layer trace ``layers`` (y_n as name → p, h_n, p_n) up to the exit. ``policy`` None: the DACT rule, or the
    default exit policy of an export (``DactBert.default_policy``, set by load_model). ``trace=False`` (DACT): no
    ``layers``, and the untraced early-exit path (``DactBert.infer(trace=False)``: a single sentence takes the batch-1
    fast path)."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
        raise DactLabError("Nothing to predict: give at least one non-empty sentence.")
    tok = loaded.tokenizer(texts, truncation=True, max_length=loaded.config.data.max_seq_len, padding=True,
                           return_tensors="pt")
    ids, am = tok["input_ids"].to(loaded.device), tok["attention_mask"].to(loaded.device)
    model = loaded.model
    results: list[dict] = []
    if isinstance(model, DactBert):
        out = model.infer(ids, am, policy, trace=trace)
        names = loaded.label_maps[model.task]
        for b in range(len(texts)):
            n_exit = int(out.exit_layer[b])
            if out.y is None or out.h is None:  # trace=False: no per-layer record
                results.append({**_top(out.probs[b], names), "exit_layer": n_exit, "num_layers": model.num_layers,
                                "task": model.task})
                continue
            y, h = out.y[b, :n_exit], out.h[b, :n_exit]
            _, p = dact.accumulate(y.unsqueeze(0), h.unsqueeze(0))
            layers = [{"layer": n + 1, "y": dict(zip(names, y[n].tolist())), "h": float(h[n]), "p": float(p[0, n]),
                       "label": names[int(y[n].argmax())]} for n in range(n_exit)]
            results.append({**_top(out.probs[b], names), "exit_layer": n_exit, "num_layers": model.num_layers,
                            "task": model.task, "layers": layers})
        return results
    out = model(ids, am)
    for b in range(len(texts)):
        per_task = {t: _top(pr[b], loaded.label_maps[t]) for t, pr in out.probs.items()}
        first = next(iter(per_task.values()))
        res = dict(first)
        if len(per_task) > 1:
            res["tasks"] = per_task
        res["task"] = next(iter(per_task))
        results.append(res)
    return results


def _top(probs: torch.Tensor, names: list[str]) -> dict:
    k = int(probs.argmax())
    return {"label": names[k], "probability": float(probs[k]),
            "probabilities": {n: float(v) for n, v in zip(names, probs.tolist())}}
