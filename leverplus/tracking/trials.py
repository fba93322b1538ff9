"""Optuna studies over GRPO knobs: where a study lives, which trials count, and what its MLflow parent run shows.

The resumable Optuna sweeper (``leverplus/sweeps/optuna.py``) runs the ask/tell loop; the rules it follows live
here, so they can be tested without Hydra:

* storage: ``sqlite:///<folder of the MLflow sqlite store>/optuna.db`` (the launch dir when MLflow is not a sqlite
  file), an absolute path, so a study and its MLflow runs sit side by side and a re-run from anywhere finds both;
* budget: a study is done when it holds ``n_trials`` finished trials in total (COMPLETE, PRUNED and FAIL by
  default), however many workers share it: the budget is re-read from the storage before every ask, and a trial
  asked past the budget by a concurrent worker is released (``surplus``, not counted). A trial left RUNNING by a
  killed worker (its heartbeat stopped, or its process is gone on this host) is FAILED, marked ``interrupted``,
  retried with the same parameters by whichever worker is alive, and not counted;
* failure budget: the study aborts once its failed trials exceed ``max_failure_rate * n_trials``;
* objective: a validation metric only; the best trial's test figures are reported afterwards, labelled, and never
  reach Optuna;
* MLflow: one parent run per study (re-opened when the study is resumed) and one child run per trial, tagged with
  the trial number and Optuna state; the parent gets the best params and value, the optimisation-history and
  parameter-importance plots, and how often the RCE phase was computed vs reused."""

from __future__ import annotations

import logging
import math
import os
import socket
from pathlib import Path
from typing import AbstractSet, Any, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple

from leverplus.errors import LeverPlusInputError
from leverplus.utils import pid_alive

log = logging.getLogger(__name__)

COUNTED_STATES: Tuple[str, ...] = ("COMPLETE", "PRUNED", "FAIL")  # Optuna's "finished" states
INTERRUPTED_ATTR = "interrupted"  # user attr of a trial FAILED because its invocation was killed
#: study user attr prefix ``interrupted:<number>``: a trial FAILED by another worker's heartbeat check (a finished
#: trial's own attrs can no longer be written)
INTERRUPTED_STUDY_PREFIX = "interrupted:"
SURPLUS_ATTR = "surplus"  # user attr of a trial asked past the budget by a concurrent worker: released, not counted
IDENTITY_ATTR = "leverplus_identity"  # study user attr: what defines the study (refused on mismatch when resumed)
RETRY_OF_ATTR = "retry_of"  # user attr of the retry: the number of the interrupted trial
HOST_ATTR, PID_ATTR = "sweeper_host", "sweeper_pid"  # which sweeper process runs a trial (stale detection)
OUTPUT_DIR_ATTR, RUN_ID_ATTR, ERROR_ATTR = "output_dir", "mlflow_run_id", "fail_reason"
TRIAL_TAG, STUDY_TAG, STATE_TAG = "optuna_trial", "optuna_study", "optuna_state"


# ---------------------------------------------------------------------------------------------- storage & objective


def _sqlite_path(url: str) -> Optional[str]:
    return url[len("sqlite:///") :] if url.startswith("sqlite:///") else None


def default_storage_url(tracking_uri: str, launch: Path, file_name: str = "optuna.db") -> str:
    """``sqlite:///<abs dir>/optuna.db`` beside the MLflow sqlite store, or in the launch dir for other stores."""
    path = _sqlite_path(tracking_uri)
    folder = Path(path).expanduser().parent if path else Path(launch)
    if not folder.is_absolute():
        folder = Path(launch) / folder
    return f"sqlite:///{(folder / file_name).resolve()}"


def absolute_storage_url(url: str, launch: Path) -> str:
    """A relative sqlite URL (``sqlite:///optuna.db``) made absolute against the launch dir; others unchanged."""
    path = _sqlite_path(url)
    if path is None or path.startswith(":memory:") or path == "":
        return url
    p = Path(path).expanduser()
    return f"sqlite:///{(p if p.is_absolute() else Path(launch) / p).resolve()}"


def resolve_storage(storage: Optional[str], tracking_uri: str, launch: Path) -> str:
    """The study's storage URL: the one given (made absolute), else beside the MLflow store."""
    return absolute_storage_url(storage, launch) if storage else default_storage_url(tracking_uri, launch)


def require_validation_objective(objective: str, prefix: str = "val/") -> None:
    """Trials are selected on validation data only: refuse any other objective before a trial runs."""
    if not str(objective).startswith(prefix):
        raise LeverPlusInputError(
            f"the study objective {objective!r} is not a validation metric (must start with {prefix!r})",
            field="objective",
            fix="e.g. objective=val/downstream_acc; the best trial's test figures are reported separately",
        )


def check_directions(stored: Sequence[str], wanted: Sequence[str], study_name: str, storage: str) -> None:
    """A resumed study must keep its direction(s)."""
    if [d.lower() for d in stored] != [d.lower() for d in wanted]:
        raise LeverPlusInputError(
            f"study {study_name!r} was created with direction {list(stored)}, this run asks for {list(wanted)}",
            file=storage,
            field="hydra.sweeper.direction",
            fix="keep the original direction, or start a new study with hydra.sweeper.study_name=NEW_NAME",
        )


# ---------------------------------------------------------------------------------------------- budget rules


def _state(trial: Any) -> str:
    return trial.state.name


def interrupted_numbers(study_user_attrs: Mapping[str, Any]) -> FrozenSet[int]:
    """Trial numbers another worker FAILED as interrupted (recorded on the study: see INTERRUPTED_STUDY_PREFIX)."""
    return frozenset(int(k[len(INTERRUPTED_STUDY_PREFIX):]) for k in study_user_attrs
                     if k.startswith(INTERRUPTED_STUDY_PREFIX))


def _not_a_real_outcome(trial: Any, interrupted: AbstractSet[int]) -> bool:
    """Interrupted (retried elsewhere) or released as surplus: neither a result nor a failure of the trial."""
    return (bool(trial.user_attrs.get(INTERRUPTED_ATTR, False)) or bool(trial.user_attrs.get(SURPLUS_ATTR, False))
            or trial.number in interrupted)


def counts_toward_budget(trial: Any, counted_states: Iterable[str] = COUNTED_STATES,
                         interrupted: AbstractSet[int] = frozenset()) -> bool:
    """Finished in a counted state, and not a FAIL caused by killing its worker (that one is retried) or by
    releasing a surplus trial."""
    return _state(trial) in set(counted_states) and not _not_a_real_outcome(trial, interrupted)


def n_counted(trials: Iterable[Any], counted_states: Iterable[str] = COUNTED_STATES,
              interrupted: AbstractSet[int] = frozenset()) -> int:
    states = tuple(counted_states)
    return sum(counts_toward_budget(t, states, interrupted) for t in trials)


def n_failed(trials: Iterable[Any], interrupted: AbstractSet[int] = frozenset()) -> int:
    """Trials that failed on their own (interrupted and surplus ones excluded)."""
    return sum(_state(t) == "FAIL" and not _not_a_real_outcome(t, interrupted) for t in trials)


def is_surplus(trial_number: int, trials: Iterable[Any], n_trials: int, counted_states: Iterable[str] = COUNTED_STATES,
               interrupted: AbstractSet[int] = frozenset()) -> bool:
    """Whether a just-asked trial lies past the budget: ``n_trials`` trials with smaller numbers are already
    counted, running or waiting. Trial numbers are assigned atomically by the storage, so concurrent workers agree,
    and a trial judged within the budget never makes the study overshoot ``n_trials``."""
    states = tuple(counted_states)
    ahead = 0
    for t in trials:
        if t.number >= trial_number or _not_a_real_outcome(t, interrupted):
            continue
        ahead += _state(t) in ("RUNNING", "WAITING") or counts_toward_budget(t, states, interrupted)
    return ahead >= int(n_trials)


def failure_budget(n_trials: int, max_failure_rate: float) -> int:
    """Failed trials the study tolerates: floor(max_failure_rate * n_trials); one more aborts it.

    The 1e-9 keeps float products such as 0.29 * 100 = 28.999999999999996 from losing a trial.
    """
    if not 0.0 <= max_failure_rate <= 1.0:
        raise LeverPlusInputError(
            f"max_failure_rate must be in [0, 1], got {max_failure_rate}",
            field="hydra.sweeper.max_failure_rate",
            fix="e.g. 0.5 (abort once more than half of n_trials failed)",
        )
    return int(math.floor(max_failure_rate * n_trials + 1e-9))


def sampler_seed(seed: Optional[int], trial_number: int) -> Optional[int]:
    """The sampler seed for one trial: the configured seed offset by the trial's number.

    Trial numbers are unique in a study, so concurrent workers never draw with the same seed (and never propose the
    same point from the same history), and a resumed study does not replay the random start-up samples of its first
    invocation. The same study history gives the same trials.
    """
    return None if seed is None else int(seed) + int(trial_number)



def is_stale(trial: Any, host: Optional[str] = None, my_pid: Optional[int] = None) -> bool:
    """A RUNNING trial whose sweeper process is gone (killed invocation).

    Known only for trials started on this host: a RUNNING trial from another host, or one whose worker has not
    yet tagged it (just asked), is left to Optuna's heartbeat check.
    """
    if _state(trial) != "RUNNING":
        return False
    host = host or socket.gethostname()
    my_pid = os.getpid() if my_pid is None else my_pid
    t_host, t_pid = trial.user_attrs.get(HOST_ATTR), trial.user_attrs.get(PID_ATTR)
    if t_host is None or t_pid is None:
        return False
    if t_host != host:
        return False
    return int(t_pid) == my_pid or not pid_alive(int(t_pid))  # our own pid: left by an earlier process


def identity_mismatch(stored: Optional[Mapping[str, Any]], wanted: Mapping[str, Any]) -> List[str]:
    """The parts of a study's identity (search space, objective, direction, data fingerprint, code version) that
    differ between the stored study and this invocation; empty when it may be resumed. A study created before
    identities were recorded (``stored`` None) is accepted."""
    if stored is None:
        return []
    return sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))


def check_identity(stored: Optional[Mapping[str, Any]], wanted: Mapping[str, Any], study_name: str,
                   storage: str) -> None:
    """Refuse to resume a study under another search space, objective, data or code: its trials would not be
    comparable, and the sampler would learn from a mix."""
    differ = identity_mismatch(stored, wanted)
    if differ:
        detail = "; ".join(f"{k}: stored {stored.get(k)!r}, now {wanted.get(k)!r}" for k in differ)  # type: ignore
        raise LeverPlusInputError(
            f"study {study_name!r} was created with another {', '.join(differ)} ({detail[:1500]})",
            file=storage, field="hydra.sweeper.study_name",
            fix=f"start a new study with hydra.sweeper.study_name={study_name}_v2 (or delete this one: optuna "
                f"delete-study --study-name {study_name} --storage {storage})")


def trial_overrides(study_name: str, number: int) -> List[str]:
    """Overrides that tell a trial's job its study and trial number (MLflow tags and run name)."""
    return [
        f"++tracking.extra_tags.{TRIAL_TAG}={int(number)}",
        f"++tracking.extra_tags.{STUDY_TAG}='{study_name}'",
        f"tracking.run_name='trial_{int(number)}'",
        f"tracking.sweep='{study_name}'",
        "tracking.role=trial",
    ]

