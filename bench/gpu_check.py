"""GPU readiness (issue 26, item 8): train, export, serve on CUDA and check the exits equal the CPU path's.

On a machine with a CUDA device it

1. trains a backbone and a DACT model (the bundled encoder, 300 demo rows, a few steps) with ``train.precision``
   bf16 (skipped where the GPU has no bf16) and fp16 (autocast fp16 + GradScaler, with ``grad_accum_steps`` 2):
   each run must finish with finite validation metrics and record the precision it ran;
2. predicts a handful of sentences with each trained model (of each kind and precision) on the CPU and on CUDA (``load_predictor``): the labels
   and the exit layers must be equal;
3. exports each model (``export_model``: ``hf`` and ``onnx``) and predicts the same sentences from the exports
   (the hf folder on CUDA, the ONNX graphs on ONNX Runtime): exit layers equal the CPU path's;
4. serves one request (``deploy.serve.create_app`` with FastAPI's TestClient, the model on CUDA): status 200 and
   the CPU path's label and exit layer.

It prints a table of the checks and exits 0 when all pass (1 otherwise). Without a CUDA device it prints
"skipped: no CUDA device" and exits 0 (tests/test_training_options.py runs it so).

    .venv/bin/python bench/gpu_check.py            # ~1-2 min on a GPU machine
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SENTENCES = ["a gorgeous, moving film", "the worst meal I have had in years", "the match went to extra time",
             "stocks fell sharply after the report", "I loved every minute of it", "rain again, all week long",
             "the service was slow but the food was fine", "a dull, lifeless sequel"]


class Checks:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def run(self, name: str, fn) -> object:
        """``fn()`` returns a detail text (pass) or raises (fail); ``("skip", why)`` skips."""
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - every failure is a row of the table
            traceback.print_exc(file=sys.stderr)
            self.rows.append((name, "FAIL", f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"))
            return None
        if isinstance(out, tuple) and out and out[0] == "skip":
            self.rows.append((name, "skip", out[1]))
            return None
        self.rows.append((name, "pass", f"{out} ({time.perf_counter() - t0:.1f} s)"))
        return out

    def table(self) -> str:
        w = max(len(r[0]) for r in self.rows)
        lines = [f"{'check':<{w}}  result  detail", f"{'-' * w}  ------  ------"]
        lines += [f"{n:<{w}}  {r:<6}  {d}" for n, r, d in self.rows]
        return "\n".join(lines)

    @property
    def ok(self) -> bool:
        return all(r != "FAIL" for _, r, _ in self.rows)


def same_exits(ref: list[dict], got: list[dict], what: str) -> str:
    a = [(p["label"], p.get("exit_layer")) for p in ref]
    b = [(p["label"], p.get("exit_layer")) for p in got]
    if a != b:
        raise AssertionError(f"{what}: (label, exit) differ from the CPU path's: cpu {a} vs {b}")
    return f"{len(a)} sentences, exits {[e for _, e in a]}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="training steps of each run")
    ap.add_argument("--rows", type=int, default=300, help="demo rows each run trains on")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="run every check with 'cuda' replaced by 'cpu' (fp16 skipped): tries the script itself on "
                         "a machine without a GPU; proves nothing about CUDA")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("skipped: no CUDA device")
        return 0
    dev = "cpu" if args.cpu_dry_run else "cuda"
    bf16_ok = True if args.cpu_dry_run else torch.cuda.is_bf16_supported()
    from dact_lib.config import default_config
    from dact_lib.deploy.export import export_model
    from dact_lib.deploy.predictor import load_predictor
    from dact_lib.tracker import Tracker
    from dact_lib.train import train

    home = Path(tempfile.mkdtemp(prefix="dact_gpu_check_"))
    tracker = Tracker(home)
    checks = Checks()
    name = "CPU (dry run: nothing here is about CUDA)" if args.cpu_dry_run else torch.cuda.get_device_name(0)
    print(f"device: {name}; torch {torch.__version__} (CUDA {torch.version.cuda}); bf16 supported: {bf16_ok}; "
          f"home {home}", flush=True)
    trained: dict[str, int] = {}
    for kind in ("backbone", "dact"):
        for precision in ("bf16", "fp16"):
            def train_one(kind=kind, precision=precision):
                if precision == "bf16" and not bf16_ok:
                    return ("skip", "this GPU has no bf16")
                if precision == "fp16" and dev == "cpu":
                    return ("skip", "dry run: fp16 is CUDA only")
                cfg = default_config(kind)
                cfg.data.max_rows, cfg.data.max_seq_len = args.rows, 64
                cfg.train.device, cfg.train.precision = dev, precision
                cfg.train.epochs, cfg.train.max_steps, cfg.train.batch_size = 1, args.steps, 16
                cfg.train.grad_accum_steps = 2 if precision == "fp16" else 1
                if kind == "dact":
                    cfg.model.exit_refit_epochs = 5
                cfg.name = f"gpu-check {kind} {precision}"
                res = train(cfg.validate(), tracker=tracker, home=home)
                run = tracker.get_run(res.run_id)
                assert res.status == "finished", res.status
                assert run["summary"]["precision"] == precision, run["summary"]["precision"]
                bad = {k: v for k, v in res.best_metrics.items() if isinstance(v, float) and not math.isfinite(v)}
                assert not bad, f"non-finite validation metrics {bad}"
                trained[f"{kind} {precision}"] = res.run_id
                return f"run {res.run_id}, val_loss {res.best_metrics['val_loss']:.4f}, " \
                       f"val_accuracy {res.best_metrics.get('val_accuracy', float('nan')):.3f}"

            checks.run(f"train {kind} {precision}", train_one)

    for kind, run_id in trained.items():  # "backbone bf16", "dact fp16", …: each trained model
        cpu_preds: list[dict] = []

        def cpu_vs_cuda(run_id=run_id, kind=kind):
            cpu = load_predictor(run=run_id, home=home, device="cpu").predict(SENTENCES)
            gpu = load_predictor(run=run_id, home=home, device=dev).predict(SENTENCES)
            cpu_preds[:] = cpu
            return same_exits(cpu, gpu, f"{kind} on CUDA")

        checks.run(f"{kind}: CUDA exits = CPU exits", cpu_vs_cuda)
        if not cpu_preds:
            continue
        for fmt in ("hf", "onnx"):
            def exported(run_id=run_id, kind=kind, fmt=fmt):
                out = export_model(run_id, home / "exports" / f"{run_id}-{fmt}", fmt=fmt, home=home)
                pred = load_predictor(model_dir=out["path"], device=dev if fmt == "hf" else "cpu")
                return same_exits(cpu_preds, pred.predict(SENTENCES), f"{kind} {fmt} export ({pred.runtime})")

            checks.run(f"{kind}: export {fmt}, exits = CPU exits", exported)

        def serve_one(run_id=run_id, kind=kind):
            from fastapi.testclient import TestClient

            from dact_lib.deploy.serve import create_app

            app = create_app(load_predictor(run=run_id, home=home, device=dev))
            with TestClient(app) as client:
                r = client.post("/predict", json={"text": SENTENCES[0]})
            assert r.status_code == 200, (r.status_code, r.text[:200])
            (got,) = r.json()["predictions"]
            return same_exits(cpu_preds[:1], [got], f"{kind} served on CUDA")

        checks.run(f"{kind}: serve one request (CUDA)", serve_one)

    print(checks.table())
    print("all checks passed" if checks.ok else "SOME CHECKS FAILED")
    return 0 if checks.ok else 1


if __name__ == "__main__":
    sys.exit(main())
