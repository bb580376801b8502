"""docs/architecture.md stays true: its module table lists every module of dact_lib, and every module it lists
exists."""
from __future__ import annotations

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
