import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# page threads at the server's own priority in tests (AppTest runs pages in this process; on a loaded CI machine a
# niced page thread only slows the test): ui.state.yield_to_jobs is tested on its own
os.environ.setdefault("DACT_LAB_PAGE_NICE", "0")

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


# --- a real PostgreSQL server for the tests of "beyond one machine" ---------------------------------------------
@pytest.fixture(scope="session")
def pg_server():
    """A throw-away PostgreSQL cluster for the test session (tests/pg_server.py). Skips with the reason where
    PostgreSQL or psycopg is missing — except in CI ($DACT_LAB_REQUIRE_SERVERS, set by .ci/run), where that is a
    failure."""
    import pg_server as pgs

    reason = pgs.missing_reason()
    if reason:
        if os.environ.get("DACT_LAB_REQUIRE_SERVERS"):
            pytest.fail(f"CI must run the PostgreSQL tests: {reason}")
        pytest.skip(reason)
    srv = pgs.start()
    yield srv
    pgs.stop(srv)


@pytest.fixture
def pg_url(pg_server, monkeypatch) -> str:
    """A fresh PostgreSQL database for one test, set as the tracker's and the studies' ($DACT_LAB_DB)."""
    import uuid

    url = pg_server.create_database(f"t_{uuid.uuid4().hex[:12]}")
    monkeypatch.setenv("DACT_LAB_DB", url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db(request) -> str:
    """Run a test on the embedded SQLite database and on a PostgreSQL server ($DACT_LAB_DB): one code path."""
    if request.param == "postgresql":
        request.getfixturevalue("pg_url")
        return "postgresql"
    return "sqlite"


@pytest.fixture
def served(monkeypatch):
    """What the pages handed Streamlit's media storage: {download file name: bytes} (AppTest's media storage is
    gone after a run, so it is recorded as it is filled)."""
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    files: dict[str, bytes] = {}
    real = MemoryMediaFileStorage.load_and_get_id

    def spy(self, path_or_data, mimetype, kind, filename=None):
        files[filename] = path_or_data
        return real(self, path_or_data, mimetype, kind, filename)

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", spy)
    return files
