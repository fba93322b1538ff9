"""The adaptive-seeds mode end to end (REAL Hydra multirun, REAL sqlite MLflow store, the simulated world): every arm
starts on `initial_seeds`, later rounds add seeds only to arms whose verdict is still open, and what MLflow holds, the
allocation ledger (adaptive.json) and the comparison agree on how many seeds each arm got and why."""

import csv
import json
import os
import subprocess
import sys
from collections import defaultdict

import mlflow
import pytest

TINY = ["data=sim_tiny", "sft.epochs=1", "model.hidden_dim=16", "eval.baselines=[]", "checkpoint_every_epoch=false",
        "plot_curves=false", "+sweep=reward_grid", "data.shot_nums=[2]",
        "hydra.sweeper.factors.weights=[{reward.hard_weight:1.0,reward.soft_weight:1.0}]", "rce.use_raw_reward=false",
        "reward.mode=hard_plus_soft,hard_only", "hydra.sweeper.adaptive.enabled=true",
        "hydra.sweeper.adaptive.initial_seeds=2", "hydra.sweeper.adaptive.step=1", "hydra.sweeper.adaptive.max_seeds=3"]


def adaptive_sweep(work, cache, *extra):
    work.mkdir()
    env = {**os.environ, "LEVERPLUS_CACHE": str(cache), "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}
    for var in ("LEVERPLUS_PARENT_RUN_ID", "LEVERPLUS_LAUNCH_DIR", "LEVERPLUS_SWEEP"):
        env.pop(var, None)
    out = subprocess.run([sys.executable, "-m", "leverplus.train", "-m", *TINY, *extra, "hydra.sweep.dir=multirun/s"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    ledger = json.loads((work / "multirun" / "s" / "adaptive.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db")
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, filter_string="tags.sweep = 'reward_grid'", max_results=1000)
    parent = [r for r in runs if r.data.tags.get("role") == "parent"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    kids = [r for r in runs if r.data.tags.get("role") != "parent"]
    assert all(r.info.status == "FINISHED" for r in kids)
    seeds = defaultdict(set)
    for r in kids:
        seeds[r.data.tags["arm"]].add(int(r.data.params["seed"]))
    rows = {r["arm"]: r for r in csv.DictReader(open(work / "multirun" / "s" / "comparison" / "comparison.csv"))}
    # the ledger is also on the parent run, where `leverplus.compare` reads it
    on_parent = json.loads(open(client.download_artifacts(parent[0].info.run_id, "adaptive.json")).read())
    assert on_parent["cells"] == ledger["cells"]
    return ledger, seeds, rows, out.stdout + out.stderr


def check_consistent(ledger, seeds, rows):
    design = ledger["design"]
    assert design["looks"] == [2, 3] and design["alpha_per_look"] == pytest.approx(0.025)
    assert ledger["rounds"][0]["add"] and all(n == 2 for n in ledger["rounds"][0]["add"].values())
    for cell in ledger["cells"]:
        n = cell["n_seeds"]
        # MLflow holds exactly the seeds the ledger says, 0..n-1, each trained once
        assert seeds[cell["arm"]] == set(range(n))
        assert int(float(rows[cell["arm"]]["adaptive_n_seeds"])) == n
        assert rows[cell["arm"]]["adaptive_verdict"] == cell["verdict"]
        # an arm stops before the last look only with a verdict; an open arm runs to max_seeds
        if n < 3:
            assert cell["verdict"] != "inconclusive" and "stop" in cell["reason"]
        else:
            assert cell["look"] == 2
    # the baseline is trained at every seed any arm needed
    assert seeds["rce_only_baseline"] == set(range(max(c["n_seeds"] for c in ledger["cells"])))


@pytest.mark.slow
def test_adaptive_sweep_adds_seeds_only_where_open(tmp_path):
    cache = tmp_path / "cache"
    # training that barely moves the SFT selector: every arm equals the baseline, equivalent at the first look
    ledger, seeds, rows, log = adaptive_sweep(tmp_path / "still", cache, "rce.epochs=1")
    check_consistent(ledger, seeds, rows)
    assert all(c["n_seeds"] == 2 and c["verdict"] == "equivalent" and c["look"] == 1 for c in ledger["cells"])
    assert ledger["rounds"][1]["add"] == {}
    assert "### Adaptive seeds" in log

    # training that moves it, and a margin no 2-seed CI fits in: the arms stay open and get the third seed
    ledger, seeds, rows, _ = adaptive_sweep(tmp_path / "moved", cache, "rce.epochs=2", "rce.lr=1e-2",
                                            "hydra.sweeper.adaptive.margin_pp=0.01")
    check_consistent(ledger, seeds, rows)
    third = [c for c in ledger["cells"] if c["n_seeds"] == 3]
    assert third, ledger["cells"]
    assert sum(ledger["rounds"][1]["add"].values()) == len(third)
