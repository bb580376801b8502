"""One backbone study, its trials run by 1 and then 2 worker processes on one PostgreSQL database.

For each worker count the script creates a fresh database on a throw-away PostgreSQL cluster (tests/pg_server.py;
or ``--server-url`` of a server you run: one database per configuration is created there), starts the study with
``tune_backbone(..., local_trials=0)`` (the driver runs no trial: it enqueues the budget as slots and waits) and
``--workers`` processes of ``python -m dact_lib worker --study NAME --db URL``. It prints the wall time of the
study (first slot enqueued → last trial finished), trials per minute, the ratio against one worker, and the best
value of each study (TPE is seeded; with two workers the sampler sees a different history, so the best values
agree within noise, not bit for bit).

Each worker trains with ``--threads`` intra-op threads (default: cores // workers, so every configuration uses the
whole machine). On a 2-core machine two workers can at best halve the wall time; what a second machine would give
is what this ratio measures with one core per worker (``--threads 1``).

    .venv/bin/python bench/scale_out.py                       # 8 trials, bundled encoder, SST-2 sample
    .venv/bin/python bench/scale_out.py --trials 8 --workers 1,2 --threads 1
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA_DIR, ROOT, describe_machine, machine_info, markdown_table, save_json  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))


def study_config(args):
    from dact_lib.config import default_config

    cfg = default_config("backbone")
    train_csv = Path(args.data_dir) / "sst2" / "train.csv"
    if train_csv.is_file():
        cfg.data.path = str(train_csv)
    cfg.data.max_rows = args.max_rows
    cfg.data.max_seq_len = 64
    cfg.train.seed = args.seed
    cfg.name = "scale-out bench"
    return cfg.validate()


def run_one(n_workers: int, url: str, home: Path, args) -> dict:
    import optuna

    from dact_lib.tuning.backbone import BackboneSpace, tune_backbone

    os.environ["DACT_LAB_DB"] = url
    threads = args.threads or max(1, (os.cpu_count() or 2) // n_workers)
    cfg = study_config(args)
    cfg.train.num_threads = threads
    name = f"scale-out-{n_workers}w-s{args.seed}"
    space = BackboneSpace(epochs=[1, 1], batch_size=[16, 32])
    out: dict = {}

    def driver():
        try:
            out["res"] = tune_backbone(cfg, trials=args.trials, study_name=name, home=home, final=False,
                                       space=space, local_trials=0, poll_s=0.5)
        except BaseException as exc:  # noqa: BLE001
            out["error"] = exc

    env = {**os.environ, "DACT_LAB_DB": url, "DACT_LAB_HOME": str(home), "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    drv = threading.Thread(target=driver)
    drv.start()
    procs = [subprocess.Popen([sys.executable, "-m", "dact_lib", "worker", "--study", name, "--home", str(home),
                               "--db", url, "--wait-s", "300"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(n_workers)]
    logs = [p.communicate() for p in procs]
    drv.join()
    wall = time.perf_counter() - t0
    for p, (_, err) in zip(procs, logs):
        if p.returncode != 0:
            raise SystemExit(f"a worker failed:\n{err[-3000:]}")
    if "error" in out:
        raise out["error"]
    from dact_lib.tuning import studies

    study = optuna.load_study(study_name=name, storage=studies.storage(home))
    done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    starts = [t.datetime_start for t in done if t.datetime_start]
    ends = [t.datetime_complete for t in done if t.datetime_complete]
    span = (max(ends) - min(starts)).total_seconds()
    per_worker = {}
    for t in done:
        per_worker[t.user_attrs.get("worker", "?")] = per_worker.get(t.user_attrs.get("worker", "?"), 0) + 1
    values = sorted(t.value for t in done if t.state.name == "COMPLETE")
    return {"workers": n_workers, "seed": args.seed, "threads_per_worker": threads, "trials": len(done),
            "trial_values": values, "median_value": statistics.median(values) if values else None,
            "complete": sum(t.state.name == "COMPLETE" for t in done), "wall_s": wall, "trials_span_s": span,
            "trials_per_min": 60.0 * len(done) / span, "best_value": out["res"].best_value,
            "median_trial_s": statistics.median((t.datetime_complete - t.datetime_start).total_seconds()
                                                for t in done),
            "trials_per_worker": sorted(per_worker.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads per worker (default cores // n)")
    ap.add_argument("--max-rows", type=int, default=800, help="rows of the SST-2 training file (demo data if absent)")
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    ap.add_argument("--server-url", default=None,
                    help="an admin URL of a running PostgreSQL (…/postgres); default: a throw-away cluster")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (TPE's and training's): each configuration "
                    "once per seed, so the best values' spread across seeds says what 'equal within noise' is")
    ap.add_argument("--out", default="scale_out.json")
    args = ap.parse_args()
    import tempfile

    import pg_server

    info = machine_info(args.threads or 0)
    print(f"# Scale-out bench — {describe_machine(info)}; {args.trials} trials per study", flush=True)
    server = None
    if args.server_url:
        admin = args.server_url

        def create(name):
            import psycopg

            with psycopg.connect(admin, autocommit=True) as con:
                con.execute(f'CREATE DATABASE "{name}"')
            return admin.rsplit("/", 1)[0] + f"/{name}"
    else:
        reason = pg_server.missing_reason()
        if reason:
            raise SystemExit(f"cannot start PostgreSQL: {reason}")
        server = pg_server.start()
        create = server.create_database
    rows = []
    try:
        for seed in [int(x) for x in args.seeds.split(",")]:
            args.seed = seed
            for n in [int(x) for x in args.workers.split(",")]:
                home = Path(tempfile.mkdtemp(prefix=f"scale-out-{n}w-"))
                url = create(f"bench_{n}w_s{seed}_{int(time.time())}")
                r = run_one(n, url, home, args)
                rows.append(r)
                print(f"seed {seed}, {n} worker(s): {r['trials']} trials in {r['trials_span_s']:.0f} s "
                      f"({r['trials_per_min']:.2f}/min), best value {r['best_value']:.4f}", flush=True)
    finally:
        if server is not None:
            pg_server.stop(server)
    for r in rows:  # against the first configuration of the same seed
        base = next(b for b in rows if b["seed"] == r["seed"])
        r["wall_ratio_vs_first"] = base["trials_span_s"] / r["trials_span_s"]
    print()
    print(markdown_table(rows, [("seed", "seed"), ("workers", "workers"), ("threads_per_worker", "threads / worker"),
                                ("trials", "trials"), ("trials_per_worker", "trials per worker"),
                                ("trials_span_s", "study wall time, s"), ("wall_ratio_vs_first", "speed-up"),
                                ("trials_per_min", "trials / min"), ("median_trial_s", "median trial, s"),
                                ("best_value", "best val_loss"), ("median_value", "median trial val_loss")]))
    if len({r["seed"] for r in rows}) > 1:
        for n in sorted({r["workers"] for r in rows}):
            best = [r["best_value"] for r in rows if r["workers"] == n]
            print(f"{n} worker(s): best val_loss over seeds {min(best):.4f} … {max(best):.4f}")
    save_json(args.out, {"machine": info, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
