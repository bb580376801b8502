"""Evaluation shared by every model: metrics on an encoded split, evaluation of a saved run, exit-policy sweeps."""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

from . import dact
from .data import EncodedDataset, iter_batches


@dataclass
class EvalResult:
    loss: float
    task_losses: dict[str, float]
    probs: dict[str, np.ndarray]  # task -> [n, K]
    targets: dict[str, np.ndarray]  # task -> [n]
    exit_layer: np.ndarray | None = None  # DACT: [n] 1-based, under the DACT rule
    extras: dict[str, float] = field(default_factory=dict)

    def preds(self, task: str) -> np.ndarray:
        return self.probs[task].argmax(-1)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (CUDA with bf16 support; a CPU with AVX-512 BF16 or AMX-BF16)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` → ``"bf16"`` where :func:`native_bf16`, else ``"fp32"``; ``"fp16"`` → ``"fp32"`` off CUDA (a
    model trained in fp16 on a GPU is evaluated on a CPU in fp32; training there is refused, :func:`check_precision`);
    other values unchanged. The DACT accumulation and halting maths run in fp32 either way (modeling_dact casts
    h_n and a_n to float)."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "fp16" and device.type != "cuda":
        return "fp32"
    return precision


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse ``train.precision = "fp16"`` for a training on anything but CUDA (CPU autocast in fp16 is slow and
    has no gradient scaler): a :class:`~dact_lib.errors.ConfigError` naming the fix, before any run is recorded."""
    if precision == "fp16" and device.type != "cuda":
        from .errors import ConfigError

        raise ConfigError(f"train.precision = 'fp16' is invalid on {device.type}: fp16 training needs a CUDA GPU "
                          "(autocast fp16 + a gradient scaler, for GPUs without bf16 such as the T4 or V100). On "
                          "this machine use 'fp32', or 'bf16' / 'auto' where the CPU has native bf16.")


def autocast_for(device: torch.device, precision: str):
    precision = resolve_precision(precision, device)
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp16":  # CUDA only (resolve_precision): the caller scales the loss (train_step's GradScaler)
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return nullcontext()


def grad_scaler_for(device: torch.device, precision: str):
    """A ``torch.amp.GradScaler`` for an fp16 training on CUDA, else None (bf16 and fp32 need no loss scaling)."""
    if resolve_precision(precision, device) != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


@torch.no_grad()
def evaluate_encoded(model, enc: EncodedDataset, batch_size: int = 64, device: torch.device | None = None,
                     precision: str = "fp32") -> EvalResult:
    """Run ``model`` (eval mode) over ``enc``; return losses, probabilities and (DACT) exit layers in file order.
    Batches are cut from rows of similar length (``group_by_length``: 2.0–2.4× faster than file-order batches on
    SST-2, docs/benchmarks.md) and the outputs put back in file order."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    n_total, loss_sum = 0, 0.0
    task_loss_sum: dict[str, float] = {}
    probs: dict[str, list] = {}
    exits: list[torch.Tensor] = []
    ponder_sum = 0.0
    order: list[torch.Tensor] = []
    for batch in iter_batches(enc, batch_size, shuffle=False, group_by_length=True):
        order.append(batch["index"])
        ids, am = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        targets = {t: v.to(device) for t, v in batch["targets"].items()}
        with autocast_for(device, precision):
            out = model(ids, am, targets)
        b = ids.shape[0]
        n_total += b
        loss_sum += float(out.loss) * b
        for t, v in out.task_losses.items():
            task_loss_sum[t] = task_loss_sum.get(t, 0.0) + float(v) * b
        for t, p in out.probs.items():
            probs.setdefault(t, []).append(p.float().cpu())
        if "exit_layer" in out.extras:
            exits.append(out.extras["exit_layer"].cpu())
            ponder_sum += float(out.extras["ponder"].sum())
    model.train(was_training)
    rows = torch.cat(order) if order else torch.zeros(0, dtype=torch.long)

    def in_file_order(parts: list[torch.Tensor]) -> np.ndarray:
        out = torch.cat(parts)
        placed = torch.empty_like(out)
        placed[rows] = out
        return placed.numpy()

    res = EvalResult(
        loss=loss_sum / max(n_total, 1),
        task_losses={t: v / max(n_total, 1) for t, v in task_loss_sum.items()},
        probs={t: in_file_order(v) for t, v in probs.items()},
        targets={t: enc.targets[t].numpy() for t in probs},
    )
    if exits:
        res.exit_layer = in_file_order(exits)
        res.extras["ponder"] = ponder_sum / max(n_total, 1)
    return res


def metrics_of(res: EvalResult, prefix: str = "val_") -> dict[str, float]:
    """Flat metric dict: loss, accuracy, macro-F1 (per task as ``name/task`` when there are several tasks; the
    unsuffixed accuracy/F1 is then the mean over tasks), average exit layer for DACT."""
    out = {f"{prefix}loss": res.loss}
    accs, f1s = [], []
    multi = len(res.probs) > 1
    for task in res.probs:
        y, p = res.targets[task], res.preds(task)
        acc = float(accuracy_score(y, p))
        f1 = float(f1_score(y, p, average="macro", labels=np.arange(res.probs[task].shape[1]), zero_division=0))
        accs.append(acc)
        f1s.append(f1)
        if multi:
            out[f"{prefix}accuracy/{task}"] = acc
            out[f"{prefix}macro_f1/{task}"] = f1
            out[f"{prefix}loss/{task}"] = res.task_losses.get(task, float("nan"))
    out[f"{prefix}accuracy"] = float(np.mean(accs))
    out[f"{prefix}macro_f1"] = float(np.mean(f1s))
    if res.exit_layer is not None:
        out[f"{prefix}avg_exit_layer"] = float(res.exit_layer.mean())
        out[f"{prefix}ponder"] = res.extras.get("ponder", float("nan"))
        nll = res.task_losses.get(next(iter(res.probs)))
        if nll is not None:
            out[f"{prefix}nll"] = nll
    return out


def full_report(res: EvalResult, label_maps: dict[str, list[str]]) -> dict:
    """Accuracy, macro-F1, confusion matrix and per-class report for every task (+ exit-layer histogram)."""
    report: dict = {"tasks": {}}
    for task in res.probs:
        names = label_maps[task]
        y, p = res.targets[task], res.preds(task)
        labels = np.arange(len(names))
        report["tasks"][task] = {
            "accuracy": float(accuracy_score(y, p)),
            "macro_f1": float(f1_score(y, p, average="macro", labels=labels, zero_division=0)),
            "labels": names,
            "confusion_matrix": confusion_matrix(y, p, labels=labels).tolist(),
            "per_class": classification_report(y, p, labels=labels, target_names=names, output_dict=True,
                                               zero_division=0),
        }
    if res.exit_layer is not None:
        report["avg_exit_layer"] = float(res.exit_layer.mean())
        vals, counts = np.unique(res.exit_layer, return_counts=True)
        report["exit_histogram"] = {int(v): int(c) for v, c in zip(vals, counts)}
    return report


# --- exit-policy comparison on one trained DACT model -------------------------------------------------------

ENTROPY_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def entropy_thresholds(num_classes: int) -> list[float]:
    """The entropy sweep scaled to the maximum entropy ln K: S = f · ln K for f in ENTROPY_FRACTIONS (for K = 2,
    0.014 … 0.66 nats; for K = 4, 0.028 … 1.32 nats), so the earliest point exits early for every K."""
    k = max(int(num_classes), 2)
    return [round(f * math.log(k), 6) for f in ENTROPY_FRACTIONS]


def default_sweep(num_layers: int, num_classes: int = 2) -> list[tuple[str, float | int | None]]:
    """The DACT rule, patience t = 1..N (t = N never exits early: the counter reaches at most N-1), entropy
    thresholds scaled with ln K (:func:`entropy_thresholds`), fixed depth k = 1..N."""
    points: list[tuple[str, float | int | None]] = [("dact", None)]
    points += [("patience", t) for t in range(1, num_layers + 1)]
    points += [("entropy", s) for s in entropy_thresholds(num_classes)]
    points += [("fixed", k) for k in range(1, num_layers + 1)]
    return points


MIN_TIMED_ITEMS = 5  # a deadline never cuts the timing below this many items per caller


@torch.no_grad()
def interleaved_latencies(callers: dict, items: list, deadline: float | None = None) -> dict:
    """Seconds per item of every caller, all callers interleaved per item (the order rotated per item), after one
    warm-up call each: a machine's load shifts every caller alike, so their ratios hold (timing one caller after
    another under load put the DACT rule 2.4× *slower* than full depth where interleaved it was ≈3× faster).
    ``deadline`` (``time.monotonic()``): no new item once it has passed (after :data:`MIN_TIMED_ITEMS`); every
    caller then has the same items."""
    names = list(callers)
    for name in names:
        callers[name](items[0])
    lat: dict = {n: [] for n in names}
    for i, item in enumerate(items):
        if deadline is not None and i >= MIN_TIMED_ITEMS and time.monotonic() >= deadline:
            break
        k = i % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            callers[name](item)
            lat[name].append(time.perf_counter() - t0)
    return lat


def quantile_of(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def exit_policy_sweep(model, enc: EncodedDataset, points=None, batch_size: int = 64, timed: bool = False,
                      device: torch.device | None = None, latency_rows: int = 100, seed: int = 0,
                      deadline: float | None = None) -> list[dict]:
    """Evaluate one trained DactBert under several exit policies. Accuracy and average exit layer come from one
    full pass (the policies are simulated exactly on the per-layer outputs). ``timed``: each policy's batch-1
    latency with real early exit (``model.infer(..., trace=False)``) on a seeded sample of ``latency_rows`` rows,
    every policy interleaved per sentence (:func:`interleaved_latencies`, fewer rows when ``deadline`` comes first):
    ``latency_ms_p50``, ``latency_ms_p90``, ``latency_rows``."""
    model.eval()
    device = device or next(model.parameters()).device
    points = points or default_sweep(model.num_layers, model.num_classes)
    ys, hs, targets = [], [], []
    for batch in iter_batches(enc, batch_size, group_by_length=True):  # y, h and targets in the same order
        out = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        ys.append(out.extras["y"].cpu())
        hs.append(out.extras["h"].cpu())
        targets.append(batch["targets"][model.task])
    y, h, tgt = torch.cat(ys), torch.cat(hs), torch.cat(targets)
    rows = []
    policies = []
    for name, value in points:
        policy = dact.make_policy(name, value)
        policies.append(policy)
        res = dact.run_policy_offline(policy, y, h)
        rows.append({"policy": name, "value": value, "avg_exit_layer": float(res.exit_layer.float().mean()),
                     "accuracy": float((res.probs.argmax(-1) == tgt).float().mean())})
    if timed and len(enc):
        import random

        picked = random.Random(seed).sample(range(len(enc)), min(int(latency_rows), len(enc)))
        items = []
        for i in picked:  # one sentence, unpadded: what a caller of the model at batch 1 runs
            ids = torch.tensor([enc.input_ids[i]], dtype=torch.long, device=device)
            items.append((ids, torch.ones_like(ids)))

        def caller(policy):
            return lambda item: model.infer(item[0], item[1], policy, trace=False)

        with torch.no_grad():
            lat = interleaved_latencies({i: caller(p) for i, p in enumerate(policies)}, items, deadline=deadline)
        for i, row in enumerate(rows):
            row["latency_ms_p50"] = 1e3 * float(np.median(lat[i]))
            row["latency_ms_p90"] = 1e3 * quantile_of(lat[i], 0.9)
            row["latency_rows"] = len(lat[i])
    return rows


def pareto_front(points: list[dict], x: str = "avg_exit_layer", y: str = "accuracy") -> list[dict]:
    """Points not dominated (lower ``x`` and higher ``y`` are better)."""
    front = []
    for p in points:
        dominated = any(q[x] <= p[x] and q[y] >= p[y] and (q[x] < p[x] or q[y] > p[y]) for q in points)
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: p[x])
