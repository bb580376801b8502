"""Taking a run's model out, in the dashboard: export (zip download), the REST service (start / stop, the curl
line) and the latency budget. Thin: every action is one library call (``dact_lib.deploy``)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from dact_lib.deploy.service import curl_line, service_for, start_service, stop_service
from dact_lib.errors import DactLabError
from ui.safe import plain

RUNTIMES = {"PyTorch": ("torch", False), "ONNX Runtime fp32": ("onnx", False), "ONNX Runtime int8": ("onnx", True)}


@st.cache_resource(max_entries=1, show_spinner=False)  # the last zip kept for the reruns (an hf zip: ~170 MB)
def _export_zip(run_dir: str, version: str, fmt: str, int8: bool, policy: str | None) -> tuple[bytes, dict]:
    from dact_lib.deploy.export import export_model, zip_folder

    with tempfile.TemporaryDirectory(prefix="dact_lab_export_") as tmp:
        out = Path(tmp) / "model"
        res = export_model(run_dir, out, fmt=fmt, int8=int8, policy=policy)
        return zip_folder(out), res


def export_panel(run_id: int, run_dir: Path, kind: str) -> None:
    """Export the run's model as a folder a transformers user (hf) or the int8 runtime (onnx) loads; a zip."""
    from dact_lib.models import model_version

    st.markdown("**Export** — `hf`: a folder `transformers` loads (`trust_remote_code=True`), with a model card; "
                "`onnx`: per-layer graphs for DACT Lab's torch-free early-exit runtime (int8 optional).")
    c1, c2, c3 = st.columns([1, 1, 2])
    fmt = c1.radio("Format", ["hf", "onnx"], horizontal=True, key=f"dep_fmt_{run_id}")
    int8 = c2.checkbox("int8", key=f"dep_int8_{run_id}", disabled=fmt != "onnx",
                       help="Dynamic int8 quantisation of the ONNX graphs (onnx only).") and fmt == "onnx"
    policy = None
    if kind == "dact":
        policy = c3.text_input("Exit policy (blank: the run's own point)", key=f"dep_pol_{run_id}",
                               placeholder="dact, entropy:0.3, patience:2, fixed:3").strip() or None
    key = f"dep_ready_{run_id}"
    args = (str(run_dir), model_version(run_dir), fmt, bool(int8), policy)
    if st.button("Prepare the export (zip)", key=f"dep_go_{run_id}", icon=":material/output:"):
        try:
            with st.spinner("Exporting…"):
                _export_zip(*args)
            st.session_state[key] = args
        except DactLabError as exc:
            st.error(plain(exc))
    if st.session_state.get(key) == args:
        data, res = _export_zip(*args)
        st.download_button(f"Download the {fmt}{' int8' if int8 else ''} export (zip, {len(data) / 1e6:.1f} MB)",
                           data, file_name=f"dact_lab_run_{run_id}_{fmt}{'_int8' if int8 else ''}.zip",
                           mime="application/zip", on_click="ignore", key=f"dep_dl_{run_id}",
                           icon=":material/download:")
        st.caption(f"Exit policy: {res['policy'] or 'the full model'} · exported in {res['seconds']:.1f} s")


def serve_panel(run_id: int, run_dir: Path, kind: str) -> None:
    """Start / stop ``dact-lab serve`` for this run (its own process, 127.0.0.1) and show the curl line."""
    svc = service_for(run_dir)
    if svc is not None:
        st.success(f"REST service of run #{run_id} on {svc.url} (process {svc.pid}"
                   f"{', int8' if svc.int8 else ''}{', policy ' + svc.policy if svc.policy else ''}).")
        st.code(curl_line(svc), language="bash")
        if st.button("Stop the REST service", key=f"dep_stop_{run_id}", icon=":material/stop:"):
            stop_service(run_dir)
            st.rerun()
        return
    c1, c2 = st.columns(2)
    port = c1.number_input("Port (0: a free one)", min_value=0, max_value=65535, value=0, step=1,
                           key=f"dep_port_{run_id}")
    int8 = c2.checkbox("int8 runtime", key=f"dep_sint8_{run_id}",
                       help="Serve the int8 ONNX export (exported once into the run folder).")
    if st.button("Start the REST service", key=f"dep_start_{run_id}", icon=":material/play_arrow:"):
        try:
            with st.spinner("Starting the service…"):
                start_service(run_dir, port=int(port) or None, int8=bool(int8))
        except DactLabError as exc:
            st.error(plain(exc))
        else:
            st.rerun()


def latency_budget_panel(run_id: int, run_dir: Path, key: str = "dep") -> None:
    """The most accurate exit point whose measured batch-1 latency on the chosen runtime fits the budget."""
    from dact_lib.deploy.budget import choose_for_budget

    c1, c2 = st.columns(2)
    budget = c1.number_input("Latency budget (ms per sentence, batch 1)", min_value=0.1, value=10.0, step=0.5,
                             key=f"{key}_budget_{run_id}")
    runtime = c2.selectbox("Runtime that will serve it", list(RUNTIMES), key=f"{key}_rt_{run_id}")
    res_key = f"{key}_budget_res_{run_id}"
    if st.button("Find the point", key=f"{key}_budget_go_{run_id}", icon=":material/speed:",
                 help="Measures every exit point on this machine with that runtime (a few seconds to a minute)."):
        rt, int8 = RUNTIMES[runtime]
        try:
            with st.spinner("Measuring the exit points on this machine…"):
                st.session_state[res_key] = choose_for_budget(run_dir, budget, runtime=rt, int8=int8)
        except DactLabError as exc:
            st.error(plain(exc))
    res = st.session_state.get(res_key)
    if res:
        (st.success if res["point"] is not None else st.warning)(plain(res["message"]))
        df = pd.DataFrame([{"policy": p["policy"], "val accuracy": p["accuracy"], "avg exit": p["avg_exit_layer"],
                            "p50 ms": p["latency_ms_p50"], "p90 ms": p["latency_ms_p90"],
                            "fits (p50 ≤ budget)": p["latency_ms_p50"] <= res["budget_ms"]} for p in res["points"]])
        st.dataframe(df, hide_index=True)
        if res["policy"]:
            st.caption(f"Export or serve with `--policy {res['policy']}` (or `--latency-budget-ms "
                       f"{res['budget_ms']:g}`).")


def deploy_section(run: dict, run_dir: Path) -> None:
    """Everything above for one finished run with a saved model (the Runs page's run in detail)."""
    if not (run_dir / "model.safetensors").is_file() or run["kind"] not in ("backbone", "dact", "multitask"):
        return
    with st.expander("Take the model out — export, serve, latency budget"):
        export_panel(run["id"], run_dir, run["kind"])
        st.divider()
        st.markdown("**REST service** — `POST /predict`, `GET /health`, `GET /model` on 127.0.0.1.")
        serve_panel(run["id"], run_dir, run["kind"])
        if run["kind"] == "dact":
            st.divider()
            st.markdown("**Latency budget**")
            latency_budget_panel(run["id"], run_dir)
