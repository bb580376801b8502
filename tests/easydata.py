"""A small labelled set that a tiny random BERT learns in a few steps: each class has its own keywords among
shared filler words. The pipeline and early-exit tests need models that learn (a guard stops a pipeline whose
model only answers the largest class), which the random tiny encoder does not on the demo sentences."""
from __future__ import annotations

import csv
import random
from pathlib import Path

KEYWORDS = {
    "weather": ["sunny", "rain", "storm", "cloud", "snow", "wind"],
    "sport": ["goal", "match", "team", "score", "coach", "league"],
    "food": ["pasta", "bread", "soup", "cheese", "salad", "pizza"],
}
FILLER = ["the", "a", "today", "we", "saw", "really", "very", "it", "was", "and", "then", "again", "so", "there"]


def easy_rows(n: int = 240, classes: int = 3, seed: int = 0, majority: float | None = None) -> list[tuple[str, str]]:
    """``n`` (text, label) rows over the first ``classes`` classes of KEYWORDS (balanced, or the first class taking
    ``majority`` of the rows)."""
    rng = random.Random(seed)
    labels = list(KEYWORDS)[:classes]
    rows = []
    for i in range(n):
        if majority is not None:
            lab = labels[0] if rng.random() < majority else rng.choice(labels[1:])
        else:
            lab = labels[i % classes]
        words = rng.sample(FILLER, 4) + rng.sample(KEYWORDS[lab], 2)
        rng.shuffle(words)
        rows.append((" ".join(words), lab))
    return rows


def easy_csv(path: Path, n: int = 240, classes: int = 3, seed: int = 0, majority: float | None = None) -> Path:
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(easy_rows(n, classes, seed, majority))
    return path
