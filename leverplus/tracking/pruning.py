"""Optuna pruning inside a trial's job: the per-epoch validation value reported to the trial, and the run stopped
when the study's pruner says so.

The resumable sweeper (``leverplus/sweeps/optuna.py``) exports the study's storage, the metric to report and the
trial's number to its jobs (environment and ``tracking.extra_tags``); :func:`trial_reporter` wraps the run's metric
logger so that every epoch's value of that metric reaches ``trial.report`` and ``trial.should_prune()`` is asked
right after. A pruned job raises ``optuna.TrialPruned``; the sweeper tells the trial PRUNED (a counted, finished
state, not a failure)."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Mapping, Optional

import optuna
from hydra.utils import instantiate

from leverplus.env import OPTUNA_PRUNE_METRIC_VAR, OPTUNA_PRUNER_VAR, OPTUNA_STORAGE_VAR
from leverplus.tracking.trials import STUDY_TAG, TRIAL_TAG


class TrialReporter:
    """A metric logger (or nothing) plus the trial's intermediate values: ``log_metrics`` forwards the metrics, then
    reports ``metric`` at that step and raises ``optuna.TrialPruned`` when the pruner stops the trial."""

    def __init__(self, inner: Any, trial: Any, metric: str) -> None:
        self.inner, self.trial, self.metric = inner, trial, metric
        self.reported = 0

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.inner is not None:
            self.inner.log_metrics(metrics, step=step)
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(float(value)):
            return
        self.trial.report(float(value), int(step))
        self.reported += 1
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned by the study's pruner at step {step} ({self.metric}={value:.4f})")

    def __getattr__(self, name: str) -> Any:  # everything else is the inner logger's
        if self.inner is None:
            raise AttributeError(name)
        return getattr(self.inner, name)


#: the pruner classes a sweep config may instantiate
PRUNER_WHITELIST = ("optuna.pruners.*",)


def make_pruner(pruner_cfg: Optional[Dict[str, Any]]) -> Optional[Any]:
    """The configured pruner (``hydra.sweeper.pruner``: a ``_target_`` under ``optuna.pruners``), or None."""
    if not pruner_cfg:
        return None
    return instantiate(dict(pruner_cfg), _execution_whitelist_=PRUNER_WHITELIST)


def trial_reporter(cfg: Any, logger: Any) -> Any:
    """``logger`` wrapped in a :class:`TrialReporter` when this job is an Optuna trial of a study with a pruner;
    ``logger`` itself otherwise."""
    storage, metric = os.environ.get(OPTUNA_STORAGE_VAR), os.environ.get(OPTUNA_PRUNE_METRIC_VAR)
    tags = cfg.tracking.extra_tags or {}
    number: Optional[str] = tags.get(TRIAL_TAG)
    study_name: Optional[str] = tags.get(STUDY_TAG)
    if not (storage and metric and number is not None and study_name):
        return logger
    # the pruner lives on the Study object, not in the storage: the job builds the same one as the sweeper
    pruner = make_pruner(json.loads(os.environ.get(OPTUNA_PRUNER_VAR) or "null"))
    study = optuna.load_study(study_name=str(study_name), storage=storage, pruner=pruner)
    trial_id = next(t._trial_id for t in study.get_trials(deepcopy=False) if t.number == int(number))
    return TrialReporter(logger, optuna.trial.Trial(study, trial_id), metric)
