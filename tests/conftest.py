import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# One encoder cache for the whole test session (the bundled checkpoint is extracted once, not per test home).
_CACHE = Path(__file__).resolve().parent.parent / ".dact_cache"
os.environ.setdefault("DACT_LAB_CACHE", str(_CACHE))

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data when present (developers and CI); skip the test cleanly in a user's clone."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent (only developers and CI have it)")
    return SHARED_DATA


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh DACT Lab home for one test (experiments.db, runs/, cache)."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("DACT_LAB_HOME", str(h))
    return h


@pytest.fixture(autouse=True)
def _live_run_ids_restored():
    """``dact_lib.tracker.liveness`` (the runs this process executes) is one registry per process: whatever a test
    adds or removes — a job it left running, a run it marked live by hand — is undone after it, so no test sees
    another test's ids."""
    from dact_lib.tracker import liveness

    saved = liveness.live_ids()
    yield
    liveness.restore(saved)
