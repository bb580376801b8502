"""Studies: the home's Optuna studies (backbone tuning, DACT pipeline stages) with Optuna's own plots, and a
button that starts optuna-dashboard on the home's storage (127.0.0.1, a free port, one server per process)."""
from __future__ import annotations

import atexit
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from dact_lib import home as _home  # noqa: E402
from ui.state import tracker  # noqa: E402
from ui.nav import through_app  # noqa: E402

through_app()

st.title("Studies")
tr = tracker()
url = _home.optuna_storage_url(tr.home)


def _has_optuna_tables(db: Path) -> bool:
    """True when experiments.db holds Optuna's tables (so listing does not create them on an empty home)."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='studies'").fetchone() \
                is not None
        finally:
            con.close()
    except sqlite3.Error:
        return False


def _list(home: Path) -> list[dict]:
    try:
        from dact_lib.tuning.studies import list_studies
    except ImportError:  # the tuning package is not installed: plain Optuna summaries
        import optuna

        out = []
        for s in optuna.get_all_study_summaries(url, include_best_trial=False):
            out.append({"name": s.study_name, "storage_url": url,
                        "directions": [d.name.lower() for d in s.directions], "n_trials": s.n_trials,
                        "trials": {}, "best_value": None, "parent_run_id": s.user_attrs.get("parent_run_id")})
        return out
    return list_studies(home)


# ---------------------------------------------------------------------------------------- optuna-dashboard


@st.cache_resource(show_spinner=False)
def _servers() -> dict:
    """storage URL -> {"proc": Popen, "port": int, "log": path}: the optuna-dashboard servers of this process."""
    servers: dict = {}

    def stop_all() -> None:
        for s in servers.values():
            if s["proc"].poll() is None:
                s["proc"].terminate()

    atexit.register(stop_all)
    return servers


_servers_lock = threading.Lock()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_dashboard(storage_url: str, wait_s: float = 15.0) -> dict:
    """Start (or reuse) optuna-dashboard for ``storage_url`` on 127.0.0.1; waits until it listens."""
    servers = _servers()
    with _servers_lock:
        srv = servers.get(storage_url)
        if srv is None or srv["proc"].poll() is not None:
            port = _free_port()
            log = Path(tr.home) / ".optuna_dashboard.log"
            fh = open(log, "ab")  # noqa: SIM115 - owned by the child process
            # optuna_dashboard has no __main__ module: its CLI module is runnable (`optuna-dashboard` script)
            proc = subprocess.Popen([sys.executable, "-m", "optuna_dashboard._cli", storage_url, "--host",
                                     "127.0.0.1", "--port", str(port)], stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
            srv = {"proc": proc, "port": port, "log": str(log), "started": time.time()}
            servers[storage_url] = srv
    deadline = time.time() + wait_s
    while time.time() < deadline and srv["proc"].poll() is None and not _listening(srv["port"]):
        time.sleep(0.2)
    srv["up"] = srv["proc"].poll() is None and _listening(srv["port"])
    return srv


# ---------------------------------------------------------------------------------------- page

db = _home.db_path(tr.home)
rows = _list(tr.home) if _has_optuna_tables(db) else []
if not rows:
    st.info("No Optuna studies in this home yet. Backbone tuning and the DACT pipeline create them (the pipeline "
            f"runs three: stage 1 architecture, stage 2 training parameters, stage 3 λ). Storage: `{url}`")
    st.stop()


def _best(r: dict) -> str:
    if r.get("best_value") is not None:
        return f"{r['best_value']:.5g}"
    if r.get("n_pareto"):
        return f"{r['n_pareto']} Pareto-optimal"
    return ""


st.dataframe(pd.DataFrame([{
    "study": r["name"], "directions": " / ".join(r.get("directions") or []), "trials": r.get("n_trials"),
    "complete": (r.get("trials") or {}).get("complete"), "pruned": (r.get("trials") or {}).get("pruned"),
    "failed": (r.get("trials") or {}).get("fail"), "best": _best(r), "parent run": r.get("parent_run_id"),
    "started": r.get("datetime_start"),
} for r in rows]), hide_index=True)

c1, c2 = st.columns([3, 2])
names = [r["name"] for r in rows]
name = c1.selectbox("Study", names, index=len(names) - 1, key="studies_pick")
with c2:
    st.write("")
    if st.button("Open in optuna-dashboard", key="studies_dashboard"):
        with st.spinner("Starting optuna-dashboard…"):
            srv = start_dashboard(url)
        st.session_state["studies_dashboard_port"] = srv["port"] if srv.get("up") else None
        st.session_state["studies_dashboard_pid"] = srv["proc"].pid
        if not srv.get("up"):
            st.error(f"optuna-dashboard did not start; see {srv['log']}.")
    port = st.session_state.get("studies_dashboard_port")
    srv = _servers().get(url)
    if port and srv and srv["proc"].poll() is None and srv["port"] == port:
        st.link_button(f"optuna-dashboard at 127.0.0.1:{port}", f"http://127.0.0.1:{port}/dashboard/")
        st.caption(f"or run `optuna-dashboard {url}` yourself")


@st.cache_resource(show_spinner=False, max_entries=4)
def _load(storage_url: str, study_name: str):
    import optuna

    from dact_lib.tuning import studies as _st

    try:
        storage = _st.storage(tr.home)
    except Exception:  # noqa: BLE001
        storage = storage_url
    return optuna.load_study(study_name=study_name, storage=storage)


def _plot(title: str, make) -> None:
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's experimental / evaluator notices
            fig = make()
    except Exception as exc:  # noqa: BLE001 - Optuna raises for studies a plot does not fit
        st.caption(f"{title}: not available for this study ({type(exc).__name__}: {exc}).")
        return
    st.plotly_chart(fig, key=f"studies_{title}")


row = next(r for r in rows if r["name"] == name)
try:
    from optuna import visualization as vis
    from optuna.trial import TrialState

    study = _load(url, name)
    trials = study.get_trials(deepcopy=False)
except Exception as exc:  # noqa: BLE001
    st.error(f"Could not open study {name!r}: {exc}")
    st.stop()

complete = [t for t in trials if t.state == TrialState.COMPLETE]
n_obj = len(study.directions)
obj_names = list(study.metric_names or []) if getattr(study, "metric_names", None) else []
if len(obj_names) != n_obj:
    ua = study.user_attrs.get("objectives")
    obj_names = list(ua) if isinstance(ua, list) and len(ua) == n_obj else [f"objective {i}" for i in range(n_obj)]
st.caption(f"{len(trials)} trials ({len(complete)} complete) · {n_obj} objective(s): {', '.join(obj_names)} · "
           + ", ".join(d.name.lower() for d in study.directions))
if not complete:
    st.info("No complete trial yet: the plots appear after the first one.")
    st.stop()

if n_obj == 1:
    _plot("optimization history", lambda: vis.plot_optimization_history(study, target_name=obj_names[0]))
    if len(complete) >= 2:
        _plot("parameter importances", lambda: vis.plot_param_importances(study, target_name=obj_names[0]))
    else:
        st.caption("Parameter importances need at least 2 complete trials.")
    _plot("parallel coordinates", lambda: vis.plot_parallel_coordinate(study, target_name=obj_names[0]))
else:
    _plot("Pareto front", lambda: vis.plot_pareto_front(study, target_names=obj_names))
    k = st.selectbox("Objective for the other plots", list(range(n_obj)), format_func=lambda i: obj_names[i],
                     key="studies_objective")
    _plot("optimization history",
          lambda: vis.plot_optimization_history(study, target=lambda t: t.values[k], target_name=obj_names[k]))
    if len(complete) >= 2:
        _plot("parameter importances",
              lambda: vis.plot_param_importances(study, target=lambda t: t.values[k], target_name=obj_names[k]))
    else:
        st.caption("Parameter importances need at least 2 complete trials.")
    _plot("parallel coordinates",
          lambda: vis.plot_parallel_coordinate(study, target=lambda t: t.values[k], target_name=obj_names[k]))

with st.expander("Trials"):
    st.dataframe(study.trials_dataframe(attrs=("number", "state", "values", "params", "duration", "user_attrs")),
                 hide_index=True)
