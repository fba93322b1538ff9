"""Hydra callbacks: one MLflow parent run per sweep invocation, and the comparison at the end of a multirun.

``on_multirun_start`` creates the parent run (tags ``sweep``, ``role=parent``) in the launching process and hands
its id, the tracking URI and the launch directory to the jobs through environment variables, which every launcher
(basic, joblib/loky, submitit) passes on to the job processes. Jobs then start their runs with
``parent_run_id`` (works across processes). ``on_multirun_end`` runs ``leverplus.compare`` and closes the parent: FINISHED, or KILLED when
the sweep was interrupted (Ctrl-C, or SIGTERM of the launching process), with the jobs that finished compared. Before
the parent is created, the runs an earlier killed invocation of the same sweep left RUNNING are marked KILLED
(``leverplus.tracking.lifecycle``); a sweep whose parent run cannot be created stops before launching any job.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, NoReturn, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from leverplus.analysis.compare import compare_sweep
from leverplus.env import (
    LAUNCH_DIR_VAR,
    PARENT_RUN_ID_VAR,
    SWEEP_ARM_KEYS_VAR,
    SWEEP_BASELINE_ARM_VAR,
    SWEEP_FAILED_JOBS_VAR,
    SWEEP_JOBS_VAR,
    SWEEP_START_VAR,
    SWEEP_VAR,
    TRACKING_URI_VAR,
)
from leverplus.errors import INPUT_ERROR_EXIT_STATUS, LeverPlusInputError
from leverplus.sweeps.plain import PlainSweep, plain_sweep, plain_sweep_name
from leverplus.tracking.lifecycle import close_dead_sweep_runs, run_url
from leverplus.tracking.run import MlflowRun, Terminated, _raise_terminated
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


#: sweepers that keep their own MLflow parent run (the Optuna study's); the callback leaves their tracking alone
OWN_TRACKING_SWEEPERS = ("leverplus.sweeps.optuna.ResumableOptunaSweeper",)
#: Hydra's basic sweeper: a plain multirun, whose arms and baseline come from the swept keys (``plain``)
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
#: environment variables the callback sets for the jobs, removed when the multirun ends
_EXPORTED = (PARENT_RUN_ID_VAR, SWEEP_VAR, SWEEP_JOBS_VAR, SWEEP_START_VAR, SWEEP_ARM_KEYS_VAR, SWEEP_BASELINE_ARM_VAR)


def _sweeper_target(config: DictConfig) -> str:
    return str(OmegaConf.select(config, "hydra.sweeper._target_", default=""))


def _plain_overrides(config: DictConfig) -> List[str]:
    """What the basic sweeper sweeps: ``hydra.sweeper.params`` first, then the command line (its own order)."""
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    task = list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    return [f"{k}={v}" for k, v in dict(params).items()] + task


def _stop_sweep(sweep: str, e: Exception) -> NoReturn:
    """Stop the sweep before any job is launched (Hydra turns a callback's exception into a warning and goes on, so
    the callback exits): bad input as one line and exit status 2, anything else with its reason and status 1."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        traceback.print_exc()
    if isinstance(e, LeverPlusInputError):
        print(f"[leverplus] error: {e}", file=sys.stderr)
        raise SystemExit(INPUT_ERROR_EXIT_STATUS) from None
    print(f"[leverplus] error: [{sweep}] the sweep's MLflow parent run could not be created "
          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); no job was launched", file=sys.stderr)
    raise SystemExit(1) from None


class SweepTrackingCallback(Callback):
    """Registered for every multirun by ``conf/train.yaml`` (key ``leverplus_sweep``; the ablation sweep base sets the
    same key, so it is never registered twice). ``sweep_name`` None: ``tracking.sweep``, else a plain multirun's
    ``multirun-<date>-<time>``."""

    def __init__(self, sweep_name: Optional[str] = None, compare: bool = True,
                 fail_on_compare_error: bool = False) -> None:
        self.sweep_name = sweep_name
        self.compare = compare
        self.fail_on_compare_error = fail_on_compare_error
        self.parent_id: Optional[str] = None
        self.uri: Optional[str] = None
        self.experiment: Optional[str] = None
        self._previous_sigterm: Any = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ[LAUNCH_DIR_VAR] = str(Path(config.hydra.runtime.cwd).resolve())
        os.environ[SWEEP_START_VAR] = repr(time.time())
        if _sweeper_target(config) in OWN_TRACKING_SWEEPERS:
            return
        self.sweep_name = self.sweep_name or config.tracking.sweep or plain_sweep_name(config.hydra.sweep.dir)
        os.environ[SWEEP_VAR] = self.sweep_name
        plain = None
        if _sweeper_target(config) == BASIC_SWEEPER:
            plain = plain_sweep(_plain_overrides(config))
            os.environ.update({SWEEP_JOBS_VAR: str(plain.n_jobs), SWEEP_ARM_KEYS_VAR: json.dumps(plain.arm_keys),
                               SWEEP_BASELINE_ARM_VAR: plain.baseline_arm})
        if not config.tracking.enabled or OmegaConf.select(config, "hydra.sweeper.dry_run", default=False):
            return  # a dry run lists jobs and writes nothing to MLflow
        try:
            self._open_parent(config, plain)
        except Exception as e:
            _stop_sweep(self.sweep_name, e)
        if threading.current_thread() is threading.main_thread():  # SIGTERM of the launcher ends the sweep KILLED
            self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)

    def _open_parent(self, config: DictConfig, plain: Optional[PlainSweep]) -> None:
        """The parent run, after closing the dead runs an earlier killed invocation of this sweep left RUNNING."""
        self.uri = resolve_tracking_uri(config.tracking.uri)
        source = str(enum_value(config.data.source))
        self.experiment = config.tracking.experiment or f"leverplus-{source}"
        exp_id = get_or_create_experiment(self.experiment, self.uri, resolve_artifact_root(config.tracking.artifact_root))
        closed = close_dead_sweep_runs(self.uri, exp_id, self.sweep_name)
        if closed:
            log.info(f"[{self.sweep_name}] {len(closed)} run(s) left RUNNING by a killed invocation marked KILLED")
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
        params = sweep_params(config)
        params["sweep.name"] = self.sweep_name
        if plain is not None:
            params.update({"sweep.overrides": json.dumps(_plain_overrides(config)), "sweep.jobs": plain.n_jobs,
                           "sweep.arm_keys": json.dumps(plain.arm_keys), "sweep.baseline": plain.baseline_arm})
        run.log_params(params)
        os.environ[PARENT_RUN_ID_VAR] = run.run_id
        os.environ[TRACKING_URI_VAR] = self.uri
        log.info(f"[{self.sweep_name}] MLflow parent run {run.run_id} in experiment {self.experiment}: "
                 f"{run_url(self.uri, exp_id, run.run_id)}")
        self._exp_id = exp_id

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        exc = sys.exc_info()[1]  # Hydra calls this in a ``finally``: the exception that ends the sweep, if any
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        try:
            if self.parent_id is not None:
                self._close_parent(config, exc)
        finally:
            for var in _EXPORTED:
                os.environ.pop(var, None)
        if isinstance(exc, Terminated):
            signal.raise_signal(signal.SIGTERM)  # the parent is closed: now what SIGTERM would have done

    def _close_parent(self, config: DictConfig, exc: Optional[BaseException]) -> None:
        """Compare what finished, then close the parent FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED."""
        failed = int(os.environ.get(SWEEP_FAILED_JOBS_VAR, "0"))
        status = "FINISHED" if exc is None else "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        try:
            self._run.set_tags({"failed_jobs": failed})
            if status == "KILLED":
                why = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted (Ctrl-C)"
                self._run.set_tags({"error": f"{why}: the comparison covers the jobs that finished"})
                log.warning(f"[{self.sweep_name}] sweep {why}: comparing the jobs that finished")
            elif status == "FAILED":
                self._run.set_tags({"error": f"{type(exc).__name__}: {exc}"[:5000]})
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
            log.info(f"[{self.sweep_name}] MLflow parent run {self.parent_id} {status}: "
                     f"{run_url(self.uri, self._exp_id, self.parent_id)}")
