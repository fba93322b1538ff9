"""ResumableOptunaSweeper: hydra-optuna-sweeper's ask/tell loop, made resumable and failure tolerant.

Registered as ``hydra/sweeper=leverplus_optuna`` (``sweeps/grpo_optuna.yaml`` selects it). Same config keys, search
space grammar (``tag(log, interval(a, b))``, ``int(interval(a, b))``, ``choice``, ``range``) and sampler configs as the
upstream ``optuna`` sweeper (1.4.0rc3), whose helpers it reuses. What differs, and why:

* ``n_trials`` is the study's total. A re-run loads the study from ``storage`` and launches only the trials still
  missing; upstream launches ``n_trials`` more on every invocation and exposes no ``MaxTrialsCallback``.
* ``storage: null`` means ``sqlite:///<folder of the MLflow sqlite store>/optuna.db`` (absolute), never in-memory:
  an in-memory study cannot be resumed.
* Trials left RUNNING by a killed invocation are FAILED, marked ``interrupted`` and retried with the same
  parameters (one invocation per study at a time on a host; trials of live sweepers elsewhere are left alone).
* ``max_failure_rate`` is a fraction of the whole study: it aborts once its failed trials exceed
  ``max_failure_rate * n_trials``. Upstream checks each ask batch, so with ``n_jobs=1`` any rate below 1 aborts on
  the first failure.
* The sampler's seed is offset by the number of trials already in the study, so a resumed study does not replay
  the random start-up samples of its first invocation (``leverplus.study.sampler_seed``).
* ``enqueue``: parameter sets evaluated first (Optuna's ``enqueue_trial``, skipped when already in the study), e.g.
  the reference defaults as a warm start.
* The objective must be a validation metric (``objective_prefix``), checked before any trial runs.
* Each trial's job learns its trial number (``tracking.extra_tags.optuna_trial``; ``hydra.job.num`` is the trial
  number too) and becomes an MLflow child run of one parent run per study (``leverplus.study.StudyTracker``); the
  parent gets the study report (``leverplus.study.report_study``). Only single-objective studies.

This module is the Hydra plugin only (config, registration, the Sweeper facade over the upstream helpers); the
loop and its pieces are ``leverplus.sweeps.study_loop``.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from omegaconf import DictConfig, OmegaConf

from leverplus.env import LAUNCH_DIR_VAR
from leverplus.errors import LeverPlusInputError
from leverplus.sweeps.study_loop import (
    StudySettings,
    TooManyFailedTrials,
    load_study,
    open_tracker,
    prepare_storage,
    run_trials,
    stale_trials,
)
from leverplus.tracking.store import resolve_tracking_uri
from leverplus.tracking.trials import require_validation_objective, resolve_storage
from leverplus.utils import launch_dir

log = logging.getLogger(__name__)


@dataclass
class ResumableOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "leverplus.sweeps.optuna.ResumableOptunaSweeper"
    storage: Optional[str] = None  # None: sqlite:///<folder of the MLflow sqlite store>/optuna.db
    n_jobs: int = 1  # trials asked per batch (a parallel launcher runs a batch at once)
    max_failure_rate: float = 0.5  # of n_trials, for the whole study
    counted_states: List[str] = field(default_factory=lambda: ["COMPLETE", "PRUNED", "FAIL"])
    retry_interrupted: bool = True
    enqueue: List[Dict[str, Any]] = field(default_factory=list)
    objective_prefix: str = "val/"  # the train config's `objective` must start with it (validation data only)


ConfigStore.instance().store(group="hydra/sweeper", name="leverplus_optuna", node=ResumableOptunaSweeperConf,
                             provider="leverplus")

__all__ = ["ResumableOptunaSweeper", "ResumableOptunaSweeperConf", "TooManyFailedTrials"]


class ResumableOptunaSweeper(OptunaSweeperImpl):
    def __init__(self, sampler: Any, direction: Any, storage: Optional[str], study_name: Optional[str],
                 n_trials: int, n_jobs: int, max_failure_rate: float, custom_search_space: Optional[str],
                 params: Optional[DictConfig], counted_states: Sequence[str], retry_interrupted: bool,
                 enqueue: Sequence[Any], objective_prefix: str) -> None:
        super().__init__(None, direction, storage, study_name, n_trials, n_jobs, max_failure_rate,
                         custom_search_space, params)
        self.sampler_cfg = sampler  # built in sweep(): its seed depends on the study's history
        self.counted_states = tuple(counted_states)
        self.retry_interrupted = retry_interrupted
        self.enqueue = [OmegaConf.to_container(p, resolve=True) if OmegaConf.is_config(p) else dict(p)
                        for p in (enqueue or [])]
        self.objective_prefix = objective_prefix

    def _checked_directions(self) -> List[str]:
        """The study's one direction, after checking the objective and that the study can be resumed."""
        require_validation_objective(self.config.objective, self.objective_prefix)
        if not self.study_name:
            raise LeverPlusInputError("the study has no name, so it cannot be resumed",
                                      field="hydra.sweeper.study_name", fix="e.g. hydra.sweeper.study_name=grpo_optuna")
        directions = self._get_directions()
        if len(directions) != 1:
            raise LeverPlusInputError(f"one objective only, got directions {directions}",
                                      field="hydra.sweeper.direction", fix="direction: maximize (or minimize)")
        return directions

    def _search_space(self, arguments: List[str]) -> Tuple[Dict[str, Any], Dict[str, Any], List[str]]:
        """(distributions, fixed params, fixed overrides) from the sweeper's params and the command line."""
        self._process_searchspace_config()
        params_conf = self._parse_sweeper_params_config() + list(arguments)
        distributions, fixed_params, fixed_overrides = create_params_from_overrides(params_conf)
        for name in fixed_params:
            distributions.pop(name, None)
        return distributions, fixed_params, fixed_overrides

    def _settings(self) -> StudySettings:
        return StudySettings(self.study_name, self.n_trials, self.n_jobs, self.max_failure_rate,
                             self.counted_states, self.retry_interrupted, self.enqueue)

    def sweep(self, arguments: List[str]) -> None:
        cfg = self.config
        os.environ[LAUNCH_DIR_VAR] = str(Path(cfg.hydra.runtime.cwd).resolve())
        launch = launch_dir()
        sweep_dir = (launch / cfg.hydra.sweep.dir).resolve()
        directions = self._checked_directions()
        tracking_uri = resolve_tracking_uri(cfg.tracking.uri)
        storage = prepare_storage(resolve_storage(self.storage, tracking_uri, launch))
        distributions, fixed_params, fixed_overrides = self._search_space(arguments)
        study, n_existing = load_study(self.study_name, storage, directions, self.sampler_cfg,
                                       metric_name=str(cfg.objective))
        stale = stale_trials(study, socket.gethostname(), os.getpid())
        settings = self._settings()
        tracker = open_tracker(cfg, study, settings, tracking_uri=tracking_uri, storage=storage,
                               direction=directions[0], sweep_dir=sweep_dir, distributions=distributions)
        status = "FAILED"
        try:
            run_trials(study, settings, stale=stale, tracker=tracker, storage=storage, n_existing=n_existing,
                       configure=lambda batch: self._configure_trials(batch, distributions, fixed_params,
                                                                      fixed_overrides),
                       launch=lambda overrides, first: self.launcher.launch(overrides, initial_job_idx=first),
                       sweep_dir=sweep_dir)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if tracker is not None:
                tracker.close(status)
