"""Optuna studies over GRPO knobs: where a study lives, which trials count, and what its MLflow parent run shows.

The resumable Optuna sweeper (``leverplus/optuna_sweeper.py``) runs the ask/tell loop; the rules it follows live
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
  parameter-importance plots, and how often the RCE phase was computed vs reused.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

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


# ---------------------------------------------------------------------------------------------- MLflow


class StudyTracker:
    """One MLflow parent run per study (re-opened on resume) and the bookkeeping of its trials' child runs."""

    PARENT_ATTR = "mlflow_parent_run_id"  # study user attr

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, study_name: str) -> None:
        import mlflow

        self.uri, self.experiment_id = uri, experiment_id
        self.parent_run_id, self.study_name = parent_run_id, study_name
        self.client = mlflow.MlflowClient(tracking_uri=uri)

    # -------------------------------------------------------------- lifecycle
    @classmethod
    def open(cls, study: Any, *, tracking_uri: str, experiment: str, artifact_root: str, storage: str,
             tags: Mapping[str, Any]) -> "StudyTracker":
        """Re-open the study's parent run (its id is a study user attr) or create it; export it to the jobs."""
        from leverplus.tracking import MlflowRun, get_or_create_experiment, with_retries
        from leverplus.utils import git_info

        exp_id = get_or_create_experiment(experiment, tracking_uri, artifact_root)
        parent = study.user_attrs.get(cls.PARENT_ATTR)
        tracker = None
        if parent:
            import mlflow

            client = mlflow.MlflowClient(tracking_uri=tracking_uri)
            try:
                run = with_retries(lambda: client.get_run(parent))
                if run.info.experiment_id == exp_id and run.info.lifecycle_stage == "active":
                    with_retries(lambda: client.update_run(parent, status="RUNNING"))
                    tracker = cls(tracking_uri, exp_id, parent, study.study_name)
                    log.info(f"[{study.study_name}] re-opened MLflow parent run {parent}")
            except Exception as e:  # deleted, or another store: start a new parent
                log.warning(f"[{study.study_name}] parent run {parent} not usable ({e}); creating a new one")
        if tracker is None:
            g = git_info()
            run = MlflowRun(uri=tracking_uri, experiment_id=exp_id, run_name=f"study:{study.study_name}",
                            tags={"sweep": study.study_name, "role": "parent", STUDY_TAG: study.study_name,
                                  "optuna_storage": storage, "git_commit": g["commit"], "git_dirty": g["dirty"]})
            study.set_user_attr(cls.PARENT_ATTR, run.run_id)
            tracker = cls(tracking_uri, exp_id, run.run_id, study.study_name)
            log.info(f"[{study.study_name}] MLflow parent run {run.run_id} in experiment {experiment}")
        tracker.set_tags(tags)
        os.environ["LEVERPLUS_PARENT_RUN_ID"] = tracker.parent_run_id
        os.environ["LEVERPLUS_TRACKING_URI"] = tracking_uri
        os.environ["LEVERPLUS_SWEEP"] = study.study_name
        return tracker

    def close(self, status: str = "FINISHED") -> None:
        from leverplus.tracking import with_retries

        with_retries(lambda: self.client.set_terminated(self.parent_run_id, status))
        for var in ("LEVERPLUS_PARENT_RUN_ID", "LEVERPLUS_SWEEP"):
            os.environ.pop(var, None)

    # -------------------------------------------------------------- parent logging
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        from leverplus.tracking import with_retries

        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items() if v is not None]
        if items:
            with_retries(lambda: self.client.log_batch(self.parent_run_id, tags=items))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        from leverplus.tracking import _clean, _finite, with_retries

        ts = int(time.time() * 1000)
        items = [Metric(_clean(k), float(v), ts, int(step)) for k, v in metrics.items() if _finite(v)]
        if items:
            with_retries(lambda: self.client.log_batch(self.parent_run_id, metrics=items))

    def log_artifact(self, path: Path) -> None:
        from leverplus.tracking import with_retries

        with_retries(lambda: self.client.log_artifact(self.parent_run_id, str(path)))

    # -------------------------------------------------------------- child runs
    def children(self) -> List[Any]:
        from leverplus.tracking import with_retries

        flt = f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'"
        return with_retries(lambda: self.client.search_runs([self.experiment_id], filter_string=flt,
                                                            max_results=50000))

    def child_runs(self, number: int) -> List[Any]:
        from leverplus.tracking import with_retries

        flt = (f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' and tags.{TRIAL_TAG} = '{int(number)}'")
        return with_retries(lambda: self.client.search_runs([self.experiment_id], filter_string=flt))

    def record_trial(self, number: int, state: str, params: Mapping[str, Any], value: Optional[float],
                     error: Optional[str], best_value: Optional[float]) -> Optional[str]:
        """Tag the trial's child run with its Optuna state (creating a FAILED one when the job failed before its
        run started), make a FAIL trial FAILED in MLflow, and log the trial's value on the parent."""
        from leverplus.tracking import MlflowRun, with_retries

        from mlflow.entities import RunTag

        runs = self.child_runs(number)
        created = not runs
        if runs:
            run_id = runs[0].info.run_id
        else:  # e.g. a config error raised before the job opened its run
            run = MlflowRun(uri=self.uri, experiment_id=self.experiment_id, run_name=f"trial_{number}",
                            tags={"sweep": self.study_name, "role": "trial", TRIAL_TAG: number,
                                  STUDY_TAG: self.study_name}, parent_run_id=self.parent_run_id)
            run.log_params(params)
            run_id = run.run_id
        tags = {STATE_TAG: state, **({"error": error[:5000]} if error else {})}
        with_retries(lambda: self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))
        status = with_retries(lambda: self.client.get_run(run_id)).info.status
        if state == "FAIL" and status != "FAILED":  # e.g. a non-finite objective from a run that ended normally
            with_retries(lambda: self.client.set_terminated(run_id, "FAILED"))
        elif created:
            with_retries(lambda: self.client.set_terminated(run_id, "FINISHED"))
        metrics = {"trial_objective": value} if value is not None else {}
        if best_value is not None:
            metrics["best_value"] = best_value
        self.log_metrics(metrics, step=number)
        return run_id

    def kill_runs_of(self, number: int) -> None:
        """Child runs of an interrupted trial, left RUNNING by the killed process: KILLED."""
        from leverplus.tracking import with_retries

        for run in self.child_runs(number):
            if run.info.status == "RUNNING":
                with_retries(lambda: self.client.set_tag(run.info.run_id, STATE_TAG, "FAIL (interrupted)"))
                with_retries(lambda: self.client.set_terminated(run.info.run_id, "KILLED"))

    def rce_reuse(self) -> Dict[str, int]:
        """How many trials computed the RCE phase (logged ``rce/loss``) and how many reused it from the cache."""
        runs = self.children()
        return {
            "rce_phase_computed": sum("rce/loss" in r.data.metrics for r in runs),
            "rce_cache_hits": sum(r.data.tags.get("cache_hit_rce") == "True" for r in runs),
        }


# ---------------------------------------------------------------------------------------------- report


@dataclass
class StudyReport:
    best_trial: Optional[int]
    best_value: Optional[float]
    best_params: Dict[str, Any]
    best_test: Dict[str, float]  # the best trial's test figures (never used for selection)
    counts: Dict[str, int]
    files: List[Path]


def best_trial_test_metrics(trial: Any, test_prefix: str = "test/") -> Dict[str, float]:
    """The test figures of a trial, read from its ``metrics.json`` (written by every run)."""
    out_dir = trial.user_attrs.get(OUTPUT_DIR_ATTR)
    path = Path(out_dir) / "metrics.json" if out_dir else None
    if path is None or not path.exists():
        return {}
    metrics = json.loads(path.read_text())["metrics"]
    return {k: float(v) for k, v in metrics.items() if k.startswith(test_prefix)}


def _plots(study: Any, out_dir: Path) -> Tuple[List[Path], Dict[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import warnings

    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    files, errors = [], {}
    for name, fn in (("optimization_history", ovm.plot_optimization_history),
                     ("param_importances", ovm.plot_param_importances)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            path = out_dir / f"{name}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            files.append(path)
        except Exception as e:  # e.g. importances need >= 2 completed trials
            errors[f"{name}_error"] = f"{type(e).__name__}: {e}"
    return files, errors


def report_study(study: Any, out_dir: Path, *, n_trials: int, counted_states: Sequence[str] = COUNTED_STATES,
                 tracker: Optional[StudyTracker] = None, test_prefix: str = "test/") -> StudyReport:
    """Best params/value, plots and the best trial's test figures: to ``out_dir`` and to the MLflow parent."""
    import yaml

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    counts = {
        "trials_counted": n_counted(trials, counted_states),
        "trials_complete": sum(_state(t) == "COMPLETE" for t in trials),
        "trials_failed": n_failed(trials),
        "trials_interrupted": sum(bool(t.user_attrs.get(INTERRUPTED_ATTR)) for t in trials),
        "n_trials": int(n_trials),
    }
    complete = [t for t in trials if _state(t) == "COMPLETE"]
    best = study.best_trial if complete else None
    best_test = best_trial_test_metrics(best, test_prefix) if best is not None else {}
    results = {
        "name": "optuna",
        "study_name": study.study_name,
        "best_trial": best.number if best else None,
        "best_params": dict(best.params) if best else {},
        "best_value": best.value if best else None,
        "best_trial_test_metrics_not_used_for_selection": best_test,
        **counts,
    }
    results_path = out_dir / "optimization_results.yaml"
    results_path.write_text(yaml.safe_dump(results, sort_keys=False))
    trials_path = out_dir / "trials.csv"
    study.trials_dataframe().to_csv(trials_path, index=False)
    plot_files, plot_errors = _plots(study, out_dir) if complete else ([], {"plots_error": "no COMPLETE trial"})
    files = [results_path, trials_path, *plot_files]
    if best is not None:
        log.info(f"[{study.study_name}] best trial {best.number}: value {best.value} params {best.params}")
        if best_test:
            accs = {k: round(v, 4) for k, v in best_test.items() if k.endswith("_acc")}
            log.info(f"[{study.study_name}] best trial's test figures (not used for selection): {accs}")
    if tracker is not None:
        step = max((t.number for t in trials), default=0)  # the per-trial series on the parent use the trial number
        metrics: Dict[str, float] = {k: float(v) for k, v in counts.items()}
        tags: Dict[str, Any] = dict(plot_errors)
        if best is not None:
            metrics["best_value"] = float(best.value)
            metrics.update({f"best_params/{k}": float(v) for k, v in best.params.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
            metrics.update({f"best_trial_test/{k[len(test_prefix):]}": v for k, v in best_test.items()})
            tags.update({"best_trial": best.number, "best_params": json.dumps(best.params, sort_keys=True),
                         "best_trial_run_id": best.user_attrs.get(RUN_ID_ATTR)})
            if not best_test:
                tags["best_trial_test"] = (f"not evaluated: add {test_prefix.rstrip('/')} to "
                                           "eval.downstream_splits")
        metrics.update(tracker.rce_reuse())
        tracker.log_metrics(metrics, step=step)
        tracker.set_tags(tags)
        for f in files:
            tracker.log_artifact(f)
    return StudyReport(best.number if best else None, best.value if best else None,
                       dict(best.params) if best else {}, best_test, counts, files)
