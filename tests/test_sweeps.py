"""Sweeps end to end: a REAL Hydra multirun (subprocess) against a REAL MLflow sqlite store.

Checks the parent/child links, the RCE-only baseline arm, aliasing of equivalent arms, skipping of finished runs on
a second invocation (and re-running only a FAILED one), the comparison against a hand computation, and the joblib
(2 workers) and submitit_local launchers losing nothing.
"""

import csv
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

TINY = ["data=sim_tiny", "rce.epochs=1", "sft.epochs=1", "model.hidden_dim=32", "eval.downstream_splits=[val,test]",
        "hydra.sweeper.arm_overrides={grpo.epochs:1}"]
GRID = ["reward.mode=hard_plus_soft,separated,hard_plus_soft_v2,hard_only",
        "hydra.sweeper.factors.weights=[{reward.hard_weight:1.0,reward.soft_weight:1.0},"
        "{reward.hard_weight:1.0,reward.soft_weight:0.5}]",
        "rce.use_raw_reward=false", "data.shot_nums=[2]", "seed=0,1"]


def multirun(workdir: Path, cache: Path, *args, timeout=900):
    env = {**os.environ, "LEVERPLUS_CACHE": str(cache), "MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/mlflow.db"}
    env.pop("LEVERPLUS_PARENT_RUN_ID", None)
    out = subprocess.run([sys.executable, "-m", "leverplus.train", "-m", *args, "hydra.sweep.dir=multirun/${now:%H-%M-%S-%f}"],
                         cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def runs(workdir: Path, filt: str = ""):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    exps = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(exps, filter_string=filt, max_results=5000)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    work = tmp_path_factory.mktemp("grid")
    cache = tmp_path_factory.mktemp("cache")
    first = multirun(work, cache, "+sweep=reward_grid", *TINY, *GRID)
    return {"work": work, "cache": cache, "first": first}


def children(work):
    _, rs = runs(work, "tags.sweep = 'reward_grid'")
    return [r for r in rs if r.data.tags.get("role") != "parent"]


def test_parent_and_children_linked(grid):
    _, parents = runs(grid["work"], "tags.role = 'parent'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    kids = children(grid["work"])
    assert kids and all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in kids)
    assert all(r.info.status == "FINISHED" for r in kids)


def test_baseline_arm_for_every_seed(grid):
    base = [r for r in children(grid["work"]) if r.data.tags["role"] == "baseline"]
    assert {r.data.tags["arm"] for r in base} == {"rce_only_baseline"}
    assert sorted(int(r.data.tags["seed"]) for r in base) == [0, 1]
    assert all(r.data.params["grpo.epochs"] == "0" and r.data.params["reward.mode"] == "hard_plus_soft" for r in base)
    arms = [r for r in children(grid["work"]) if r.data.tags["role"] == "arm"]
    assert all(r.data.params["grpo.epochs"] == "1" for r in arms)


def test_equivalent_arms_run_once_and_are_reported_as_aliases(grid):
    kids = children(grid["work"])
    labels = {r.data.tags["arm"] for r in kids}
    # hard_only ignores soft_weight: (1, 0.5) is the same run as (1, 1)
    assert "mode=hard_only|hard_weight=1.0|soft_weight=0.5|raw=false" not in labels
    # separated == hard_plus_soft_v2 for binary correctness: rewards identical on the data -> one run
    v2 = [lab for lab in labels if lab.startswith("mode=hard_plus_soft_v2")]
    sep = [lab for lab in labels if lab.startswith("mode=separated")]
    assert len(v2) + len(sep) == 2
    # 1 baseline + hard_plus_soft x2 + separated/v2 x2 + hard_only x1 = 6 runs per seed
    assert len(kids) == 12
    # one FINISHED run per run key
    keys = [r.data.tags["run_key"] for r in kids]
    assert len(keys) == len(set(keys))
    client, parents = runs(grid["work"], "tags.role = 'parent'")
    aliases = Path(client.download_artifacts(parents[0].info.run_id, "aliases.json")).read_text()
    assert "hard_only|hard_weight=1.0|soft_weight=0.5" in aliases and "hard_plus_soft_v2" in aliases or "separated" in aliases


def test_comparison_matches_a_hand_computation(grid):
    client, parents = runs(grid["work"], "tags.role = 'parent'")
    pid = parents[0].info.run_id
    names = {a.path for a in client.list_artifacts(pid, "comparison")}
    assert {"comparison/comparison.csv", "comparison/comparison.md", "comparison/delta_bars.png"} <= names
    rows = list(csv.DictReader(open(client.download_artifacts(pid, "comparison/comparison.csv"))))
    kids = children(grid["work"])
    acc = {(r.data.tags["arm"], int(r.data.tags["seed"])): r.data.metrics["test/downstream_acc"] for r in kids}
    base = {s: v for (arm, s), v in acc.items() if arm == "rce_only_baseline"}
    assert sorted(base) == [0, 1]
    checked = 0
    for row in rows:
        arm = row["arm"]
        if row["role"] == "baseline" or row.get("alias_of"):
            continue
        mean_acc = sum(acc[(arm, s)] for s in (0, 1)) / 2
        delta = sum(acc[(arm, s)] - base[s] for s in (0, 1)) / 2  # paired by seed
        assert float(row["acc_mean"]) == pytest.approx(mean_acc, abs=1e-9)
        assert float(row["delta"]) == pytest.approx(delta, abs=1e-9)
        checked += 1
    assert checked == 5
    assert "no significant difference" in grid["first"].stdout or "better" in grid["first"].stdout


def test_second_invocation_skips_finished_and_reruns_failed(grid):
    work, cache = grid["work"], grid["cache"]
    client, _ = runs(work)
    before = children(work)
    victim = before[0]
    client.set_terminated(victim.info.run_id, "FAILED")  # pretend this job crashed
    out = multirun(work, cache, "+sweep=reward_grid", *TINY, *GRID)
    assert out.stdout.count("already FINISHED") == len(before) - 1
    after = [r for r in children(work) if r.info.status == "FINISHED"]
    # exactly one new FINISHED run, with the failed run's key
    new = {r.info.run_id for r in after} - {r.info.run_id for r in before}
    assert len(new) == 1
    (new_run,) = [r for r in after if r.info.run_id in new]
    assert new_run.data.tags["run_key"] == victim.data.tags["run_key"]


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_parallel_launchers_lose_nothing(tmp_path, launcher):
    cache = tmp_path / "cache"
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else ["hydra.launcher.timeout_min=20"]
    multirun(tmp_path, cache, "+sweep=seeds", f"hydra/launcher={launcher}", *extra, *TINY, "seed=0,1")
    _, rs = runs(tmp_path, "tags.sweep = 'seeds'")
    kids = [r for r in rs if r.data.tags.get("role") != "parent"]
    parent = [r for r in rs if r.data.tags.get("role") == "parent"]
    # baseline + default GRPO arm for 2 seeds = 4 jobs, each exactly once, all FINISHED, all children of the parent
    assert len(kids) == 4 and all(r.info.status == "FINISHED" for r in kids)
    assert sorted((r.data.tags["role"], r.data.tags["seed"]) for r in kids) == [
        ("arm", "0"), ("arm", "1"), ("baseline", "0"), ("baseline", "1")]
    assert len(parent) == 1 and all(r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id for r in kids)
