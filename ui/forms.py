"""Form helpers shared by the launch pages (Backbone, DACT pipeline, PBT, Multi-task) and Home.

A launch form keeps its values in ``st.session_state`` under ``"<prefix>:<dotted path>"`` keys (``"bb:train.epochs"``),
so a config loaded from a file can fill the form before its widgets are drawn. The form's values overlay a *base*
config (the defaults, or the uploaded file), so settings the form does not show are kept. Nothing here trains:
:func:`submit_job` hands the validated config to the job manager.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import streamlit as st

from dact_lib.config import RunConfig, default_config, parse_mapping, split_config_document
from dact_lib.errors import ConfigError, DactLabError

from ui.fields import Field, dataset_choices, dataset_picker, make_field, settings_fields  # noqa: F401 - re-exported
from ui.safe import plain

from . import state

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------- fields


def get_path(mapping: dict, path: str) -> Any:
    cur: Any = mapping
    for part in path.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def set_path(mapping: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    cur = mapping
    for part in parts[:-1]:
        if not isinstance(cur.get(part), dict):
            cur[part] = {}
        cur = cur[part]
    cur[parts[-1]] = value


def _skey(prefix: str, path: str) -> str:
    return f"{prefix}:{path}"


@dataclass(frozen=True)
class FormKeys:
    """Every session-state key of one launch page, in one place. A page's state is per config kind (switching
    the kind keeps each kind's edits): ``prefix(kind)`` namespaces the widgets (``field``), the form's base config
    (``base``: what the widgets do not show is kept), an engine mode's base options and the Data page's split once
    applied."""

    page: str

    @property
    def kind(self) -> str:
        return f"{self.page}:kind"

    @property
    def mode(self) -> str:
        return f"{self.page}:mode"

    @property
    def form(self) -> str:
        return f"{self.page}:form"

    @property
    def jobs(self) -> str:
        return f"{self.page}:jobs"

    @property
    def kept(self) -> str:
        """What the user set on the page (widget key -> value): widgets' own keys are dropped by Streamlit when
        the page is left, this plain key is not (:func:`keep_values` / :func:`restore_values`)."""
        return f"{self.page}:kept"

    @property
    def drawn(self) -> str:
        """The widget keys the page's last run drew (their state is the user's, not to be overwritten)."""
        return f"{self.page}:drawn"

    @property
    def upload(self) -> str:
        """The config uploader's widget key (drawn on every run of the page)."""
        return f"{self.page}:upload"

    def prefix(self, kind: str) -> str:
        return f"{self.page}/{kind}"

    def field(self, kind: str, path: str) -> str:
        return _skey(self.prefix(kind), path)

    def base(self, kind: str) -> str:
        return base_key(self.prefix(kind))

    def options_base(self, kind: str, mode_label: str) -> str:
        return f"{self.prefix(kind)}:{mode_label}:options_base"

    def downloads(self, kind: str) -> str:
        return f"{self.page}:{kind}"


def base_key(prefix: str) -> str:
    """The session key of a form's base config (the full RunConfig dict its widgets edit)."""
    return f"{prefix}:base"


#: session key where the Data page leaves the split the user previewed ({val_frac, test_frac, split_seed})
SPLIT_KEY = "data:split_settings"
_SPLIT_FIELDS = ("data.val_frac", "data.test_frac", "data.split_seed")


def apply_data_split(prefix: str, fields: list[Field]) -> None:
    """Copy the Data page's split settings into a form once per change (a later edit in the form is kept)."""
    split = st.session_state.get(SPLIT_KEY)
    applied = f"{prefix}:split_applied"
    if not split or st.session_state.get(applied) == split:
        return
    chosen = [f for f in fields if f.path in _SPLIT_FIELDS]
    fill_state(prefix, chosen, {"data": split}, overwrite=True)
    base = st.session_state.get(base_key(prefix))
    if isinstance(base, dict):  # the form's base config too, so the split survives a page switch
        base.setdefault("data", {}).update(split)
    st.session_state[applied] = dict(split)


def fill_state(prefix: str, fields: list[Field], values: dict, *, overwrite: bool) -> None:
    """Write ``values`` (a nested mapping) into the widgets' session-state keys."""
    for f in fields:
        key = _skey(prefix, f.path)
        if overwrite or not f.has_state(key):
            f.write(key, get_path(values, f.path))


def restore_values(keys: "FormKeys") -> None:
    """Put back what :func:`keep_values` kept, before the widgets are drawn: Streamlit drops the state of every
    widget a run does not draw (the page was left, or the other mode / kind was shown) and may leave an older
    value under the same key. Widgets drawn in the page's previous run keep their own state (the user's edits);
    every other kept value is written again."""
    entered = keys.upload not in st.session_state  # drawn on every run of the page: absent = the page was left
    drawn = set() if entered else set(st.session_state.get(keys.drawn) or ())
    for key, value in (st.session_state.get(keys.kept) or {}).items():
        if key not in drawn:
            st.session_state[key] = value


def keep_values(keys: "FormKeys", drawn: list[str]) -> None:
    """Copy the values of the widget keys ``drawn`` in this run into a plain session key (which survives a page
    switch): a form's values — as last submitted — are its values when the page is drawn again."""
    kept = dict(st.session_state.get(keys.kept) or {})
    kept.update({k: st.session_state[k] for k in drawn if k in st.session_state})
    st.session_state[keys.kept] = kept
    st.session_state[keys.drawn] = list(drawn)


def field_keys(prefix: str, fields: list[Field]) -> list[str]:
    return [k for f in fields for k in f.state_keys(_skey(prefix, f.path))]


def draw_fields(prefix: str, fields: list[Field], columns: int = 3) -> None:
    cols = st.columns(columns)
    for i, f in enumerate(fields):
        with cols[i % columns]:
            f.draw(_skey(prefix, f.path))


def collect(prefix: str, fields: list[Field], base: dict) -> dict:
    """``base`` (deep-copied) with every field's current widget value set; ConfigError for an unparsable value."""
    out = json.loads(json.dumps(base, default=list))
    for f in fields:
        set_path(out, f.path, f.read(_skey(prefix, f.path)))
    return out


def dataclass_fields(cls: type, path: str = "", skip: tuple[str, ...] = ()) -> list[Field]:
    """Fields for an engine's settings dataclass (PBTConfig, PipelineConfig, ...): see ui.fields.settings_fields."""
    return settings_fields(cls, path, skip)


def dataclass_values(obj: Any) -> dict:
    """A settings object as a JSON-friendly dict."""
    to_dict = getattr(obj, "to_dict", None)
    d = to_dict() if callable(to_dict) else dataclasses.asdict(obj)
    return json.loads(json.dumps(d, default=list))


# --------------------------------------------------------------------------------------------- common run fields


def run_fields(kind: str) -> list[Field]:
    """The RunConfig settings every launch form shows (the model's own fields are added by each page): generated
    from ``RunConfig.FORM``; a multi-task form's dataset picker offers two-task datasets only."""
    from dact_lib.config import RunConfig

    out = []
    for f in RunConfig.FORM:
        if f.kind == "dataset" and kind == "multitask":
            out.append(make_field(f.path, f.label, "dataset", ("two_task",),
                                  help=f.help + " Multi-task training needs a two-task dataset."))
        else:
            out.append(make_field(f.path, f.label, f.kind, f.choices, help=f.help))
    return out


@functools.lru_cache(maxsize=1)
def form_labels() -> dict[str, str]:
    """Config path -> the label a launch form shows for it (``pipeline.min_steps`` -> "Minimum optimizer steps per
    trial"), over every kind's run and model fields and the engines' settings."""
    from dact_lib.tuning.backbone import BackboneSpace
    from dact_lib.tuning.dact_pipeline import PipelineConfig
    from dact_lib.tuning.pbt import PBTConfig

    fields = [f for kind in ("backbone", "dact", "multitask") for f in run_fields(kind) + model_fields(kind)]
    fields += settings_fields(PipelineConfig, "pipeline") + settings_fields(PBTConfig, "pbt")
    fields += settings_fields(BackboneSpace, "space")
    out: dict[str, str] = {}
    for f in fields:
        out.setdefault(f.path, f.label)
    return out


_MENTION = re.compile(r"\b((?:pipeline|pbt|train|model|data)(?:\.[A-Za-z_][A-Za-z0-9_]*)+)"
                      r"((?:\s*/\s*[A-Za-z_][A-Za-z0-9_]*(?![A-Za-z0-9_.(]))*)")


def form_words(message: str) -> str:
    """``message`` with every config key it names (``pipeline.min_steps``, ``train.epochs``, ``model.pooling``, and
    ``pipeline.a / b``) written as the form's label in quotes: what the user sees on the page. A key the forms do
    not show is left as it is; a label the message already gives in brackets after the key is not repeated."""
    labels = form_labels()

    def label_of(path: str) -> str | None:
        if path in labels:
            return labels[path]
        if path.startswith("pbt.") and path.replace("pbt.space.", "space.", 1) in labels:
            return labels[path.replace("pbt.space.", "space.", 1)]
        return None

    def repl(m: re.Match) -> str:
        path, rest = m.group(1), m.group(2) or ""
        label = label_of(path)
        if label is None:
            return m.group(0)
        words = [f"“{label}”"]
        section = path.rsplit(".", 1)[0]
        for name in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", rest):
            other = label_of(f"{section}.{name}")
            words.append(f"“{other}”" if other else name)
        return " / ".join(words)

    out = _MENTION.sub(repl, str(message))
    for label in set(labels.values()):  # "“Label” (Label)" -> "“Label”"
        out = out.replace(f"“{label}” ({label})", f"“{label}”")
    return out


# --------------------------------------------------------------------------------------------- config files


def config_document(cfg: dict, options: dict | None = None) -> dict:
    """What a config download holds: the RunConfig alone, or ``{"config": ..., "options": ...}`` for engines."""
    return {"config": cfg, "options": options} if options else cfg


def parse_config_document(text: str, suffix: str) -> tuple[RunConfig, dict]:
    """Parse a downloaded config back: ``(RunConfig, engine options)``. Raises ConfigError."""
    data, options = split_config_document(parse_mapping(text, suffix, "the uploaded config"), "the uploaded config")
    return RunConfig.from_dict(data), options


def config_download_texts(doc: dict) -> dict[str, str]:
    """The exact texts of the two config downloads (JSON and YAML)."""
    import yaml

    return {"json": json.dumps(doc, indent=2), "yaml": yaml.safe_dump(doc, sort_keys=False)}


def config_downloads(doc: dict, basename: str, key: str) -> None:
    """Two download buttons: the config as JSON and as YAML (the document offered is kept in the session state
    under ``<key>:download-doc``, so a test can upload exactly what a user downloads)."""
    texts = config_download_texts(doc)
    st.session_state[f"{key}:download-doc"] = doc
    c1, c2 = st.columns(2)
    c1.download_button("Download config (JSON)", texts["json"], file_name=f"{basename}.json",
                       mime="application/json", key=f"{key}:dl-json", on_click="ignore",
                       icon=":material/download:")
    c2.download_button("Download config (YAML)", texts["yaml"], file_name=f"{basename}.yaml",
                       mime="application/x-yaml", key=f"{key}:dl-yaml", on_click="ignore",
                       icon=":material/download:")


def config_upload(prefix: str, apply: Callable[[RunConfig, dict], None], *, kinds: tuple[str, ...]) -> None:
    """A file uploader for a JSON/YAML config; a new valid file is handed to ``apply`` (which fills the form's
    session state) once. A ConfigError is shown with st.error and nothing changes."""
    up = st.file_uploader("Load a config (JSON or YAML)", type=["json", "yaml", "yml"], key=f"{prefix}:upload")
    if up is None:
        return
    marker = f"{prefix}:upload-applied"
    ident = (up.file_id, up.name, up.size)
    if st.session_state.get(marker) == ident:
        st.caption(f"Loaded {plain(up.name)}.")
        return
    try:
        cfg, options = parse_config_document(up.getvalue().decode("utf-8", errors="replace"),
                                             Path(up.name).suffix.lower())
        if cfg.kind not in kinds:
            raise ConfigError(f"kind = {cfg.kind!r} in {up.name} does not fit this page: expected "
                              f"{' or '.join(repr(k) for k in kinds)}.")
        apply(cfg, options)
    except ConfigError as exc:
        st.error(f"{plain(up.name)}: {plain(exc)}")
        return
    st.session_state[marker] = ident
    st.success(f"Loaded {plain(up.name)} into the form.")


# --------------------------------------------------------------------------------------------- launching


def page_link(path: str, label: str, icon: str | None = None) -> None:
    """st.page_link when the page exists in this app, else a plain caption."""
    if (ROOT / path).is_file():
        try:
            st.page_link(path, label=label, icon=icon)
            return
        except Exception:  # noqa: BLE001 - e.g. the page is not registered in this app run
            pass
    st.caption(label)


def unexpected(exc: BaseException, what: str) -> None:
    """An exception dact_lib did not raise on purpose: one st.error line (no traceback on the page), the
    traceback in the server log."""
    import logging

    logging.getLogger("dact_lab.ui").exception("%s", what)
    st.error(f"{what}: {plain(type(exc).__name__)}: {plain(str(exc)[:300])}. This is a bug in DACT Lab (the server "
             "log has the details); nothing was started.")


def submit_job(kind: str, cfg: RunConfig | dict, *, options: dict | None = None, name: str | None = None) -> int | None:
    """Submit to the job manager; st.success with the id and a link to Runs, or st.error (nothing submitted)."""
    try:
        run_id = state.jobs().submit(kind, cfg, options=options, name=name)
    except DactLabError as exc:
        st.error(plain(form_words(str(exc))))
        return None
    except Exception as exc:  # noqa: BLE001 - never a traceback on the page: say what happened, log the rest
        unexpected(exc, "The job was not submitted")
        return None
    st.session_state["last_run_id"] = run_id
    state.refresh_every()  # this page already shows the new job: no rerun to announce it (it would clear this message)
    ahead = state.jobs().ahead(run_id)
    if ahead is not None:
        st.success(f"Queued job **#{run_id}** ({kind}, {ahead} ahead): it starts when the "
                   f"{'job' if ahead == 1 else 'jobs'} before it end{'s' if ahead == 1 else ''}. Follow it on "
                   "the Runs page.")
    else:
        st.success(f"Started job **#{run_id}** ({kind}). It runs in the background; follow it on the Runs page.")
    page_link("app_pages/runs.py", f"Watch run #{run_id} on Runs", ":material/monitoring:")
    return run_id


def active_runs_caption(runs: list[dict]) -> None:
    """A text line under a run table naming its queued and running runs (the table is a canvas grid: this is what
    a reader — or a browser test — can follow as statuses change)."""
    active = [r for r in runs if r.get("status") in ("queued", "running")]
    if not active:
        st.caption("No run is queued or running.")
        return
    st.caption("Active: " + "; ".join(f"#{r['id']} {r['kind']}{' ' + plain(r['name']) if r.get('name') else ''} "
                                      f"**{r['status']}**" for r in active))


def _fmt_time(t: float | None) -> str:
    if not t:
        return ""
    import datetime as _dt

    return _dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def jobs_panel(key: str = "jobs") -> None:
    """The job manager's jobs of this server process, with a Cancel button for queued/running ones; read with the
    page, which the sidebar's status watch reruns when a job is queued, starts training or ends."""
    jm = state.jobs()

    def body() -> None:
        rows = jm.jobs()
        if not rows:
            st.caption("No jobs started from this dashboard yet.")
            return
        import pandas as pd

        df = pd.DataFrame([{"run": r["run_id"], "kind": r["kind"], "name": r["name"] or "", "state": r["state"],
                            "submitted": _fmt_time(r["submitted"]), "started": _fmt_time(r["started"]),
                            "ended": _fmt_time(r["ended"]), "error": form_words(r["error"] or "")} for r in rows])
        st.dataframe(df, hide_index=True, width="stretch")
        active = [r for r in rows if r["state"] in ("queued", "running")]
        if active:
            c1, c2 = st.columns([3, 1])
            labels = {r["run_id"]: f"#{r['run_id']} {r['kind']}{' ' + r['name'] if r['name'] else ''}"
                      for r in active}
            pick = c1.selectbox("Job to cancel", list(labels), key=f"{key}:cancel-pick", format_func=labels.get)
            if c2.button("Cancel job", key=f"{key}:cancel", icon=":material/cancel:"):
                if jm.cancel(pick):
                    st.toast(f"Cancelling job #{pick}.")
                else:
                    st.warning(f"Job #{pick} has already ended.")

    body()  # re-read with the page: the sidebar's status watch reruns it when a job is queued, starts training or ends


# --------------------------------------------------------------------------------------------- launch pages

def model_fields(kind: str) -> list[Field]:
    """The model settings a launch form shows for ``kind``: generated from the model config's ``FORM`` (label,
    help, widget and choices live beside the settings in dact_lib/config.py)."""
    from dact_lib.config import BackboneModelConfig, DactModelConfig, MultiTaskModelConfig

    cls = {"dact": DactModelConfig, "multitask": MultiTaskModelConfig}.get(kind, BackboneModelConfig)
    return [make_field(f"model.{f.path}", f.label, f.kind, f.choices, help=f.help) for f in cls.FORM]


@dataclass
class Mode:
    """One way a launch page can start a job: a plain run of the config's kind, or an engine with options."""

    label: str
    job_kind: str | None  # None: the config's own kind (a single training run)
    option_fields: Callable[[], list[Field]] | None = None
    option_defaults: Callable[[], dict] | None = None
    help: str | None = None
    #: (RunConfig, options) -> options, after the form is read: e.g. the pipeline takes the run's name
    prepare_options: Callable[[RunConfig, dict], dict] | None = None
    #: (RunConfig, options, the new job's run id or None after Check config) -> None: says more on the page, e.g.
    #: that the pipeline of this name is resumed
    notice: Callable[[RunConfig, dict | None, int | None], None] | None = None


def launch_page(page: str, *, kinds: tuple[str, ...], modes: list[Mode], kind_label: str = "Model kind") -> None:
    """The body of a launch page: config upload, mode/kind choice, one st.form, validation, submit, downloads."""
    keys = FormKeys(page)
    kind_key, mode_key, state_prefix = keys.kind, keys.mode, keys.prefix
    restore_values(keys)  # what the user set before leaving the page (or the mode) is drawn again
    st.session_state.setdefault(kind_key, kinds[0])
    labels = [m.label for m in modes]
    st.session_state.setdefault(mode_key, labels[0])

    def fields_for(kind: str) -> list[Field]:
        return run_fields(kind) + model_fields(kind) + [make_field("name", "Run name (optional)", "text")]

    def init(kind: str) -> None:
        if keys.base(kind) not in st.session_state:
            st.session_state[keys.base(kind)] = default_config(kind).to_dict()
        fill_state(state_prefix(kind), fields_for(kind), st.session_state[keys.base(kind)], overwrite=False)
        apply_data_split(state_prefix(kind), fields_for(kind))
        for m in modes:
            if m.option_fields is not None:
                fill_state(state_prefix(kind), m.option_fields(), m.option_defaults(), overwrite=False)

    # --- load a config file into the form -------------------------------------------------------------------
    def apply(cfg: RunConfig, options: dict) -> None:
        pre = state_prefix(cfg.kind)
        st.session_state[kind_key] = cfg.kind
        st.session_state[keys.base(cfg.kind)] = cfg.to_dict()
        fill_state(pre, fields_for(cfg.kind), cfg.to_dict(), overwrite=True)
        engine_modes = [m for m in modes if m.option_fields is not None]
        if options and engine_modes:
            m = engine_modes[0]
            merged = m.option_defaults()
            for key, value in options.items():
                if isinstance(value, dict) and isinstance(merged.get(key), dict):
                    merged[key] = {**merged[key], **value}
                else:
                    merged[key] = value
            fill_state(pre, m.option_fields(), merged, overwrite=True)
            st.session_state[keys.options_base(cfg.kind, m.label)] = merged  # keys the form does not show are kept
            st.session_state[mode_key] = m.label
        elif not options:
            st.session_state[mode_key] = next((m.label for m in modes if m.job_kind is None), labels[0])

    with st.expander("Load a config file", icon=":material/upload_file:"):
        config_upload(page, apply, kinds=kinds)

    # --- mode and kind (outside the form: they change which fields the form shows) -------------------------
    c1, c2 = st.columns(2)
    if len(modes) > 1:
        c1.radio("What to run", labels, key=mode_key, horizontal=True,
                 help=" ".join(m.help for m in modes if m.help) or None)
    mode = next(m for m in modes if m.label == st.session_state[mode_key])
    if len(kinds) > 1:
        c2.selectbox(kind_label, list(kinds), key=kind_key)
    kind = st.session_state[kind_key]
    init(kind)
    pre = state_prefix(kind)

    common, model = run_fields(kind), model_fields(kind)
    opt_fields = mode.option_fields() if mode.option_fields else []
    # Enter in a field does not submit (two jobs were started by accident): only Start and Check config do
    with st.form(keys.form, enter_to_submit=False):
        st.markdown("**Run settings**")
        draw_fields(pre, common, columns=3)
        st.markdown("**Model**")
        draw_fields(pre, model, columns=3)
        if opt_fields:
            st.markdown(f"**{mode.label} settings**")
            draw_fields(pre, opt_fields, columns=3)
        st.text_input("Run name (optional)", key=keys.field(kind, "name"))
        b1, b2 = st.columns([1, 1])
        start = b1.form_submit_button("Start", type="primary", icon=":material/play_arrow:")
        check = b2.form_submit_button("Check config", icon=":material/fact_check:")

    def build() -> tuple[RunConfig, dict | None]:
        base = st.session_state[keys.base(kind)]
        if base.get("kind") != kind:
            base = default_config(kind).to_dict()
        cfg = RunConfig.from_dict(collect(pre, fields_for(kind), base))
        options = None
        if opt_fields:
            base_opts = st.session_state.get(keys.options_base(kind, mode.label)) or mode.option_defaults()
            options = collect(pre, opt_fields, base_opts)
            if mode.prepare_options is not None:
                options = mode.prepare_options(cfg, options)
        return cfg, options

    keep_values(keys, [kind_key, mode_key] + field_keys(pre, fields_for(kind) + opt_fields))

    if start or check:
        try:
            cfg, options = build()
        except ConfigError as exc:
            st.error(plain(form_words(str(exc))))
        except Exception as exc:  # noqa: BLE001 - never a traceback on the page
            unexpected(exc, "The form could not be read")
        else:
            if check:
                try:  # the same checks as Start (engine settings included), nothing submitted
                    state.jobs().check(mode.job_kind or cfg.kind, cfg, options)
                except DactLabError as exc:
                    st.error(plain(form_words(str(exc))))
                except Exception as exc:  # noqa: BLE001
                    unexpected(exc, "The config could not be checked")
                else:
                    st.success("The config is valid.")
                    if mode.notice is not None:
                        mode.notice(cfg, options, None)
            else:
                run_id = submit_job(mode.job_kind or cfg.kind, cfg, options=options, name=cfg.name)
                if run_id is not None and mode.notice is not None:
                    mode.notice(cfg, options, run_id)

    try:
        cfg, options = build()
    except Exception:  # noqa: BLE001 - ConfigError or worse: Check config / Start show it
        st.caption("Fix the form (Check config shows the problem) to download its config.")
    else:
        config_downloads(config_document(cfg.to_dict(), options), f"{page}-{mode.job_kind or cfg.kind}",
                         key=keys.downloads(kind))

    st.divider()
    st.subheader("Jobs")
    jobs_panel(key=keys.jobs)
