"""dact_lib — fine-tune BERT-style text classifiers and make them cheaper with early exit (DACT).

For notebooks (README "Python API")::

    import dact_lib
    run = dact_lib.train(df, kind="dact", epochs=2)      # a DataFrame or a data file; recorded in the home
    run.run_id, run.metrics, run.predict(["a fine film"])
    model = dact_lib.load(run.run_id)                    # a run id, a run folder or an export

``import dact_lib`` loads nothing heavy: every name of ``__all__`` is imported when first used (module
``__getattr__``). ``dact_lib.train`` is the training-loop module (``dact_lib/train.py``) and, called, the notebook
API :func:`dact_lib.api.train`. See docs/architecture.md for which file owns what.
"""
from __future__ import annotations

import sys
import types

__all__ = ["__version__", "train", "load", "TrainedRun", "read_csv", "load_demo_dataset", "RunConfig",
           "default_config", "DactLabError", "DataError", "ConfigError"]

#: lazily imported names → their module
_LAZY = {"load": "api", "TrainedRun": "api", "read_csv": "data", "load_demo_dataset": "data", "RunConfig": "config",
         "default_config": "config", "DactLabError": "errors", "DataError": "errors", "ConfigError": "errors"}


class _CallableTrainModule(types.ModuleType):
    """``dact_lib.train``: the training-loop module (``dact_lib.train.train`` etc. as before) that, called, is the
    notebook API ``dact_lib.api.train(data, kind=..., **overrides)``."""

    def __call__(self, *args, **kwargs):
        from .api import train

        return train(*args, **kwargs)


def _callable(module: types.ModuleType) -> types.ModuleType:
    if not isinstance(module, _CallableTrainModule):
        module.__class__ = _CallableTrainModule
    return module


class _Package(types.ModuleType):
    """The package: when the import system binds the submodule ``train`` to it (whoever imports it first), the
    submodule becomes callable (``dact_lib.train(df)``)."""

    def __setattr__(self, name: str, value) -> None:
        if name == "train" and isinstance(value, types.ModuleType):
            value = _callable(value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name == "__version__":
        from .version import version

        value = version()
        globals()["__version__"] = value  # computed once
        return value
    if name == "train":
        import importlib

        return _callable(importlib.import_module(f"{__name__}.train"))
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dact_lib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
