"""``dact-lab serve`` under load, on 127.0.0.1: one table.

1. the runtime's own batch-1 latency (in this process, 1 thread, the same sentences) vs ``POST /predict`` with one
   client (sequential requests on one keep-alive connection): p50 / p90 and their ratio (target: serve p50 under
   1.5× the runtime's own);
2. a bounded load test: ``--clients`` clients (threads, one keep-alive connection each) for ``--seconds`` seconds,
   each posting one sentence at a time: requests, errors (non-200 or a broken connection), requests/s, p50 / p90 /
   p99 latency as the clients saw it.

The model: an exported folder (``--model DIR``, e.g. bench/deploy_latency.py's int8 DACT export) or a run
(``--run N --home H``), served by a separate ``dact-lab serve`` process (``--int8`` as given).

    .venv/bin/python bench/serve_load.py --model bench/out/deploy_home/export/sst2_dact_int8 --clients 8 --seconds 60
"""
from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA_DIR, describe_machine, machine_info, markdown_table, save_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def pct(xs, q):
    from dact_lib.evaluate import quantile_of  # the library's percentile (the latency budget uses it too)

    return quantile_of(xs, q) if xs else float("nan")


def post(conn: http.client.HTTPConnection, text: str) -> tuple[int, bytes]:
    body = json.dumps({"text": text}).encode()
    conn.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.read()


def wait_health(port: int, proc: subprocess.Popen) -> None:
    while proc.poll() is None:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the service exited with code {proc.returncode}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--run", default=None)
    ap.add_argument("--home", default=None)
    ap.add_argument("--int8", action="store_true")
    ap.add_argument("--data", default=str(DEFAULT_DATA_DIR / "sst2" / "dev.csv"))
    ap.add_argument("--rows", type=int, default=200, help="sentences of the one-client comparison")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--out", default="serve_load.json")
    args = ap.parse_args()
    from dact_lib.data import read_csv

    texts = list(read_csv(args.data).texts)
    sample = random.Random(0).sample(texts, min(args.rows, len(texts)))
    src = ["--model", args.model] if args.model else ["--run", str(args.run)]
    cmd = [sys.executable, "-m", "dact_lib", "serve", *src, "--port", str(args.port), "--host", "127.0.0.1"]
    if args.home:
        cmd += ["--home", args.home]
    if args.int8:
        cmd += ["--int8"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_health(args.port, proc)
        # the runtime's own batch-1 latency, in this process (1 thread), interleaved with the HTTP requests
        from dact_lib.deploy.predictor import load_predictor

        pred = (load_predictor(model_dir=args.model, int8=args.int8, threads=1) if args.model else
                load_predictor(run=args.run, home=args.home, int8=args.int8, threads=1))
        conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=30)
        own, http_lat = [], []
        pred.predict([sample[0]])
        post(conn, sample[0])
        for text in sample:
            t0 = time.perf_counter()
            pred.predict([text])
            own.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            status, _ = post(conn, text)
            http_lat.append(time.perf_counter() - t0)
            assert status == 200, status
        del pred
        # the load test
        stop = time.monotonic() + args.seconds
        lat: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()

        def client(i: int) -> None:
            rng = random.Random(i)
            c = http.client.HTTPConnection("127.0.0.1", args.port, timeout=60)
            mine, errs = [], []
            while time.monotonic() < stop:
                text = rng.choice(texts)
                t0 = time.perf_counter()
                try:
                    status, body = post(c, text)
                    if status != 200:
                        errs.append(f"{status}: {body[:120]!r}")
                except OSError as exc:
                    errs.append(repr(exc))
                    c = http.client.HTTPConnection("127.0.0.1", args.port, timeout=60)
                mine.append(time.perf_counter() - t0)
            with lock:
                lat.extend(mine)
                errors.extend(errs)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    info = machine_info(1)
    print(describe_machine(info))
    one = [{"what": "runtime in-process, batch 1", "p50_ms": 1e3 * statistics.median(own), "p90_ms": 1e3 * pct(own, .9)},
           {"what": "POST /predict, 1 client", "p50_ms": 1e3 * statistics.median(http_lat),
            "p90_ms": 1e3 * pct(http_lat, .9)}]
    one[1]["ratio"] = one[1]["p50_ms"] / one[0]["p50_ms"]
    print(markdown_table(one, [("what", "what"), ("p50_ms", "p50 ms"), ("p90_ms", "p90 ms"),
                               ("ratio", "serve / runtime (p50)")]))
    load = [{"clients": args.clients, "seconds": round(wall, 1), "requests": len(lat), "errors": len(errors),
             "rps": len(lat) / wall, "p50_ms": 1e3 * pct(lat, .5), "p90_ms": 1e3 * pct(lat, .9),
             "p99_ms": 1e3 * pct(lat, .99)}]
    print(markdown_table(load, [("clients", "clients"), ("seconds", "seconds"), ("requests", "requests"),
                                ("errors", "errors"), ("rps", "requests/s"), ("p50_ms", "p50 ms"),
                                ("p90_ms", "p90 ms"), ("p99_ms", "p99 ms")]))
    if errors:
        print("first errors:", errors[:5])
    save_json(args.out, {"machine": info, "one_client": one, "load": load, "errors": errors[:50]})


if __name__ == "__main__":
    main()
