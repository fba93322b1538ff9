"""A throwaway PostgreSQL cluster for tests: initdb + pg_ctl in a temp dir, loopback only, trust auth, stopped
afterwards. Skips the test when the PostgreSQL server binaries or the psycopg2 driver are missing (``.ci/run``
installs both). As root (CI containers) the server runs as the ``postgres`` OS user, which initdb requires."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator, List

import pytest


def _bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        pytest.skip(f"PostgreSQL server binary {name!r} not found (apt-get install postgresql)")
    return found


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def throwaway_postgres(database: str = "leverplus") -> Iterator[str]:
    """Start a cluster in a fresh temp dir (its own, so the ``postgres`` user can reach it); yield a SQLAlchemy URL
    of a fresh database on it; stop the cluster and delete the dir afterwards."""
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver psycopg2 is not installed")
    initdb, pg_ctl, createdb = _bin("initdb"), _bin("pg_ctl"), _bin("createdb")
    as_user: List[str] = []
    root = Path(tempfile.mkdtemp(prefix="leverplus-pg-"))
    data, sock = root / "pgdata", root / "pgsock"
    sock.mkdir()
    if os.geteuid() == 0:  # initdb refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        for p in (root, sock):
            shutil.chown(p, "postgres")
    subprocess.run(as_user + [initdb, "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync"],
                   check=True, capture_output=True)
    port = _free_port()
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {sock} -c fsync=off -c max_connections=200"
    subprocess.run(as_user + [pg_ctl, "-D", str(data), "-o", opts, "-l", str(root / "pg.log"), "-w", "start"],
                   check=True, capture_output=True)
    try:
        subprocess.run(as_user + [createdb, "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", database],
                       check=True, capture_output=True)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{database}"
    finally:
        subprocess.run(as_user + [pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
