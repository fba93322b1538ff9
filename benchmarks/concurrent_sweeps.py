"""Two invocations of one reduced reward grid, started together against one ``mlflow server`` with a PostgreSQL
backend store: is every distinct arm trained (FINISHED) exactly once, none lost, and is each invocation's comparison
whole? And the wall time against one invocation alone.

Run by hand, not in tests (needs the PostgreSQL server binaries and psycopg2, as the tests do):

    python benchmarks/concurrent_sweeps.py                       # 3 reward modes x 2 seeds on data=sim_tiny
    python benchmarks/concurrent_sweeps.py --modes hard_plus_soft,hard_only --seeds 0

Each study gets a fresh throwaway PostgreSQL cluster (tests/pg.py), a fresh server (tests/mlflow_server.py) and a
fresh stage cache. Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path

import mlflow

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from mlflow_server import mlflow_server  # noqa: E402
from pg import throwaway_postgres  # noqa: E402

TINY = ["data=sim_tiny", "sft.epochs=1", "rce.epochs=1", "model.hidden_dim=16", "eval.baselines=[zero_shot]",
        "checkpoint_every_epoch=false", "plot_curves=false", "+sweep=reward_grid", "data.shot_nums=[2]",
        "hydra.sweeper.factors.weights=[{reward.hard_weight:1.0,reward.soft_weight:1.0}]",
        "rce.use_raw_reward=false", "tracking.claim_poll_s=0.5"]


def sweep(n_invocations: int, modes: str, seeds: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp, throwaway_postgres() as pg:
        work = Path(tmp)
        with mlflow_server(work, pg) as url:
            env = {**os.environ, "MLFLOW_TRACKING_URI": url, "LEVERPLUS_CACHE": str(work / "cache")}
            for var in ("LEVERPLUS_PARENT_RUN_ID", "LEVERPLUS_LAUNCH_DIR", "LEVERPLUS_SWEEP"):
                env.pop(var, None)
            t0 = time.monotonic()
            procs = [subprocess.Popen([sys.executable, "-m", "leverplus.train", "-m", *TINY, f"reward.mode={modes}",
                                       f"seed={seeds}", f"hydra.sweep.dir=multirun/inv{i}"], cwd=work, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT) for i in range(n_invocations)]
            codes = [p.wait() for p in procs]
            wall = time.monotonic() - t0
            client = mlflow.MlflowClient(tracking_uri=url)
            exp = client.get_experiment_by_name("leverplus-sim")
            runs = client.search_runs([exp.experiment_id], max_results=5000)
            children = [r for r in runs if r.data.tags.get("role") != "parent"]
            keys = {r.data.tags["run_key"] for r in children}
            trained = Counter(r.data.tags["run_key"] for r in children
                              if r.info.status == "FINISHED" and "reused_run_id" not in r.data.tags)
            parents = [r for r in runs if r.data.tags.get("role") == "parent"]
            whole = [sorted(r.data.tags["run_key"] for r in children
                            if r.data.tags.get("mlflow.parentRunId") == p.info.run_id) == sorted(keys)
                     for p in parents]
            compared = [(work / "multirun" / f"inv{i}" / "comparison").is_dir() for i in range(n_invocations)]
            return {"invocations": n_invocations, "distinct_keys": len(keys),
                    "trained_once": sum(v == 1 for v in trained.values()),
                    "trained_twice_or_more": sum(v > 1 for v in trained.values()),
                    "never_trained": len(keys - set(trained)), "parents_whole": sum(whole),
                    "comparisons": sum(compared), "exit_codes": codes, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default="hard_plus_soft,hard_only,separated")
    ap.add_argument("--seeds", default="0,1")
    args = ap.parse_args()
    rows = [sweep(2, args.modes, args.seeds), sweep(1, args.modes, args.seeds)]
    print(f"\nmachine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{date.today()}\n")
    print("| invocations | distinct arms (run keys) | trained once | trained twice+ | never trained | parents whole | "
          "comparisons | exit codes | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['invocations']} | {r['distinct_keys']} | {r['trained_once']} | {r['trained_twice_or_more']} | "
              f"{r['never_trained']} | {r['parents_whole']} | {r['comparisons']} | {r['exit_codes']} | "
              f"{r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
