"""optuna-dashboard for a home: :func:`start_dashboard` (the app's launcher: one server per process and storage,
127.0.0.1, a free port) and the guarded child process it runs,

``python -m dact_lib.tuning.dashboard_server STORAGE_URL --port P --parent-pid PID``

* **Host and Origin checked** (:class:`LocalOnly`): optuna-dashboard itself answers any Host and any Origin
  without authentication, so a web page the user visits could reach it through DNS rebinding and delete studies.
  Here a request is served only when its Host header is ``127.0.0.1:P`` / ``localhost:P`` (or ``[::1]:P``), and a
  request that changes anything (not GET/HEAD/OPTIONS) only when its Origin, if sent, is that same host. Anything
  else gets 403.
* **It stops with its parent** (:func:`watch_parent`): the server exits when the process that started it is gone
  (checked every second; not the parent-death signal, which fires when the starting *thread* ends: a page's script
  thread), instead of relying on ``atexit`` (which a kill -9 of the
  app never runs).
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from typing import Any, Callable, Iterable

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class LocalOnly:
    """WSGI middleware: serve ``app`` only to requests addressed to this machine's loopback name on ``port``."""

    def __init__(self, app: Callable, port: int) -> None:
        self.app = app
        self.hosts = {f"{h}:{port}" for h in ("127.0.0.1", "localhost", "[::1]")}

    def allowed(self, environ: dict[str, Any]) -> tuple[bool, str]:
        host = (environ.get("HTTP_HOST") or "").strip().lower()
        if host not in self.hosts:
            return False, f"Host {host!r} is not this dashboard's address"
        method = environ.get("REQUEST_METHOD", "GET").upper()
        origin = (environ.get("HTTP_ORIGIN") or "").strip().lower()
        if method not in SAFE_METHODS and origin and origin not in {f"http://{h}" for h in self.hosts}:
            return False, f"cross-origin {method} from {origin!r}"
        return True, ""

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        ok, why = self.allowed(environ)
        if not ok:
            body = f"403 Forbidden: {why}. Open the dashboard at http://127.0.0.1 on its port.\n".encode()
            start_response("403 Forbidden", [("Content-Type", "text/plain; charset=utf-8"),
                                             ("Content-Length", str(len(body)))])
            return [body]
        return self.app(environ, start_response)


def stop_with_parent(parent_pid: int) -> bool:
    """This process ends when ``parent_pid`` (the process that started it) dies, by a poll of its parent pid
    (:func:`watch_parent`). False when the parent is already gone (the caller should exit).

    Not Linux's parent-death signal (PR_SET_PDEATHSIG): it fires when the *thread* that started the child ends, and
    a Streamlit page runs in a thread that ends with every rerun — "Open in optuna-dashboard" (and a REST service
    started from the Runs page) died seconds after it started."""
    if os.getppid() != parent_pid:  # the parent died before we got here
        return False
    watch_parent(parent_pid)
    return True


def watch_parent(parent_pid: int, interval_s: float = 1.0) -> threading.Thread:
    """A daemon thread that ends this process once ``parent_pid`` is no longer its parent (the parent died)."""

    def loop() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(0)
            time.sleep(interval_s)

    t = threading.Thread(target=loop, name="parent-watch", daemon=True)
    t.start()
    return t


def make_app(storage_url: str, port: int) -> Callable:
    import optuna_dashboard

    return LocalOnly(optuna_dashboard.wsgi(storage_url), port)


# ------------------------------------------------------------------------------------------ the launcher
_dashboards: dict[str, dict[str, Any]] = {}
_dashboards_lock = threading.Lock()


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop_dashboards() -> None:
    """Stop every optuna-dashboard this process started."""
    for srv in _dashboards.values():
        if srv["proc"].poll() is None:
            srv["proc"].terminate()


def dashboard(home=None) -> dict[str, Any] | None:
    """The running optuna-dashboard of this process for the home's storage (``proc``, ``port``, ``url``, ``log``),
    or None."""
    from ..home import optuna_storage_url

    srv = _dashboards.get(optuna_storage_url(home))
    return srv if srv is not None and srv["proc"].poll() is None else None


def start_dashboard(home=None, wait_s: float = 15.0) -> dict[str, Any]:
    """Start optuna-dashboard on the home's storage at 127.0.0.1 on a free port — or reuse the one this process
    already runs — and wait up to ``wait_s`` until it listens. Returns ``proc``, ``port``, ``url`` (the dashboard
    page), ``log`` (its output, in the home) and ``up``. Every server is stopped when the process exits."""
    import atexit
    import subprocess
    import sys
    import time

    from ..home import optuna_storage_url, resolve_home

    url = optuna_storage_url(home)
    with _dashboards_lock:
        srv = _dashboards.get(url)
        if srv is None or srv["proc"].poll() is not None:
            if not _dashboards:
                atexit.register(stop_dashboards)
            port = _free_port()
            log = resolve_home(home) / ".optuna_dashboard.log"
            fh = open(log, "ab")  # noqa: SIM115 - owned by the child process
            # optuna-dashboard's WSGI app behind a Host/Origin guard, stopping when this process is gone
            # (dashboard_server.py): no DNS-rebinding access, no orphan server after a kill -9 of the app
            # (run by file path: it imports only optuna_dashboard, so it starts whatever the working directory)
            server = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard_server.py")
            proc = subprocess.Popen([sys.executable, server, url,
                                     "--port", str(port), "--parent-pid", str(os.getpid())], stdout=fh,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            srv = {"proc": proc, "port": port, "url": f"http://127.0.0.1:{port}/dashboard/", "log": str(log),
                   "started": time.time()}
            _dashboards[url] = srv
    deadline = time.time() + wait_s
    while time.time() < deadline and srv["proc"].poll() is None and not _listening(srv["port"]):
        time.sleep(0.2)
    srv["up"] = srv["proc"].poll() is None and _listening(srv["port"])
    return srv


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dact_lib.tuning.dashboard_server")
    p.add_argument("storage")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--parent-pid", type=int, default=None)
    args = p.parse_args(argv)
    # started from the Studies page's script thread, which ends with the rerun: the parent pid is polled
    if args.parent_pid and not stop_with_parent(args.parent_pid):
        return 0
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *a: Any) -> None:  # noqa: A002 - the stdlib's name
            sys.stderr.write("%s - %s\n" % (self.address_string(), format % a))

    httpd = make_server("127.0.0.1", args.port, make_app(args.storage, args.port), server_class=Server,
                        handler_class=Quiet)
    print(f"Listening on http://127.0.0.1:{args.port}/ (Host/Origin checked)", file=sys.stderr, flush=True)
    httpd.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
