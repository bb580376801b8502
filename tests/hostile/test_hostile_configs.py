"""Hostile config values (issue 27, item 7): every numeric field of every config — the run configs of the three
kinds, the pipeline's and PBT's settings — set to values the code cannot take (a 64-bit overflow, 1e308, inf, NaN,
-1) is either refused by ``validate()`` with a ConfigError that names the field, or a value the code takes. Never
another exception, never an accepted value that fails later (2**64 seeds and ids, 1e308 loss weights did)."""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest

from dact_lib.config import default_config
from dact_lib.errors import ConfigError

HOSTILE = (2**64, 10**30, 1e308, float("inf"), float("nan"), -1)
# fields whose hostile values are legitimately accepted (a bias may be any finite number, negative included)
ACCEPT = {("model.halting_bias_init", -1)}


def numeric_fields(obj, prefix=""):
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            yield from numeric_fields(v, prefix + f.name + ".")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield prefix + f.name


def set_path(obj, path, value):
    *head, last = path.split(".")
    for p in head:
        obj = getattr(obj, p)
    setattr(obj, last, value)


def pipeline_settings():
    from dact_lib.tuning.dact_pipeline import PipelineConfig

    return PipelineConfig(name="hostile")


def pbt_settings():
    from dact_lib.tuning.pbt import PBTConfig

    return PBTConfig()


CONFIGS = {"dact": lambda: default_config("dact"), "backbone": lambda: default_config("backbone"),
           "multitask": lambda: default_config("multitask"), "pipeline": pipeline_settings, "pbt": pbt_settings}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_every_numeric_field_refuses_what_the_code_cannot_take(kind):
    base = CONFIGS[kind]()
    fields = list(numeric_fields(base))
    assert fields
    accepted = []
    for path in fields:
        for bad in HOSTILE:
            cfg = copy.deepcopy(base)
            set_path(cfg, path, bad)
            try:
                cfg.validate()
            except ConfigError as exc:
                assert path.split(".")[-1] in str(exc), (path, bad, str(exc))  # the message names the field
                continue
            # anything else than ConfigError propagates and fails the test
            if (path, bad) not in ACCEPT:
                accepted.append((path, bad))
    assert accepted == [], f"accepted hostile values: {accepted}"


def test_the_tolerated_values_are_finite_and_sane():
    cfg = default_config("dact")
    cfg.model.halting_bias_init = -1
    assert cfg.validate().model.halting_bias_init == -1 and math.isfinite(cfg.model.halting_bias_init)
