"""The docs stay true: docs/architecture.md's module table lists every module of dact_lib and nothing that does not
exist; docs/dact_maths.md cites only functions that exist, its defaults are the config's, and the code cites its
sections by titles it has."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def listed_modules() -> set[str]:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    names = set()
    for line in text.splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            names.update(re.findall(r"`([\w/]+(?:\.py|/))`", first_cell))
    return names


def existing_modules() -> set[str]:
    lib = ROOT / "dact_lib"
    out = set()
    for p in lib.rglob("*.py"):
        rel = p.relative_to(lib).as_posix()
        if rel.startswith("tuning/dact_pipeline/") and rel != "tuning/dact_pipeline/__init__.py":
            continue  # the package is one row (`tuning/dact_pipeline/`), its modules named in that row
        out.add(rel)
    return out


def test_every_module_is_in_the_table_and_every_listed_one_exists():
    listed = listed_modules()
    pipeline = "tuning/dact_pipeline/"
    assert pipeline in listed
    files = {n for n in listed if n.endswith(".py")}
    assert sorted(existing_modules() - files - {"tuning/dact_pipeline/__init__.py"}) == []  # every module listed
    assert sorted(n for n in files if not (ROOT / "dact_lib" / n).is_file()) == []  # nothing that does not exist


def test_the_pipeline_row_names_every_stage_module():
    row = next(line for line in (ROOT / "docs" / "architecture.md").read_text().splitlines()
               if line.startswith("| `tuning/dact_pipeline/`"))
    modules = {p.stem for p in (ROOT / "dact_lib" / "tuning" / "dact_pipeline").glob("*.py") if p.stem != "__init__"}
    assert sorted(m for m in modules if f"`{m}`" not in row) == []


# --- docs/dact_maths.md ------------------------------------------------------------------------------------------
MATHS = ROOT / "docs" / "dact_maths.md"
CODE_REF = re.compile(r"`(dact_lib/[\w/]+\.py):([A-Za-z_][\w.]*)`")
SECTION_REF = re.compile(r'docs/dact_maths\.md,\s+"([^"]+)"')  # a title may wrap over docstring or comment lines


def _names(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """The names a module or class body defines: functions, classes and assigned names."""
    out: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
    return out


def _defined(path: Path, dotted: str) -> bool:
    body = ast.parse(path.read_text(encoding="utf-8")).body
    node = None
    for part in dotted.split("."):
        node = _names(body).get(part)
        if node is None:
            return False
        body = node.body if isinstance(node, ast.ClassDef) else []
    return True


def maths_headings() -> set[str]:
    return {line.lstrip("#").strip() for line in MATHS.read_text(encoding="utf-8").splitlines()
            if line.startswith("#")}


def test_every_function_the_maths_page_cites_exists():
    refs = CODE_REF.findall(MATHS.read_text(encoding="utf-8"))
    assert len(refs) >= 40  # the pattern still finds the page's references
    missing = [f"{f}:{name}" for f, name in sorted(set(refs))
               if not (ROOT / f).is_file() or not _defined(ROOT / f, name)]
    assert missing == []


def test_the_maths_page_defaults_are_the_config_defaults():
    from dact_lib.config import DactModelConfig

    rows = re.findall(r"^\| `model\.(\w+)` \| `([^`]+)` \|", MATHS.read_text(encoding="utf-8"), flags=re.M)
    assert len(rows) >= 10
    default = DactModelConfig()
    wrong = {name: (ast.literal_eval(text), getattr(default, name, "<no such field>")) for name, text in rows
             if ast.literal_eval(text) != getattr(default, name, "<no such field>")}
    assert wrong == {}  # field: (the page's default, the config's)


def test_the_code_cites_maths_sections_that_exist():
    headings = maths_headings()
    cited = {}
    for path in sorted((ROOT / "dact_lib").rglob("*.py")):
        for title in SECTION_REF.findall(path.read_text(encoding="utf-8")):
            title = " ".join(title.replace("#", " ").split())  # as one line, without a wrapped comment's '#'
            cited.setdefault(title, []).append(path.relative_to(ROOT).as_posix())
    assert cited  # dact.py cites the page
    assert {t: files for t, files in cited.items() if t not in headings} == {}


def test_no_module_cites_a_spec_outside_the_repository():
    outside = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "dact_lib").rglob("*.py"))
               if re.search(r"dact_spec\.md|\.\./shared/docs", p.read_text(encoding="utf-8"))]
    assert outside == []
