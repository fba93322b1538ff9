"""Hydra callbacks: one MLflow parent run per sweep invocation, and the comparison at the end of a multirun.

``on_multirun_start`` creates the parent run (tags ``sweep``, ``role=parent``) in the launching process and hands
its id, the tracking URI and the launch directory to the jobs through environment variables, which every launcher
(basic, joblib/loky, submitit) passes on to the job processes. Jobs then start their runs with
``parent_run_id`` (works across processes). ``on_multirun_end`` runs ``leverplus.compare`` and closes the parent.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from leverplus.analysis.compare import compare_sweep
from leverplus.env import LAUNCH_DIR_VAR, PARENT_RUN_ID_VAR, SWEEP_FAILED_JOBS_VAR, SWEEP_VAR, TRACKING_URI_VAR
from leverplus.tracking.run import MlflowRun
from leverplus.tracking.store import get_or_create_experiment, resolve_artifact_root, resolve_tracking_uri
from leverplus.utils import enum_value, git_info

log = logging.getLogger(__name__)


def sweep_params(config: DictConfig) -> Dict[str, Any]:
    """The parent run's params: what the sweep varies and against what (factors, baseline, pairing, overrides)."""
    sweeper = OmegaConf.to_container(config.hydra.sweeper, resolve=True)
    keep = ("factors", "baseline", "baseline_label", "paired_by", "arm_overrides", "alias_identical_rewards")
    params = {f"sweep.{k}": json.dumps(sweeper[k], sort_keys=True) for k in keep if k in sweeper}
    params["sweep.name"] = config.tracking.sweep or ""
    params["sweep.launcher"] = str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
    return params


class SweepTrackingCallback(Callback):
    def __init__(self, sweep_name: str, compare: bool = True, fail_on_compare_error: bool = False) -> None:
        self.sweep_name = sweep_name
        self.compare = compare
        self.fail_on_compare_error = fail_on_compare_error
        self.parent_id: Optional[str] = None
        self.uri: Optional[str] = None
        self.experiment: Optional[str] = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ[LAUNCH_DIR_VAR] = str(Path(config.hydra.runtime.cwd).resolve())
        if not config.tracking.enabled or OmegaConf.select(config, "hydra.sweeper.dry_run", default=False):
            return  # a dry run lists jobs and writes nothing to MLflow
        self.uri = resolve_tracking_uri(config.tracking.uri)
        source = str(enum_value(config.data.source))
        self.experiment = config.tracking.experiment or f"leverplus-{source}"
        exp_id = get_or_create_experiment(self.experiment, self.uri, resolve_artifact_root(config.tracking.artifact_root))
        g = git_info()
        run = MlflowRun(
            uri=self.uri,
            experiment_id=exp_id,
            run_name=f"sweep:{self.sweep_name}",
            tags={"sweep": self.sweep_name, "role": "parent", "git_commit": g["commit"], "git_dirty": g["dirty"],
                  "sweep_dir": config.hydra.sweep.dir},
        )
        self.parent_id = run.run_id
        self._run = run
        run.log_params(sweep_params(config))
        os.environ[PARENT_RUN_ID_VAR] = run.run_id
        os.environ[TRACKING_URI_VAR] = self.uri
        os.environ[SWEEP_VAR] = self.sweep_name
        log.info(f"[{self.sweep_name}] MLflow parent run {run.run_id} in experiment {self.experiment} ({self.uri})")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_id is None:
            return
        failed = int(os.environ.get(SWEEP_FAILED_JOBS_VAR, "0"))
        status = "FINISHED"
        try:
            self._run.set_tags({"failed_jobs": failed})
            if self.compare:
                out = Path(config.hydra.sweep.dir) / "comparison"
                compare_sweep(self.sweep_name, tracking_uri=self.uri, experiment=self.experiment,
                              parent_run_id=self.parent_id, out_dir=out, log_to_parent=True,
                              n_boot=config.eval.bootstrap_samples)
        except Exception as e:  # the jobs' runs are safe in MLflow; the comparison can be re-run by hand
            log.error(f"[{self.sweep_name}] comparison failed: {type(e).__name__}: {e}. "
                      f"Re-run: python -m leverplus.compare --sweep {self.sweep_name}")
            self._run.set_tags({"compare_error": f"{type(e).__name__}: {e}"[:5000]})
            if self.fail_on_compare_error:
                status = "FAILED"
                raise
        finally:
            self._run.finish(status)
            for var in (PARENT_RUN_ID_VAR, SWEEP_VAR):
                os.environ.pop(var, None)
