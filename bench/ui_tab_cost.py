"""What a watching tab costs, and where (issue 28): the browser's and the Streamlit server's CPU while 1 or 3
Chromium tabs watch a training on the Runs page, with the live charts redrawn on every rerun of the live part or on
their own period (``ui.state.held``, ``$DACT_LAB_CHARTS_REFRESH_S``), at one status period or another
(``$DACT_LAB_REFRESH_S``), and with Chromium flags of one's choice (``--browser-arg``: e.g.
``--js-flags=--no-memory-reducer`` shows what the garbage collections after each burst of work cost).

No torch here: the run is a synthetic DACT run that logs what a real one logs, at its pace (bench/ui_overhead.py's
training on 2 cores: a step every ``--step-s`` = 0.25 s; train loss, accuracy, exit layer, learning rates and
samples/s every 10 steps, samples seen every 3, system metrics every 60, an evaluation every 300 steps), after
``--history`` steps already logged. Its record's pid is this process, so the server sees it alive and 'running'.
Without a training beside it the page's own cost is read alone (psutil, per Chromium process type), which
bench/ui_overhead.py can only see as the training's lost speed.

Each condition starts its own server (``streamlit run app.py`` on a fresh home, tests/test_browser.py's
``streamlit_server``) and opens the tabs; after ``--settle`` seconds the CPU of ``--window`` seconds is read.

    .venv/bin/python bench/ui_tab_cost.py                        # charts 0 and default x 1 and 3 tabs: ~6 min
    .venv/bin/python bench/ui_tab_cost.py --charts 0,15,30 --tabs 1 --repeat 2
    .venv/bin/python bench/ui_tab_cost.py --refresh 5,default --charts default --repeat 2
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, describe_machine, machine_info, markdown_table, save_json  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
import test_browser as tb  # noqa: E402  (the browser test's server and page helpers)

TRAIN_EVERY, SEEN_EVERY, SYS_EVERY, EVAL_EVERY = 10, 3, 60, 300
BATCH = 16


def metrics_at(step: int) -> dict[str, float]:
    """What a DACT run logs at ``step`` (smooth curves with a little noise, the names and cadences of a real run)."""
    out: dict[str, float] = {}
    noise = 0.03 * math.sin(step * 1.7)
    if step % SEEN_EVERY == 0:
        out["samples_seen"] = float(step * BATCH)
    if step % TRAIN_EVERY == 0:
        out.update(train_loss=0.3 + 0.4 / (1 + step / 500) + noise, train_accuracy=0.95 - 0.3 / (1 + step / 500),
                   train_avg_exit_layer=6.0, lr=1e-5, lr_head=2e-4, epoch=float(step // 270),
                   samples_per_s=64.0 + 4 * noise)
    if step % SYS_EVERY == 0:
        out.update({"sys/cpu_percent": 195.0, "sys/rss_mb": 1160.0})
    if step % EVAL_EVERY == 0:
        out.update(val_loss=0.35 + 0.2 / (1 + step / 900), val_accuracy=0.86 - 0.1 / (1 + step / 900),
                   val_macro_f1=0.85 - 0.1 / (1 + step / 900), val_avg_exit_layer=3.0, val_nll=0.4, val_ponder=2.5)
    return out


def make_run(home: Path, history: int):
    from dact_lib.config import default_config
    from dact_lib.tracker import Tracker

    tr = Tracker(home)
    cfg = default_config("dact")
    cfg.train.epochs = 20
    rid = tr.create_run("dact", cfg.to_dict(), name="tab cost", status="running")
    for step in range(1, history + 1):
        m = metrics_at(step)
        if m:
            tr.log_metrics(rid, m, step=step, epoch=step // 270)
    return tr, rid


def writer(tr, rid: int, first: int, step_s: float, stop: threading.Event) -> None:
    step, t0 = first, time.monotonic()
    while not stop.is_set():
        step += 1
        stop.wait(max(0.0, t0 + (step - first) * step_s - time.monotonic()))
        m = metrics_at(step)
        if m:
            tr.log_metrics(rid, m, step=step, epoch=step // 270)


def cpu_by_type(procs) -> dict[str, float]:
    import psutil

    out: dict[str, float] = {}
    for p in procs:
        try:
            c = p.cpu_times()
            typ = next((a[7:] for a in p.cmdline() if a.startswith("--type=")), "browser")
            out[typ] = out.get(typ, 0.0) + c.user + c.system
        except psutil.Error:
            pass
    return out


def renderer_threads(procs) -> dict[str, float]:
    """CPU seconds of the renderers' threads: ``main`` (the page's JS, style, layout, paint) and ``pool`` (the
    thread pool's workers: V8's concurrent garbage-collection marking and compiling), by /proc's thread names."""
    import psutil

    out = {"main": 0.0, "pool": 0.0}
    for p in procs:
        try:
            if "--type=renderer" not in p.cmdline():
                continue
            for t in p.threads():
                with open(f"/proc/{p.pid}/task/{t.id}/comm") as f:
                    name = f.read().strip()
                if t.id == p.pid:
                    out["main"] += t.user_time + t.system_time
                elif name.startswith("ThreadPool"):
                    out["pool"] += t.user_time + t.system_time
        except (psutil.Error, OSError):
            pass
    return out


def _setting(name: str, value: str) -> None:
    """``$name`` = ``value`` for the next server; 'default' unsets it."""
    if value == "default":
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def measure(exe: str, refresh: str, charts: str, tabs: int, args) -> dict:
    import psutil
    from playwright.sync_api import sync_playwright

    home = Path(tempfile.mkdtemp(prefix="dact-tab-cost-"))
    tr, rid = make_run(home, args.history)
    stop = threading.Event()
    threading.Thread(target=writer, args=(tr, rid, args.history, args.step_s, stop), daemon=True).start()
    _setting("DACT_LAB_CHARTS_REFRESH_S", charts)
    _setting("DACT_LAB_REFRESH_S", refresh)
    try:
        with tb.streamlit_server(home, home / "streamlit.log") as url, sync_playwright() as pw:
            server = next(p for p in psutil.Process().children() if "streamlit" in " ".join(p.cmdline()))
            browser = pw.chromium.launch(executable_path=exe, headless=True,
                                         args=tb.LAUNCH_ARGS + list(args.browser_arg))
            pages = []
            for _ in range(tabs):
                page = browser.new_page(viewport=tb.VIEWPORT)
                page.set_default_timeout(tb.T)
                page.goto(url + "/runs", wait_until="domcontentloaded")
                pages.append(page)
            for page in pages:  # the live part is drawn
                page.get_by_role("button", name="Download metrics (CSV)").wait_for()
            time.sleep(args.settle)
            kids = [c for c in psutil.Process().children(recursive=True) if "chrom" in c.name()]
            s0, b0, r0 = sum(server.cpu_times()[:2]), cpu_by_type(kids), renderer_threads(kids)
            t0 = time.monotonic()
            while time.monotonic() - t0 < args.window:
                for page in pages:  # Playwright's event loop keeps the pages served
                    page.wait_for_timeout(250)
            minutes = (time.monotonic() - t0) / 60
            s1, b1, r1 = sum(server.cpu_times()[:2]), cpu_by_type(kids), renderer_threads(kids)
            shown = pages[0].get_by_text("training curves (live").count() > 0
            browser.close()
    finally:
        stop.set()
        os.environ.pop("DACT_LAB_CHARTS_REFRESH_S", None)
        os.environ.pop("DACT_LAB_REFRESH_S", None)
    by = {k: (b1[k] - b0.get(k, 0.0)) / minutes for k in b1}
    return {"refresh": refresh, "charts": charts, "tabs": tabs, "minutes": minutes, "browser": sum(by.values()),
            "renderer": by.get("renderer", 0.0), "renderer_main": (r1["main"] - r0["main"]) / minutes,
            "renderer_pool": (r1["pool"] - r0["pool"]) / minutes,
            "other": sum(v for k, v in by.items() if k != "renderer"),
            "server": (s1 - s0) / minutes, "live_chart_shown": shown}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--charts", default="0,default",
                    help="DACT_LAB_CHARTS_REFRESH_S per condition: seconds, 0 = on every rerun, 'default' = unset")
    ap.add_argument("--refresh", default="default",
                    help="DACT_LAB_REFRESH_S per condition: the status period while training, seconds per tab, "
                         "'default' = unset")
    ap.add_argument("--tabs", default="1,3", help="tab counts")
    ap.add_argument("--browser-arg", action="append", default=[],
                    help="an extra Chromium flag for every condition (repeatable), e.g. "
                         "--browser-arg=--js-flags=--no-memory-reducer")
    ap.add_argument("--window", type=float, default=60.0, help="seconds measured per condition")
    ap.add_argument("--settle", type=float, default=20.0, help="seconds after the tabs drew before the window")
    ap.add_argument("--repeat", type=int, default=1, help="times each condition is measured (interleaved)")
    ap.add_argument("--history", type=int, default=2000, help="steps logged before the server starts")
    ap.add_argument("--step-s", type=float, default=0.25, help="seconds per synthetic training step")
    args = ap.parse_args()
    exe = tb.chromium_path()
    if exe is None:
        print("SKIPPED: no chromium binary (/usr/bin/chromium or chromium on PATH)", file=sys.stderr)
        return 0
    info = machine_info(threads=0)
    from ui.state import CALM_REFRESH_S, CHARTS_REFRESH_S

    rows = []
    for r in range(args.repeat):
        for refresh, charts, tabs in itertools.product(args.refresh.split(","), args.charts.split(","),
                                                       (int(t) for t in args.tabs.split(","))):
            row = measure(exe, refresh, charts, tabs, args)
            row["repeat"] = r + 1
            rows.append(row)
            print(f"status {refresh} · charts {charts} · {tabs} tab(s): browser {row['browser']:.2f} CPU-s/min "
                  f"(renderer {row['renderer']:.2f}: main {row['renderer_main']:.2f}, "
                  f"pool {row['renderer_pool']:.2f}), "
                  f"server {row['server']:.2f}", flush=True)
    print(f"\n{describe_machine(info)}")
    print(f"status period default {CALM_REFRESH_S:g} s per tab; charts default {CHARTS_REFRESH_S:g} s per tab; "
          f"Chromium flags added: {' '.join(args.browser_arg) or 'none'}; "
          f"synthetic run: a step every {args.step_s:g} s, {args.history} steps of history\n")
    print(markdown_table(rows, [("refresh", "status period (s per tab)"), ("charts", "charts redrawn every (s)"),
                                ("tabs", "Runs tabs"), ("repeat", "repeat"), ("browser", "browser CPU-s/min"),
                                ("renderer", "of it renderer"), ("renderer_main", "renderer main threads"),
                                ("renderer_pool", "renderer pool threads (V8 GC, compile)"),
                                ("other", "other Chromium"),
                                ("server", "server CPU-s/min"), ("live_chart_shown", "live chart shown")]))
    print(f"\nraw: {save_json('ui_tab_cost.json', {'machine': info, 'args': vars(args), 'rows': rows})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
