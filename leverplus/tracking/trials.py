"""Optuna studies over GRPO knobs: where a study lives, which trials count, and what its MLflow parent run shows.

The resumable Optuna sweeper (``leverplus/sweeps/optuna.py``) runs the ask/tell loop; the rules it follows live
here, so they can be tested without Hydra:

* storage: ``sqlite:///<folder of the MLflow sqlite store>/optuna.db`` (the launch dir when MLflow is not a sqlite
  file), an absolute path, so a study and its MLflow runs sit side by side and a re-run from anywhere finds both;
* budget: a study is done when it holds ``n_trials`` finished trials in total (COMPLETE, PRUNED and FAIL by
  default). A trial left RUNNING by a killed invocation is FAILED, marked ``interrupted``, retried with the same
  parameters, and not counted;
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
from typing import Any, Iterable, List, Optional, Sequence, Tuple

from leverplus.errors import LeverPlusInputError

log = logging.getLogger(__name__)

COUNTED_STATES: Tuple[str, ...] = ("COMPLETE", "PRUNED", "FAIL")  # Optuna's "finished" states
INTERRUPTED_ATTR = "interrupted"  # user attr of a trial FAILED because its invocation was killed
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


def counts_toward_budget(trial: Any, counted_states: Iterable[str] = COUNTED_STATES) -> bool:
    """Finished in a counted state, and not a FAIL caused by killing the sweeper (that one is retried)."""
    return _state(trial) in set(counted_states) and not trial.user_attrs.get(INTERRUPTED_ATTR, False)


def n_counted(trials: Iterable[Any], counted_states: Iterable[str] = COUNTED_STATES) -> int:
    states = tuple(counted_states)
    return sum(counts_toward_budget(t, states) for t in trials)


def n_failed(trials: Iterable[Any]) -> int:
    """Trials that failed on their own (interrupted ones excluded)."""
    return sum(_state(t) == "FAIL" and not t.user_attrs.get(INTERRUPTED_ATTR, False) for t in trials)


def trials_to_run(n_trials: int, counted: int, running_elsewhere: int = 0) -> int:
    """How many trials this invocation still launches so the study ends with ``n_trials`` counted trials."""
    return max(0, int(n_trials) - int(counted) - int(running_elsewhere))


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


def sampler_seed(seed: Optional[int], n_existing_trials: int) -> Optional[int]:
    """The sampler seed for an invocation: the configured seed offset by the trials already in the study.

    A fresh study uses the seed as given; a resumed one does not replay the random start-up samples of the first
    invocation. The same history of invocations gives the same trials.
    """
    return None if seed is None else int(seed) + int(n_existing_trials)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_stale(trial: Any, host: Optional[str] = None, my_pid: Optional[int] = None) -> bool:
    """A RUNNING trial whose sweeper process is gone (killed invocation).

    Known only for trials started on this host: a RUNNING trial from another host is assumed alive. A trial with
    no sweeper attrs (started by another tool) is treated as stale.
    """
    if _state(trial) != "RUNNING":
        return False
    host = host or socket.gethostname()
    my_pid = os.getpid() if my_pid is None else my_pid
    t_host, t_pid = trial.user_attrs.get(HOST_ATTR), trial.user_attrs.get(PID_ATTR)
    if t_host is None or t_pid is None:
        return True
    if t_host != host:
        return False
    return int(t_pid) == my_pid or not _pid_alive(int(t_pid))  # our own pid: left by an earlier process


def trial_overrides(study_name: str, number: int) -> List[str]:
    """Overrides that tell a trial's job its study and trial number (MLflow tags and run name)."""
    return [
        f"++tracking.extra_tags.{TRIAL_TAG}={int(number)}",
        f"++tracking.extra_tags.{STUDY_TAG}='{study_name}'",
        f"tracking.run_name='trial_{int(number)}'",
        f"tracking.sweep='{study_name}'",
        "tracking.role=trial",
    ]

