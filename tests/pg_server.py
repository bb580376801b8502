"""A throw-away PostgreSQL cluster for the tests that need a real server (Debian's ``postgresql`` package).

:func:`start` runs ``initdb`` in a temporary directory (as the ``postgres`` user when the tests run as root:
PostgreSQL refuses to run as root), starts the server on 127.0.0.1 and a free port, creates a database and returns
its URL; :func:`stop` shuts it down and removes the directory. Nothing outside the temporary directory is touched.
Where PostgreSQL is not installed the tests that need it skip with the reason — except in CI
(``$DACT_LAB_REQUIRE_SERVERS``, set by ``.ci/run``), where a missing server is a failure.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def find_bin(name: str) -> str | None:
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):  # Debian: not on PATH
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return shutil.which(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str  # postgresql://dact@127.0.0.1:PORT/dactlab
    admin_url: str  # the "postgres" maintenance database, to create more databases
    data_dir: Path
    root: Path
    port: int
    as_user: list[str]

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')
        return self.admin_url.rsplit("/", 1)[0] + f"/{name}"


def missing_reason() -> str | None:
    if find_bin("initdb") is None or find_bin("pg_ctl") is None:
        return "PostgreSQL is not installed (Debian: apt-get install postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install \"psycopg[binary]\")"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: cannot start PostgreSQL as a non-root user"
    return None


def start() -> Server:
    initdb, pg_ctl = find_bin("initdb"), find_bin("pg_ctl")
    root = Path(tempfile.mkdtemp(prefix="dact-pg-"))
    data = root / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses root: run it as the postgres user (or nobody)
        import pwd

        user = "postgres"
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            user, pw = "nobody", pwd.getpwnam("nobody")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", user, "--"]
    port = free_port()
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    subprocess.run(as_user + [initdb, "-D", str(data), "-U", "dact", "--auth=trust", "-E", "UTF8", "--no-sync"],
                   check=True, capture_output=True, env=env, cwd=root)
    opts = f"-p {port} -h 127.0.0.1 -k {root} -c fsync=off -c max_connections=100"
    subprocess.run(as_user + [pg_ctl, "-D", str(data), "-o", opts, "-l", str(root / "server.log"), "-w", "-t", "60",
                              "start"], check=True, capture_output=True, env=env, cwd=root)
    admin = f"postgresql://dact@127.0.0.1:{port}/postgres"
    server = Server(url="", admin_url=admin, data_dir=data, root=root, port=port, as_user=as_user)
    deadline = time.monotonic() + 30
    while True:
        try:
            server.url = server.create_database("dactlab")
            break
        except Exception:  # noqa: BLE001 - the server is still starting
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    return server


def stop(server: Server) -> None:
    pg_ctl = find_bin("pg_ctl")
    subprocess.run(server.as_user + [pg_ctl, "-D", str(server.data_dir), "-m", "immediate", "-w", "stop"],
                   capture_output=True, cwd=server.root)
    shutil.rmtree(server.root, ignore_errors=True)
