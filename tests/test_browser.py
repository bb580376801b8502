"""One real-browser end-to-end test: the dashboard in Debian's chromium, driven by Playwright.

The test starts ``streamlit run app.py`` on a free port of 127.0.0.1 with a fresh home (DACT_LAB_HOME), then in
the browser: uploads a CSV on **Data** and saves it, starts a single DACT run with the tiny encoder on the
**DACT pipeline** page and a second one behind it (announced as queued; the sidebar's job counts go from
"1 queued" to "0 queued" without a reload), watches the curves on **Runs** until they have finished, and predicts a sentence on **Predict**
(label + DACT per-layer trace). A screenshot of every stage goes to ``tmp_path/shots``; with
``DACT_LAB_SCREENSHOTS=1`` the Data and DACT pipeline ones also go to ``docs/screenshots/`` (README images).

It skips (with the reason) without the ``playwright`` package or a chromium binary (``/usr/bin/chromium`` or
``chromium`` on PATH). ``playwright install`` is never needed: the system chromium is used.

The README's other screenshots (Home, Runs, Pareto explorer, Early exit, Predict of a populated home) are taken by
hand with ``python tests/test_browser.py readme-shots HOME`` (see ``readme_shots``) on a home holding real runs.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS_SHOTS = ROOT / "docs" / "screenshots"
VIEWPORT = {"width": 1280, "height": 900}
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]
T = 60_000  # ms: default Playwright timeout (the CPU is shared)
TRAIN_TIMEOUT_MS = 150_000

CLASSES = {
    "sport": ["the team won the match", "a late goal decided the final", "the striker scored twice",
              "the coach praised the defence", "fans cheered the home side"],
    "food": ["the soup was rich and warm", "fresh bread with olive oil", "the pasta tasted of garlic",
             "a sweet cake for dessert", "the curry was spicy and good"],
    "tech": ["the new laptop boots fast", "the phone update fixed the battery", "a faster chip for servers",
             "the app crashed after login", "cloud storage prices fell again"],
}
ENDINGS = ["today", "last night", "this week", "again"]


def chromium_path() -> str | None:
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    return shutil.which("chromium")


def write_csv(path: Path) -> Path:
    """A valid single-task ``text,label`` CSV: 60 rows, 3 classes of 20."""
    lines = ["text,label"]
    for label, texts in CLASSES.items():
        for i in range(20):
            lines.append(f"{texts[i % 5]} {ENDINGS[i // 5]},{label}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def streamlit_server(home: Path, log_path: Path, *, max_jobs: int = 1):
    """``streamlit run app.py`` on a free port of 127.0.0.1 with DACT_LAB_HOME=home; yields the base URL."""
    port = free_port()
    env = dict(os.environ, DACT_LAB_HOME=str(home), DACT_LAB_MAX_JOBS=str(max_jobs),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.setdefault("DACT_LAB_CACHE", str(ROOT / ".dact_cache"))
    cmd = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless", "true",
           "--server.address", "127.0.0.1", "--server.fileWatcherType", "none",
           "--browser.gatherUsageStats", "false"]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"streamlit did not become healthy in 90 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@contextmanager
def browser_page(exe: str):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(T)
            yield page
        finally:
            browser.close()


# --------------------------------------------------------------------------------------------- page helpers


def settle(page, timeout: int = T) -> None:
    """Wait until Streamlit has finished running the script (the 'Running…' status widget is gone)."""
    page.wait_for_timeout(300)
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=timeout)
    page.locator('[data-testid="stSkeleton"]').first.wait_for(state="hidden", timeout=timeout)
    page.locator('[data-testid="stSpinner"]').first.wait_for(state="hidden", timeout=timeout)


def goto_page(page, title: str) -> None:
    """Click the st.navigation link ``title`` in the sidebar (the session, and so its state, is kept)."""
    nav = page.get_by_test_id("stSidebarNav")
    nav.get_by_role("link").filter(has=page.get_by_text(title, exact=True)).click()
    page.get_by_role("heading", name=title, exact=True).first.wait_for()
    settle(page)


def choose(page, label: str, option: str | re.Pattern) -> None:
    """Pick ``option`` in the st.selectbox labelled ``label``."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    combo = page.get_by_role("combobox", name=label, exact=True)
    opener = page.get_by_test_id("stSelectbox").filter(has=combo).get_by_role("button", name="Open")
    combo.scroll_into_view_if_needed()
    for _ in range(3):  # the list sometimes closes again at once (scrolling): try again
        opener.click()
        try:
            page.get_by_role("listbox").wait_for(timeout=5_000)
            break
        except PlaywrightTimeout:
            page.keyboard.press("Escape")
    page.get_by_role("option", name=option).first.click()
    settle(page)


def pick_many(page, label: str, options: list[re.Pattern]) -> None:
    """Make the selection of the st.multiselect labelled ``label`` the options matching ``options`` (regexes)."""
    combo = page.get_by_role("combobox", name=label, exact=True)
    box = page.get_by_test_id("stMultiSelect").filter(has=combo)
    chips = box.locator('[data-testid="stMultiSelectTagsContainer"] [data-tag]')

    def selected() -> list[str]:
        return [c.get_attribute("aria-label") or "" for c in chips.all()]

    for option in options:
        if any(option.search(t) for t in selected()):
            continue
        if not page.get_by_role("listbox").is_visible():  # the list stays open after a pick
            combo.click()
        page.get_by_role("option", name=option).first.click()
        settle(page)
    page.keyboard.press("Escape")
    for t in selected():
        if not any(o.search(t) for o in options):
            box.get_by_role("button", name=f"Remove {t}", exact=True).click()
            settle(page)


def fill_number(page, label: str, value) -> None:
    inp = page.get_by_label(label, exact=True)
    inp.fill(str(value))
    inp.press("Tab")


def shots_saver(out: Path, readme: dict[str, int] | None = None):
    """``shot(page, name)``: a PNG in ``out``; also in docs/screenshots/ when DACT_LAB_SCREENSHOTS=1 and the name is
    one of ``readme`` ({name: height of the image in px, 0 = the viewport's})."""
    out.mkdir(parents=True, exist_ok=True)
    to_docs = os.environ.get("DACT_LAB_SCREENSHOTS") == "1"

    def shot(page, name: str, *, height: int = 0) -> Path:
        """``height``: make the window this tall (at most the page's own height) for this one picture."""
        height = max(height, (readme or {}).get(name, 0))
        page.evaluate("() => document.activeElement && document.activeElement.blur()")  # no focus ring
        size = page.viewport_size
        if height > size["height"]:
            needed = page.evaluate("""() => {
                const b = document.querySelector('[data-testid="stMainBlockContainer"]');
                return b ? Math.ceil(b.getBoundingClientRect().top + b.scrollHeight) : 0; }""")
            page.set_viewport_size({"width": size["width"], "height": max(size["height"], min(height, needed))})
            page.wait_for_timeout(1500)  # the charts re-layout to the new window
        else:
            page.wait_for_timeout(500)  # let plotly finish its transitions
        path = out / f"{name}.png"
        try:
            page.screenshot(path=str(path))
        finally:
            if page.viewport_size != size:
                page.set_viewport_size(size)
        if to_docs and readme is not None and name in readme and out.resolve() != DOCS_SHOTS.resolve():
            DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, DOCS_SHOTS / f"{name}.png")
        return path

    return shot


# --------------------------------------------------------------------------------------------- the test


@pytest.fixture
def chromium_exe() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"the playwright package is not installed or broken ({exc}): "
                    "pip install -r requirements-dev.txt")
    exe = chromium_path()
    if exe is None:
        pytest.skip("no chromium binary (/usr/bin/chromium or chromium on PATH): apt-get install chromium")
    return exe


@pytest.fixture
def server(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    with streamlit_server(home, tmp_path / "streamlit.log") as url:
        yield url


@pytest.mark.browser
@pytest.mark.timeout(480)
def test_upload_train_watch_predict(chromium_exe, server, tmp_path):
    from playwright.sync_api import expect

    expect.set_options(timeout=T)
    csv_path = write_csv(tmp_path / "browser_e2e.csv")
    shot = shots_saver(tmp_path / "shots", readme={"data": 1560, "train": 1330})

    with browser_page(chromium_exe) as page:
        try:
            _walk_through(page, server, csv_path, shot)
        except Exception:
            page.screenshot(path=str(tmp_path / "FAILED.png"), full_page=True)
            print(f"failure screenshot: {tmp_path / 'FAILED.png'}; server log: {tmp_path / 'streamlit.log'}")
            raise

    # what the browser did is in the home: the uploaded dataset, the finished DACT run with its model and curves
    from dact_lib.tracker import Tracker

    tr = Tracker(tmp_path / "home")
    (ds,) = tr.list_datasets()
    assert ds["name"] == "browser_e2e" and ds["rows"] == 60
    runs = sorted(tr.list_runs(), key=lambda r: r["id"])
    assert [(r["name"], r["status"]) for r in runs] == [("browser e2e", "cancelled"),
                                                         ("browser e2e queued", "finished")]
    for run in runs:
        assert run["kind"] == "dact" and run["dataset_id"] == ds["id"]
        assert {"train_loss"} <= set(tr.get_metrics(run["id"])["name"])
    finished = runs[1]["id"]
    assert (tmp_path / "home" / "runs" / str(finished) / "model.safetensors").is_file()
    assert {"val_accuracy", "val_avg_exit_layer"} <= set(tr.get_metrics(finished)["name"])
    assert sorted(p.stem for p in (tmp_path / "shots").glob("*.png")) == sorted(
        ["e2e-home", "data", "e2e-data-saved", "train", "e2e-train-started", "e2e-runs-live", "e2e-runs-finished",
         "e2e-predict"])


def _walk_through(page, server: str, csv_path: Path, shot) -> None:
    from playwright.sync_api import expect

    # ---- A deep link as the server's very first request still opens inside app.py's navigation (with the pages
    # in app_pages/, not pages/, Streamlit has no folder-based mode to fall into)
    page.goto(server + "/data", wait_until="domcontentloaded")
    expect(page.get_by_role("heading", name="Data", exact=True).first).to_be_visible()
    nav = page.get_by_test_id("stSidebarNav")
    expect(nav.get_by_text("Watch & explore", exact=True)).to_be_visible()
    expect(nav.get_by_text("dact pipeline", exact=True)).to_have_count(0)
    settle(page)

    # ---- Home
    page.goto(server + "/", wait_until="domcontentloaded")
    expect(page.get_by_role("heading", name="DACT Lab", exact=True)).to_be_visible()
    settle(page)
    expect(page.get_by_text("No runs yet")).to_be_visible()
    shot(page, "e2e-home")

    # ---- Data: upload, preview + validation, save
    goto_page(page, "Data")
    page.get_by_test_id("stFileUploader").locator('input[type="file"]').set_input_files(str(csv_path))
    expect(page.get_by_text(re.compile(r"60 rows, task\(s\) label \(3 classes\)"))).to_be_visible()
    settle(page)
    expect(page.get_by_test_id("stDataFrame").first).to_be_visible()
    expect(page.locator(".js-plotly-plot").first).to_be_visible()  # the class counts chart
    expect(page.get_by_label("Dataset name")).to_have_value("browser_e2e")
    shot(page, "data")
    page.get_by_role("button", name=re.compile("Save")).click()
    expect(page.get_by_text(re.compile(r"Saved as dataset #1"))).to_be_visible()
    settle(page)
    shot(page, "e2e-data-saved")

    # ---- DACT pipeline: a single DACT run with the tiny encoder on the saved dataset
    goto_page(page, "DACT pipeline")
    expect(page.get_by_text("Single DACT run")).to_be_visible()
    enc = page.get_by_label("Encoder", exact=True)
    enc.fill("tiny")
    choose(page, "Dataset", re.compile(r"#1 browser_e2e \(60 rows"))
    expect(page.get_by_role("combobox", name="Dataset")).to_have_value(re.compile(r"#1 browser_e2e"))
    fill_number(page, "Epochs", 30)
    page.get_by_text("Early stopping", exact=True).click()
    expect(page.get_by_role("checkbox", name="Early stopping")).not_to_be_checked()
    fill_number(page, "Batch size", 8)
    fill_number(page, "Max tokens per text", 32)
    choose(page, "Device", "cpu")
    page.get_by_label("Run name (optional)", exact=True).fill("browser e2e")
    expect(enc).to_have_value("tiny")
    title = page.get_by_role("heading", name="DACT pipeline", exact=True)
    title.click()  # leave the text box (no focus ring in the picture)
    title.scroll_into_view_if_needed()
    page.mouse.move(VIEWPORT["width"] - 10, 10)  # and no hover effect
    shot(page, "train")
    # the first job does not end by itself within the test (it is cancelled below): the second job is queued behind
    # it for as long as the test needs, whatever the machine's speed
    fill_number(page, "Epochs", 1000)
    page.get_by_role("button", name=re.compile("Start")).click()
    expect(page.get_by_text(re.compile(r"Started job #\d+ \(dact\)"))).to_be_visible()
    shot(page, "e2e-train-started")
    # a second job waits behind the first (one job at a time here): announced as queued, and the sidebar's
    # counts follow it from "queued" to "running" without a reload (the pages' one status timer)
    page.get_by_label("Run name (optional)", exact=True).fill("browser e2e queued")
    fill_number(page, "Epochs", 30)
    page.get_by_role("button", name=re.compile("Start")).click()
    expect(page.get_by_text(re.compile(r"Queued job #2 \(dact, 1 ahead\)"))).to_be_visible()
    counts = page.get_by_test_id("stSidebar").get_by_text(re.compile(r"^Jobs:"))
    expect(counts).to_have_text(re.compile(r"1 running, 1 queued"))

    # ---- Runs: #2 is queued while #1 runs; #1's curve grows live; cancelled from the page, #1 stops and #2 runs to
    # its end, the table and the sidebar following without a reload (the pages' status timer)
    goto_page(page, "Runs")
    active = page.get_by_text(re.compile(r"^Active: "))
    expect(active).to_contain_text(re.compile(r"#2 dact browser e2e queued queued"))
    choose(page, "Run details", re.compile(r"^#1 dact"))
    chart = page.locator('[data-testid="stPlotlyChart"] .js-plotly-plot >> visible=true').first
    expect(chart).to_be_visible()
    # a curve has points: at least one plotted trace
    expect(chart.locator(".scatterlayer .trace").first).to_be_attached(timeout=TRAIN_TIMEOUT_MS)
    # the run in detail's bar (.first: while the page reruns from its live part to the whole page, the bar being
    # replaced and its successor can both be in the DOM for a moment — a strict locator failed on that, seen once)
    progress = page.get_by_test_id("stProgress").first
    expect(progress).to_contain_text("#1 running")
    shot(page, "e2e-runs-live")
    page.get_by_role("button", name="Cancel run", exact=True).click()
    expect(page.get_by_text("Cancellation of run 1 requested")).to_be_visible()
    expect(progress).to_contain_text("#1 cancelled", timeout=TRAIN_TIMEOUT_MS)

    # ---- #2 starts once #1 has stopped, and finishes
    choose(page, "Run details", re.compile(r"^#2 dact"))
    expect(progress).to_contain_text(re.compile(r"#2 (finished|failed|cancelled|interrupted)"),
                                     timeout=TRAIN_TIMEOUT_MS)
    expect(progress).to_contain_text("#2 finished")  # not failed: the page shows the error below otherwise
    expect(page.get_by_test_id("stSidebar").get_by_text(re.compile(r"^Jobs:"))).to_have_text(
        re.compile(r"0 running, 0 queued"), timeout=TRAIN_TIMEOUT_MS)  # the sidebar agrees
    settle(page)
    expect(chart.locator(".scatterlayer .trace").first).to_be_attached()
    shot(page, "e2e-runs-finished")

    # ---- Predict: a sentence, a label, the DACT per-layer trace
    goto_page(page, "Predict")
    choose(page, "Model", re.compile(r"#2 dact browser e2e queued"))
    expect(page.get_by_role("combobox", name="Model")).to_have_value(re.compile(r"#2 dact browser e2e queued"))
    text = page.get_by_label("Text (one per line)")
    text.fill("the striker scored a late goal in the final")
    text.press("Tab")
    settle(page)
    page.get_by_role("button", name="Predict", exact=True).click()
    metric = page.get_by_test_id("stMetric").first
    expect(metric).to_be_visible()
    expect(metric.get_by_test_id("stMetricValue")).to_have_text(re.compile(r"^\s*(sport|food|tech)\s*$"))
    expect(page.locator(".js-plotly-plot .gtitle").filter(has_text="Per-layer trace")).to_be_visible()
    settle(page)
    shot(page, "e2e-predict")


# --------------------------------------------------------------------------------------------- README images


def readme_shots(home: Path, out: Path = DOCS_SHOTS, *, runs: list[str] = (), pareto: str | None = None,
                 early: str | None = None, predict: str | None = None, text: str | None = None) -> list[Path]:
    """Screenshots of the main pages on a home holding real runs, into docs/screenshots/ (by hand, not a test):
    ``python tests/test_browser.py readme-shots HOME [--runs RE ...] [--pareto RE] [--early RE] [--predict RE]``.
    Each RE (a regex of an option's label) picks what a page shows instead of its default: the runs compared on
    Runs, the pipeline on the Pareto explorer, the DACT run on Early exit, the model on Predict."""
    import tempfile

    exe = chromium_path()
    if exe is None:
        raise SystemExit("no chromium binary (/usr/bin/chromium or chromium on PATH)")
    from playwright.sync_api import expect

    expect.set_options(timeout=T)
    out.mkdir(parents=True, exist_ok=True)
    shot = shots_saver(out)
    made = []
    log = Path(tempfile.mkdtemp(prefix="dact-readme-shots-")) / "streamlit.log"
    with streamlit_server(home, log) as url, browser_page(exe) as page:
        page.goto(url + "/", wait_until="domcontentloaded")
        expect(page.get_by_role("heading", name="DACT Lab", exact=True)).to_be_visible()
        settle(page)
        made.append(shot(page, "home"))

        goto_page(page, "Runs")
        if runs:
            pick_many(page, "Runs to show (several are compared on one chart)", [re.compile(r) for r in runs])
        expect(page.locator('[data-testid="stPlotlyChart"] .scatterlayer .trace').first).to_be_attached()
        made.append(shot(page, "runs", height=1330))

        goto_page(page, "Pareto explorer")
        if pareto:
            choose(page, "DACT pipeline run", re.compile(pareto))
        expect(page.locator(".js-plotly-plot").first).to_be_visible()
        made.append(shot(page, "pareto", height=1500))

        goto_page(page, "Early exit")
        if early:
            choose(page, "DACT run", re.compile(early))
        expect(page.get_by_test_id("stMetric").first).to_be_visible(timeout=180_000)
        settle(page, timeout=180_000)
        made.append(shot(page, "early_exit", height=1300))

        goto_page(page, "Predict")
        if predict:
            choose(page, "Model", re.compile(predict))
        if text:
            box = page.get_by_label("Text (one per line)")
            box.fill(text)
            box.press("Tab")
            settle(page)
        page.get_by_role("button", name="Predict", exact=True).click()
        expect(page.locator(".js-plotly-plot .gtitle").filter(has_text="Per-layer trace")).to_be_visible()
        settle(page)
        made.append(shot(page, "predict", height=1200))
    print(f"server log: {log}")
    return made


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="README screenshots of a populated DACT Lab home")
    ap.add_argument("cmd", choices=["readme-shots"])
    ap.add_argument("home", type=Path)
    ap.add_argument("--runs", action="append", default=[], help="regex of a run to compare on Runs (repeatable)")
    ap.add_argument("--pareto", help="regex of the pipeline run to show on the Pareto explorer")
    ap.add_argument("--early", help="regex of the DACT run to show on Early exit")
    ap.add_argument("--predict", help="regex of the model to use on Predict")
    ap.add_argument("--text", help="the sentence to predict (default: the page's example)")
    a = ap.parse_args()
    for p in readme_shots(a.home.resolve(), runs=a.runs, pareto=a.pareto, early=a.early, predict=a.predict,
                          text=a.text):
        print(p, p.stat().st_size // 1024, "KB")
