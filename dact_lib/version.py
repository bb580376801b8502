"""The version of DACT Lab: the installed distribution's (``importlib.metadata``), pyproject.toml's in a source tree
that is not installed. No dependencies, so that any module can import it (``dact_lib.__version__`` is this)."""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

DISTRIBUTION = "dact-lab"
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


@lru_cache(maxsize=1)
def version() -> str:
    """``importlib.metadata.version("dact-lab")``; else pyproject.toml's ``[project] version``; else
    ``0+unknown``."""
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return pyproject_version()


def pyproject_version(path: Path = PYPROJECT) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return "0+unknown"
    try:
        import tomllib

        return str(tomllib.loads(text)["project"]["version"])
    except (ImportError, KeyError, ValueError):  # Python 3.10 has no tomllib: the [project] table's version line
        m = re.search(r'^\[project\][^\[]*?^version\s*=\s*["\']([^"\']+)["\']', text, re.M | re.S)
        return m.group(1) if m else "0+unknown"
