"""The MLflow side of an Optuna study: one parent run per study (re-opened when the study is resumed) and
one child run per trial, tagged with the trial number and Optuna state.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import mlflow
from mlflow.entities import Metric, RunTag

from leverplus.env import PARENT_RUN_ID_VAR, SWEEP_VAR, TRACKING_URI_VAR
from leverplus.tracking.run import MlflowRun, _clean, _finite
from leverplus.tracking.store import get_or_create_experiment, with_retries
from leverplus.tracking.trials import STATE_TAG, STUDY_TAG, TRIAL_TAG
from leverplus.utils import git_info

# ---------------------------------------------------------------------------------------------- MLflow


log = logging.getLogger(__name__)


class StudyTracker:
    """One MLflow parent run per study (re-opened on resume) and the bookkeeping of its trials' child runs."""

    PARENT_ATTR = "mlflow_parent_run_id"  # study user attr

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, study_name: str) -> None:
        self.uri, self.experiment_id = uri, experiment_id
        self.parent_run_id, self.study_name = parent_run_id, study_name
        self.client = mlflow.MlflowClient(tracking_uri=uri)

    # -------------------------------------------------------------- lifecycle
    @classmethod
    def open(cls, study: Any, *, tracking_uri: str, experiment: str, artifact_root: str, storage: str,
             tags: Mapping[str, Any]) -> "StudyTracker":
        """Re-open the study's parent run (its id is a study user attr) or create it; export it to the jobs."""
        exp_id = get_or_create_experiment(experiment, tracking_uri, artifact_root)
        parent = study.user_attrs.get(cls.PARENT_ATTR)
        tracker = None
        if parent:
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
            tracker = cls._create_parent(study, tracking_uri, exp_id, experiment, storage)
        tracker.set_tags(tags)
        os.environ[PARENT_RUN_ID_VAR] = tracker.parent_run_id
        os.environ[TRACKING_URI_VAR] = tracking_uri
        os.environ[SWEEP_VAR] = study.study_name
        return tracker

    @classmethod
    def _create_parent(cls, study: Any, tracking_uri: str, exp_id: str, experiment: str,
                       storage: str) -> "StudyTracker":
        """The study's parent run when the study names none yet. Workers starting together each create one, then
        all adopt the earliest parent of the study found in the experiment (a worker's search runs after its own
        run is stored, so the later one always sees the earlier) and delete their own if it lost; the winner's id
        is recorded on the study."""
        g = git_info()
        run = MlflowRun(uri=tracking_uri, experiment_id=exp_id, run_name=f"study:{study.study_name}",
                        tags={"sweep": study.study_name, "role": "parent", STUDY_TAG: study.study_name,
                              "optuna_storage": storage, "optuna_study_id": study._study_id,
                              "git_commit": g["commit"], "git_dirty": g["dirty"]})
        client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        flt = (f"tags.role = 'parent' and tags.{STUDY_TAG} = '{study.study_name}' and "
               f"tags.optuna_study_id = '{study._study_id}'")
        found = with_retries(lambda: client.search_runs([exp_id], filter_string=flt, max_results=1000))
        live = [r for r in found if r.info.lifecycle_stage == "active"] or [client.get_run(run.run_id)]
        winner = min(live, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id
        if winner != run.run_id:
            with_retries(lambda: client.delete_run(run.run_id))
            log.info(f"[{study.study_name}] another worker created the study's parent run first: using {winner}")
        else:
            log.info(f"[{study.study_name}] MLflow parent run {winner} in experiment {experiment}")
        study.set_user_attr(cls.PARENT_ATTR, winner)
        return cls(tracking_uri, exp_id, winner, study.study_name)

    def close(self, status: str = "FINISHED") -> None:
        with_retries(lambda: self.client.set_terminated(self.parent_run_id, status))
        for var in (PARENT_RUN_ID_VAR, SWEEP_VAR):
            os.environ.pop(var, None)

    # -------------------------------------------------------------- parent logging
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items() if v is not None]
        if items:
            with_retries(lambda: self.client.log_batch(self.parent_run_id, tags=items))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        items = [Metric(_clean(k), float(v), ts, int(step)) for k, v in metrics.items() if _finite(v)]
        if items:
            with_retries(lambda: self.client.log_batch(self.parent_run_id, metrics=items))

    def log_artifact(self, path: Path) -> None:
        with_retries(lambda: self.client.log_artifact(self.parent_run_id, str(path)))

    # -------------------------------------------------------------- child runs
    def children(self) -> List[Any]:
        flt = f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'"
        return with_retries(lambda: self.client.search_runs([self.experiment_id], filter_string=flt,
                                                            max_results=50000))

    def child_runs(self, number: int) -> List[Any]:
        flt = (f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' and tags.{TRIAL_TAG} = '{int(number)}'")
        return with_retries(lambda: self.client.search_runs([self.experiment_id], filter_string=flt))

    def record_trial(self, number: int, state: str, params: Mapping[str, Any], value: Optional[float],
                     error: Optional[str], best_value: Optional[float]) -> Optional[str]:
        """Tag the trial's child run with its Optuna state (creating a FAILED one when the job failed before its
        run started), make a FAIL trial FAILED in MLflow, and log the trial's value on the parent."""
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
        elif state == "PRUNED" and status == "FAILED":  # stopped by the pruner, not broken
            with_retries(lambda: self.client.set_terminated(run_id, "KILLED"))
        elif created:
            with_retries(lambda: self.client.set_terminated(run_id, "FINISHED"))
        metrics = {"trial_objective": value} if value is not None else {}
        if best_value is not None:
            metrics["best_value"] = best_value
        self.log_metrics(metrics, step=number)
        return run_id

    def kill_runs_of(self, number: int) -> None:
        """Child runs of an interrupted trial, left RUNNING by the killed process: KILLED."""
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

