"""The experiment tracker: ``experiments.db`` in the home, through sqlite-utils.

``store`` (the :class:`Tracker`: connections, transactions, datasets, runs, metrics, events, artifacts),
``schema`` (tables, indexes, how values are stored), ``liveness`` (the runs this process executes; whether a
recorded process is alive), ``callback`` (:class:`TrackerCallback`, the training loop's link). See
:mod:`dact_lib.tracker.store` for the concurrency model.
"""
from __future__ import annotations

from . import liveness
from .callback import TrackerCallback
from .liveness import hostname, pid_alive
from .store import (ACTIVE_STATUSES, BUSY_TIMEOUT_S, METRIC_COLUMNS, STATUSES, TERMINAL_STATUSES, Tracker,
                    run_params, run_scores)

__all__ = ["Tracker", "TrackerCallback", "liveness", "pid_alive", "hostname", "STATUSES", "ACTIVE_STATUSES",
           "TERMINAL_STATUSES", "METRIC_COLUMNS", "BUSY_TIMEOUT_S", "run_scores", "run_params"]
