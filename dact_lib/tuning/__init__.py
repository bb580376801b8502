"""The tuning engines: backbone study, DACT staged pipeline, PBT, and the Optuna study helpers.
(Multi-task training is not tuning: it is ``dact_lib.multitask``.)

Entry points are imported lazily (``from dact_lib.tuning import tune_backbone``), so importing this package is
cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "tune_backbone": "backbone", "BackboneSpace": "backbone", "TuneResult": "backbone",
    "run_pipeline": "dact_pipeline", "PipelineConfig": "dact_pipeline", "PipelineResult": "dact_pipeline",
    "run_pbt": "pbt", "PBTConfig": "pbt", "PBTResult": "pbt",
    "list_studies": "studies", "create_study": "studies", "storage": "studies", "PruningCallback": "studies",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dact_lib.tuning' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
