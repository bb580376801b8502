"""``dact-lab export``: a run's model as a folder that leaves DACT Lab — ``hf`` (loaded by ``transformers``,
``deploy/hf.py``) or ``onnx`` (per-layer graphs for the torch-free runtime, optionally int8, ``deploy/onnx_export.py``).

The exit point an export carries: the run's own (its installed halting units under the DACT rule), another exit
policy (``policy``: ``entropy:S``, ``patience:T``, ``fixed:K``), a stage-3 point of a DACT pipeline (``point``: the
trial number; its halting units are baked in, the run's own choice is not changed) or the most accurate point
within a latency budget measured on the runtime the export is for (``latency_budget_ms``, ``deploy/budget.py``).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DactLabError
from .policy import canonical

FORMATS = ("hf", "onnx")


def _check(fmt: str, int8: bool, policy: str | None, point: int | None, budget: float | None) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r} is unknown: use --format hf (a transformers folder) or --format "
                          "onnx (per-layer ONNX graphs for the int8 runtime).")
    if int8 and fmt != "onnx":
        raise ConfigError("--int8 quantises ONNX graphs: use it with --format onnx.")
    given = [name for name, v in (("--policy", policy), ("--point", point), ("--latency-budget-ms", budget))
             if v is not None]
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(given)} each choose the exit point: give only one of them.")


def _pipeline_point(run: Any, point: int, home) -> tuple[int, Any]:
    """(final run id, halting weights) of stage-3 point ``point`` of the DACT pipeline run ``run``."""
    from safetensors.torch import load_file

    from ..tracker import Tracker
    from ..tuning.dact_pipeline.choice import load_stage3
    from ..tuning.dact_pipeline.settings import PIPELINE_KIND
    from ..tuning.dact_pipeline.stage3 import pareto_points

    text = str(run).strip()
    if not text.isdigit():
        raise ConfigError(f"--point picks a stage-3 point of a DACT pipeline: give the pipeline's run id as --run, "
                          f"not {run!r}.")
    tracker = Tracker(home)
    info = tracker.get_run(int(text))
    if info["kind"] != PIPELINE_KIND:
        raise ConfigError(f"--point picks a stage-3 point of a DACT pipeline, and run {text} is a {info['kind']!r} "
                          "run: use --policy (e.g. entropy:0.3) or --latency-budget-ms for a single run.")
    study, _, _ = load_stage3(int(text), tracker=tracker)
    front = {p.trial: p for p in pareto_points(study)}
    if int(point) not in front:
        raise ConfigError(f"--point {point}: not a point of pipeline {text}'s front; choose one of trials "
                          f"{sorted(t for t in front if t is not None)} (the Pareto page lists them).")
    p = front[int(point)]
    summary = info.get("summary") or {}
    final = summary.get("final_run_id")
    if summary.get("final_source") == "single run" and p.halting_file:
        # the final model is the pipeline's single run: stage 3's units fit the stage-2 model, exported with it
        final = summary.get("trunk_run_id", final)
    halting = None
    try:
        if p.halting_file:
            src = tracker.abs_path(p.halting_file)
            if not src.is_file():
                raise DactLabError(f"point {point}'s halting weights ({src}) are missing: choose another point.")
            halting = {"weights": load_file(str(src)), **p.brief().to_dict(), "by": "export --point"}
        elif p.run_id is not None:
            final = p.run_id  # an older pipeline: one trained run per λ
    finally:
        tracker.close()
    if final is None:
        raise DactLabError(f"pipeline {text} has no final model yet: resume it to the end, then export.")
    return int(final), halting


def export_model(run: Any, out_dir: str | Path, *, fmt: str = "hf", int8: bool = False, policy: str | None = None,
                 point: int | None = None, latency_budget_ms: float | None = None, home=None) -> dict:
    """Export ``run`` (an id or a run folder) to ``out_dir``. Returns ``path``, ``format``, ``int8``, ``policy`` (the
    exit policy the export answers with; None for a backbone / multi-task model), ``budget`` (the latency-budget
    choice, or None), ``point`` and ``seconds``."""
    from ..modeling_dact import DactBert
    from ..models import load_model

    t0 = time.perf_counter()
    _check(fmt, int8, policy, point, latency_budget_ms)
    budget = None
    source = run
    halting = None
    if point is not None:
        source, halting = _pipeline_point(run, point, home)
    if latency_budget_ms is not None:
        from .budget import choose_for_budget

        budget = choose_for_budget(run, latency_budget_ms, runtime="onnx" if fmt == "onnx" else "torch", int8=int8,
                                   home=home)
        if budget["point"] is None:
            raise DactLabError(budget["message"])
        policy = budget["policy"]
    loaded = load_model(source, home, device="cpu")
    if policy is not None:
        if loaded.kind != "dact":
            raise ConfigError(f"--policy chooses where a DACT model exits; run {run} is a {loaded.kind!r} model "
                              "(it always runs every layer): leave --policy out.")
        policy = canonical(policy)
    if halting is not None:  # the point's halting units, and the export's records say so
        if not isinstance(loaded.model, DactBert):
            raise DactLabError(f"point {point}: run {source} is a {loaded.kind!r} model, which has no halting units "
                               "to load.")
        loaded.model.halters.load_state_dict(halting.pop("weights"))
        loaded.halting = halting
    if fmt == "hf":
        from .card import card_info
        from .hf import export_hf

        front = budget["points"] if budget else None
        path = export_hf(loaded, out_dir, policy=policy,
                         card=card_info(loaded, policy=policy, front=front, runtime="transformers"))
    else:
        from .onnx_export import export_onnx

        path = export_onnx(loaded, out_dir, int8=int8, policy=policy)
    used = (policy or loaded.policy or "dact") if loaded.kind == "dact" else None
    return {"path": str(path), "format": fmt, "int8": bool(int8), "policy": used, "budget": budget,
            "point": point, "seconds": time.perf_counter() - t0}


def zip_folder(folder: str | Path) -> bytes:
    """An exported folder as zip bytes (the dashboard's download), paths relative to the folder."""
    import io
    import zipfile

    folder = Path(folder)
    if not folder.is_dir():
        raise DactLabError(f"{folder} is not a folder: export the model first.")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, str(f.relative_to(folder)))
    return buf.getvalue()
