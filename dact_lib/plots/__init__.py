"""Plotly figure builders for the dashboard pages (and anything else that wants a figure). No streamlit here.

One module per subject — ``curves`` (training curves), ``compare`` (settings and results of several runs, seeds
grouped), ``pbt`` (members, hyperparameters, lineage), ``pareto`` (the λ / exit / accuracy trade-off), ``exits``
(per-sample exit depth) — over ``base`` (colours, downsampling).
Every builder takes plain data — a long-format metrics frame (``run_id, step, epoch, name, value, time``) as
:meth:`Tracker.get_metrics` returns it, lists of dicts or of front points (``dact_lib.front``), arrays — and
returns a ``plotly.graph_objects.Figure``; what a page reads from the tracker to get that data lives elsewhere
(``dact_lib.progress`` for progress and ETA, ``dact_lib.tuning.dact_pipeline.view`` for a pipeline's points). Long
series are thinned to at most ``max_points`` points per trace by :func:`downsample` (min/max per bucket, so spikes
survive), which keeps the page fast however long a run was.
"""
from __future__ import annotations

from .base import MAX_POINTS, POLICY_COLOURS, POLICY_LABELS, colour, downsample, downsample_index
from .compare import (compare_table, grouped_curves_figure, latest_values, parallel_coordinates_figure,
                      seed_groups)
from .curves import EXIT_NAME, LOSS_NAMES, config_diff, curve_metric, curves_figure, ema, metric_figure
from .exits import accuracy_per_layer, exit_histogram, trace_figure
from .pareto import exit_policy_figure, front_mask, lambda_pareto_figure
from .pbt import (HP_NAMES, exploit_edges, hp_trajectories, lineage_figure, member_labels,
                  pbt_member_curves, resolve_member)

__all__ = ["compare_table", "latest_values", "grouped_curves_figure", "parallel_coordinates_figure", "seed_groups",
           "MAX_POINTS",
           "POLICY_COLOURS", "POLICY_LABELS", "colour", "downsample", "downsample_index", "EXIT_NAME",
           "LOSS_NAMES", "config_diff", "curve_metric", "curves_figure", "ema", "metric_figure", "accuracy_per_layer",
           "exit_histogram", "exit_policy_figure", "front_mask", "lambda_pareto_figure", "HP_NAMES",
           "exploit_edges", "hp_trajectories", "lineage_figure", "member_labels", "pbt_member_curves",
           "resolve_member", "trace_figure"]
