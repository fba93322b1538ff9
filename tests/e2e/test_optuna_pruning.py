"""Pruning: a trial's job reports its per-epoch validation value to its Optuna trial and stops when the study's
pruner says so; the sweeper tells the trial PRUNED. Real Optuna storage (sqlite), real Hydra JobReturn."""

import optuna
import pytest
from hydra.core.utils import JobReturn, JobStatus

from leverplus.env import OPTUNA_PRUNE_METRIC_VAR, OPTUNA_PRUNER_VAR, OPTUNA_STORAGE_VAR
from leverplus.sweeps.study_loop import _objective
from leverplus.tracking.pruning import TrialReporter, make_pruner, trial_reporter

MEDIAN = {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 2, "n_warmup_steps": 0}


class Recorder:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, dict(metrics)))


def _study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize", pruner=make_pruner(MEDIAN))
    for v in (0.5, 0.7):  # two finished trials: at step 3 their values 0.5 and 0.7, median 0.6
        t = study.ask()
        t.report(v, 3)
        study.tell(t, v)
    return study, storage


def test_a_trial_below_the_median_is_pruned_and_the_metrics_still_logged(tmp_path):
    study, _ = _study(tmp_path)
    inner = Recorder()
    rep = TrialReporter(inner, study.ask(), "val/m")
    rep.log_metrics({"val/other": 1.0}, step=2)  # not the reported metric: nothing reported
    assert rep.reported == 0
    rep.log_metrics({"val/m": 0.65}, step=3)  # above the median 0.6: goes on
    with pytest.raises(optuna.TrialPruned, match="step 3"):
        TrialReporter(inner, study.ask(), "val/m").log_metrics({"val/m": 0.55}, step=3)  # below 0.6
    assert [s for s, _ in inner.logged] == [2, 3, 3]  # every call reached the run's logger first


def test_the_job_finds_its_trial_from_the_sweepers_environment(tmp_path, monkeypatch, compose_cfg):
    study, storage = _study(tmp_path)
    t = study.ask()
    cfg = compose_cfg([f"++tracking.extra_tags.optuna_trial={t.number}", "++tracking.extra_tags.optuna_study=s"])
    assert trial_reporter(cfg, None) is None  # no pruner exported: the logger as it was
    import json
    monkeypatch.setenv(OPTUNA_STORAGE_VAR, storage)
    monkeypatch.setenv(OPTUNA_PRUNER_VAR, json.dumps(MEDIAN))
    monkeypatch.setenv(OPTUNA_PRUNE_METRIC_VAR, "val/m")
    rep = trial_reporter(cfg, None)
    assert isinstance(rep, TrialReporter) and rep.trial.number == t.number
    with pytest.raises(optuna.TrialPruned):
        rep.log_metrics({"val/m": 0.1}, step=3)
    assert optuna.load_study(study_name="s", storage=storage).trials[t.number].intermediate_values == {3: 0.1}


def test_a_pruned_job_is_told_pruned_not_failed():
    pruned = JobReturn(status=JobStatus.FAILED, _return_value=optuna.TrialPruned("pruned at step 3"))
    failed = JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError("boom"))
    done = JobReturn(status=JobStatus.COMPLETED, _return_value=0.5)
    assert _objective(pruned)[2] is True and _objective(pruned)[0] is None
    assert _objective(failed) == (None, "RuntimeError: boom", False)
    assert _objective(done) == (0.5, None, False)


def test_only_optuna_pruners_may_be_instantiated():
    with pytest.raises(Exception):
        make_pruner({"_target_": "os.system", "command": "true"})
    assert isinstance(make_pruner({"_target_": "optuna.pruners.HyperbandPruner", "min_resource": 1,
                                   "max_resource": 10}), optuna.pruners.HyperbandPruner)
