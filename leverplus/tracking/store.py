"""Where the MLflow store is, and safe access to it.

Store: ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<launch dir>/mlflow.db``. Artifacts (unless
``tracking.artifact_root`` says where): beside a sqlite store, in ``<dir of the .db>/mlartifacts``; with an
``http(s)://`` tracking server, wherever the server puts them (its ``--artifacts-destination``, served through its
``mlflow-artifacts:/`` proxy, so the UI can show them and no worker's disk holds them). The launch dir is resolved
once, from where the command was started (Hydra's original cwd, or ``LEVERPLUS_LAUNCH_DIR``), never from a job's
working directory, so every run of every sweep lands in the same store. sqlite writes are retried on "database is
locked"; opening a sqlite store and creating an experiment are serialised with a file lock beside it, so
parallel local jobs (joblib) lose nothing; for many processes or machines use ``mlflow server`` over HTTP.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, TypeVar

import mlflow
from filelock import FileLock
from mlflow.exceptions import MlflowException

from leverplus.env import MLFLOW_TRACKING_URI_VAR, launch_dir
from leverplus.errors import LeverPlusInputError

T = TypeVar("T")


def resolve_tracking_uri(uri: Optional[str] = None) -> str:
    if uri:
        return uri
    env = os.environ.get(MLFLOW_TRACKING_URI_VAR)
    if env:
        return env
    return f"sqlite:///{launch_dir() / 'mlflow.db'}"


def resolve_artifact_root(root: Optional[str] = None) -> Optional[str]:
    """``tracking.artifact_root`` as an absolute ``file://`` URI (relative paths against the launch dir), or None
    when unset: then :func:`default_artifact_root` picks the store's own place."""
    if not root:
        return None
    path = Path(root).expanduser()
    if not path.is_absolute():
        path = launch_dir() / path
    return path.resolve().as_uri()


def is_server_uri(uri: str) -> bool:
    """A tracking server (``http://``/``https://``): it owns the artifact store."""
    return uri.lower().startswith(("http://", "https://"))


def default_artifact_root(uri: str) -> Optional[str]:
    """Where a new experiment's artifacts go when ``tracking.artifact_root`` is unset: None for a tracking server
    (the server's default, its ``--artifacts-destination`` proxy), ``<dir of the .db>/mlartifacts`` for a sqlite
    store, ``<launch dir>/mlartifacts`` for any other store."""
    if is_server_uri(uri):
        return None
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).expanduser().resolve().parent / "mlartifacts").as_uri()
    return (launch_dir() / "mlartifacts").resolve().as_uri()


def with_retries(fn: Callable[[], T], attempts: int = 8, base_delay: float = 0.2) -> T:
    """Retry an MLflow call on sqlite's "database is locked" (concurrent local writers)."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # MlflowException wraps sqlalchemy's OperationalError
            if "locked" not in str(e).lower() or i == attempts - 1:
                raise
            time.sleep(base_delay * (2**i) * (1 + random.random()))
    raise AssertionError("unreachable")


def _lock_path(uri: str) -> Optional[Path]:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :] + ".lock")
    return None


#: tags of every experiment leverplus creates: MLflow 3 opens an experiment without a kind on its GenAI traces page;
#: this kind opens the runs table
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


#: stores this process has opened (MLflow caches the store per URI, so the schema check runs once per process)
_OPENED: set = set()

#: what sqlite says about a file that is not an sqlite database, or a damaged one
_CORRUPT_DB = ("file is not a database", "database disk image is malformed")


#: what MLflow says when the file's schema revision is not the one this MLflow expects
_OLD_SCHEMA = "out-of-date database schema"


def _schema_revision(db: str) -> Optional[str]:
    """The Alembic revision recorded in an sqlite store (None while it cannot be read)."""
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
            row = con.execute("SELECT version_num FROM alembic_version").fetchone()
        return row[0] if row else None
    except sqlite3.Error:
        return None


def init_store(uri: str, settle_s: float = 10.0, poll_s: float = 0.5) -> None:
    """Open the store once per process, holding the store's file lock for a sqlite file.

    MLflow creates (and migrates) the sqlite schema when a client first opens the store; two processes doing that
    at once on a fresh file race ("table ... already exists"), so opening is serialised like experiment creation.
    A client outside leverplus (``mlflow ui``, a notebook) does not take that lock: while it is still migrating a
    fresh file, MLflow reports the schema as out of date. That is waited out while the file's revision keeps moving;
    a revision that stays put for ``settle_s`` seconds is a store made by an older MLflow, reported as bad input
    naming the file and the upgrade command. A file that is not an sqlite database is reported as bad input too."""
    if uri in _OPENED:
        return
    lock = _lock_path(uri)
    db = uri[len("sqlite:///") :] if lock is not None else None
    last, still_since = None, time.monotonic()
    while True:
        try:
            if lock is None:
                mlflow.MlflowClient(tracking_uri=uri)
            else:
                lock.parent.mkdir(parents=True, exist_ok=True)
                with FileLock(str(lock), timeout=300):
                    mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
            break
        except Exception as e:
            if db is not None and "already exists" in str(e) and time.monotonic() - still_since < settle_s:
                time.sleep(poll_s)  # an outside client created the same table a moment earlier: look again
                continue
            if db is not None and _OLD_SCHEMA in str(e):
                revision = _schema_revision(db)
                if revision != last:  # someone is migrating it: wait for them to finish
                    last, still_since = revision, time.monotonic()
                elif time.monotonic() - still_since >= settle_s:
                    raise LeverPlusInputError(
                        f"is an MLflow store with an older schema (revision {revision}) than this MLflow "
                        f"{mlflow.__version__} expects", file=db,
                        fix=f"back it up (cp {db} {db}.bak), then run: mlflow db upgrade {uri}") from e
                time.sleep(poll_s)
                continue
            if db is not None and any(m in str(e) for m in _CORRUPT_DB):
                raise LeverPlusInputError(
                    "is not a readable MLflow sqlite store (sqlite: "
                    f"{next(m for m in _CORRUPT_DB if m in str(e))})", file=db,
                    fix=f"move it aside (mv {db} {db}.corrupt) to start a fresh store there, or point tracking.uri "
                        "(or MLFLOW_TRACKING_URI) at another store") from e
            raise
    _OPENED.add(uri)


#: (uri, experiment name) -> id, for experiments this process found or created: a process running several jobs
#: (joblib workers, Optuna trials) asks the store once
_EXPERIMENT_IDS: Dict[Tuple[str, str], str] = {}


def get_or_create_experiment(name: str, uri: str, artifact_root: Optional[str] = None) -> str:
    """The experiment's id, creating it (tagged :data:`EXPERIMENT_TAGS`) if needed, with its artifacts under
    ``<artifact_root>/<name>`` (``artifact_root`` None: :func:`default_artifact_root`; for a server, the server's)."""
    cached = _EXPERIMENT_IDS.get((uri, name))
    if cached is not None:
        return cached
    pending = _PREFETCHING.pop(uri, None)
    if pending is not None:  # one store build, not two racing ones
        pending.join()
    init_store(uri)  # a no-op when the prefetch opened it; else opens it now and reports a corrupt store
    client = mlflow.MlflowClient(tracking_uri=uri)
    root = artifact_root or default_artifact_root(uri)

    def create() -> str:
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = f"{root}/{name}" if root else None
        try:
            return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
        except MlflowException as e:  # a concurrent client (another machine, no shared lock) created it first
            if e.error_code != "RESOURCE_ALREADY_EXISTS" or client.get_experiment_by_name(name) is None:
                raise
            return client.get_experiment_by_name(name).experiment_id

    lock = _lock_path(uri)
    if lock is None:
        exp_id = with_retries(create)
    else:
        lock.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock), timeout=120):
            exp_id = with_retries(create)
    _EXPERIMENT_IDS[(uri, name)] = exp_id
    return exp_id


def prefetch_store(uri: str) -> threading.Thread:
    """Open the MLflow store for ``uri`` in a background thread (MLflow keeps one store per URI per process), so that
    importing MLflow's SQL store (seconds of SQLAlchemy and Alembic imports) and checking the schema overlap with
    loading the data instead of adding to the run. Joining is optional: the first MLflow call waits on MLflow's own
    locks; an error here is left for that call to raise."""

    def open_store() -> None:
        try:
            init_store(uri)  # builds (and caches) the store, under the sqlite file's lock
        except Exception:  # the real call (get_or_create_experiment) reports it, with its context
            pass

    t = threading.Thread(target=open_store, name="mlflow-store-prefetch", daemon=True)
    t.start()
    _PREFETCHING[uri] = t
    return t


#: uri -> the thread opening its store (see :func:`prefetch_store`)
_PREFETCHING: Dict[str, threading.Thread] = {}

