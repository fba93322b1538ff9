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

from leverplus.env import MLFLOW_TRACKING_URI_VAR
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


def get_or_create_experiment(name: str, uri: str, artifact_root: str) -> str:
    client = mlflow.MlflowClient(tracking_uri=uri)

    def create() -> str:
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        return client.create_experiment(name, artifact_location=f"{artifact_root}/{name}", tags=EXPERIMENT_TAGS)

    lock = _lock_path(uri)
    if lock is None:
        return with_retries(create)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock), timeout=120):
        return with_retries(create)

