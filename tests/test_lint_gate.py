"""The lint gate's mypy rule (tools/lint.py): dact_lib clean whatever the baseline says, the rest a ratchet that
only falls."""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import lint  # noqa: E402


def gate(monkeypatch, tmp_path, counts: dict, baseline: dict, update: bool = False) -> list[str]:
    path = tmp_path / "mypy_baseline.json"
    path.write_text(json.dumps(baseline), encoding="utf-8")
    monkeypatch.setattr(lint, "BASELINE", path)
    monkeypatch.setattr(lint, "mypy_counts", lambda: Counter(counts))
    return lint.mypy_ratchet(update)


def test_an_error_in_dact_lib_fails_even_where_the_baseline_allows_it(monkeypatch, tmp_path):
    bad = gate(monkeypatch, tmp_path, {"dact_lib/train.py": 1}, {"dact_lib/train.py": 5})
    assert len(bad) == 1 and "dact_lib/ must have none" in bad[0] and "mypy dact_lib/train.py" in bad[0]
    assert gate(monkeypatch, tmp_path, {}, {"dact_lib/train.py": 5}) == []


def test_the_rest_is_a_ratchet_that_only_falls(monkeypatch, tmp_path):
    base = {"ui/forms.py": 7}
    assert gate(monkeypatch, tmp_path, {"ui/forms.py": 7}, base) == []
    assert gate(monkeypatch, tmp_path, {"ui/forms.py": 6}, base) == []  # fewer: fine (and reported)
    (worse,) = gate(monkeypatch, tmp_path, {"ui/forms.py": 8}, base)
    assert "the baseline allows 7" in worse
    (new,) = gate(monkeypatch, tmp_path, {"app_pages/new.py": 1}, base)  # a file not listed must be clean
    assert "app_pages/new.py" in new and "allows 0" in new
    # --update-baseline lowers, and refuses while a file is over its count
    assert gate(monkeypatch, tmp_path, {"ui/forms.py": 8}, base, update=True)
    assert json.loads(lint.BASELINE.read_text()) == base
    assert gate(monkeypatch, tmp_path, {"ui/forms.py": 3}, base, update=True) == []
    assert json.loads(lint.BASELINE.read_text()) == {"ui/forms.py": 3}


def test_the_repository_baseline_allows_nothing_in_dact_lib():
    base = json.loads((ROOT / ".ci" / "mypy_baseline.json").read_text(encoding="utf-8"))
    assert base and not [f for f in base if f.startswith("dact_lib/")]
