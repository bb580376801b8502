"""Issue 25 (one λ): every exit-related field of the DACT form does what its help text says. Each test reads the
help it checks (a help that changes must change its test) and measures the effect on a tiny model."""
from __future__ import annotations

import numpy as np
import pytest

from dact_lib.config import default_config
from dact_lib.data import TextDataset, split_dataset
from dact_lib.halting import HaltingPoint, choose_point

pytest.importorskip("streamlit")
from ui.forms import model_fields  # noqa: E402


def _help(name: str) -> str:
    (f,) = [f for f in model_fields("dact") if f.path == f"model.{name}"]
    return f.help


def _setting(obj, path: str):
    """The value at dotted ``path`` of a config object; fails the test naming a path that is no setting."""
    for part in path.split("."):
        assert hasattr(obj, part), f"{path} is not a setting"
        obj = getattr(obj, part)
    return obj


def _data(n: int = 160) -> object:
    rng = np.random.default_rng(3)
    words = {0: ["good", "great", "fine", "nice"], 1: ["bad", "awful", "poor", "sad"]}
    labels = [i % 2 for i in range(n)]
    ds = TextDataset(texts=[" ".join(rng.choice(words[c], size=4)) for c in labels],
                     targets={"label": np.array(labels)}, label_maps={"label": ["neg", "pos"]})
    return split_dataset(ds, 0.25, 0.0, 0)


def _train(**model):
    from dact_lib.train import train

    cfg = default_config("dact", encoder="tiny")
    cfg.train.epochs, cfg.train.early_stopping.enabled = 2, False
    cfg.model.exit_refit_epochs, cfg.model.halting_epochs = 0, 3
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return train(cfg.validate(), data=_data(), save=False, evaluate_test=False)


def test_halting_tolerance_larger_means_earlier_exits():
    assert "larger = earlier exits" in _help("halting_tolerance")
    pts = [HaltingPoint(lam=x, spec_lambda=x, avg_exit_layer=e, accuracy=a)
           for x, e, a in ((0.0, 6.0, 0.90), (0.1, 4.0, 0.895), (0.5, 2.5, 0.88), (1.0, 1.2, 0.80))]
    exits = [choose_point(pts, tol).avg_exit_layer for tol in (0.0, 0.5, 2.0, 10.0)]
    assert exits == sorted(exits, reverse=True) and exits[0] > exits[-1]


def test_the_training_lambda_decides_the_exits_only_without_the_halting_fit():
    help_ = _help("ponder_lambda")
    assert "only with 'Fit the halting units after training' off" in help_ and "larger = earlier exits" in help_
    # off: the trained units decide; a large λ halts earlier than none — measured as the ponder cost (the expected
    # depth the units give; the tiny encoder's 2 layers are too unsure for the rule to exit at layer 1 either way)
    low, high = (_train(fit_halting=False, ponder_lambda=lam).best_metrics for lam in (0.0, 50.0))
    assert high["val_ponder"] < low["val_ponder"] and high["val_avg_exit_layer"] <= low["val_avg_exit_layer"]
    # on (the default): the units the model keeps are the chosen point's, whatever λ trained them
    assert default_config("dact").model.fit_halting is True
    res = _train(ponder_lambda=1e-3)
    rep = res.report["halting"]
    assert rep["chosen"] and rep["tolerance_points"] == default_config("dact").model.halting_tolerance
    assert res.best_metrics["val_avg_exit_layer"] == pytest.approx(rep["chosen"]["val_avg_exit_layer"], abs=1e-6) or \
        not rep.get("cross_fitted")


def test_exit_refit_zero_is_off():
    assert "0 = off" in [f.label for f in model_fields("dact") if f.path == "model.exit_refit_epochs"][0]
    assert _train(exit_refit_epochs=0, fit_halting=False).report.get("exit_refit") is None
    on = _train(exit_refit_epochs=2, fit_halting=False).report["exit_refit"]
    assert on["epochs"] == 2 and len(on["val_history"]) == 2


def test_fit_halting_off_keeps_the_trained_units():
    res = _train(fit_halting=False)
    assert res.report.get("halting") is None


def test_every_model_form_field_comes_from_the_config_and_names_a_real_setting():
    """Issue 25 (item 4): the model forms are generated from the model configs' FORM (label, help, widget,
    choices beside the settings); every path is a setting, and a select offers exactly what validation accepts."""
    from dact_lib import config as C

    for kind, cls in (("backbone", C.BackboneModelConfig), ("dact", C.DactModelConfig),
                      ("multitask", C.MultiTaskModelConfig)):
        fields = model_fields(kind)
        assert [(f.path, f.label, f.help) for f in fields] == [(f"model.{x.path}", x.label, x.help) for x in cls.FORM]
        obj = cls()
        for x in cls.FORM:
            value = _setting(obj, x.path)
            if x.kind == "select":
                assert value in x.choices
                for choice in x.choices:  # each choice validates
                    c = C.default_config(kind)
                    *head, last = x.path.split(".")
                    setattr(_setting(c.model, ".".join(head)) if head else c.model, last, choice)
                    c.validate()
            assert x.help, f"{kind}: {x.path} has no help"


def test_the_run_fields_come_from_the_run_config():
    """Issue 25 (item 4): the run settings of every launch form are generated from RunConfig.FORM; each path is a
    setting of the run config, and the multi-task form's dataset picker offers two-task datasets only."""
    from dact_lib.config import RunConfig
    from ui.forms import run_fields

    fields = run_fields("backbone")
    assert [(f.path, f.label) for f in fields] == [(x.path, x.label) for x in RunConfig.FORM]
    cfg = RunConfig()
    for x in RunConfig.FORM:
        _setting(cfg, x.path)
        assert x.help
    (multi,) = [f for f in run_fields("multitask") if f.path == "data.dataset_id"]
    assert multi.two_task_only and "two-task" in multi.help


def test_every_engine_setting_on_a_form_carries_its_label_and_help():
    """Issue 25 (item 4): the engines' settings labels were one name-keyed table in ui/fields.py (a name shared by
    two engines got one text); each settings dataclass now carries FORM_TEXT for its own fields."""
    import dataclasses

    from dact_lib.tuning.backbone import BackboneSpace
    from dact_lib.tuning.dact_pipeline.settings import PipelineConfig
    from dact_lib.tuning.pbt import PBTConfig, PBTSpace
    from ui.fields import _NOT_ON_FORMS

    for cls in (PipelineConfig, PBTConfig, PBTSpace, BackboneSpace):
        for f in dataclasses.fields(cls):
            if f.name in _NOT_ON_FORMS or f.name in ("name", "space"):
                continue
            label, help_ = cls.FORM_TEXT[f.name]
            assert label and help_, (cls.__name__, f.name)
    assert PBTConfig.FORM_TEXT["epochs"][0] != BackboneSpace.FORM_TEXT["epochs"][0]  # not the search range's text
