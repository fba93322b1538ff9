"""The resumable Optuna sweeper's ask/tell loop and its pieces (the plugin facade is ``leverplus.sweeps.optuna``).

The rules it follows (which trials count, the failure budget, stale trials, storage URLs) are
``leverplus.tracking.trials``; the MLflow side of a study is ``leverplus.tracking.study``.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import optuna
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from leverplus.analysis.study_report import report_study
from leverplus.errors import LeverPlusInputError
from leverplus.tracking.store import resolve_artifact_root
from leverplus.tracking.study import StudyTracker
from leverplus.tracking.trials import (
    ERROR_ATTR,
    HOST_ATTR,
    INTERRUPTED_ATTR,
    OUTPUT_DIR_ATTR,
    PID_ATTR,
    RETRY_OF_ATTR,
    RUN_ID_ATTR,
    check_directions,
    failure_budget,
    is_stale,
    n_counted,
    n_failed,
    sampler_seed,
    trial_overrides,
    trials_to_run,
)
from leverplus.utils import enum_value

log = logging.getLogger(__name__)

#: the sampler classes a sweep config may instantiate (Hydra's ``_execution_whitelist_``)
SAMPLER_WHITELIST = ("hydra_plugins.hydra_optuna_sweeper.*", "optuna.samplers.*")


class TooManyFailedTrials(RuntimeError):
    """The study's failed trials exceeded max_failure_rate * n_trials."""


@dataclass(frozen=True)
class StudySettings:
    """The sweeper's study settings (``hydra.sweeper.*``)."""

    study_name: str
    n_trials: int
    n_jobs: int
    max_failure_rate: float
    counted_states: Tuple[str, ...]
    retry_interrupted: bool
    enqueue: Sequence[Dict[str, Any]]


# ---------------------------------------------------------------------------------------------- opening


def prepare_storage(storage: str) -> str:
    """Create the folder of a sqlite storage file."""
    if storage.startswith("sqlite:///"):
        Path(storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return storage


def make_sampler(sampler_cfg: Any, n_existing: int) -> Any:
    """The configured sampler, its seed offset by the trials already in the study (``sampler_seed``)."""
    cfg = OmegaConf.to_container(sampler_cfg, resolve=True)
    if cfg.get("_partial_"):
        raise LeverPlusInputError(
            f"sampler {cfg.get('_target_')} is not supported by the resumable sweeper",
            field="hydra.sweeper.sampler", fix="use tpe/random/cmaes/gp/qmc, or hydra/sweeper=optuna for a grid")
    if "seed" in cfg:
        cfg["seed"] = sampler_seed(cfg["seed"], n_existing)
    return instantiate(cfg, _execution_whitelist_=SAMPLER_WHITELIST)


def load_study(name: str, storage: str, directions: List[str], sampler_cfg: Any,
               metric_name: Optional[str] = None) -> Tuple[Any, int]:
    """The study (created or resumed) with its seeded sampler, and the number of trials it had. ``metric_name``
    (the objective) is stored as the study's metric name: optuna-dashboard and the study's plots show it."""
    study = optuna.create_study(study_name=name, storage=storage, directions=directions,
                                sampler=optuna.samplers.RandomSampler(), load_if_exists=True)
    check_directions([d.name for d in study.directions], directions, name, storage)
    if metric_name:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([str(metric_name)])
    n_existing = len(study.trials)
    study.sampler = make_sampler(sampler_cfg, n_existing)
    return study, n_existing


def stale_trials(study: Any, host: str, pid: int) -> List[Any]:
    """RUNNING trials whose sweeper process is gone."""
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    return [t for t in running if is_stale(t, host, pid)]


def open_tracker(cfg: DictConfig, study: Any, s: StudySettings, *, tracking_uri: str, storage: str,
                 direction: str, sweep_dir: Path, distributions: Dict[str, Any]) -> Optional[StudyTracker]:
    """The study's MLflow parent run, or None when tracking is off."""
    if not cfg.tracking.enabled:
        return None
    source = str(enum_value(cfg.data.source))
    return StudyTracker.open(
        study, tracking_uri=tracking_uri, experiment=cfg.tracking.experiment or f"leverplus-{source}",
        artifact_root=resolve_artifact_root(cfg.tracking.artifact_root), storage=storage,
        tags={"optuna_storage": storage, "n_trials": s.n_trials, "direction": direction,
              "objective": cfg.objective, "max_failure_rate": s.max_failure_rate,
              "sampler": type(study.sampler).__name__, "sweep_dir": str(sweep_dir),
              "search_space": {k: repr(v) for k, v in distributions.items()}})


# ---------------------------------------------------------------------------------------------- trials


def retire_stale(study: Any, stale: List[Any], tracker: Optional[StudyTracker], retry: bool) -> None:
    """FAIL trials of a killed invocation (marked interrupted, not counted) and enqueue their retries."""
    for t in stale:
        optuna.trial.Trial(study, t._trial_id).set_user_attr(INTERRUPTED_ATTR, True)
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        if tracker is not None:
            tracker.kill_runs_of(t.number)
        if retry:
            study.enqueue_trial(dict(t.params), user_attrs={RETRY_OF_ATTR: t.number})
        log.warning(f"[{study.study_name}] trial {t.number} was interrupted (its sweeper is gone): FAILED, "
                    f"{'retried with the same params' if retry else 'not retried'}")


def _objective(ret: Any) -> Tuple[Optional[float], Optional[str]]:
    """(value, None) for a finite objective, else (None, error)."""
    try:
        value = float(ret.return_value)  # re-raises the job's exception when it failed
        if not math.isfinite(value):
            raise ValueError(f"the objective is not finite ({value})")
        return value, None
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


def tell(study: Any, trial: Any, ret: Any, tracker: Optional[StudyTracker]) -> str:
    """Report one job's outcome to Optuna (COMPLETE or FAIL) and to its MLflow child run."""
    value, error = _objective(ret)
    if error:
        log.warning(f"[{study.study_name}] trial {trial.number} FAILED: {error}")
    out_dir = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir") if ret.hydra_cfg else None
    if out_dir:
        trial.set_user_attr(OUTPUT_DIR_ATTR, str(out_dir))
    if error:
        trial.set_user_attr(ERROR_ATTR, error[:2000])
    state = "FAIL" if error else "COMPLETE"
    if tracker is not None:
        run_id = tracker.record_trial(trial.number, state, trial.params, value, error, best_with(study, value))
        trial.set_user_attr(RUN_ID_ATTR, run_id)
    if error:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    else:
        study.tell(trial, value)
    return state


def best_with(study: Any, value: Optional[float]) -> Optional[float]:
    """The study's best value once ``value`` is told (single objective)."""
    try:
        prev = study.best_value
    except ValueError:  # no COMPLETE trial yet
        prev = None
    if value is None or prev is None:
        return prev if value is None else value
    return max(prev, value) if study.direction.name == "MAXIMIZE" else min(prev, value)


def check_failures(study: Any, s: StudySettings, max_failures: int) -> None:
    failed = n_failed(study.get_trials(deepcopy=False))
    if failed > max_failures:
        raise TooManyFailedTrials(
            f"study {s.study_name!r}: {failed} failed trials exceed max_failure_rate={s.max_failure_rate} "
            f"x n_trials={s.n_trials} (= {max_failures}); see the trials' fail_reason. Raise "
            "hydra.sweeper.max_failure_rate to go on: a re-run resumes the study.")


# ---------------------------------------------------------------------------------------------- the loop

#: (trials of one batch) -> their Hydra overrides (the upstream sweeper's ``_configure_trials``)
Configure = Callable[[List[Any]], List[Sequence[str]]]
#: (overrides, first job number) -> job returns (the launcher)
Launch = Callable[[List[Tuple[str, ...]], int], Sequence[Any]]


def _todo(study: Any, s: StudySettings, storage: str, n_existing: int, max_failures: int) -> int:
    """Trials still to run for the study to reach ``n_trials`` counted ones (logged with the study's state)."""
    trials = study.get_trials(deepcopy=False)
    counted = n_counted(trials, s.counted_states)
    live = sum(t.state.name == "RUNNING" for t in trials)
    todo = trials_to_run(s.n_trials, counted, live)
    log.info(f"[{s.study_name}] storage {storage}: {len(trials)} trials, {counted} counted, {live} "
             f"running elsewhere; n_trials={s.n_trials} -> {todo} to run "
             f"(sampler seed offset {n_existing}, failure budget {max_failures})")
    return todo


def run_trials(study: Any, s: StudySettings, *, stale: List[Any], tracker: Optional[StudyTracker], storage: str,
               n_existing: int, configure: Configure, launch: Launch, sweep_dir: Path) -> None:
    """Retire stale trials, enqueue the warm start, then ask/launch/tell in batches of ``n_jobs`` until the study
    has ``n_trials`` counted trials; the study report is written at the end, or when the failure budget is spent."""
    host, pid = socket.gethostname(), os.getpid()
    try:
        retire_stale(study, stale, tracker, s.retry_interrupted)
        for params in s.enqueue:
            study.enqueue_trial(params, skip_if_exists=True)
        max_failures = failure_budget(s.n_trials, s.max_failure_rate)
        todo = _todo(study, s, storage, n_existing, max_failures)
        check_failures(study, s, max_failures)
        while todo > 0:
            batch = [study.ask() for _ in range(min(s.n_jobs, todo))]
            for t in batch:
                t.set_user_attr(HOST_ATTR, host)
                t.set_user_attr(PID_ATTR, pid)
            overrides = [tuple(ov) + tuple(trial_overrides(s.study_name, t.number))
                         for t, ov in zip(batch, configure(batch))]
            for t, ret in zip(batch, launch(overrides, batch[0].number)):
                tell(study, t, ret, tracker)
            todo -= len(batch)
            check_failures(study, s, max_failures)
    except TooManyFailedTrials:
        report_study(study, sweep_dir, n_trials=s.n_trials, counted_states=s.counted_states, tracker=tracker)
        raise
    report_study(study, sweep_dir, n_trials=s.n_trials, counted_states=s.counted_states, tracker=tracker)
