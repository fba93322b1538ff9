"""Optuna study over GRPO lr/epochs: sweeps/grpo_optuna.yaml, leverplus/optuna_sweeper.py, leverplus/study.py.

Rules first (hand-computed, no Hydra run), then REAL Hydra multiruns (`python -m leverplus.train -m
+sweep=grpo_optuna`) on the embedded tiny world against real sqlite stores (optuna.db beside mlflow.db in the launch
dir):

* a 4-trial study whose first trial diverges (NaN loss, enqueued with grpo.lr=1e30 through the sweeper's `enqueue`
  key, Optuna's own way of pinning a trial's parameters; the range check warns and lets it through), SIGKILLed while
  its 4th trial runs, resumed to exactly 4 counted trials, then run once more (nothing left to run); RCE computed once;
* a study whose every trial fails (a negative grpo.lr range: the config check raises before the run opens) and that
  aborts on its failure budget.
"""

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState, create_trial

from leverplus.errors import LeverPlusInputError
from leverplus.tracking import trials as S

TINY = ["data=sim_tiny", "rce.epochs=1", "sft.epochs=1", "model.hidden_dim=32", "eval.baselines=[zero_shot]",
        "grpo.epochs=int(interval(1,2))"]
DIVERGE = "hydra.sweeper.enqueue=[{grpo.lr:1e30,grpo.epochs:1}]"
SLOW_DIM = 512


# ---------------------------------------------------------------------------------------------- rules


def test_storage_sits_beside_the_mlflow_sqlite_store_as_an_absolute_url():
    assert S.default_storage_url("sqlite:////a/b/mlflow.db", Path("/x")) == "sqlite:////a/b/optuna.db"
    # a relative MLflow sqlite path is relative to the launch dir
    assert S.default_storage_url("sqlite:///rel/mlflow.db", Path("/x")) == "sqlite:////x/rel/optuna.db"
    # an MLflow server: the study goes to the launch dir
    assert S.default_storage_url("http://127.0.0.1:5000", Path("/x")) == "sqlite:////x/optuna.db"
    assert S.resolve_storage(None, "sqlite:////a/mlflow.db", Path("/x")) == "sqlite:////a/optuna.db"
    assert S.resolve_storage("sqlite:///studies/o.db", "sqlite:////a/mlflow.db", Path("/x")) == \
        "sqlite:////x/studies/o.db"
    assert S.resolve_storage("postgresql://u@h/db", "sqlite:////a/mlflow.db", Path("/x")) == "postgresql://u@h/db"


def test_failure_budget_is_a_fraction_of_the_whole_study():
    assert S.failure_budget(30, 0.5) == 15  # 0.5 * 30 = 15 failures tolerated, the 16th aborts
    assert S.failure_budget(4, 0.5) == 2  # 0.5 * 4 = 2
    assert S.failure_budget(3, 0.5) == 1  # floor(1.5) = 1
    assert S.failure_budget(100, 0.29) == 29  # 0.29 * 100 = 28.999999999999996 in floats: still 29
    assert S.failure_budget(10, 0.0) == 0  # upstream default: the first failure aborts
    with pytest.raises(LeverPlusInputError, match="max_failure_rate"):
        S.failure_budget(10, 1.5)


def _trial(state, number=0, **attrs):
    t = create_trial(state=state, value=0.5 if state == TrialState.COMPLETE else None, user_attrs=attrs)
    t.number = number
    return t


def test_a_trial_asked_past_the_budget_is_surplus():
    """n_trials=3. Ahead of trial 5: 0 COMPLETE, 1 FAIL (counted), 2 interrupted (retried, not counted), 3 RUNNING
    on another worker, 4 surplus (released): 3 counted/running -> trial 5 is surplus; trial 4 would not have been
    (only 0, 1, 3 ahead of it = 3 -> surplus too); trial 3 is within (0 and 1 ahead)."""
    trials = [_trial(TrialState.COMPLETE, 0), _trial(TrialState.FAIL, 1), _trial(TrialState.FAIL, 2, interrupted=True),
              _trial(TrialState.RUNNING, 3), _trial(TrialState.FAIL, 4, surplus=True)]
    assert S.is_surplus(5, trials, 3)
    assert S.is_surplus(4, trials, 3)
    assert not S.is_surplus(3, trials, 3)
    assert not S.is_surplus(5, trials, 4)  # a budget of 4: one slot left
    # a WAITING (enqueued) trial ahead will be run, so it holds a slot
    assert S.is_surplus(2, [_trial(TrialState.COMPLETE, 0), _trial(TrialState.WAITING, 1)], 2)
    # interrupted recorded on the study (another worker's heartbeat check) frees the slot
    assert not S.is_surplus(5, trials, 3, interrupted={1, 3})
    assert S.n_failed(trials) == 1 and S.n_counted(trials) == 2  # surplus and interrupted: neither


def test_a_resumed_study_keeps_its_identity():
    ident = {"search_space": {"grpo.lr": "FloatDistribution(1e-06, 0.0001, log=True)"}, "objective": "val/a",
             "data": "d1", "code": "c1"}
    S.check_identity(None, ident, "s", "sqlite:////x/o.db")  # a study from before identities: accepted
    S.check_identity(dict(ident), ident, "s", "sqlite:////x/o.db")
    assert S.identity_mismatch({**ident, "data": "d0"}, ident) == ["data"]
    with pytest.raises(LeverPlusInputError) as e:
        S.check_identity({**ident, "data": "d0", "code": "c0"}, ident, "grpo_optuna", "sqlite:////x/o.db")
    assert e.value.field == "hydra.sweeper.study_name" and "code, data" in e.value.problem
    assert "hydra.sweeper.study_name=grpo_optuna_v2" in e.value.fix and "delete-study" in e.value.fix


def test_which_trials_count_toward_the_budget():
    trials = [_trial(TrialState.COMPLETE), _trial(TrialState.FAIL), _trial(TrialState.FAIL, interrupted=True),
              _trial(TrialState.PRUNED), _trial(TrialState.RUNNING), _trial(TrialState.WAITING)]
    assert S.n_counted(trials) == 3  # COMPLETE + FAIL + PRUNED; the interrupted FAIL is retried, not counted
    assert S.n_counted(trials, ["COMPLETE"]) == 1
    assert S.n_failed(trials) == 1


def test_stale_trials_are_running_ones_whose_sweeper_process_is_gone():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    running = lambda **a: _trial(TrialState.RUNNING, **a)  # noqa: E731
    assert S.is_stale(running(sweeper_host="h", sweeper_pid=dead.pid), host="h", my_pid=os.getpid())
    assert not S.is_stale(running(sweeper_host="h", sweeper_pid=os.getppid()), host="h", my_pid=os.getpid())
    # our own pid recorded: left by an earlier process that had the same pid
    assert S.is_stale(running(sweeper_host="h", sweeper_pid=os.getpid()), host="h", my_pid=os.getpid())
    assert not S.is_stale(running(sweeper_host="other", sweeper_pid=dead.pid), host="h", my_pid=os.getpid())
    assert not S.is_stale(running(), host="h", my_pid=os.getpid())  # just asked, not yet tagged: left alone
    assert not S.is_stale(_trial(TrialState.COMPLETE, sweeper_host="h", sweeper_pid=dead.pid), host="h")


def test_sampler_seed_is_offset_by_the_trial_number():
    assert S.sampler_seed(1234, 0) == 1234  # trial 0: the seed as configured
    assert S.sampler_seed(1234, 3) == 1237  # trial 3 (whichever worker asks it)
    assert S.sampler_seed(None, 3) is None
    def draw(seed):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        return study.ask().suggest_float("x", 0.0, 1.0)

    assert draw(S.sampler_seed(1234, 0)) == draw(1234) != draw(S.sampler_seed(1234, 3))


def test_only_a_validation_objective_is_accepted():
    S.require_validation_objective("val/downstream_acc")
    S.require_validation_objective("val/offline/top1_reward")
    with pytest.raises(LeverPlusInputError) as e:
        S.require_validation_objective("test/downstream_acc")
    assert "objective" in str(e.value) and "val/" in str(e.value)


def test_a_resumed_study_keeps_its_direction():
    S.check_directions(["MAXIMIZE"], ["maximize"], "s", "sqlite:////x/optuna.db")
    with pytest.raises(LeverPlusInputError, match="hydra.sweeper.direction"):
        S.check_directions(["MAXIMIZE"], ["minimize"], "s", "sqlite:////x/optuna.db")


def test_sweep_config_and_trial_overrides_compose(compose_cfg, repo):
    cfg = compose_cfg(["+sweep=grpo_optuna", *S.trial_overrides("grpo_optuna", 3)])
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(repo / "conf")):
        h = compose("train", overrides=["+sweep=grpo_optuna"], return_hydra_config=True).hydra
    sw = h.sweeper
    assert sw._target_.endswith("ResumableOptunaSweeper") and sw.study_name == "grpo_optuna"
    assert sw.sampler._target_ == "optuna.samplers.TPESampler" and sw.sampler.seed is not None
    assert sw.direction == "maximize" and sw.n_trials == 30 and sw.storage is None and sw.max_failure_rate == 0.5
    assert sw.params["grpo.lr"] == "tag(log, interval(1e-6, 1e-4))"
    assert sw.params["grpo.epochs"] == "int(interval(1, 10))"
    assert cfg.rce.cache is True and cfg.objective == "val/downstream_acc"
    assert cfg.tracking.extra_tags.optuna_trial == "3" and cfg.tracking.run_name == "trial_3"
    assert cfg.tracking.role == "trial" and cfg.tracking.sweep == "grpo_optuna"


# ---------------------------------------------------------------------------------------------- real studies


def _env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "LEVERPLUS_LAUNCH_DIR")}
    env.update(LEVERPLUS_CACHE=str(root / "cache"), PYTHONWARNINGS="ignore")
    return env


def _cmd(*extra, hidden_dim: int = 32):
    tiny = [f"model.hidden_dim={hidden_dim}" if t.startswith("model.hidden_dim=") else t for t in TINY]
    return [sys.executable, "-m", "leverplus.train", "-m", "+sweep=grpo_optuna", *tiny, "hydra.sweeper.n_trials=4",
            *extra]


def _load(root: Path, name: str = "grpo_optuna") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{root / 'optuna.db'}")


def _sql(db: Path, query: str, *args) -> list:
    """A read-only query on a store's sqlite file: milliseconds, so the poll below sees a trial that runs ~2 s."""
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
        return con.execute(query, args).fetchall()


def _trial_running(root: Path, number: int) -> bool:
    """Trial ``number`` is RUNNING in Optuna and its MLflow child run is RUNNING with its params logged (so it is
    training, not still being created)."""
    optuna_rows = _sql(root / "optuna.db", "SELECT state FROM trials WHERE number = ?", number)
    mlflow_rows = _sql(root / "mlflow.db", "SELECT r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                       "JOIN params p ON p.run_uuid = r.run_uuid "
                       "WHERE t.key = 'optuna_trial' AND t.value = ? AND p.key = 'grpo.lr'", str(number))
    return ("RUNNING",) in optuna_rows and ("RUNNING",) in mlflow_rows


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """Invocation 1 (n_trials=4) SIGKILLed while trial 3 runs; invocation 2 resumes; invocation 3 finds it done."""
    root = tmp_path_factory.mktemp("study")
    env = _env(root)
    # a wider model keeps each trial RUNNING long enough for the poll below to catch trial 3 (sim_tiny trials
    # at hidden_dim 32 can finish between two polls)
    proc = subprocess.Popen(_cmd(DIVERGE, hidden_dim=SLOW_DIM), cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 400
    try:
        while True:
            assert proc.poll() is None, "the study ended before it could be killed:\n" + proc.stdout.read()[-4000:]
            assert time.monotonic() < deadline, "trial 3 never started"
            try:
                if _trial_running(root, 3):
                    break
            except sqlite3.Error:  # the study or the MLflow tables are being created
                pass
            time.sleep(0.02)
    finally:
        proc.kill()  # SIGKILL: no clean-up runs in the killed process
        first_log = proc.communicate()[0]
    before = [(t.number, t.state.name) for t in _load(root).trials]
    second = subprocess.run(_cmd(DIVERGE, hidden_dim=SLOW_DIM), cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    third = subprocess.run(_cmd(DIVERGE, hidden_dim=SLOW_DIM), cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    return {"root": root, "before": before, "first_log": first_log,
            "third_log": third.stdout + third.stderr}


def _runs(root: Path):
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("leverplus-sim")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("role") == "parent"]
    children = {int(r.data.tags["optuna_trial"]): r for r in runs if "optuna_trial" in r.data.tags}
    return client, parents, children


def test_killed_study_resumes_to_exactly_n_trials(killed_and_resumed):
    root = killed_and_resumed["root"]
    # killed while trial 3 ran: trials 0 (diverged), 1, 2 finished
    assert killed_and_resumed["before"] == [(0, "FAIL"), (1, "COMPLETE"), (2, "COMPLETE"), (3, "RUNNING")]
    study = _load(root)
    assert (root / "optuna.db").exists() and (root / "mlflow.db").exists()  # side by side, in the launch dir
    assert study.direction.name == "MAXIMIZE"
    states = [(t.number, t.state.name) for t in study.trials]
    assert states == [(0, "FAIL"), (1, "COMPLETE"), (2, "COMPLETE"), (3, "FAIL"), (4, "COMPLETE")]
    assert S.n_counted(study.trials) == 4  # n_trials in total, not 4 more
    interrupted, retry = study.trials[3], study.trials[4]
    assert interrupted.user_attrs["interrupted"] is True and retry.user_attrs["retry_of"] == 3
    assert retry.params == interrupted.params
    # the third invocation found nothing to run
    assert "-> 0 to run" in killed_and_resumed["third_log"]
    # one Hydra job folder per trial, named by the trial number
    assert sorted(p.name for p in (root / "outputs/optuna/grpo_optuna").glob("trial_*")) == \
        [f"trial_{i}" for i in range(5)]


def test_failing_trial_is_failed_in_optuna_and_mlflow_and_the_study_goes_on(killed_and_resumed):
    root = killed_and_resumed["root"]
    t0 = _load(root).trials[0]
    assert t0.params["grpo.lr"] == 1e30 and "NonFiniteLossError" in t0.user_attrs["fail_reason"]
    _, _, children = _runs(root)
    assert children[0].info.status == "FAILED" and children[0].data.tags["optuna_state"] == "FAIL"
    assert "NonFiniteLossError" in children[0].data.tags["error"]
    assert [t.number for t in _load(root).trials if t.state == TrialState.COMPLETE] == [1, 2, 4]


def test_each_trial_is_an_mlflow_child_of_one_parent_per_study(killed_and_resumed):
    root = killed_and_resumed["root"]
    study = _load(root)
    client, parents, children = _runs(root)
    assert len(parents) == 1  # re-opened on resume, not one per invocation
    parent = parents[0]
    assert parent.info.status == "FINISHED" and study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    assert sorted(children) == [0, 1, 2, 3, 4]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children.values())
    assert children[3].info.status == "KILLED"  # left RUNNING by the killed process, closed on resume
    for t in study.trials:
        run = children[t.number]
        assert run.info.run_name == f"trial_{t.number}"
        assert float(run.data.params["grpo.lr"]) == t.params["grpo.lr"]
        assert int(run.data.params["grpo.epochs"]) == t.params["grpo.epochs"]
        assert t.user_attrs.get("mlflow_run_id", run.info.run_id) == run.info.run_id
        if t.state == TrialState.COMPLETE:
            assert run.info.status == "FINISHED" and run.data.tags["optuna_state"] == "COMPLETE"
            assert run.data.metrics["objective"] == pytest.approx(t.value)
            assert run.data.metrics["val/downstream_acc"] == pytest.approx(t.value)  # validation objective
    # the parent: best params and value, plots
    best = study.best_trial
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    assert json.loads(parent.data.tags["best_params"]) == best.params
    assert parent.data.tags["best_trial"] == str(best.number)
    assert parent.data.metrics["trials_counted"] == 4 and parent.data.metrics["trials_interrupted"] == 1
    assert best.value == max(t.value for t in study.trials if t.state == TrialState.COMPLETE)
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"optimization_history.png", "param_importances.png", "optimization_results.yaml"} <= names
    for png in ("optimization_history.png", "param_importances.png"):
        assert Path(client.download_artifacts(parent.info.run_id, png)).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_best_trials_test_figures_are_reported_separately(killed_and_resumed):
    root = killed_and_resumed["root"]
    study = _load(root)
    _, parents, _ = _runs(root)
    best = study.best_trial
    metrics = json.loads((Path(best.user_attrs["output_dir"]) / "metrics.json").read_text())["metrics"]
    assert parents[0].data.metrics["best_trial_test/downstream_acc"] == pytest.approx(metrics["test/downstream_acc"])
    assert best.value == pytest.approx(metrics["val/downstream_acc"])  # selection saw validation only


def test_rce_ran_once_and_every_other_trial_reused_it(killed_and_resumed):
    root = killed_and_resumed["root"]
    _, parents, children = _runs(root)
    # The cache key holds the code version (a hash of leverplus/*.py): in a fixed checkout every trial has the same
    # one and RCE runs once; if the code changes between invocations, once per code version, never more.
    versions = {r.data.tags["code_version"] for r in children.values()}
    first_of_version = sorted(min(n for n, r in children.items() if r.data.tags["code_version"] == v) for v in versions)
    computed = sorted(n for n, r in children.items() if "rce/loss" in r.data.metrics)
    why = {n: (r.info.status, r.data.tags["code_version"], r.data.tags.get("cache_hit_rce"),
               "rce/loss" in r.data.metrics) for n, r in sorted(children.items())}
    why = f"{why} {sorted(p.name for p in (root / 'cache' / 'stages' / 'rce').glob('*.pt'))} {parents[0].data.metrics}"
    assert computed == first_of_version and computed[0] == 0, why  # trial 0 diverged in GRPO; its RCE was cached
    hits = [n for n in (1, 2, 4) if n not in computed]
    assert all(children[n].data.tags["cache_hit_rce"] == "True" for n in hits), why
    assert parents[0].data.metrics["rce_phase_computed"] == len(versions), why
    # the killed trial 3 may or may not have reached its cache hit before SIGKILL: count what the runs recorded
    tagged = [n for n, r in children.items() if r.data.tags.get("cache_hit_rce") == "True"]
    assert set(hits) <= set(tagged) and parents[0].data.metrics["rce_cache_hits"] == len(tagged), why
    assert len(list((root / "cache" / "stages" / "rce").glob("*.pt"))) == len(versions), why


def test_study_aborts_when_failures_exceed_the_failure_budget(tmp_path):
    # every trial fails before its run opens (negative lr); budget 0.5 * 4 = 2, so the 3rd failure aborts
    out = subprocess.run(_cmd("hydra.sweeper.study_name=all_fail", "grpo.lr=interval(-2e-4,-1e-4)"),
                         cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    assert "TooManyFailedTrials" in out.stdout + out.stderr
    study = _load(tmp_path, "all_fail")
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL", "FAIL"]
    assert all("grpo.lr" in t.user_attrs["fail_reason"] for t in study.trials)
    _, parents, children = _runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    assert sorted(children) == [0, 1, 2]  # created by the sweeper: the jobs failed before their runs opened
    assert all(r.info.status == "FAILED" and r.data.tags["optuna_state"] == "FAIL" for r in children.values())
