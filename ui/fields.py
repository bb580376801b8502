"""Form fields: one small class per widget kind, each bound to a dotted path of a config mapping.

A field moves a config value into the widget's session state (:meth:`Field.write`), draws the widget
(:meth:`Field.draw`) and reads the value back (:meth:`Field.read`, ConfigError for an unparsable entry). A field
uses the session key it is given (``<form prefix>:<path>``); :class:`RangeField` uses that key + ``:low`` / ``:high``.
:func:`make_field` builds one from a kind name (what the pages write); :func:`settings_fields` builds them for an
engine's settings dataclass with the labels and help the dataclass carries (``FORM_TEXT``).
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from typing import Any, Callable

import streamlit as st

from dact_lib.errors import ConfigError
from ui import state
from ui.safe import plain


@dataclass
class Field:
    """A text field (also the base class): ``path`` in the config, ``label`` and ``help`` on the page."""

    path: str
    label: str
    help: str | None = None

    def to_widget(self, value: Any) -> Any:
        return "" if value is None else str(value)

    def from_widget(self, value: Any) -> Any:
        return str(value or "").strip() or None

    def write(self, key: str, value: Any) -> None:
        st.session_state[key] = self.to_widget(value)

    def has_state(self, key: str) -> bool:
        return key in st.session_state

    def state_keys(self, key: str) -> list[str]:
        """The session keys this field's widgets use (what a form keeps across page switches)."""
        return [key]

    def read(self, key: str) -> Any:
        return self.from_widget(st.session_state.get(key))

    def draw(self, key: str) -> None:
        st.text_input(self.label, key=key, help=self.help)


class BoolField(Field):
    def to_widget(self, value: Any) -> Any:
        return bool(value)

    def from_widget(self, value: Any) -> Any:
        return bool(value)

    def draw(self, key: str) -> None:
        st.checkbox(self.label, key=key, help=self.help)


class IntField(Field):
    def to_widget(self, value: Any) -> Any:
        return int(value) if value is not None else 0

    def from_widget(self, value: Any) -> Any:
        return int(value)

    def draw(self, key: str) -> None:
        st.number_input(self.label, key=key, step=1, help=self.help)


class OptIntField(IntField):
    """An optional whole number: 0 in the widget = None (no limit / default)."""

    def to_widget(self, value: Any) -> Any:
        return 0 if value is None else int(value)

    def from_widget(self, value: Any) -> Any:
        return None if not value else int(value)


class FloatField(Field):
    step, fmt = 0.05, "%.3f"

    def to_widget(self, value: Any) -> Any:
        return float(value) if value is not None else 0.0

    def from_widget(self, value: Any) -> Any:
        return float(value)

    def draw(self, key: str) -> None:
        st.number_input(self.label, key=key, step=self.step, format=self.fmt, help=self.help)


class OptFloatField(FloatField):
    """An optional number: 0 in the widget = None."""

    def to_widget(self, value: Any) -> Any:
        return 0.0 if value is None else float(value)

    def from_widget(self, value: Any) -> Any:
        return None if not value else float(value)


class SciField(FloatField):
    """A small number (learning rates, weight decay) in scientific format."""

    step, fmt = 1e-5, "%.2e"


@dataclass
class SelectField(Field):
    options: tuple = ()

    def to_widget(self, value: Any) -> Any:
        return value

    def from_widget(self, value: Any) -> Any:
        return value

    def draw(self, key: str) -> None:
        st.selectbox(self.label, list(self.options), key=key, help=self.help)


@dataclass
class MultiSelectField(Field):
    """Several choices among ``options`` (e.g. the activations a search may try)."""

    options: tuple = ()

    def to_widget(self, value: Any) -> Any:
        return [v for v in (value or []) if v in self.options]

    def from_widget(self, value: Any) -> Any:
        return list(value or [])

    def draw(self, key: str) -> None:
        st.multiselect(self.label, list(self.options), key=key, help=self.help)


class DimsField(Field):
    """A list of whole numbers written "256, 64" (layer widths, batch sizes)."""

    number, what, example = int, "whole numbers", "256, 64"

    def to_widget(self, value: Any) -> Any:
        return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in (value or []))

    def from_widget(self, value: Any) -> Any:
        text = str(value or "").strip().strip("[]()")
        try:
            return [self.number(x) for x in text.replace(";", ",").split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"{self.path} ({self.label}) = {value!r} is invalid: write {self.what} separated by "
                              f"commas, e.g. {self.example}.") from None


class NumbersField(DimsField):
    """A list of numbers written "0.8, 1.2" (e.g. PBT's perturbation factors)."""

    number, what, example = float, "numbers", "0.8, 1.2"


class OptDimsField(DimsField):
    """Comma-separated whole numbers, empty = None (keep the base config's value)."""

    def from_widget(self, value: Any) -> Any:
        return super().from_widget(value) or None


@dataclass
class RangeField(Field):
    """A ``(low, high)`` pair as two number inputs (keys ``<key>:low`` and ``<key>:high``); ``optional``: a
    checkbox (``<key>:on``) — off = None (e.g. "keep the base config's value, do not search it")."""

    integer: bool = False
    sci: bool = False
    optional: bool = False

    def _num(self, v: Any) -> Any:
        return int(v) if self.integer else float(v)

    def write(self, key: str, value: Any) -> None:
        lo, hi = (list(value) + [None, None])[:2] if value is not None else (None, None)
        st.session_state[f"{key}:low"] = self._num(lo if lo is not None else 0)
        st.session_state[f"{key}:high"] = self._num(hi if hi is not None else 0)
        if self.optional:
            st.session_state[f"{key}:on"] = value is not None

    def has_state(self, key: str) -> bool:
        return f"{key}:low" in st.session_state

    def state_keys(self, key: str) -> list[str]:
        return [f"{key}:low", f"{key}:high"] + ([f"{key}:on"] if self.optional else [])

    def read(self, key: str) -> Any:
        if self.optional and not st.session_state.get(f"{key}:on"):
            return None
        lo, hi = st.session_state.get(f"{key}:low"), st.session_state.get(f"{key}:high")
        if lo is None or hi is None:
            return None
        if hi < lo:
            raise ConfigError(f"{self.path} ({self.label}): the low end ({lo}) is above the high end ({hi}): swap them.")
        return [self._num(lo), self._num(hi)]

    def draw(self, key: str) -> None:
        if self.optional:
            st.checkbox(f"Search {self.label[0].lower()}{self.label[1:]}", key=f"{key}:on", help=self.help)
        else:
            st.caption(self.label, help=self.help)
        c1, c2 = st.columns(2)
        kw = {"step": 1} if self.integer else ({"step": 1e-5, "format": "%.2e"} if self.sci else
                                                {"step": 0.05, "format": "%.3f"})
        c1.number_input("low", key=f"{key}:low", **kw)
        c2.number_input("high", key=f"{key}:high", **kw)


class JsonField(Field):
    """Any other value, written as JSON (a last resort: settings get a proper widget where one fits)."""

    def to_widget(self, value: Any) -> Any:
        return json.dumps(value)

    def from_widget(self, value: Any) -> Any:
        try:
            return json.loads(value) if str(value).strip() else None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{self.path} ({self.label}) = {value!r} is invalid JSON ({exc.msg}): write e.g. 0.5, [1, 4], "
                              "\"text\" or null.") from None


@dataclass
class DatasetField(Field):
    """A dataset saved on the Data page (or the demo data)."""

    two_task_only: bool = False

    def to_widget(self, value: Any) -> Any:
        return value

    def from_widget(self, value: Any) -> Any:
        return value

    def draw(self, key: str) -> None:
        dataset_picker(key, two_task_only=self.two_task_only, label=self.label, help_=self.help)


def dataset_choices(*, two_task_only: bool = False) -> dict[Any, str]:
    """{dataset id or None (the demo): label} from the tracker."""
    choices: dict[Any, str] = {None: "Demo dataset (bundled: topics × sentiment, two tasks)"}
    try:
        datasets = state.tracker().list_datasets()
    except Exception as exc:  # noqa: BLE001
        st.warning(f"Could not list the saved datasets: {plain(exc)}")
        datasets = []
    for d in datasets:
        tasks = d.get("tasks") or []
        if two_task_only and len(tasks) < 2:
            continue
        choices[int(d["id"])] = f"#{d['id']} {d['name']} ({d['rows']} rows; {', '.join(tasks)})"
    return choices


def dataset_picker(key: str, *, two_task_only: bool = False, label: str = "Dataset",
                   help_: str | None = None) -> int | None:
    """A selectbox of the saved datasets + the demo; returns the dataset id (None = the demo)."""
    options = dataset_choices(two_task_only=two_task_only)
    if st.session_state.get(key) not in options:
        st.session_state[key] = None
    # the demo is the option None, which a selectbox shows as its placeholder: give that the demo's label
    return st.selectbox(label, list(options), key=key, format_func=lambda v: options.get(v, str(v)), help=help_,
                        placeholder=options[None])



KINDS: dict[str, Callable[..., Field]] = {
    "text": Field, "bool": BoolField, "int": IntField, "optint": OptIntField, "float": FloatField,
    "optfloat": OptFloatField, "sci": SciField, "dims": DimsField, "json": JsonField,
}


def make_field(path: str, label: str, kind: str = "text", options: tuple = (), help: str | None = None) -> Field:
    """The field class for ``kind`` (text | bool | int | optint | float | optfloat | sci | dims | json | select |
    multiselect | dataset | range | intrange | scirange)."""
    if kind == "select":
        return SelectField(path, label, help, tuple(options))
    if kind == "multiselect":
        return MultiSelectField(path, label, help, tuple(options))
    if kind == "dataset":
        return DatasetField(path, label, help, "two_task" in options)
    if kind in ("range", "intrange", "scirange"):
        return RangeField(path, label, help, integer=kind == "intrange", sci=kind == "scirange")
    if kind not in KINDS:
        raise ValueError(f"unknown field kind {kind!r}: one of {sorted(KINDS) + ['select', 'multiselect']}")
    return KINDS[kind](path, label, help)


# --------------------------------------------------------------------------------------------- engine settings


# settings the forms do not show: where 0 and None mean different things (0 = every trial runs on workers,
# None = no limit) and the setting is for more than one machine (the CLI's --stage2-local-trials; README)
_NOT_ON_FORMS = {"stage2_local_trials", "stage3_local_trials"}

_SCI = {"lambda_low", "lambda_high", "stage1_lambda", "stage1_lr", "lr", "weight_decay", "head_lr",
        "encoder_lr_range", "head_lr_range"}
_OPTIONS = {"poolings": ("cls", "mean"), "activations": None}


def settings_fields(cls: type, path: str = "", skip: tuple[str, ...] = ()) -> list[Field]:
    """Fields for an engine's settings dataclass: human labels and help (the class's ``FORM_TEXT``, beside the
    settings), a checkbox for a
    bool, a number for a number (0 = None for an optional one), a select for a Literal, two numbers for a
    (low, high) range, comma-separated numbers for a list of whole numbers, a multiselect for a list of choices;
    JSON text only where nothing fits. Nested dataclasses are flattened (``space.lr``)."""
    from dact_lib.config import ACTIVATIONS

    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001
        hints = {}
    defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                for f in dataclasses.fields(cls)}  # MISSING for a required field (PipelineConfig.name)
    out: list[Field] = []
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name in _NOT_ON_FORMS:
            continue
        hint = hints.get(f.name, f.type)
        p = f"{path}.{f.name}" if path else f.name
        label, help_ = (getattr(cls, "FORM_TEXT", None) or {}).get(f.name,
                                                                  (f.name.replace("_", " ").capitalize(), ""))
        help_ = help_ or None
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        optional = type(None) in args
        inner = [a for a in args if a is not type(None)]
        sci = f.name in _SCI
        default = defaults.get(f.name)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            out += settings_fields(hint, p)
        elif hint is bool:
            out.append(BoolField(p, label, help_))
        elif hint is int or (optional and inner == [int]):
            out.append((OptIntField if optional else IntField)(p, label, help_))
        elif hint is float or (optional and inner == [float]):
            out.append((OptFloatField if optional else (SciField if sci else FloatField))(p, label, help_))
        elif origin is typing.Literal:
            out.append(SelectField(p, label, help_, tuple(args)))
        elif hint is str:
            out.append(Field(p, label, help_))
        elif optional and len(inner) == 1 and typing.get_origin(inner[0]) is list and \
                typing.get_args(inner[0]) and typing.get_args(inner[0])[0] in (int, float) and f.name != "batch_size":
            num = typing.get_args(inner[0])[0]  # an optional [low, high] range: a checkbox + two numbers
            out.append(RangeField(p, label, help_, integer=num is int, sci=sci, optional=True))
        elif optional and len(inner) == 1 and typing.get_origin(inner[0]) is list:
            out.append(OptDimsField(p, label, help_))
        elif origin in (tuple, list) and (len(args) == 2 and args[1] is not Ellipsis and args[0] in (int, float)
                                          or (origin is list and args and args[0] in (int, float)
                                              and isinstance(default, list) and len(default) == 2
                                              and f.name not in ("batch_sizes",))):
            out.append(RangeField(p, label, help_, integer=args[0] is int, sci=sci))
        elif origin in (tuple, list) and args and args[0] is int:
            out.append(DimsField(p, label, help_))
        elif origin in (tuple, list) and args and args[0] is float:
            out.append(NumbersField(p, label, help_))
        elif origin in (tuple, list) and args and args[0] is str:
            options = _OPTIONS.get(f.name) or (tuple(ACTIVATIONS) if f.name == "activations" else
                                                tuple(default or ()))
            out.append(MultiSelectField(p, label, help_, tuple(options)))
        else:
            out.append(JsonField(p, label, help_))
    return out
