"""Where the MLflow store is, and safe access to it.

Store: ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<launch dir>/mlflow.db`` with artifacts in
``<launch dir>/mlartifacts``. The launch dir is resolved once, from where the command was started (Hydra's original
cwd, or ``LEVERPLUS_LAUNCH_DIR``), never from a job's working directory, so every run of every sweep lands in the same
store. sqlite writes are retried on "database is locked" and experiment creation is serialised with a file lock, so
parallel local jobs (joblib) lose nothing; for many processes or machines use ``mlflow server`` over HTTP.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

import mlflow
from filelock import FileLock
from mlflow.exceptions import MlflowException

from leverplus.env import MLFLOW_TRACKING_URI_VAR
from leverplus.errors import LeverPlusInputError
from leverplus.utils import launch_dir

T = TypeVar("T")




def resolve_tracking_uri(uri: Optional[str] = None) -> str:
    if uri:
        return uri
    env = os.environ.get(MLFLOW_TRACKING_URI_VAR)
    if env:
        return env
    return f"sqlite:///{launch_dir() / 'mlflow.db'}"


def resolve_artifact_root(root: Optional[str] = None) -> str:
    path = Path(root).expanduser() if root else launch_dir() / "mlartifacts"
    if not path.is_absolute():
        path = launch_dir() / path
    return path.resolve().as_uri()


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


def init_store(uri: str) -> None:
    """Open the store once per process, holding the store's file lock for a sqlite file.

    MLflow creates (and migrates) the sqlite schema when a client first opens the store; two processes doing that
    at once on a fresh file race ("table ... already exists"), so opening is serialised like experiment creation.
    A file that is not an sqlite database is reported as bad input naming the file."""
    if uri in _OPENED:
        return
    lock = _lock_path(uri)
    try:
        if lock is None:
            mlflow.MlflowClient(tracking_uri=uri)
        else:
            lock.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(lock), timeout=300):
                mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:
        if lock is not None and any(m in str(e) for m in _CORRUPT_DB):
            db = uri[len("sqlite:///") :]
            raise LeverPlusInputError(
                "is not a readable MLflow sqlite store (sqlite: "
                f"{next(m for m in _CORRUPT_DB if m in str(e))})", file=db,
                fix=f"move it aside (mv {db} {db}.corrupt) to start a fresh store there, or point tracking.uri "
                    "(or MLFLOW_TRACKING_URI) at another store") from e
        raise
    _OPENED.add(uri)


def get_or_create_experiment(name: str, uri: str, artifact_root: str) -> str:
    init_store(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)

    def create() -> str:
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(name, artifact_location=f"{artifact_root}/{name}", tags=EXPERIMENT_TAGS)
        except MlflowException as e:  # a concurrent client (another machine, no shared lock) created it first
            if e.error_code != "RESOURCE_ALREADY_EXISTS" or client.get_experiment_by_name(name) is None:
                raise
            return client.get_experiment_by_name(name).experiment_id

    lock = _lock_path(uri)
    if lock is None:
        return with_retries(create)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock), timeout=120):
        return with_retries(create)

