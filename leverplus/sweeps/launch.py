"""Launching the distinct jobs of an ablation sweep: tracking tags, the dry-run listing, batches through the
configured Hydra launcher (a failed job is counted, not fatal unless ``fail_fast``), and the aliases record."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import mlflow
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf

from leverplus.data.formats.io import atomic_write_json
from leverplus.env import PARENT_RUN_ID_VAR, SWEEP_FAILED_JOBS_VAR, SWEEP_JOBS_VAR, TRACKING_URI_VAR
from leverplus.sweeps.grid import Job
from leverplus.tracking.store import with_retries

log = logging.getLogger(__name__)


def job_overrides(sweep_name: str, fixed: List[str], jobs: List[Job]) -> List[List[str]]:
    """Each job's overrides plus its tracking tags; ``skip_finished`` makes a re-run resume the sweep."""
    return [fixed + job.overrides + [f"tracking.sweep={sweep_name}", f"tracking.arm='{job.arm}'",
                                     f"tracking.role={job.role}", "tracking.skip_finished=true"]
            for job in jobs]


def record_aliases(config: DictConfig, aliases: Dict[str, str]) -> None:
    """multirun.yaml and aliases.json in the sweep dir; aliases.json on the MLflow parent run too, if any."""
    sweep_dir = Path(config.hydra.sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, sweep_dir / "multirun.yaml")
    atomic_write_json(sweep_dir / "aliases.json", aliases, indent=2)
    parent = os.environ.get(PARENT_RUN_ID_VAR)
    uri = os.environ.get(TRACKING_URI_VAR)
    if parent and uri:
        client = mlflow.MlflowClient(tracking_uri=uri)
        with_retries(lambda: client.log_text(parent, json.dumps(aliases, indent=2), "aliases.json"))


def print_dry_run(sweep_name: str, batches: List[List[str]], n_total: int, n_aliases: int) -> None:
    for i, b in enumerate(batches):
        print(f"job {i}: {' '.join(b)}")
    print(f"[{sweep_name}] dry run: {n_total} jobs in the grid, {len(batches)} distinct, {n_aliases} aliases")


def launch_all(launcher: Launcher, sweep_name: str, batches: List[List[str]], max_batch_size: Optional[int],
               fail_fast: bool) -> List[Any]:
    """Launch in batches of ``max_batch_size`` (all at once when unset); the failed-job count goes to the sweep
    callback through ``SWEEP_FAILED_JOBS_VAR``."""
    size = max_batch_size or len(batches) or 1
    os.environ[SWEEP_JOBS_VAR] = str(len(batches))  # each job's "[k/N]" line
    returns, failed, idx = [], 0, 0
    for start in range(0, len(batches), size):
        batch = batches[start : start + size]  # (no validate_batch_is_legal: dedupe composed every job already)
        results = launcher.launch(batch, initial_job_idx=idx)
        idx += len(batch)
        for r in results:
            try:
                _ = r.return_value
            except Exception as e:  # a failed job is FAILED in MLflow; the sweep goes on
                failed += 1
                log.error(f"[{sweep_name}] job failed: {type(e).__name__}: {e}")
                if fail_fast:
                    raise
        returns.append(results)
    os.environ[SWEEP_FAILED_JOBS_VAR] = str(failed)
    log.info(f"[{sweep_name}] done: {len(batches)} jobs launched, {failed} failed")
    return returns
