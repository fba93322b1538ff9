"""ResumableOptunaSweeper: hydra-optuna-sweeper's ask/tell loop, made resumable and failure tolerant.

Registered as ``hydra/sweeper=leverplus_optuna`` (``sweeps/grpo_optuna.yaml`` selects it). Same config keys, search
space grammar (``tag(log, interval(a, b))``, ``int(interval(a, b))``, ``choice``, ``range``) and sampler configs as the
upstream ``optuna`` sweeper (1.4.0rc3), whose helpers it reuses. What differs, and why:

* ``n_trials`` is the study's total. A re-run loads the study from ``storage`` and launches only the trials still
  missing; upstream launches ``n_trials`` more on every invocation and exposes no ``MaxTrialsCallback``.
* ``storage: null`` means ``sqlite:///<folder of the MLflow sqlite store>/optuna.db`` (absolute), never in-memory:
  an in-memory study cannot be resumed.
* Any number of workers (invocations, on one machine or many) may share a study: the budget is re-read from the
  storage before every ask, so together they stop at exactly ``n_trials``; a trial asked past the budget by a
  concurrent worker is released as ``surplus``. Storage: an RDB URL (sqlite on one machine, PostgreSQL/MySQL across
  machines) with Optuna's trial heartbeats, or ``journal:///abs/path.log`` (Optuna's JournalStorage, for a shared
  filesystem; no heartbeats there).
* A trial whose worker died (heartbeat older than ``grace_period``, or its process gone on this host) is FAILED,
  marked ``interrupted`` and retried with the same parameters by a live worker; a worker whose remaining trials are
  running elsewhere waits for them.
* The study records what defines it (search space, objective, direction, data fingerprint, code version) and
  refuses to resume under a mismatch, naming the difference and how to start a new study.
* ``max_failure_rate`` is a fraction of the whole study: it aborts once its failed trials exceed
  ``max_failure_rate * n_trials``. Upstream checks each ask batch, so with ``n_jobs=1`` any rate below 1 aborts on
  the first failure.
* The sampler's seed is offset by each trial's number, so concurrent workers never draw with the same seed and a
  resumed study does not replay the random start-up samples of its first invocation (``sampler_seed``).
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

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from omegaconf import DictConfig, OmegaConf

from leverplus.env import LAUNCH_DIR_VAR, OPTUNA_PRUNE_METRIC_VAR, OPTUNA_PRUNER_VAR, OPTUNA_STORAGE_VAR
from leverplus.errors import LeverPlusInputError
from leverplus.config.identity import COSMETIC, drop_path, to_container
from leverplus.pipeline import load_data
from leverplus.sweeps.study_loop import (
    StaleTrials,
    StudySettings,
    TooManyFailedTrials,
    load_study,
    open_storage,
    open_tracker,
    prepare_storage,
    run_trials,
)
from leverplus.tracking.pruning import make_pruner
from leverplus.tracking.store import resolve_tracking_uri
from leverplus.tracking.trials import require_validation_objective, resolve_storage
from leverplus.utils import code_version, launch_dir, stable_hash

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
    heartbeat_interval: int = 10  # s between a running trial's heartbeats (RDB storages)
    grace_period: Optional[int] = 60  # s without a heartbeat after which a trial's worker counts as dead
    poll_interval: float = 2.0  # s between budget checks while the remaining trials run on other workers
    # Pruning: e.g. {_target_: optuna.pruners.MedianPruner, n_startup_trials: 5, n_warmup_steps: 20}; each trial's job
    # reports prune_metric (default: eval.select_metric) at every epoch and stops when the pruner says so (PRUNED)
    pruner: Optional[Dict[str, Any]] = None
    prune_metric: Optional[str] = None


ConfigStore.instance().store(group="hydra/sweeper", name="leverplus_optuna", node=ResumableOptunaSweeperConf,
                             provider="leverplus")

__all__ = ["ResumableOptunaSweeper", "ResumableOptunaSweeperConf", "TooManyFailedTrials"]


class ResumableOptunaSweeper(OptunaSweeperImpl):
    def __init__(self, sampler: Any, direction: Any, storage: Optional[str], study_name: Optional[str],
                 n_trials: int, n_jobs: int, max_failure_rate: float, custom_search_space: Optional[str],
                 params: Optional[DictConfig], counted_states: Sequence[str], retry_interrupted: bool,
                 enqueue: Sequence[Any], objective_prefix: str, heartbeat_interval: int = 10,
                 grace_period: Optional[int] = 60, poll_interval: float = 2.0, pruner: Optional[Any] = None,
                 prune_metric: Optional[str] = None) -> None:
        super().__init__(None, direction, storage, study_name, n_trials, n_jobs, max_failure_rate,
                         custom_search_space, params)
        self.sampler_cfg = sampler  # built in sweep(): its seed depends on the study's history
        self.counted_states = tuple(counted_states)
        self.retry_interrupted = retry_interrupted
        self.enqueue = [OmegaConf.to_container(p, resolve=True) if OmegaConf.is_config(p) else dict(p)
                        for p in (enqueue or [])]
        self.objective_prefix = objective_prefix
        self.heartbeat_interval, self.grace_period, self.poll_interval = heartbeat_interval, grace_period, poll_interval
        self.pruner = OmegaConf.to_container(pruner, resolve=True) if OmegaConf.is_config(pruner) else pruner
        self.prune_metric = prune_metric

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

    def _identity(self, distributions: Dict[str, Any], directions: List[str]) -> Dict[str, Any]:
        """What defines the study: refused on resume when any of it changed (``check_identity``). ``config`` is the
        trials' shared config (the searched knobs and the knobs that do not change results left out)."""
        cfg = self.config
        job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        shared = to_container(job_cfg)
        for path in [*COSMETIC, *distributions]:
            drop_path(shared, path)
        return {"search_space": {k: repr(v) for k, v in sorted(distributions.items())},
                "config": stable_hash(shared), "objective": str(cfg.objective),
                "direction": directions[0], "data": load_data(job_cfg).fingerprint, "code": code_version()}

    def _export_pruning(self, study: Any, storage: str) -> None:
        """With a pruner: hand each trial's job the storage, the pruner and the metric to report (environment)."""
        for var in (OPTUNA_STORAGE_VAR, OPTUNA_PRUNER_VAR, OPTUNA_PRUNE_METRIC_VAR):
            os.environ.pop(var, None)
        if not self.pruner:
            return
        study.pruner = make_pruner(self.pruner)  # checks the config now, before any trial runs
        os.environ[OPTUNA_STORAGE_VAR] = storage
        os.environ[OPTUNA_PRUNER_VAR] = json.dumps(self.pruner)
        os.environ[OPTUNA_PRUNE_METRIC_VAR] = self.prune_metric or str(self.config.eval.select_metric)

    def sweep(self, arguments: List[str]) -> None:
        cfg = self.config
        os.environ[LAUNCH_DIR_VAR] = str(Path(cfg.hydra.runtime.cwd).resolve())
        launch = launch_dir()
        sweep_dir = (launch / cfg.hydra.sweep.dir).resolve()
        directions = self._checked_directions()
        tracking_uri = resolve_tracking_uri(cfg.tracking.uri)
        storage = prepare_storage(resolve_storage(self.storage, tracking_uri, launch))
        distributions, fixed_params, fixed_overrides = self._search_space(arguments)
        identity = self._identity(distributions, directions)
        on_stale = StaleTrials(self.retry_interrupted)
        study = load_study(self.study_name, open_storage(storage, on_stale, self.heartbeat_interval,
                                                         self.grace_period), directions, identity, storage,
                           metric_name=str(cfg.objective))
        settings = self._settings()
        self._export_pruning(study, storage)
        tracker = open_tracker(cfg, study, settings, tracking_uri=tracking_uri, storage=storage,
                               direction=directions[0], sweep_dir=sweep_dir, distributions=distributions)
        status = "FAILED"
        try:
            run_trials(study, settings, on_stale=on_stale, tracker=tracker, storage=storage,
                       sampler_cfg=self.sampler_cfg, poll_interval=self.poll_interval,
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
