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
"""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from omegaconf import DictConfig, OmegaConf

from leverplus.env import LAUNCH_DIR_VAR

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


class TooManyFailedTrials(RuntimeError):
    """The study's failed trials exceeded max_failure_rate * n_trials."""


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

    # ------------------------------------------------------------------ pieces
    def _make_sampler(self, n_existing: int) -> Any:
        from leverplus.errors import LeverPlusInputError
        from leverplus.tracking.trials import sampler_seed

        cfg = OmegaConf.to_container(self.sampler_cfg, resolve=True)
        if cfg.get("_partial_"):
            raise LeverPlusInputError(
                f"sampler {cfg.get('_target_')} is not supported by the resumable sweeper",
                field="hydra.sweeper.sampler", fix="use tpe/random/cmaes/gp/qmc, or hydra/sweeper=optuna for a grid")
        if "seed" in cfg:
            cfg["seed"] = sampler_seed(cfg["seed"], n_existing)
        return instantiate(cfg, _execution_whitelist_=("hydra_plugins.hydra_optuna_sweeper.*", "optuna.samplers.*"))

    def _retire_stale(self, study: Any, stale: List[Any], tracker: Any) -> None:
        """FAIL trials of a killed invocation (marked interrupted, not counted) and enqueue their retries."""
        import optuna

        from leverplus.tracking.trials import INTERRUPTED_ATTR, RETRY_OF_ATTR

        for t in stale:
            optuna.trial.Trial(study, t._trial_id).set_user_attr(INTERRUPTED_ATTR, True)
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            if tracker is not None:
                tracker.kill_runs_of(t.number)
            if self.retry_interrupted:
                study.enqueue_trial(dict(t.params), user_attrs={RETRY_OF_ATTR: t.number})
            log.warning(f"[{study.study_name}] trial {t.number} was interrupted (its sweeper is gone): FAILED, "
                        f"{'retried with the same params' if self.retry_interrupted else 'not retried'}")

    def _tell(self, study: Any, trial: Any, ret: Any, tracker: Any) -> str:
        """Report one job's outcome to Optuna (COMPLETE or FAIL) and to its MLflow child run."""
        import optuna

        from leverplus.tracking.trials import ERROR_ATTR, OUTPUT_DIR_ATTR, RUN_ID_ATTR

        value: Optional[float] = None
        error: Optional[str] = None
        try:
            value = float(ret.return_value)  # re-raises the job's exception when it failed
            if not math.isfinite(value):
                raise ValueError(f"the objective is not finite ({value})")
        except Exception as e:
            value, error = None, f"{type(e).__name__}: {e}"
            log.warning(f"[{study.study_name}] trial {trial.number} FAILED: {error}")
        out_dir = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir") if ret.hydra_cfg else None
        if out_dir:
            trial.set_user_attr(OUTPUT_DIR_ATTR, str(out_dir))
        if error:
            trial.set_user_attr(ERROR_ATTR, error[:2000])
        state = "FAIL" if error else "COMPLETE"
        if tracker is not None:
            best = self._best_with(study, value)
            run_id = tracker.record_trial(trial.number, state, trial.params, value, error, best)
            trial.set_user_attr(RUN_ID_ATTR, run_id)
        if error:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, value)
        return state

    @staticmethod
    def _best_with(study: Any, value: Optional[float]) -> Optional[float]:
        """The study's best value once ``value`` is told (single objective)."""
        try:
            prev = study.best_value
        except ValueError:  # no COMPLETE trial yet
            prev = None
        if value is None or prev is None:
            return prev if value is None else value
        return max(prev, value) if study.direction.name == "MAXIMIZE" else min(prev, value)

    # ------------------------------------------------------------------ the loop
    def sweep(self, arguments: List[str]) -> None:
        import optuna

        from leverplus.analysis.study_report import report_study
        from leverplus.errors import LeverPlusInputError
        from leverplus.tracking.store import resolve_artifact_root, resolve_tracking_uri
        from leverplus.tracking.study import StudyTracker
        from leverplus.tracking.trials import (
            HOST_ATTR,
            PID_ATTR,
            check_directions,
            failure_budget,
            is_stale,
            n_counted,
            require_validation_objective,
            resolve_storage,
            trial_overrides,
            trials_to_run,
        )
        from leverplus.utils import launch_dir

        cfg = self.config
        os.environ[LAUNCH_DIR_VAR] = str(Path(cfg.hydra.runtime.cwd).resolve())
        launch = launch_dir()
        sweep_dir = (launch / cfg.hydra.sweep.dir).resolve()
        require_validation_objective(cfg.objective, self.objective_prefix)
        if not self.study_name:
            raise LeverPlusInputError("the study has no name, so it cannot be resumed",
                                      field="hydra.sweeper.study_name", fix="e.g. hydra.sweeper.study_name=grpo_optuna")
        directions = self._get_directions()
        if len(directions) != 1:
            raise LeverPlusInputError(f"one objective only, got directions {directions}",
                                      field="hydra.sweeper.direction", fix="direction: maximize (or minimize)")
        tracking_uri = resolve_tracking_uri(cfg.tracking.uri)
        storage = resolve_storage(self.storage, tracking_uri, launch)
        if storage.startswith("sqlite:///"):
            Path(storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)

        self._process_searchspace_config()
        params_conf = self._parse_sweeper_params_config() + list(arguments)
        distributions, fixed_params, fixed_overrides = create_params_from_overrides(params_conf)
        for name in fixed_params:
            distributions.pop(name, None)

        study = optuna.create_study(study_name=self.study_name, storage=storage, directions=directions,
                                    sampler=optuna.samplers.RandomSampler(), load_if_exists=True)
        check_directions([d.name for d in study.directions], directions, self.study_name, storage)
        n_existing = len(study.trials)
        study.sampler = self._make_sampler(n_existing)
        host, pid = socket.gethostname(), os.getpid()
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        stale = [t for t in running if is_stale(t, host, pid)]

        tracker = None
        if cfg.tracking.enabled:
            source = cfg.data.source.value if hasattr(cfg.data.source, "value") else str(cfg.data.source)
            tracker = StudyTracker.open(
                study, tracking_uri=tracking_uri, experiment=cfg.tracking.experiment or f"leverplus-{source}",
                artifact_root=resolve_artifact_root(cfg.tracking.artifact_root), storage=storage,
                tags={"optuna_storage": storage, "n_trials": self.n_trials, "direction": directions[0],
                      "objective": cfg.objective, "max_failure_rate": self.max_failure_rate,
                      "sampler": type(study.sampler).__name__, "sweep_dir": str(sweep_dir),
                      "search_space": {k: repr(v) for k, v in distributions.items()}})
        status = "FAILED"
        try:
            self._retire_stale(study, stale, tracker)
            for params in self.enqueue:
                study.enqueue_trial(params, skip_if_exists=True)
            trials = study.get_trials(deepcopy=False)
            counted = n_counted(trials, self.counted_states)
            live = sum(t.state.name == "RUNNING" for t in trials)
            todo = trials_to_run(self.n_trials, counted, live)
            max_failures = failure_budget(self.n_trials, self.max_failure_rate)
            log.info(f"[{self.study_name}] storage {storage}: {len(trials)} trials, {counted} counted, {live} "
                     f"running elsewhere; n_trials={self.n_trials} -> {todo} to run "
                     f"(sampler seed offset {n_existing}, failure budget {max_failures})")
            self._check_failures(study, max_failures)
            while todo > 0:
                batch = [study.ask() for _ in range(min(self.n_jobs, todo))]
                for t in batch:
                    t.set_user_attr(HOST_ATTR, host)
                    t.set_user_attr(PID_ATTR, pid)
                overrides = self._configure_trials(batch, distributions, fixed_params, fixed_overrides)
                overrides = [tuple(ov) + tuple(trial_overrides(self.study_name, t.number))
                             for t, ov in zip(batch, overrides)]
                returns = self.launcher.launch(overrides, initial_job_idx=batch[0].number)
                for t, ret in zip(batch, returns):
                    self._tell(study, t, ret, tracker)
                todo -= len(batch)
                self._check_failures(study, max_failures)
            report_study(study, sweep_dir, n_trials=self.n_trials,
                           counted_states=self.counted_states, tracker=tracker)
            status = "FINISHED"
        except TooManyFailedTrials:
            report_study(study, sweep_dir, n_trials=self.n_trials,
                           counted_states=self.counted_states, tracker=tracker)
            raise
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if tracker is not None:
                tracker.close(status)

    def _check_failures(self, study: Any, max_failures: int) -> None:
        from leverplus.tracking.trials import n_failed

        failed = n_failed(study.get_trials(deepcopy=False))
        if failed > max_failures:
            raise TooManyFailedTrials(
                f"study {self.study_name!r}: {failed} failed trials exceed max_failure_rate={self.max_failure_rate} "
                f"x n_trials={self.n_trials} (= {max_failures}); see the trials' fail_reason. Raise "
                "hydra.sweeper.max_failure_rate to go on: a re-run resumes the study.")
