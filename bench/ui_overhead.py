"""The dashboard never slows the work (issue 28): training throughput with 0, 1 and 3 browser tabs on the Runs page,
cancel-to-stopped time, and time to first progress after Start.

Everything goes through the real dashboard: ``streamlit run app.py`` on a fresh home (tests/test_browser.py's
``streamlit_server``) and Debian's chromium driven by Playwright (its ``browser_page`` helpers). The home holds a
stratified sample of SST-2 (``--rows`` rows of ../shared/data/sst2/train.csv, read with ``dact_lib.data.read_csv``
and stored with ``Tracker.add_dataset``, as the Data page does).

1. **First progress** — on the DACT pipeline page a single DACT run is started (bundled encoder all-MiniLM-L6-v2,
   that dataset, batch 16, 64 tokens, many epochs, early stopping off: it trains through the whole bench); the
   tab then opens Runs. Measured from the Start click: the Runs page's progress bar first shows the run
   ``running`` (a phase), then a step count (``step N`` with N >= 1).
2. **Throughput** — after a warm-up, the same training is watched by 0, 1 and 3 tabs on the Runs page (the run
   selected by default: its live part redraws on the pages' status timer, ``ui.state.period_for``: 5 s per
   watching tab while the run trains), one condition after another in ``--order``, ``--window`` seconds each, the
   order repeated ``--repeat`` times (interleaved: the shared machine's drifts fall on every condition). Tabs are
   kept from one window to the next (1 -> 3 opens two more). Per window: the median of the loop's own
   ``samples_per_s`` logs (one per ``log_every_steps`` = 10 steps), the mean (steps between the window's first and
   last log x batch / their time apart: evaluations included), each as a ratio to its cycle's unwatched window, and
   the CPU seconds the worker process, the Streamlit server (without its children) and the browser used in it
   (psutil). Per condition, over all its windows: the median of all its logs and the pooled steps / time, as a ratio
   to the unwatched windows', and CPU seconds per minute.
3. **Cancel** — in one tab on Runs the "Cancel run" button is clicked; measured until the run's status is
   ``cancelled`` in experiments.db and the worker process is gone, and until the page shows it.

    .venv/bin/python bench/ui_overhead.py --window 60 --repeat 5   # 5 minutes each: ~22 min on 2 shared cores
    .venv/bin/python bench/ui_overhead.py --window 20 --order 0,1   # a quick look
    .venv/bin/python bench/ui_overhead.py --pool bench/out/ui_overhead_run14.json bench/out/ui_overhead_run15.json

``--pool`` measures nothing: it pools the windows of earlier runs' JSON files (runs of the same code), per tab
count: the mean of the window ratios ± their standard error, and CPU seconds per minute.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DEFAULT_DATA_DIR, ROOT, describe_machine, machine_info, markdown_table,  # noqa: E402
                    require_data, save_json)

sys.path.insert(0, str(ROOT / "tests"))
import test_browser as tb  # noqa: E402  (the browser test's server and page helpers)

RUN_NAME = "ui overhead"
BATCH = 16


def store_dataset(home: Path, data_dir: Path, rows: int) -> int:
    from dact_lib.data import read_csv
    from dact_lib.tracker import Tracker

    train_p, _ = require_data(data_dir)
    ds = read_csv(train_p, max_rows=rows, seed=0)
    return Tracker(home).add_dataset(ds, name=f"sst2-{rows}")


def start_training(page, server: str, ds_id: int, epochs: int) -> float:
    """Fill the single DACT run form and click Start; returns the time of the click."""
    from playwright.sync_api import expect

    page.goto(server + "/", wait_until="domcontentloaded")
    tb.settle(page)
    tb.goto_page(page, "DACT pipeline")
    expect(page.get_by_text("Single DACT run")).to_be_visible()
    enc = page.get_by_label("Encoder", exact=True)
    enc.fill("all-MiniLM-L6-v2")
    tb.choose(page, "Dataset", re.compile(rf"#{ds_id} sst2"))
    tb.fill_number(page, "Epochs", epochs)
    box = page.get_by_role("checkbox", name="Early stopping")
    if box.is_checked():
        page.get_by_text("Early stopping", exact=True).click()
    expect(box).not_to_be_checked()
    tb.fill_number(page, "Batch size", BATCH)
    tb.fill_number(page, "Max tokens per text", 64)
    tb.choose(page, "Device", "cpu")
    page.get_by_label("Run name (optional)", exact=True).fill(RUN_NAME)
    tb.settle(page)
    button = page.get_by_role("button", name=re.compile("Start"))
    t_click = time.monotonic()
    button.click()
    expect(page.get_by_text(re.compile(r"Started job #\d+ \(dact\)"))).to_be_visible()
    return t_click


def progress_text(page) -> str:
    try:
        return page.get_by_test_id("stProgress").first.inner_text(timeout=1000)
    except Exception:  # noqa: BLE001 - not drawn yet
        return ""


def wait_text(page, pred, timeout: float) -> float | None:
    """Poll the Runs page's progress text until ``pred(text)``; the time.monotonic() it held, or None."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred(progress_text(page)):
            return time.monotonic()
        time.sleep(0.1)
    return None


def open_runs_tabs(browser, server: str, n: int) -> list:
    from playwright.sync_api import expect

    pages = []
    for _ in range(n):
        p = browser.new_page(viewport=tb.VIEWPORT)
        p.set_default_timeout(tb.T)
        p.goto(server + "/runs", wait_until="domcontentloaded")
        expect(p.get_by_role("heading", name="Runs", exact=True).first).to_be_visible()
        expect(p.locator('[data-testid="stPlotlyChart"] .js-plotly-plot').first).to_be_visible()
        pages.append(p)
    return pages


class CpuMeter:
    """CPU seconds (user + system) of processes: the worker, the server (without its children: the worker is one)."""

    def __init__(self, roots: dict[str, int]) -> None:
        import psutil

        self.psutil = psutil
        self.roots = roots

    def _tree(self, pid: int) -> list:
        try:
            return [self.psutil.Process(pid)]
        except self.psutil.Error:
            return []

    def sample(self) -> dict[str, float]:
        out = {}
        for name, pid in self.roots.items():
            total = 0.0
            for p in self._tree(pid):
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except self.psutil.Error:
                    pass
            out[name] = total
        return out


def window_rate(tr, run_id: int, t0: float, t1: float) -> dict:
    """Throughput of the run between wall-clock times t0 and t1: the median of its samples_per_s logs and the
    steps it made."""
    m = tr.get_metrics(run_id)
    sps = m[(m["name"] == "samples_per_s") & (m["time"] >= t0) & (m["time"] <= t1)]
    loss = m[(m["name"] == "train_loss") & (m["time"] >= t0) & (m["time"] <= t1)]
    steps = int(loss["step"].max() - loss["step"].min()) if len(loss) >= 2 else None
    span = float(loss["time"].max() - loss["time"].min()) if len(loss) >= 2 else None
    return {"samples_per_s": float(statistics.median(sps["value"])) if len(sps) else None,
            "logs": int(len(sps)), "log_values": [float(v) for v in sps["value"]], "steps": steps, "span_s": span,
            "steps_per_s": steps / span if steps and span else None,
            "mean_samples_per_s": BATCH * steps / span if steps and span else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    ap.add_argument("--rows", type=int, default=6000, help="rows of SST-2 train stored as the dataset")
    ap.add_argument("--window", type=float, default=75.0, help="seconds measured per condition")
    ap.add_argument("--warmup", type=float, default=180.0,
                    help="seconds of training before the first window: its first minutes run faster than the rest "
                         "(75 -> 62 samples/s over 3 minutes, unwatched, docs/benchmarks.md run 11)")
    ap.add_argument("--settle", type=float, default=20.0,
                    help="seconds after opening/closing tabs before a window (every tab's status watch has run "
                         "once and its timers follow the number of tabs)")
    ap.add_argument("--order", default="0,1,3", help="tab counts, one window each, per cycle")
    ap.add_argument("--repeat", type=int, default=1,
                    help="cycles of --order: the conditions interleaved, so that the shared machine's drifts fall on "
                         "all of them (--window 60 --repeat 5: 5 minutes each)")
    ap.add_argument("--home", type=Path, default=None, help="default: a temporary folder")
    ap.add_argument("--pool", type=Path, nargs="+", default=None,
                    help="measure nothing: pool the windows of these earlier runs' JSON files")
    args = ap.parse_args()
    if args.pool:
        return pool(args.pool)
    exe = tb.chromium_path()
    if exe is None:
        print("SKIPPED: no chromium binary (/usr/bin/chromium or chromium on PATH)", file=sys.stderr)
        return 0
    order = [int(x) for x in args.order.split(",")]
    info = machine_info(threads=0)
    home = args.home or Path(tempfile.mkdtemp(prefix="dact-ui-overhead-"))
    home.mkdir(parents=True, exist_ok=True)
    ds_id = store_dataset(home, args.data_dir, args.rows)
    log = home / "streamlit.log"

    from playwright.sync_api import expect, sync_playwright

    from dact_lib.tracker import Tracker, pid_alive

    expect.set_options(timeout=tb.T)
    tr = Tracker(home)
    result: dict = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "windows": []}
    with tb.streamlit_server(home, log) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=tb.LAUNCH_ARGS)
        server_pid = next(p.pid for p in __import__("psutil").Process().children() if "streamlit" in " ".join(
            p.cmdline()))
        try:
            # ---- 1. Start, then the first progress on Runs
            page = browser.new_page(viewport=tb.VIEWPORT)
            page.set_default_timeout(tb.T)
            t_click = start_training(page, server, ds_id, epochs=1000)
            run_id = max(r["id"] for r in tr.list_runs())
            tb.goto_page(page, "Runs")
            t_status = wait_text(page, lambda s: f"#{run_id} running" in s, 120)
            t_step = wait_text(page, lambda s: re.search(r"step [1-9]", s) is not None, 300)
            result["first_progress"] = {"run_id": run_id,
                                        "running_shown_s": None if t_status is None else t_status - t_click,
                                        "first_step_shown_s": None if t_step is None else t_step - t_click}
            print(f"first progress: {result['first_progress']}", flush=True)
            page.close()
            worker_pid = int(tr.get_run(run_id)["pid"])
            assert worker_pid != server_pid and pid_alive(worker_pid), "the job does not run in a worker process"
            time.sleep(args.warmup)

            # ---- 2. throughput with 0 / 1 / 3 tabs
            roots = {"worker": worker_pid, "server": server_pid}
            meter = CpuMeter(roots)
            import psutil

            def chromes() -> list:  # the browser's processes: descendants of this one (via Playwright's driver)
                out = []
                for p in psutil.Process().children(recursive=True):
                    try:
                        if "chrom" in p.name() or "headless" in p.name():
                            out.append(p)
                    except psutil.Error:
                        pass
                return out
            # the tabs are kept from one window to the next (1 -> 3 opens two more): a tab closed just before a
            # window would still count among the watching tabs for WATCH_GONE_S and slow the others' period
            from ui.state import WATCH_GONE_S, period_for

            tabs: list = []
            plan = [(c, n) for c in range(args.repeat) for n in order]
            if order[-1] != 0:  # a last unwatched window: every watched one has one on each side (drift)
                plan.append((args.repeat, 0))
            for cycle, n in plan:
                opened = n > len(tabs)
                tabs += open_runs_tabs(browser, server, n - len(tabs)) if opened else []
                while len(tabs) > n:
                    tabs.pop().close()
                if opened:
                    time.sleep(args.settle)
                elif n:  # fewer tabs: the closed ones stop counting, then each remaining tab's watch notices
                    time.sleep(WATCH_GONE_S + period_for("training", max(order)))
                else:
                    time.sleep(5.0)
                c0, b0 = meter.sample(), _cpu(chromes())
                t0 = time.time()
                time.sleep(args.window)
                t1 = time.time()
                c1, b1 = meter.sample(), _cpu(chromes())
                rate = window_rate(tr, run_id, t0, t1)
                row = {"cycle": cycle, "tabs": n, **rate, "window_s": t1 - t0, "t_mid": (t0 + t1) / 2,
                       "worker_cpu_s": c1["worker"] - c0["worker"], "server_cpu_s": c1["server"] - c0["server"],
                       "browser_cpu_s": b1 - b0}
                result["windows"].append(row)
                print({k: v for k, v in row.items() if k != "log_values"}, flush=True)
            while tabs:
                tabs.pop().close()
            time.sleep(args.settle)

            # ---- 3. cancel from the Runs page
            (page,) = open_runs_tabs(browser, server, 1)
            expect(page.get_by_test_id("stProgress")).to_contain_text(f"#{run_id} running")
            button = page.get_by_role("button", name="Cancel run", exact=True)
            t_cancel = time.monotonic()
            button.click()
            t_page = wait_text(page, lambda s: f"#{run_id} cancel" in s, 60)
            stopped = None
            end = time.monotonic() + 120
            while time.monotonic() < end:
                if tr.get_run(run_id)["status"] == "cancelled" and not pid_alive(worker_pid):
                    stopped = time.monotonic()
                    break
                time.sleep(0.05)
            t_shown = wait_text(page, lambda s: f"#{run_id} cancelled" in s, 60)
            result["cancel"] = {"cancelling_shown_s": None if t_page is None else t_page - t_cancel,
                                "stopped_s": None if stopped is None else stopped - t_cancel,
                                "cancelled_shown_s": None if t_shown is None else t_shown - t_cancel,
                                "error": tr.get_run(run_id)["error"]}
            print(f"cancel: {result['cancel']}", flush=True)
        finally:
            browser.close()
    info["loadavg_end"] = __import__("os").getloadavg()
    for w in result["windows"]:  # each window against the unwatched speed at its time (the machine drifts)
        for key, out in (("samples_per_s", "ratio"), ("mean_samples_per_s", "mean_ratio")):
            base = unwatched_at(result["windows"], key, w["t_mid"])
            w[out] = w[key] / base if base and w[key] and w["tabs"] else None
    result["conditions"] = conditions(result["windows"])
    print()
    print(describe_machine(info) + f" · load avg at end {'/'.join(f'{x:.2f}' for x in info['loadavg_end'])}")
    print()
    print(markdown_table(result["windows"], [("cycle", "cycle", 0), ("tabs", "Runs tabs", 0),
                                             ("samples_per_s", "samples/s (median)", 2),
                                             ("ratio", "ratio to 0 tabs at its time", 3), ("logs", "logs", 0),
                                             ("mean_samples_per_s", "samples/s (mean)", 2),
                                             ("mean_ratio", "ratio (mean)", 3),
                                             ("worker_cpu_s", "worker CPU s", 1), ("server_cpu_s", "server CPU s", 1),
                                             ("browser_cpu_s", "browser CPU s", 1), ("window_s", "window s", 0)]))
    print()
    print(markdown_table(result["conditions"], [
        ("tabs", "Runs tabs", 0), ("minutes", "minutes measured", 1), ("median", "samples/s (median of logs)", 2),
        ("ratio", "ratio", 3), ("mean", "samples/s (steps / time)", 2), ("mean_ratio", "ratio (steps / time)", 3),
        ("cycle_ratios", "each window's ratio (median)", 0), ("worker", "worker CPU-s/min", 1),
        ("server", "server CPU-s/min", 1), ("browser", "browser CPU-s/min", 1)]))
    fp, cc = result.get("first_progress", {}), result.get("cancel", {})
    print()
    print(markdown_table([
        {"what": "Start → 'running' shown on Runs", "s": fp.get("running_shown_s"), "target": "—"},
        {"what": "Start → first step shown on Runs", "s": fp.get("first_step_shown_s"), "target": "< 10"},
        {"what": "Cancel click → 'cancelling' shown", "s": cc.get("cancelling_shown_s"), "target": "—"},
        {"what": "Cancel click → run cancelled and worker gone", "s": cc.get("stopped_s"), "target": "< 5"},
        {"what": "Cancel click → 'cancelled' shown", "s": cc.get("cancelled_shown_s"), "target": "—"},
    ], [("what", "measure", 0), ("s", "seconds", 1), ("target", "target", 0)]))
    print(f"\nraw: {save_json('ui_overhead.json', result)}")
    return 0


def unwatched_at(windows: list[dict], key: str, t: float) -> float | None:
    """The unwatched speed at time ``t``: linear between the nearest 0-tab windows before and after it (the one on
    its side where there is only one)."""
    zero = sorted((w["t_mid"], w[key]) for w in windows if w["tabs"] == 0 and w[key])
    before = [z for z in zero if z[0] <= t]
    after = [z for z in zero if z[0] >= t]
    if before and after:
        (ta, va), (tb, vb) = before[-1], after[0]
        return va if tb == ta else va + (vb - va) * (t - ta) / (tb - ta)
    return (before or after or [(None, None)])[-1 if before else 0][1]


def conditions(windows: list[dict]) -> list[dict]:
    """Per tab count, over all its windows: the median of every samples_per_s log, steps x batch / time (pooled),
    both as a ratio to the unwatched windows', the per-cycle ratios, and CPU seconds per minute."""
    out = []
    for n in sorted({w["tabs"] for w in windows}):
        ws = [w for w in windows if w["tabs"] == n]
        logs = [v for w in ws for v in w["log_values"]]
        steps = sum(w["steps"] or 0 for w in ws)
        span = sum(w["span_s"] or 0 for w in ws)
        minutes = sum(w["window_s"] for w in ws) / 60
        out.append({"tabs": n, "windows": len(ws), "minutes": minutes,
                    "median": statistics.median(logs) if logs else None,
                    "mean": BATCH * steps / span if span else None,
                    "cycle_ratios": " ".join(f"{w['ratio']:.3f}" for w in ws if w.get("ratio")) or "—",
                    **{k: sum(w[f"{k}_cpu_s"] for w in ws) / minutes for k in ("worker", "server", "browser")}})
    for c in out:  # the mean of its windows' ratios to the unwatched speed at their time
        ws = [w for w in windows if w["tabs"] == c["tabs"]]
        for key, ratio in (("ratio", "ratio"), ("mean_ratio", "mean_ratio")):
            rs = [w[key] for w in ws if w.get(key)]
            c[ratio] = statistics.mean(rs) if rs else (1.0 if c["tabs"] == 0 else None)
    return out


def pooled(runs: list[list[dict]]) -> list[dict]:
    """Per tab count over the windows of several runs (each a list of windows with their ratios): the mean of the
    window ratios ± their standard error, the mean of the steps / time ratios, CPU seconds per minute."""
    out = []
    windows = [w for ws in runs for w in ws]
    for n in sorted({w["tabs"] for w in windows}):
        ws = [w for w in windows if w["tabs"] == n]
        rs = [w["ratio"] for w in ws if w.get("ratio")]
        ms = [w["mean_ratio"] for w in ws if w.get("mean_ratio")]
        minutes = sum(w["window_s"] for w in ws) / 60
        se = statistics.stdev(rs) / len(rs) ** 0.5 if len(rs) > 1 else None
        out.append({"tabs": n, "minutes": minutes, "windows": len(ws),
                    "ratio": statistics.mean(rs) if rs else 1.0 if n == 0 else None, "se": se,
                    "mean_ratio": statistics.mean(ms) if ms else 1.0 if n == 0 else None,
                    "low": min(rs) if rs else None, "high": max(rs) if rs else None,
                    **{k: sum(w[f"{k}_cpu_s"] for w in ws) / minutes for k in ("worker", "server", "browser")}})
    return out


def pool(paths: list[Path]) -> int:
    import json

    runs = [json.loads(p.read_text())["windows"] for p in paths]
    print("pooled: " + ", ".join(str(p) for p in paths) + "\n")
    print(markdown_table(pooled(runs), [
        ("tabs", "Runs tabs", 0), ("minutes", "minutes", 1), ("ratio", "ratio (mean of windows)", 3),
        ("se", "± s.e.", 3), ("mean_ratio", "ratio (steps / time)", 3), ("low", "lowest window", 3),
        ("high", "highest window", 3), ("worker", "worker CPU-s/min", 1), ("server", "server CPU-s/min", 1),
        ("browser", "browser CPU-s/min", 1)]))
    return 0


def _cpu(procs) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except Exception:  # noqa: BLE001 - gone meanwhile
            pass
    return total


if __name__ == "__main__":
    sys.exit(main())
