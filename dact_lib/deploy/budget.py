"""A latency budget: the most accurate exit point whose batch-1 latency, measured on this machine with the runtime
that will serve it, is within the budget.

The candidate points of a DACT model are exit policies, so they run on every runtime (PyTorch, the ONNX runtime
fp32 or int8): the DACT rule with the model's installed halting units, the entropy sweep
(``evaluate.entropy_thresholds``) and the full depth (``fixed:N``). Each point's accuracy and average exit come
from the run's validation split (at most ``ACCURACY_ROWS`` rows, seeded) as that runtime answers it: for PyTorch
every layer's y_n and h_n once, then every policy offline (the same numbers the online loop gives); for ONNX
Runtime each policy run on the split (int8 moves some answers and exits). Latency is measured per sentence on a
seeded sample of that split, every point interleaved per sentence, 1 thread. A backbone or multi-task model has one
point, the model itself.

:func:`pick` is the choice on a measured front (pure); :func:`measure_front` measures; :func:`choose_for_budget`
does both and says which point it took and its numbers, or that none fits.
"""
from __future__ import annotations

import math
import random
import statistics
import threading
from typing import Any, Callable, Sequence

from ..errors import ConfigError
from .policy import format_policy

LATENCY_ROWS = 40
_MEASURING = threading.Lock()
ACCURACY_ROWS = 2000


def check_budget(budget_ms: Any) -> float:
    try:
        value = float(budget_ms)
    except (TypeError, ValueError):
        raise ConfigError(f"latency budget {budget_ms!r} is not a number: give milliseconds, e.g. 5.") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"latency budget {budget_ms!r}: give a number of milliseconds > 0, e.g. 5.")
    return value


def pick(points: list[dict], budget_ms: float) -> dict | None:
    """The most accurate point with ``latency_ms_p50 <= budget_ms`` (ties: the faster, then the earlier exit);
    None when no point fits."""
    budget_ms = check_budget(budget_ms)
    fits = [p for p in points if p.get("latency_ms_p50") is not None and p["latency_ms_p50"] <= budget_ms]
    if not fits:
        return None
    return max(fits, key=lambda p: (p["accuracy"], -p["latency_ms_p50"], -(p.get("avg_exit_layer") or 0.0)))


def describe(point: dict) -> str:
    exit_txt = f", exit {point['avg_exit_layer']:.2f} layers" if point.get("avg_exit_layer") is not None else ""
    return (f"{point['policy']} (validation accuracy {100 * point['accuracy']:.2f}%{exit_txt}, batch-1 latency "
            f"p50 {point['latency_ms_p50']:.2f} ms, p90 {point['latency_ms_p90']:.2f} ms on {point['runtime']})")


def message_for(chosen: dict | None, points: list[dict], budget_ms: float) -> str:
    if chosen is not None:
        return f"Latency budget {budget_ms:g} ms: the most accurate point that fits is {describe(chosen)}."
    fastest = min(points, key=lambda p: p["latency_ms_p50"]) if points else None
    if fastest is None:
        return f"Latency budget {budget_ms:g} ms: no point was measured."
    hint = "" if fastest.get("runtime") == "onnxruntime-int8" else ", or measure on the int8 runtime (--format onnx --int8)"
    return (f"Latency budget {budget_ms:g} ms: no point fits — the fastest is {describe(fastest)}. Raise the "
            f"budget to at least {fastest['latency_ms_p50']:.2f} ms{hint}.")


def candidate_policies(num_layers: int, num_classes: int) -> list[str]:
    from ..evaluate import entropy_thresholds

    return (["dact"] + [format_policy("entropy", s) for s in entropy_thresholds(num_classes)]
            + [format_policy("fixed", num_layers)])


def _offline_points(loaded, ds, policies: list[str]) -> dict[str | None, dict]:
    """Accuracy and average exit of each policy on ``ds``: ``evaluate.exit_policy_sweep`` (every layer's y_n, h_n
    once, the policies simulated exactly on them), untimed."""
    import torch

    from ..data import encode
    from ..evaluate import exit_policy_sweep
    from .policy import parse_policy

    enc = encode(ds, loaded.tokenizer, loaded.config.data.max_seq_len)
    with torch.no_grad():
        rows = exit_policy_sweep(loaded.model, enc, points=[parse_policy(p) for p in policies], timed=False,
                                 device=loaded.device)
    return {p: {"accuracy": r["accuracy"], "avg_exit_layer": r["avg_exit_layer"]} for p, r in zip(policies, rows)}


def _runtime_points(model, ds, policies: Sequence[str | None], loaded) -> dict:
    """Accuracy and average exit of each policy on ``ds`` as the ONNX runtime answers (batches of 32)."""
    task = model.tasks[0]
    gold = [loaded.label_maps[task][int(t)] for t in ds.targets[task]]
    out = {}
    for pol in policies:
        preds = model.predict(list(ds.texts), policy=pol, batch_size=32)
        exits = [p["exit_layer"] for p in preds if "exit_layer" in p]
        out[pol] = {"accuracy": sum(p["label"] == g for p, g in zip(preds, gold)) / len(gold),
                    "avg_exit_layer": sum(exits) / len(exits) if exits else None}
    return out


def measure_front(run, *, runtime: str = "torch", int8: bool = False, home=None, latency_rows: int = LATENCY_ROWS,
                  accuracy_rows: int = ACCURACY_ROWS, seed: int = 0) -> list[dict]:
    """Every candidate point of ``run`` with its validation accuracy, average exit and batch-1 latency (ms, p50 and
    p90) on ``runtime`` ("torch", or "onnx" with ``int8``). Latency: 1 thread, ``latency_rows`` sentences."""
    with _MEASURING:  # one measurement at a time per process: it sets torch's thread count for its duration
        return _measure_front(run, runtime=runtime, int8=int8, home=home, latency_rows=latency_rows,
                              accuracy_rows=accuracy_rows, seed=seed)


def _measure_front(run, *, runtime: str, int8: bool, home, latency_rows: int, accuracy_rows: int,
                   seed: int) -> list[dict]:
    import torch

    from ..evaluate import interleaved_latencies, quantile_of
    from ..exits import split_of_run
    from ..modeling_dact import DactBert
    from ..models import load_model
    from .predictor import load_predictor

    loaded = load_model(run, home, device="cpu")
    ds, _ = split_of_run(loaded, "val", home)
    rng = random.Random(seed)
    if len(ds.texts) > accuracy_rows:
        keep = sorted(rng.sample(range(len(ds.texts)), accuracy_rows))
        ds = ds.subset(keep) if hasattr(ds, "subset") else ds
    sample = rng.sample(list(ds.texts), min(latency_rows, len(ds.texts)))
    policies: Sequence[str | None]
    offline: dict[str | None, dict]
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if isinstance(loaded.model, DactBert):  # kind "dact"
            policies = candidate_policies(loaded.model.num_layers, loaded.model.num_classes)
            offline = _offline_points(loaded, ds, policies)
        else:
            policies = [None]
            preds = load_predictor(run, home=home, runtime="torch").predict(list(ds.texts))
            task = loaded.config.data.task or next(iter(loaded.label_maps))
            gold = [loaded.label_maps[task][int(t)] for t in ds.targets[task]]
            offline = {None: {"accuracy": sum(p["label"] == g for p, g in zip(preds, gold)) / len(gold),
                              "avg_exit_layer": None}}
        runtime_name = "pytorch" if runtime == "torch" and not int8 else ("onnxruntime-int8" if int8
                                                                          else "onnxruntime-fp32")
        callers: dict[str | None, Callable[[str], Any]] = {}
        if runtime == "torch" and not int8:
            callers = _torch_callers(loaded, policies)
        else:
            from .predictor import onnx_cache
            from .runtime import OnnxModel

            model = OnnxModel(onnx_cache(loaded.run_dir), int8=bool(int8), threads=1)
            for pol in policies:
                callers[pol] = (lambda m, p: (lambda t: m.predict([t], policy=p)))(model, pol)
            offline = _runtime_points(model, ds, policies, loaded)  # int8 moves answers: measured, not assumed
        lat = interleaved_latencies(callers, sample)
    finally:
        torch.set_num_threads(old_threads)
    points = []
    for pol in policies:
        xs = lat[pol]
        points.append({"policy": pol or "full model", **offline[pol], "latency_ms_p50": 1e3 * statistics.median(xs),
                       "latency_ms_p90": 1e3 * quantile_of(xs, 0.9), "runtime": runtime_name, "latency_rows": len(xs)})
    return points


def _torch_callers(loaded, policies: Sequence[str | None]) -> dict:
    import torch

    from .. import dact
    from .policy import parse_policy

    model, tok, max_len = loaded.model, loaded.tokenizer, loaded.config.data.max_seq_len

    def make(pol):
        policy = dact.make_policy(*parse_policy(pol)) if pol is not None else None

        @torch.no_grad()
        def call(text):
            enc = tok([text], truncation=True, max_length=max_len, return_tensors="pt")
            if policy is not None:
                return model.infer(enc["input_ids"], enc["attention_mask"], policy, trace=False)
            return model(enc["input_ids"], enc["attention_mask"])

        return call

    return {pol: make(pol) for pol in policies}


def choose_for_budget(run, budget_ms, *, runtime: str = "torch", int8: bool = False, home=None,
                      latency_rows: int = LATENCY_ROWS) -> dict:
    """Measure ``run``'s front on ``runtime`` and pick the most accurate point within ``budget_ms``. Returns
    ``policy`` (text, None when nothing fits or the model has no exit policy), ``point``, ``points``, ``message``."""
    budget = check_budget(budget_ms)
    points = measure_front(run, runtime=runtime, int8=int8, home=home, latency_rows=latency_rows)
    chosen = pick(points, budget)
    policy = chosen["policy"] if chosen is not None and chosen["policy"] != "full model" else None
    return {"policy": policy, "point": chosen, "points": points, "message": message_for(chosen, points, budget),
            "budget_ms": budget}
