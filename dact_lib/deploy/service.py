"""REST services started from the dashboard: ``dact-lab serve`` in its own process, one per model folder.

:func:`start_service` starts it on 127.0.0.1 (a free port unless one is given) and returns once its ``/health``
answers — or raises with the end of its log when the process exits first; :func:`stop_service` ends it;
:func:`service_for` finds the live one of a folder; :func:`curl_line` is the command a user pastes.
"""
from __future__ import annotations

import atexit
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DactLabError

_LOCK = threading.Lock()
_SERVICES: dict[str, "Service"] = {}


@dataclass
class Service:
    source: str
    host: str
    port: int
    policy: str | None
    int8: bool
    log_path: Path
    process: subprocess.Popen = field(repr=False)
    started_at: float = field(default_factory=time.time)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _key(source) -> str:
    return str(Path(source).resolve()) if Path(str(source)).exists() else str(source)


def health(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as resp:
            return resp.status == 200 and json.loads(resp.read() or b"{}").get("status") == "ok"
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _log_tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError:
        return ""


def start_service(source, *, host: str = "127.0.0.1", port: int | None = None, policy: str | None = None,
                  int8: bool = False, home=None, wait_s: float = 600.0) -> Service:
    """Start ``dact-lab serve --model SOURCE`` (a run folder or an exported folder) and wait until it answers
    ``/health``. One service per folder: a live one is returned as it is."""
    key = _key(source)
    with _LOCK:
        old = _SERVICES.get(key)
        if old is not None and old.alive():
            return old
        port = int(port) if port else free_port(host)
        log = Path(tempfile.mkstemp(prefix="dact_lab_serve_", suffix=".log")[1])
        cmd = [sys.executable, "-m", "dact_lib", "serve", "--model", str(source), "--host", host, "--port", str(port),
               "--parent-pid", str(os.getpid())]  # it stops when this process dies, however it dies
        if policy:
            cmd += ["--policy", policy]
        if int8:
            cmd += ["--int8"]
        if home is not None:
            cmd += ["--home", str(home)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        svc = Service(str(source), host, port, policy, bool(int8), log, proc)
        if not _SERVICES:
            atexit.register(stop_all)
        _SERVICES[key] = svc
    deadline = time.monotonic() + wait_s
    while True:  # the condition: it answers, or its process ended
        if health(svc.url):
            return svc
        if not svc.alive():
            with _LOCK:
                _SERVICES.pop(key, None)
            raise DactLabError(f"The REST service for {source} stopped before answering (exit code "
                               f"{svc.process.returncode}): {_log_tail(log).strip() or 'no output'}")
        if time.monotonic() > deadline:
            stop_service(source)
            raise DactLabError(f"The REST service for {source} did not answer /health within {wait_s:.0f} s; its log: "
                               f"{_log_tail(log).strip()}")
        time.sleep(0.2)


def service_for(source) -> Service | None:
    with _LOCK:
        svc = _SERVICES.get(_key(source))
        if svc is not None and not svc.alive():
            _SERVICES.pop(_key(source), None)
            svc.log_path.unlink(missing_ok=True)
            return None
        return svc


def stop_service(source, timeout: float = 10.0) -> bool:
    """Stop the service of ``source``; False when none was running."""
    with _LOCK:
        svc = _SERVICES.pop(_key(source), None)
    if svc is None:
        return False
    was_alive = svc.alive()
    if was_alive:
        svc.process.terminate()
        try:
            svc.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            svc.process.kill()
            svc.process.wait()
    svc.log_path.unlink(missing_ok=True)
    return was_alive


def stop_all() -> int:
    with _LOCK:
        keys = list(_SERVICES)
    return sum(stop_service(k) for k in keys)


def curl_line(svc: Service, text: str = "a gorgeous, moving film") -> str:
    body = json.dumps({"text": text})
    return (f"curl -s -X POST {svc.url}/predict -H 'Content-Type: application/json' -d {shlex.quote(body)}")
