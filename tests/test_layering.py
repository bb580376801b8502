"""The house rule "dact_lib never imports streamlit": importing every module of the library (in a fresh
interpreter) must leave streamlit unloaded, and no module's source may import it."""
from __future__ import annotations

import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import dact_lib

ROOT = Path(__file__).resolve().parent.parent


def _modules() -> list[str]:
    # __main__ runs the CLI when imported
    found = pkgutil.walk_packages(dact_lib.__path__, "dact_lib.")
    return sorted(m.name for m in found if m.name != "dact_lib.__main__")


def test_importing_every_library_module_leaves_streamlit_unloaded():
    mods = _modules()
    assert "dact_lib.train" in mods and "dact_lib.tuning.pbt" in mods  # the walk found the library
    code = ("import importlib, sys\n"
            f"for m in {mods!r}:\n    importlib.import_module(m)\n"
            "print('streamlit' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_no_library_source_imports_streamlit():
    pattern = re.compile(r"^\s*(import streamlit|from streamlit)", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "dact_lib").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
