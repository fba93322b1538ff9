"""Many workers on one Optuna study: do N worker processes on one PostgreSQL-backed study reach exactly n_trials, with
no parameter set proposed twice, when one worker is SIGKILLed mid-trial? And how does the wall time compare with one
worker?

Run by hand, not in tests (needs the PostgreSQL server binaries and psycopg2, as the tests do):

    python benchmarks/optuna_workers.py                          # 4 workers, 16 trials, one killed; then 1 worker
    python benchmarks/optuna_workers.py --workers 2 --trials 6 --no-single

Each study runs the real command (``python -m leverplus.train -m +sweep=grpo_optuna data=sim_tiny ...``) in its own
launch dir (its own mlflow.db and stage cache) against a throwaway PostgreSQL cluster (tests/pg.py). The workers pose
as different machines (``LEVERPLUS_WORKER_HOST``), so the killed worker's trial is recovered by Optuna's heartbeat
check (interval 1 s, grace 5 s), not by the same-host process check. Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from pg import throwaway_postgres  # noqa: E402

TINY = ["data=sim_tiny", "rce.epochs=1", "sft.epochs=1", "model.hidden_dim=64", "eval.baselines=[zero_shot]",
        "grpo.epochs=int(interval(1,3))"]


def _worker(launch: Path, url: str, n_trials: int, host: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "LEVERPLUS_LAUNCH_DIR")}
    env.update(LEVERPLUS_CACHE=str(launch / "cache"), PYTHONWARNINGS="ignore", LEVERPLUS_WORKER_HOST=host)
    cmd = [sys.executable, "-m", "leverplus.train", "-m", "+sweep=grpo_optuna", *TINY,
           f"hydra.sweeper.n_trials={n_trials}", f"hydra.sweeper.storage='{url}'", "hydra.sweeper.heartbeat_interval=1",
           "hydra.sweeper.grace_period=5", "hydra.sweeper.poll_interval=0.5"]
    return subprocess.Popen(cmd, cwd=launch, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def study(n_workers: int, n_trials: int, kill_one: bool) -> dict:
    with throwaway_postgres() as url, tempfile.TemporaryDirectory() as tmp:
        launch = Path(tmp)
        t0 = time.monotonic()
        procs = [_worker(launch, url, n_trials, f"machine-{i}") for i in range(n_workers)]
        killed = None
        if kill_one:  # SIGKILL worker 0 once it runs a trial
            while killed is None and procs[0].poll() is None:
                try:
                    s = optuna.load_study(study_name="grpo_optuna", storage=url)
                    mine = [t for t in s.trials if t.state.name == "RUNNING" and t.params
                            and t.user_attrs.get("sweeper_host") == "machine-0"]
                except Exception:  # noqa: BLE001 -- schema not there yet
                    mine = []
                if mine:
                    killed = mine[0].number
                    procs[0].kill()
                time.sleep(0.2)
        codes = [p.wait() for p in procs]
        wall = time.monotonic() - t0
        s = optuna.load_study(study_name="grpo_optuna", storage=url)
        interrupted = {int(k.split(":")[1]) for k in s.user_attrs if k.startswith("interrupted:")}
        real = [t for t in s.trials if not t.user_attrs.get("surplus") and t.number not in interrupted
                and not t.user_attrs.get("interrupted")]
        counted = [t for t in real if t.state.name in ("COMPLETE", "PRUNED", "FAIL")]
        params = [tuple(sorted(t.params.items())) for t in counted if t.user_attrs.get("retry_of") is None]
        retried = [t for t in s.trials if killed is not None and t.user_attrs.get("retry_of") == killed]
        return {"workers": n_workers, "n_trials": n_trials, "counted": len(counted),
                "complete": sum(t.state.name == "COMPLETE" for t in counted),
                "duplicate_params": len(params) - len(set(params)),
                "surplus_released": sum(bool(t.user_attrs.get("surplus")) for t in s.trials),
                "killed_trial": killed, "retried": [(t.number, t.state.name) for t in retried],
                "exit_codes": codes, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--no-single", action="store_true", help="skip the one-worker reference study")
    args = ap.parse_args()
    rows = [study(args.workers, args.trials, kill_one=True)]
    if not args.no_single:
        rows.append(study(1, args.trials, kill_one=False))
    print(f"\nmachine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{date.today()}\n")
    print("| workers | n_trials | counted | COMPLETE | duplicate params | surplus released | killed -> retried | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['n_trials']} | {r['counted']} | {r['complete']} | {r['duplicate_params']} | "
              f"{r['surplus_released']} | {r['killed_trial']} -> {r['retried']} | {r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
