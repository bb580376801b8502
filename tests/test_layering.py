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


# --------------------------------------------------------------------------------------------- the import graph


#: the packages whose imports form the graph: the library, the dashboard's helpers and its pages (issue 25: a
#: cycle ui/forms <-> ui/fields went unseen while only dact_lib was checked)
PACKAGES = ("dact_lib", "ui", "app_pages")


def _module_names() -> dict[str, Path]:
    out = {}
    for p in (q for pkg in PACKAGES for q in (ROOT / pkg).rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _resolve(current: str, path: Path, node) -> str | None:
    if node.level == 0:
        return node.module
    base = current.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _defined_names(tree) -> set[str]:
    import ast

    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """(module -> the dact_lib modules it imports, anywhere in its source; uses of another module's private
    names: ``from x import _y`` and ``something._y`` where ``_y`` is not defined in the module itself)."""
    import ast

    mods = _module_names()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    private: list[tuple[str, str]] = []
    allowed_private = {"_exit"}  # os._exit: documented public API despite its name
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        own = _defined_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith(PACKAGES):
                        graph[name].add(a.name if a.name in mods else a.name.rsplit(".", 1)[0])
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(name, path, node)
                if not target or not target.startswith(PACKAGES):
                    continue
                for a in node.names:
                    full = f"{target}.{a.name}"
                    graph[name].add(full if full in mods else target)
                    if a.name.startswith("_") and full not in mods and name.startswith("dact_lib"):
                        private.append((name, f"from {target} import {a.name}"))
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and name.startswith("dact_lib"):
                base = node.value
                if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                    continue
                if node.attr not in own and node.attr not in allowed_private:
                    private.append((name, f"….{node.attr}"))
    for m in graph:
        graph[m].discard(m)
        graph[m] &= set(mods)
    return graph, private


def test_the_import_graph_has_no_cycle():
    graph, _ = import_graph()
    assert "dact_lib.cli" in graph and "dact_lib.tuning.cli" in graph["dact_lib.cli"]
    assert "ui.forms" in graph and "app_pages.runs" in graph  # the dashboard's modules are in it too
    seen: dict[str, int] = {}  # 1 = on the stack, 2 = done
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        seen[m] = 1
        for n in sorted(graph[m]):
            if seen.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in seen:
                visit(n, stack + [n])
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m, [m])
    assert cycles == []


def test_no_module_uses_another_modules_private_names():
    _, private = import_graph()
    assert private == []


def test_the_graph_check_sees_a_cycle_and_a_private_name(tmp_path, monkeypatch):
    """The two checks above can fail: a fake package with a cycle and a private import is caught."""
    import ast  # noqa: F401 - used by import_graph

    pkg = tmp_path / "dact_lib"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import thing\n")
    (pkg / "b.py").write_text("from . import a\nfrom .sub.c import _secret\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("_secret = 1\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    graph, private = import_graph()
    assert "dact_lib.b" in graph["dact_lib.a"] and "dact_lib.a" in graph["dact_lib.b"]
    assert private == [("dact_lib.b", "from dact_lib.sub.c import _secret")]


def test_event_kinds_are_named_constants():
    """Every event the library records names its kind through dact_lib.events (values unique: one meaning each)."""
    from dact_lib import events

    assert len(events.ALL) == len(set(events.ALL)) and "chosen_point" in events.ALL
    literal = re.compile(r"(log_event\((?:[^,()]+,\s*)?|on_event\(state,\s*)\"[a-z_0-9]+\"")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "dact_lib").rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if literal.search(line)]
    assert offenders == []
