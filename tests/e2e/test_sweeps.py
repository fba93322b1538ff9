"""Sweeps end to end: a REAL Hydra multirun (subprocess) against a REAL MLflow sqlite store.

Checks the parent/child links, the RCE-only baseline arm, aliasing of equivalent arms, skipping of finished runs on
a second invocation (and re-running only a FAILED one), the comparison against a hand computation, and the joblib
(2 workers) and submitit_local launchers losing nothing.
"""

import csv
import json
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
    params = parents[0].data.params  # the parent describes the sweep
    assert params["sweep.name"] == "reward_grid" and "reward.mode" in json.loads(params["sweep.factors"])
    assert json.loads(params["sweep.paired_by"]) == ["data.shot_nums", "seed"] and params["sweep.baseline"] != "null"
    assert len({r.info.run_name for r in kids}) == len(kids)  # every arm job has its own name


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
    client, parents = runs(grid["work"], "tags.role = 'parent'")
    aliases = json.loads(Path(client.download_artifacts(parents[0].info.run_id, "aliases.json")).read_text())
    assert aliases["mode=hard_only|hard_weight=1.0|soft_weight=0.5|raw=false"] == \
        "mode=hard_only|hard_weight=1.0|soft_weight=1.0|raw=false"
    # sim_tiny's accuracy is binary, so separated ≡ hard_plus_soft_v2 and, after z-scoring, both ≡ hard_plus_soft
    # (1, 0.5): 1·c + 1·c and 1·c + 0.5·c are the same rewards up to scale. 8 arms -> 4 distinct + the baseline.
    modes = {lab.split("|")[0] for lab in aliases}
    assert {"mode=separated", "mode=hard_plus_soft_v2"} & modes
    assert all(canonical in labels for canonical in aliases.values())  # every alias points at a run that ran
    assert not set(aliases) & labels
    arms = 4 * 2
    assert len(kids) == 2 * (1 + arms - len(aliases))
    # one FINISHED run per run key
    keys = [r.data.tags["run_key"] for r in kids]
    assert len(keys) == len(set(keys))


def test_comparison_matches_a_hand_computation(grid):
    client, parents = runs(grid["work"], "tags.role = 'parent'")
    pid = parents[0].info.run_id
    names = {a.path for a in client.list_artifacts(pid, "comparison")}
    assert {"comparison/comparison.csv", "comparison/comparison.md"} <= names
    assert any(n.startswith("comparison/delta_forest_shot") and n.endswith(".png") for n in names)
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
    assert checked == len({r.data.tags["arm"] for r in kids}) - 1  # every distinct arm but the baseline
    # the verdict is the one its seed-paired CI implies, in the CSV and in the printed report
    printed = grid["first"].stdout
    for row in rows:
        if row["role"] == "arm" and not row.get("alias_of"):
            assert row["verdict"] == implied_verdict(float(row["delta_lo"]), float(row["delta_hi"])), row
            assert any(line.startswith(f"| {row['arm'].replace('|', chr(92) + '|')} |") and f"| {row['verdict']} |"
                       in line for line in printed.splitlines()), row["arm"]


def implied_verdict(lo: float, hi: float) -> str:
    """What a seed-paired CI [lo, hi] of Δacc says: better above 0, worse below, else no significant difference."""
    return "better" if lo > 0 else "worse" if hi < 0 else "no significant difference"


def test_a_planted_null_effect_is_reported_as_exactly_none(tmp_path):
    """Planted: no anchor is scored by the fallback (``data.sim.fallback_fraction=0``), so skipping fallback-scored
    rewards or not trains the very same model. Every seed's Δ must be exactly 0 and the verdict "no significant
    difference", however small the world. (A harmful planted effect, flipped fallback correctness, needs the default
    world to be resolved: see sweeps/skip_fallback.yaml.)"""
    tiny = [a for a in TINY if not a.startswith("hydra.sweeper.arm_overrides")]  # this sweep's arms keep grpo.epochs
    multirun(tmp_path, tmp_path / "cache", "+sweep=skip_fallback", *tiny, "data.sim.fallback_fraction=0.0", "seed=0,1")
    client, parents = runs(tmp_path, "tags.role = 'parent'")
    rows = list(csv.DictReader(open(client.download_artifacts(parents[0].info.run_id, "comparison/comparison.csv"))))
    arm = [r for r in rows if r["role"] == "arm"]
    assert [r["arm"] for r in arm] == ["skip_fallback_reward=false"] and arm[0]["seeds"] == "0 1"
    assert float(arm[0]["delta"]) == float(arm[0]["delta_lo"]) == float(arm[0]["delta_hi"]) == 0.0
    assert arm[0]["verdict"] == "no significant difference"
    _, kids = runs(tmp_path, "tags.sweep = 'skip_fallback'")
    acc = {}
    for r in kids:
        if r.data.tags.get("role") != "parent":
            acc.setdefault(r.data.tags["seed"], set()).add(r.data.metrics["test/downstream_acc"])
    assert sorted(acc) == ["0", "1"] and all(len(v) == 1 for v in acc.values())  # both arms equal, per seed


def test_second_invocation_skips_finished_and_reruns_failed(grid):
    work, cache = grid["work"], grid["cache"]
    client, _ = runs(work)
    before = children(work)
    victim = before[0]
    client.set_terminated(victim.info.run_id, "FAILED")  # pretend this job crashed
    out = multirun(work, cache, "+sweep=reward_grid", *TINY, *GRID)
    assert out.stdout.count("already FINISHED") == len(before) - 1
    after = [r for r in children(work) if r.info.status == "FINISHED"]
    new = [r for r in after if r.info.run_id not in {b.info.run_id for b in before}]
    # exactly one job trained again, the failed one (same key) ...
    trained = [r for r in new if "reused_run_id" not in r.data.tags]
    assert len(trained) == 1 and trained[0].data.tags["run_key"] == victim.data.tags["run_key"]
    # ... and every skipped job is still a child of the new parent, pointing at the run that trained it
    _, parents = runs(work, "tags.role = 'parent'")
    second = max(parents, key=lambda r: r.info.start_time)
    reused = [r for r in new if "reused_run_id" in r.data.tags]
    assert len(reused) == len(before) - 1
    by_id = {r.info.run_id: r for r in before}
    for r in reused:
        src = by_id[r.data.tags["reused_run_id"]]
        assert r.data.tags["mlflow.parentRunId"] == second.info.run_id
        assert (r.data.tags["arm"], r.data.tags["run_key"]) == (src.data.tags["arm"], src.data.tags["run_key"])
        assert r.data.metrics["test/downstream_acc"] == src.data.metrics["test/downstream_acc"]
    # so the resumed sweep's comparison covers every arm, not only the re-run one
    client, _ = runs(work)
    rows = list(csv.DictReader(open(client.download_artifacts(second.info.run_id, "comparison/comparison.csv"))))
    first = min(parents, key=lambda r: r.info.start_time)
    rows_first = list(csv.DictReader(open(client.download_artifacts(first.info.run_id, "comparison/comparison.csv"))))
    assert sorted(r["arm"] for r in rows) == sorted(r["arm"] for r in rows_first)
    assert {r["arm"]: r["acc_mean"] for r in rows} == {r["arm"]: r["acc_mean"] for r in rows_first}
    # a third invocation follows the pointers to the run that trained, never to a pointer
    multirun(work, cache, "+sweep=reward_grid", *TINY, *GRID)
    _, kids = runs(work, "tags.sweep = 'reward_grid'")
    trainers = {r.info.run_id for r in kids if "reused_run_id" not in r.data.tags}
    assert all(r.data.tags["reused_run_id"] in trainers for r in kids if "reused_run_id" in r.data.tags)


def test_aliased_arms_really_train_identically(tmp_path):
    """The consumed-reward aliasing is exact: with it switched off, the arms it would merge give bit-identical
    results (here hard_plus_soft (1, 0.5) vs (2, 1) on normalised rewards, through RCE and GRPO)."""
    cache = tmp_path / "cache"
    work = tmp_path / "w"
    work.mkdir()
    args = ["+sweep=reward_grid", *TINY, "reward.mode=hard_plus_soft", "rce.use_raw_reward=false",
            "data.shot_nums=[2]", "seed=0", "hydra.sweeper.baseline=null",
            "hydra.sweeper.factors.weights=[{reward.hard_weight:1.0,reward.soft_weight:0.5},"
            "{reward.hard_weight:2.0,reward.soft_weight:1.0}]"]
    dry = multirun(work, cache, *args, "hydra.sweeper.dry_run=true")
    assert "2 jobs in the grid, 1 distinct" in dry.stdout + dry.stderr
    assert not (work / "mlflow.db").exists()  # a dry run writes nothing to MLflow
    multirun(work, cache, *args, "hydra.sweeper.alias_identical_rewards=false")
    _, rs = runs(work, "tags.sweep = 'reward_grid'")
    kids = [r for r in rs if r.data.tags.get("role") == "arm"]
    assert len(kids) == 2
    a, b = (r.data.metrics for r in kids)
    for key in ("objective", "test/downstream_acc", "val/offline/top1_acc", "val/offline/ndcg"):
        assert a[key] == b[key], key
    assert a["val/offline/top1_reward"] != b["val/offline/top1_reward"]  # reward units do differ


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
