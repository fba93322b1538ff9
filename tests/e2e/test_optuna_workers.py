"""Many workers on one Optuna study: real `python -m leverplus.train -m +sweep=grpo_optuna` processes started
together on one storage (sqlite on one machine; a throwaway PostgreSQL cluster as across machines).

* 3 workers, n_trials=6, sqlite: exactly 6 counted trials, no parameter set proposed twice, one MLflow parent;
* 2 workers posing as two machines (LEVERPLUS_WORKER_HOST), PostgreSQL, heartbeats every 1 s with a 3 s grace:
  one worker SIGKILLed mid-trial; the other fails that trial through Optuna's heartbeat check, retries it with
  the same parameters and ends the study at exactly n_trials;
* resuming the study with another search space is refused, naming the difference and the fix.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from pg import throwaway_postgres

from leverplus.tracking import trials as S

TINY = ["data=sim_tiny", "rce.epochs=1", "sft.epochs=1", "model.hidden_dim=32", "eval.baselines=[zero_shot]",
        "grpo.epochs=int(interval(1,2))"]


def _env(root: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "LEVERPLUS_LAUNCH_DIR")}
    env.update(LEVERPLUS_CACHE=str(root / "cache"), PYTHONWARNINGS="ignore", **extra)
    return env


def _worker(root: Path, n_trials: int, *extra: str, **env) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "leverplus.train", "-m", "+sweep=grpo_optuna", *TINY,
           f"hydra.sweeper.n_trials={n_trials}", "hydra.sweeper.poll_interval=0.5", *extra]
    return subprocess.Popen(cmd, cwd=root, env=_env(root, **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finish(procs, timeout=900):
    logs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out[-4000:]
        logs.append(out)
    return logs


def _param_sets(trials):
    return [tuple(sorted(t.params.items())) for t in trials]


@pytest.fixture(scope="module")
def three_workers(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    logs = _finish([_worker(root, 6) for _ in range(3)])
    return root, logs


def test_three_workers_stop_at_exactly_n_trials_with_distinct_params(three_workers):
    root, logs = three_workers
    study = optuna.load_study(study_name="grpo_optuna", storage=f"sqlite:///{root / 'optuna.db'}")
    interrupted = S.interrupted_numbers(study.user_attrs)
    counted = [t for t in study.trials if S.counts_toward_budget(t, interrupted=interrupted)]
    assert len(counted) == 6 and all(t.state.name == "COMPLETE" for t in counted)
    params = _param_sets(counted)
    assert len(set(params)) == 6, params  # distinct sampler seeds per trial: no point proposed twice
    surplus = [t for t in study.trials if t.user_attrs.get(S.SURPLUS_ATTR)]
    assert len(study.trials) == 6 + len(surplus)  # nothing else: no failed or lost trials
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("leverplus-sim")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("role") == "parent"]
    assert len(parents) == 1  # workers agree on one parent run
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(int(r.data.tags["optuna_trial"]) for r in children) == sorted(t.number for t in counted)


def test_resuming_under_another_search_space_is_refused(three_workers):
    root, _ = three_workers
    p = _worker(root, 6, "grpo.lr=tag(log,interval(1e-7,1e-4))")
    out, _ = p.communicate(timeout=300)
    assert p.returncode != 0
    assert "was created with another search_space" in out and "hydra.sweeper.study_name=grpo_optuna_v2" in out


def test_a_killed_workers_trial_is_retried_by_another_machine_on_postgres(tmp_path):
    with throwaway_postgres() as url:
        hb = ["hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3", f"hydra.sweeper.storage='{url}'"]
        # a wide model keeps a trial RUNNING long enough for the poll to catch it
        hb.append("model.hidden_dim=512")
        victim = _worker(tmp_path, 3, *hb, LEVERPLUS_WORKER_HOST="machine-a")
        deadline = time.monotonic() + 300
        killed = None
        try:
            while killed is None:
                assert victim.poll() is None, "the victim finished before it could be killed"
                assert time.monotonic() < deadline, "the victim never started a trial"
                try:
                    study = optuna.load_study(study_name="grpo_optuna", storage=url)
                    running = [t for t in study.trials if t.state.name == "RUNNING" and t.params]
                except Exception:  # noqa: BLE001 -- schema not created yet
                    running = []
                if running:
                    killed = running[0]
                else:
                    time.sleep(0.2)
        finally:
            victim.kill()
            victim.communicate()
        survivor = _worker(tmp_path, 3, *hb, LEVERPLUS_WORKER_HOST="machine-b")
        log = _finish([survivor])[0]
        study = optuna.load_study(study_name="grpo_optuna", storage=url)
        interrupted = S.interrupted_numbers(study.user_attrs)
        assert killed.number in interrupted and "was interrupted" in log
        dead = study.trials[killed.number]
        assert dead.state.name == "FAIL"
        retries = [t for t in study.trials if t.user_attrs.get(S.RETRY_OF_ATTR) == killed.number]
        assert len(retries) == 1 and retries[0].state.name == "COMPLETE" and retries[0].params == killed.params
        assert S.n_counted(study.trials, interrupted=interrupted) == 3
        assert S.n_failed(study.trials, interrupted) == 0
