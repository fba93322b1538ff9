"""The environment variables leverplus reads, in one place.

A sweep hands its jobs what they share through these (jobs may run in other processes or on other machines,
where Hydra's in-process state is not available): where the command was launched, the tracking store, the
sweep's MLflow parent run, the sweep's name, and where failed jobs are recorded. Also :func:`launch_dir`, the
directory the first of these names (here, not in ``leverplus.utils``, so that modules which must not import torch,
such as the tracking worker process, can resolve it)."""

import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

#: where the command was started; relative input paths and the default stores resolve against it
LAUNCH_DIR_VAR = "LEVERPLUS_LAUNCH_DIR"
#: the tracking URI every job of a sweep must use (the sweep's own store)
TRACKING_URI_VAR = "LEVERPLUS_TRACKING_URI"
#: the MLflow run id of the sweep's parent run; every job becomes its child
PARENT_RUN_ID_VAR = "LEVERPLUS_PARENT_RUN_ID"
#: the sweep's name (tags every job's run)
SWEEP_VAR = "LEVERPLUS_SWEEP"
#: a file where the sweeper records jobs that failed (read by the end-of-sweep callback)
SWEEP_FAILED_JOBS_VAR = "LEVERPLUS_SWEEP_FAILED_JOBS"
#: root of the caches (simulated worlds, SFT/RCE stages); default ``~/.cache/leverplus``
CACHE_VAR = "LEVERPLUS_CACHE"
#: MLflow's own variable for the tracking URI (read when ``tracking.uri`` is not set)
MLFLOW_TRACKING_URI_VAR = "MLFLOW_TRACKING_URI"
#: the name of this machine for an Optuna worker's same-host liveness check (default: the hostname); set it where
#: several machines share one hostname (e.g. identical containers), so their trials are left to the heartbeat check
WORKER_HOST_VAR = "LEVERPLUS_WORKER_HOST"
#: an Optuna study's storage URL, exported by the resumable sweeper to its jobs when the study has a pruner (a URL
#: may carry a password, so it travels in the environment, never in a tag)
OPTUNA_STORAGE_VAR = "LEVERPLUS_OPTUNA_STORAGE"
#: the per-epoch validation metric a trial's job reports to its pruner
OPTUNA_PRUNE_METRIC_VAR = "LEVERPLUS_OPTUNA_PRUNE_METRIC"
#: the study's pruner config (JSON, a ``_target_`` under ``optuna.pruners``), rebuilt by each trial's job
OPTUNA_PRUNER_VAR = "LEVERPLUS_OPTUNA_PRUNER"
#: how many jobs the running sweep launches, and when it started (epoch seconds): each job's ``[k/N] ... ETA`` line
SWEEP_JOBS_VAR = "LEVERPLUS_SWEEP_JOBS"
SWEEP_START_VAR = "LEVERPLUS_SWEEP_START"
#: a plain multirun (Hydra's basic sweeper): the swept keys that name a job's arm (JSON list) and the baseline arm
SWEEP_ARM_KEYS_VAR = "LEVERPLUS_SWEEP_ARM_KEYS"
SWEEP_BASELINE_ARM_VAR = "LEVERPLUS_SWEEP_BASELINE_ARM"


def launch_dir() -> Path:
    """Where the command was started (stable across Hydra jobs and worker processes)."""
    env = os.environ.get(LAUNCH_DIR_VAR)
    if env:
        return Path(env).resolve()
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.cwd).resolve()
    return Path.cwd().resolve()
