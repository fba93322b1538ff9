"""Two invocations of one ablation sweep started together against one ``mlflow server`` with a PostgreSQL backend
store (both real, on loopback): every distinct arm is trained exactly once (the other invocation waits for its run
and records it as reused), none is lost, and both invocations end with a whole comparison."""

import os
import subprocess
import sys
from collections import Counter

import mlflow
from mlflow_server import mlflow_server
from pg import throwaway_postgres

TINY = ["data=sim_tiny", "sft.epochs=1", "rce.epochs=1", "model.hidden_dim=16", "eval.baselines=[zero_shot]",
        "checkpoint_every_epoch=false", "plot_curves=false", "+sweep=seeds", "hydra.sweeper.factors.seed=[0,1]",
        "hydra.sweeper.arm_overrides={grpo.epochs:1}", "tracking.claim_poll_s=0.5"]


def test_two_invocations_train_each_arm_once_and_both_compare_everything(tmp_path):
    with throwaway_postgres() as pg, mlflow_server(tmp_path, pg) as url:
        env = {**os.environ, "MLFLOW_TRACKING_URI": url, "LEVERPLUS_CACHE": str(tmp_path / "cache")}
        for var in ("LEVERPLUS_PARENT_RUN_ID", "LEVERPLUS_LAUNCH_DIR", "LEVERPLUS_SWEEP"):
            env.pop(var, None)
        procs = [subprocess.Popen([sys.executable, "-m", "leverplus.train", "-m", *TINY,
                                   f"hydra.sweep.dir=multirun/inv{i}"], cwd=tmp_path, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
        logs = [p.communicate(timeout=1500)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
        client = mlflow.MlflowClient(tracking_uri=url)
        exp = client.get_experiment_by_name("leverplus-sim")
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        children = [r for r in runs if r.data.tags.get("role") != "parent"]
        trained = Counter(r.data.tags["run_key"] for r in children
                          if r.info.status == "FINISHED" and "reused_run_id" not in r.data.tags)
        keys = {r.data.tags["run_key"] for r in children}
        assert len(keys) == 4 and set(trained.values()) == {1}, trained  # 2 arms x 2 seeds, each trained once
        parents = [r for r in runs if r.data.tags.get("role") == "parent"]
        assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
        for p in parents:  # each invocation's parent lists all 4 jobs (trained or reused), all FINISHED
            mine = [r for r in children if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
            assert sorted(r.data.tags["run_key"] for r in mine) == sorted(keys)
            assert all(r.info.status == "FINISHED" for r in mine)
        for i in range(2):
            assert (tmp_path / "multirun" / f"inv{i}" / "comparison").is_dir()
