"""dact_lib — fine-tune BERT-style text classifiers and make them cheaper with early exit (DACT).

The public surface is small; see docs/architecture.md for which file owns what. ``import dact_lib`` loads nothing
heavy: every name below is imported when first used (module ``__getattr__``).
"""
from __future__ import annotations

import re
from pathlib import Path

DISTRIBUTION = "dact-lab"


def _version() -> str:
    """The installed distribution's version (``importlib.metadata``); in a source tree that is not installed,
    pyproject.toml's; ``0+unknown`` when neither is there."""
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        text = pyproject.read_text(encoding="utf-8")
    except OSError:
        return "0+unknown"
    try:
        import tomllib

        return str(tomllib.loads(text)["project"]["version"])
    except (ImportError, KeyError, ValueError):  # Python 3.10 has no tomllib: the [project] table's version line
        m = re.search(r'^\[project\][^\[]*?^version\s*=\s*["\']([^"\']+)["\']', text, re.M | re.S)
        return m.group(1) if m else "0+unknown"


def __getattr__(name: str):
    if name == "__version__":
        value = _version()
        globals()["__version__"] = value  # computed once
        return value
    raise AttributeError(f"module 'dact_lib' has no attribute {name!r}")
