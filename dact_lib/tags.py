"""A run's tags: one tag or several (``RunConfig.tag``, ``--tag a --tag b,c``, the Runs page's tag field), read as a
list and stored in a run row's ``tag`` column as one text. No dependencies: the config and the tracker share it."""
from __future__ import annotations

from typing import Any

#: the most tags a run config gives (each at most config.MAX_TEXT_FIELD characters)
MAX_TAGS = 20


def tag_list(value: Any) -> list[str]:
    """A run's tags as a list, from a config's ``tag`` or a run row's ``tag`` column: None, one string (a run of an
    older DACT Lab: one tag; ``"a, b"``: two) or a list of strings (``--tag a --tag b,c``), split on commas,
    stripped, empty and repeated tags dropped, in their order."""
    if value is None:
        return []
    out: list[str] = []
    for item in [value] if isinstance(value, str) else list(value):
        for t in str(item).split(","):
            t = t.strip()
            if t and t not in out:
                out.append(t)
    return out


def tag_text(value: Any) -> str | None:
    """How a run row's ``tag`` column stores the tags: joined with ``", "`` (one tag: the tag itself, as older runs
    stored it), None without any."""
    return ", ".join(tag_list(value)) or None
