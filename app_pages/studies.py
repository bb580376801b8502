"""Studies: the home's Optuna studies (backbone tuning, DACT pipeline stages) with Optuna's own plots, and a
button that starts optuna-dashboard on the home's storage (127.0.0.1, a free port, one server per process)."""
from __future__ import annotations



import pandas as pd
import streamlit as st

from dact_lib.tuning import dashboard_server, studies
from ui.safe import plain
from ui.state import tracker

st.title("Studies")
tr = tracker()
url = studies.shown_url(tr.home)


# ---------------------------------------------------------------------------------------- page

rows = studies.list_studies(tr.home) if studies.has_studies(tr.home) else []
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
            srv = dashboard_server.start_dashboard(tr.home)
        st.session_state["studies_dashboard_port"] = srv["port"] if srv.get("up") else None
        st.session_state["studies_dashboard_pid"] = srv["proc"].pid
        if not srv.get("up"):
            st.error(f"optuna-dashboard did not start; see {srv['log']}.")
    port = st.session_state.get("studies_dashboard_port")
    srv = dashboard_server.dashboard(tr.home)
    if port and srv and srv["port"] == port:
        st.link_button(f"optuna-dashboard at 127.0.0.1:{port}", srv["url"])
        st.caption(f"or run `optuna-dashboard {url}` yourself")


@st.cache_resource(show_spinner=False, max_entries=4)
def _load(storage_url: str, study_name: str):
    import optuna

    return optuna.load_study(study_name=study_name, storage=studies.storage(tr.home))


def _plot(title: str, make) -> None:
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's experimental / evaluator notices
            fig = make()
    except Exception as exc:  # noqa: BLE001 - Optuna raises for studies a plot does not fit
        st.caption(f"{title}: not available for this study ({type(exc).__name__}: {plain(exc)}).")
        return
    st.plotly_chart(fig, key=f"studies_{title}")


row = next(r for r in rows if r["name"] == name)
try:
    from optuna import visualization as vis
    from optuna.trial import TrialState

    study = _load(url, name)
    trials = study.get_trials(deepcopy=False)
except Exception as exc:  # noqa: BLE001
    st.error(f"Could not open study {plain(repr(name))}: {plain(exc)}")
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
