"""The engines, behind one interface.

An engine runs many trainings (through the one loop, :func:`dact_lib.train.train`) as one parent run: Optuna
tuning of a backbone, the staged DACT pipeline, Population Based Training. Each is described by an
:class:`Engine`: the RunConfig kinds it accepts, its settings class (one typed dataclass with ``from_dict`` →
validated object) and the module whose ``run_engine(cfg, settings, ctx)`` runs it; every result has
``summary()``. The job manager (:mod:`dact_lib.jobs`) starts engines only through this module, so a new engine
is one entry in :data:`ENGINES`. The CLI (:mod:`dact_lib.tuning.cli`) builds and validates an engine's settings
through it (:meth:`Engine.settings`) but calls the engine modules' own entry points (``tune_backbone``,
``run_pipeline``, ``run_pbt``, and ``run_pbt_ray`` for ``pbt --backend ray``, which has no entry here).

    engine = get_engine("pbt")
    settings = engine.settings({"population": 4})        # or {"pbt": {...}}: validated once
    result = engine.run(cfg, settings, EngineContext(tracker=Tracker()))

Engine modules are imported when an engine is used, so the dashboard starts without loading them all.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from .callbacks import Callback, CancelToken
from .errors import ConfigError, DactLabError

TRAIN_KINDS = ("backbone", "dact", "multitask")


class EngineSettings(Protocol):
    """What an engine's settings class is: a dataclass that round-trips through a dict (PBTConfig,
    PipelineConfig, BackboneSpace, …)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]: ...

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any: ...


@dataclass
class EngineContext:
    """Where an engine runs: the tracker (and its home), the cancel token, callbacks for every training, and —
    from a job manager — the queued parent run to use (``run_id``) and whether to continue it (``resume``)."""

    tracker: Any
    cancel: CancelToken = field(default_factory=CancelToken)
    callbacks: list[Callback] = field(default_factory=list)
    run_id: int | None = None
    resume: bool = False

    @property
    def home(self):
        return self.tracker.home


@dataclass(frozen=True)
class Engine:
    kind: str  # the parent run's kind and the job kind
    module: str  # holds run_engine(cfg, settings, ctx) and the settings class
    settings_class: str
    #: the option that holds the settings in a job's options / a config download (None: the options *are* the
    #: settings, as for the backbone study: {"trials": 10, "space": {...}})
    settings_key: str | None
    run_kinds: tuple[str, ...]  # RunConfig kinds it trains
    resumable: bool = False  # JobManager.resume / the Resume button

    def _module(self):
        return importlib.import_module(self.module)

    @property
    def settings_type(self) -> type[EngineSettings]:
        return getattr(self._module(), self.settings_class)

    def settings(self, options: dict | None = None) -> Any:
        """The validated settings object of job ``options``: ``{settings_key: {...}}`` and/or the settings'
        fields at the top level (``{"population": 4}``; top-level fields win). Unknown options raise
        :class:`ConfigError` naming the allowed ones."""
        cls = self.settings_type
        options = dict(options or {})
        names = {f.name for f in dataclasses.fields(cls)}
        reserved = {"config", "home", "tracker", "cancel", "callbacks", "run_id", "resume"}
        for key in options:
            if key in reserved:
                raise ConfigError(f"option {key!r} is set by the job manager; remove it from the options.")
        values: dict[str, Any] = {}
        if self.settings_key is not None and self.settings_key in options:
            nested = options.pop(self.settings_key)
            if isinstance(nested, cls):
                nested = nested.to_dict()
            if nested is not None and not isinstance(nested, dict):
                raise ConfigError(f"{self.settings_key} must be a mapping of settings, got {nested!r}.")
            values.update(nested or {})
        unknown = sorted(k for k in options if k not in names)
        if unknown:
            allowed = sorted(names | ({self.settings_key} if self.settings_key else set()))
            raise ConfigError(f"Unknown option {unknown[0]!r} for {self.kind}: allowed are {allowed}.")
        values.update(options)
        try:
            return cls.from_dict(values)
        except TypeError as exc:  # a required setting without a default (PipelineConfig.name)
            raise ConfigError(f"{self.settings_key or self.kind}: {exc}; give it in the options.") from None

    def options(self, settings: Any) -> dict:
        """The job options (and config download) that give back ``settings``."""
        d = settings.to_dict()
        return {self.settings_key: d} if self.settings_key else d

    def check_config(self, cfg) -> None:
        if cfg.kind not in self.run_kinds:
            raise ConfigError(f"kind = {cfg.kind!r} cannot run as {self.kind!r}: it trains configs of kind "
                              f"{' or '.join(repr(k) for k in self.run_kinds)}.")

    def run(self, cfg, settings: Any, ctx: EngineContext) -> Any:
        """Run the engine; the result has ``summary()`` (the ids and best values a parent run records)."""
        if ctx.resume and not self.resumable:
            raise DactLabError(f"the {self.kind!r} engine cannot resume a run.")
        return self._module().run_engine(cfg, settings, ctx)


ENGINES: dict[str, Engine] = {e.kind: e for e in (
    Engine("tune-backbone", "dact_lib.tuning.backbone", "BackboneTuneConfig", None, ("backbone",)),
    Engine("dact-pipeline", "dact_lib.tuning.dact_pipeline", "PipelineConfig", "pipeline", ("dact", "backbone")),
    Engine("pbt", "dact_lib.tuning.pbt_engine", "PBTConfig", "pbt", TRAIN_KINDS, resumable=True),
)}
ENGINE_KINDS = tuple(ENGINES)


def get_engine(kind: str) -> Engine:
    try:
        return ENGINES[kind]
    except KeyError:
        raise DactLabError(f"unknown engine {kind!r}: expected one of {', '.join(ENGINES)}.") from None
