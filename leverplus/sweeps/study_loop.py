"""The resumable Optuna sweeper's ask/tell loop and its pieces (the plugin facade is ``leverplus.sweeps.optuna``).

The rules it follows (which trials count, the failure budget, stale trials, storage URLs) are
``leverplus.tracking.trials``; the MLflow side of a study is ``leverplus.tracking.study``.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Mapping, Optional, Sequence, Tuple

import optuna
import optuna.storages.journal
from filelock import FileLock
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from leverplus.analysis.study_report import report_study
from leverplus.env import WORKER_HOST_VAR
from leverplus.errors import LeverPlusInputError
from leverplus.tracking.store import resolve_artifact_root
from leverplus.tracking.study import StudyTracker
from leverplus.tracking.trials import (
    ERROR_ATTR,
    HOST_ATTR,
    IDENTITY_ATTR,
    INTERRUPTED_ATTR,
    INTERRUPTED_STUDY_PREFIX,
    OUTPUT_DIR_ATTR,
    PID_ATTR,
    RETRY_OF_ATTR,
    RUN_ID_ATTR,
    SURPLUS_ATTR,
    check_directions,
    check_identity,
    failure_budget,
    interrupted_numbers,
    is_stale,
    is_surplus,
    n_counted,
    n_failed,
    sampler_seed,
    trial_overrides,
)
from leverplus.utils import enum_value

try:  # Optuna's trial heartbeat helpers (public in spirit: the same ones Study.optimize uses)
    from optuna.storages._heartbeat import fail_stale_trials, get_heartbeat_thread
except ImportError:  # pragma: no cover - a future Optuna that moved them
    from optuna.storages import fail_stale_trials  # type: ignore[no-redef]

    def get_heartbeat_thread(trial_id: int, storage: Any) -> Any:  # type: ignore[misc]
        raise RuntimeError("this Optuna has no heartbeat thread helper")

log = logging.getLogger(__name__)

#: the sampler classes a sweep config may instantiate (Hydra's ``_execution_whitelist_``)
SAMPLER_WHITELIST = ("hydra_plugins.hydra_optuna_sweeper.*", "optuna.samplers.*")
#: storage URL prefix of Optuna's JournalStorage on a file (a shared filesystem)
JOURNAL_PREFIX = "journal:///"


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
    """Create the folder of a sqlite or journal storage file."""
    for prefix in ("sqlite:///", JOURNAL_PREFIX):
        if storage.startswith(prefix):
            Path(storage[len(prefix):]).parent.mkdir(parents=True, exist_ok=True)
    return storage


class StaleTrials:
    """What happens to a trial whose worker died: FAILED, recorded as interrupted on the study (not counted, not a
    failure), its MLflow child runs KILLED, and the same parameters enqueued for whichever worker is alive. Called by
    Optuna's heartbeat check (any host) and by the same-host process check; only the worker that wins the FAIL
    transition runs it, so a trial is retried once."""

    def __init__(self, retry: bool) -> None:
        self.retry = retry
        self.tracker: Optional[StudyTracker] = None

    def __call__(self, study: Any, trial: Any) -> None:
        study.set_user_attr(f"{INTERRUPTED_STUDY_PREFIX}{trial.number}", True)
        if self.tracker is not None:
            self.tracker.kill_runs_of(trial.number)
        if self.retry:
            study.enqueue_trial(dict(trial.params), user_attrs={RETRY_OF_ATTR: trial.number})
        log.warning(f"[{study.study_name}] trial {trial.number} was interrupted (its worker is gone): FAILED, "
                    f"{'retried with the same params' if self.retry else 'not retried'}")


def open_storage(url: str, on_stale: StaleTrials, heartbeat_interval: Optional[int], grace_period: Optional[int]) -> Any:
    """The study storage: an RDB (sqlite for one machine; PostgreSQL/MySQL for many) with Optuna's trial heartbeats,
    or Optuna's JournalStorage for a shared filesystem (``journal:///abs/path.log``; Optuna keeps no heartbeats there,
    so a dead worker's trial is detected only on its own host). Schema creation by workers starting together on a
    fresh database is serialised (sqlite: a file lock) or retried (a server database)."""
    if url.startswith(JOURNAL_PREFIX):
        path = url[len(JOURNAL_PREFIX):]
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
    kwargs: Dict[str, Any] = {"heartbeat_interval": heartbeat_interval, "grace_period": grace_period,
                              "heartbeat_stale_trial_callback": on_stale}
    if url.startswith("sqlite:///"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
        with FileLock(url[len("sqlite:///"):] + ".lock", timeout=300):
            return optuna.storages.RDBStorage(url, **kwargs)
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except Exception as e:  # noqa: BLE001 -- a concurrent worker created the schema first
            if attempt == 4:
                raise
            log.info(f"storage {url}: retrying after {type(e).__name__} during schema creation")
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def make_sampler(sampler_cfg: Any, trial_number: int) -> Any:
    """The configured sampler, its seed offset by the trial's number (``sampler_seed``)."""
    cfg = OmegaConf.to_container(sampler_cfg, resolve=True)
    if cfg.get("_partial_"):
        raise LeverPlusInputError(
            f"sampler {cfg.get('_target_')} is not supported by the resumable sweeper",
            field="hydra.sweeper.sampler", fix="use tpe/random/cmaes/gp/qmc, or hydra/sweeper=optuna for a grid")
    if "seed" in cfg:
        cfg["seed"] = sampler_seed(cfg["seed"], trial_number)
    return instantiate(cfg, _execution_whitelist_=SAMPLER_WHITELIST)


def load_study(name: str, storage: Any, directions: List[str], identity: Mapping[str, Any], storage_url: str,
               metric_name: Optional[str] = None) -> Any:
    """The study (created or resumed), after checking that it is the same study: direction and identity (search
    space, objective, data fingerprint, code version). A fresh study records its identity. ``metric_name`` (the
    objective) is stored as the study's metric name: optuna-dashboard and the study's plots show it."""
    study = optuna.create_study(study_name=name, storage=storage, directions=directions,
                                sampler=optuna.samplers.RandomSampler(), load_if_exists=True)
    check_directions([d.name for d in study.directions], directions, name, storage_url)
    if metric_name:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([str(metric_name)])
    stored = study.user_attrs.get(IDENTITY_ATTR)
    if stored is None and not study.trials:
        study.set_user_attr(IDENTITY_ATTR, dict(identity))
    check_identity(stored, identity, name, storage_url)
    return study


def fail_dead_same_host(study: Any, on_stale: StaleTrials, host: str, pid: int) -> None:
    """RUNNING trials started on this host whose worker process is gone, FAILED at once (no need to wait for the
    heartbeat's grace period); trials of other hosts are left to Optuna's heartbeat check."""
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for t in running:
        if not is_stale(t, host, pid):
            continue
        optuna.trial.Trial(study, t._trial_id).set_user_attr(INTERRUPTED_ATTR, True)  # still RUNNING: writable
        try:
            won = study._storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            won = False  # another worker got there first
        if won:
            on_stale(study, study._storage.get_trial(t._trial_id))


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


def _objective(ret: Any) -> Tuple[Optional[float], Optional[str], bool]:
    """(value, None, False) for a finite objective; (None, error, pruned) otherwise."""
    try:
        value = float(ret.return_value)  # re-raises the job's exception when it failed
        if not math.isfinite(value):
            raise ValueError(f"the objective is not finite ({value})")
        return value, None, False
    except optuna.TrialPruned as e:
        return None, f"TrialPruned: {e}", True
    except Exception as e:
        return None, f"{type(e).__name__}: {e}", False


def tell(study: Any, trial: Any, ret: Any, tracker: Optional[StudyTracker]) -> str:
    """Report one job's outcome to Optuna (COMPLETE, PRUNED or FAIL) and to its MLflow child run."""
    value, error, pruned = _objective(ret)
    if pruned:
        log.info(f"[{study.study_name}] trial {trial.number} PRUNED: {error}")
        if tracker is not None:
            trial.set_user_attr(RUN_ID_ATTR, tracker.record_trial(trial.number, "PRUNED", trial.params, None, None,
                                                                  best_with(study, None)))
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return "PRUNED"
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
    failed = n_failed(study.get_trials(deepcopy=False), interrupted_numbers(study.user_attrs))
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


@contextmanager
def heartbeats(study: Any, trials: List[Any]) -> Iterator[None]:
    """Optuna's heartbeat for each of this worker's trials while they run (a no-op without heartbeats)."""
    threads = [get_heartbeat_thread(t._trial_id, study._storage) for t in trials]
    for th in threads:
        th.start()
    try:
        yield
    finally:
        for th in threads:
            th.join()


def _budget(study: Any, s: StudySettings) -> Tuple[int, int, List[Any], FrozenSet[int]]:
    """(counted, running) trials of the study now, with the trials and the interrupted numbers."""
    trials = study.get_trials(deepcopy=False)
    interrupted = interrupted_numbers(study.user_attrs)
    counted = n_counted(trials, s.counted_states, interrupted)
    running = sum(t.state.name == "RUNNING" for t in trials)
    return counted, running, trials, interrupted


def _ask(study: Any, s: StudySettings, host: str, pid: int, free: int) -> List[Any]:
    """Up to ``free`` (and ``n_jobs``) new trials within the budget; one asked past it by a concurrent worker is
    released as surplus."""
    batch = []
    for _ in range(min(s.n_jobs, free)):
        t = study.ask()
        t.set_user_attr(HOST_ATTR, host)
        t.set_user_attr(PID_ATTR, pid)
        trials = study.get_trials(deepcopy=False)
        if is_surplus(t.number, trials, s.n_trials, s.counted_states, interrupted_numbers(study.user_attrs)):
            t.set_user_attr(SURPLUS_ATTR, True)
            study.tell(t, state=optuna.trial.TrialState.FAIL)
            log.info(f"[{s.study_name}] trial {t.number} released: the budget of {s.n_trials} is taken")
            break
        batch.append(t)
    return batch


def _consecutive(batch: List[Any]) -> List[List[Any]]:
    """The batch split into runs of consecutive trial numbers (a launch numbers its jobs from the first one)."""
    runs: List[List[Any]] = []
    for t in batch:
        if runs and t.number == runs[-1][-1].number + 1:
            runs[-1].append(t)
        else:
            runs.append([t])
    return runs


def run_trials(study: Any, s: StudySettings, *, on_stale: StaleTrials, tracker: Optional[StudyTracker],
               storage: str, sampler_cfg: Any, configure: Configure, launch: Launch, sweep_dir: Path,
               poll_interval: float = 2.0) -> None:
    """Ask/launch/tell until the study holds ``n_trials`` counted trials, whoever runs them: the budget is re-read
    before every ask; while the rest is running on other workers, wait for them (and take over a dead worker's
    retried trial). The study report is written at the end, or when the failure budget is spent."""
    host, pid = os.environ.get(WORKER_HOST_VAR) or socket.gethostname(), os.getpid()
    on_stale.tracker = tracker
    try:
        for params in s.enqueue:
            study.enqueue_trial(params, skip_if_exists=True)
        max_failures = failure_budget(s.n_trials, s.max_failure_rate)
        waiting_said = False
        counted, running, trials, _ = _budget(study, s)
        log.info(f"[{s.study_name}] storage {storage}: {len(trials)} trials, {counted} counted, {running} running; "
                 f"n_trials={s.n_trials} -> {max(0, s.n_trials - counted - running)} to run (failure budget {max_failures})")
        while True:
            fail_stale_trials(study)  # another host's dead worker (Optuna's heartbeat)
            fail_dead_same_host(study, on_stale, host, pid)
            check_failures(study, s, max_failures)
            counted, running, _, _ = _budget(study, s)
            if counted >= s.n_trials:
                break
            free = s.n_trials - counted - running
            batch = _ask(study, s, host, pid, free) if free > 0 else []
            if not batch:
                if not waiting_said:
                    log.info(f"[{s.study_name}] {counted}/{s.n_trials} counted, {running} running on other "
                             "workers: waiting for them")
                    waiting_said = True
                time.sleep(poll_interval)
                continue
            waiting_said = False
            with heartbeats(study, batch):
                overrides = []
                for t in batch:  # one sampler seed per trial number: workers never draw with the same seed
                    study.sampler = make_sampler(sampler_cfg, t.number)
                    overrides.append(tuple(configure([t])[0]) + tuple(trial_overrides(s.study_name, t.number)))
                by_number = dict(zip([t.number for t in batch], overrides))
                for run in _consecutive(batch):
                    rets = launch([by_number[t.number] for t in run], run[0].number)
                    for t, ret in zip(run, rets):
                        tell(study, t, ret, tracker)
    except TooManyFailedTrials:
        report_study(study, sweep_dir, n_trials=s.n_trials, counted_states=s.counted_states, tracker=tracker)
        raise
    report_study(study, sweep_dir, n_trials=s.n_trials, counted_states=s.counted_states, tracker=tracker)
