"""The two-stage reward recipe of docs/usage.md end to end on the simulated world (REAL Hydra multiruns against a
REAL MLflow store): the RCE-only reward grid (every arm at grpo.epochs=0, legacy among the modes), the winner picked
from its comparison, then the GRPO stage on that configuration with the RCE phase computed once and reused."""

import csv
import os
import subprocess
import sys

import mlflow
import pytest

TINY = ["data=sim_tiny", "rce.epochs=1", "sft.epochs=1", "model.hidden_dim=32", "eval.downstream_splits=[val,test]"]


def multirun(workdir, cache, *args):
    env = {**os.environ, "LEVERPLUS_CACHE": str(cache), "MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/mlflow.db"}
    env.pop("LEVERPLUS_PARENT_RUN_ID", None)
    out = subprocess.run([sys.executable, "-m", "leverplus.train", "-m", *args, "hydra.sweep.dir=multirun/${now:%H-%M-%S-%f}"],
                         cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]


def sweep_runs(workdir, sweep):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    exps = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(exps, filter_string=f"tags.sweep = '{sweep}'", max_results=1000)
    parent = [r for r in found if r.data.tags.get("role") == "parent"]
    assert len(parent) == 1
    return client, parent[0], [r for r in found if r.data.tags.get("role") != "parent"]


@pytest.mark.slow
def test_rce_grid_then_grpo_stage_on_the_winner(tmp_path):
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    # stage 1: RCE-only reward grid
    multirun(work, cache, "+sweep=reward_grid_rce", *TINY, "reward.mode=hard_plus_soft,legacy,hard_only",
             "hydra.sweeper.factors.weights=[{reward.hard_weight:1.0,reward.soft_weight:1.0}]",
             "rce.use_raw_reward=false", "seed=0", "reward.reward_alpha=0.5")
    client, parent, kids = sweep_runs(work, "reward_grid_rce")
    assert all(r.info.status == "FINISHED" and r.data.params["grpo.epochs"] == "0" for r in kids)
    assert not any(k.startswith("grpo/") for r in kids for k in r.data.metrics)  # RCE-only everywhere
    modes = {r.data.params["reward.mode"] for r in kids}
    assert "legacy" in modes
    base = [r for r in kids if r.data.tags["role"] == "baseline"]
    assert len(base) == 1 and base[0].data.params["reward.mode"] == "hard_plus_soft"
    rows = list(csv.DictReader(open(client.download_artifacts(parent.info.run_id, "comparison/comparison.csv"))))
    winner_arm = max((r for r in rows if not r.get("alias_of")), key=lambda r: float(r["acc_mean"]))["arm"]
    winner = next(r for r in kids if r.data.tags["arm"] == winner_arm)
    chosen = {k: winner.data.params[k] for k in ("reward.mode", "reward.hard_weight", "reward.soft_weight",
                                                   "rce.use_raw_reward", "reward.reward_alpha")}

    # stage 2: GRPO on the chosen RCE configuration, RCE cached
    multirun(work, cache, "+sweep=reward_grid_grpo_stage", *TINY, *(f"{k}={v}" for k, v in chosen.items()),
             "grpo.epochs=1", "grpo.lr=1e-5", "grpo.advantage=zscore,rank", "seed=0")
    _, _, stage2 = sweep_runs(work, "reward_grid_grpo_stage")
    assert len(stage2) == 3 and all(r.info.status == "FINISHED" for r in stage2)
    assert all(r.data.params[k] == v for r in stage2 for k, v in chosen.items())  # every job on the winner
    baseline = [r for r in stage2 if r.data.tags["role"] == "baseline"]
    arms = [r for r in stage2 if r.data.tags["role"] == "arm"]
    assert len(baseline) == 1 and baseline[0].data.params["grpo.epochs"] == "0"
    assert {r.data.params["grpo.advantage"] for r in arms} == {"zscore", "rank"}
    assert all("grpo/max_advantage" in r.data.metrics for r in arms)
    # the RCE phase ran once (the baseline, first of its seed) and the GRPO arms loaded it from the stage cache
    assert baseline[0].data.tags["cache_hit_rce"] == "False" and "rce/loss" in baseline[0].data.metrics
    assert all(r.data.tags["cache_hit_rce"] == "True" and "rce/loss" not in r.data.metrics for r in arms)
    assert len(list((cache / "stages" / "rce").glob("*.pt"))) == 1
