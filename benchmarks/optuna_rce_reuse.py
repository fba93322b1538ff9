"""Wall time of a small GRPO Optuna study with and without reusing the RCE phase (``rce.cache``).

Run by hand, not in tests:

    python benchmarks/optuna_rce_reuse.py                  # 6 trials on data=sim_tiny, default model/RCE, 2 repeats
    python benchmarks/optuna_rce_reuse.py --trials 10 --repeats 3 --extra data=sim 'grpo.epochs=int(interval(1,3))'

Each mode runs the real command (``python -m leverplus.train -m +sweep=grpo_optuna ...``) in its own temporary
launch dir (its own optuna.db, mlflow.db and stage cache). Both start from the same pre-generated simulated world and
with an empty stage cache, so the first trial of each mode trains SFT (cached in both modes) and RCE; after that
only the mode with ``rce.cache=true`` skips RCE. Same sampler seed, so both modes run the same trials: their
objectives must be identical (the reuse changes the time, nothing else). The modes alternate (no, yes, yes, no, ...)
and the fastest repeat of each is reported, because the machine is shared; the CPU time (user + sys of the study
process) is reported beside the wall time, as it depends much less on what else runs on the machine.
docs/optuna.md reports the figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _generate_world(cache: Path, overrides: list[str]) -> None:
    """The simulated world, once, so neither mode pays for its generation."""
    from hydra import compose, initialize_config_dir

    from leverplus.config.store import register_configs
    from leverplus.pipeline import load_data

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf")):
        cfg = compose("train", overrides=[o for o in overrides if o.startswith("data")] + [f"data.cache_dir={cache}"])
    load_data(cfg)


def run_mode(reuse: bool, trials: int, overrides: list[str], world: Path) -> dict:
    import mlflow
    import optuna

    root = Path(tempfile.mkdtemp(prefix=f"optuna-bench-{'reuse' if reuse else 'noreuse'}-"))
    shutil.copytree(world / "sim", root / "cache" / "sim")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "LEVERPLUS_LAUNCH_DIR")}
    env.update(LEVERPLUS_CACHE=str(root / "cache"), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "leverplus.train", "-m", "+sweep=grpo_optuna", f"hydra.sweeper.n_trials={trials}",
           f"rce.cache={'true' if reuse else 'false'}", *overrides]
    load = os.getloadavg()[0]
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    if out.returncode != 0:
        mode = "reuse" if reuse else "no reuse"
        raise SystemExit(f"study failed ({mode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    study = optuna.load_study(study_name="grpo_optuna", storage=f"sqlite:///{root / 'optuna.db'}")
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("leverplus-sim")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if "optuna_trial" in r.data.tags]
    trial_s = [(r.info.end_time - r.info.start_time) / 1000 for r in children]
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "load": load,
        "trial_run_s": sum(trial_s),
        "rce_computed": sum("rce/loss" in r.data.metrics for r in children),
        "rce_s": sum(r.data.metrics.get("train/rce_s", 0.0) for r in children),
        "values": [t.value for t in study.trials],
        "params": [t.params for t in study.trials],
        "root": root,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--extra", nargs="*", default=["data=sim_tiny", "grpo.epochs=int(interval(1,3))"],
                    help="overrides for both modes (a sweep override such as grpo.epochs=int(...) is a search space)")
    ap.add_argument("--repeats", type=int, default=2, help="studies per mode, alternating; the fastest is reported")
    ap.add_argument("--keep", action="store_true", help="keep the temporary launch dirs")
    args = ap.parse_args()

    world = Path(tempfile.mkdtemp(prefix="optuna-bench-world-"))
    _generate_world(world, args.extra)
    order = [r % 2 == 1 for r in range(args.repeats)]  # no, yes, ...
    order = [m for first in order for m in ((first, not first))]  # (no, yes), (yes, no), ...
    runs: dict = {False: [], True: []}
    for reuse in order:
        runs[reuse].append(run_mode(reuse, args.trials, args.extra, world))
    no, yes = (min(runs[m], key=lambda r: r["wall_s"]) for m in (False, True))
    print(f"\nGRPO Optuna study, {args.trials} trials, overrides: {' '.join(args.extra)}; "
          f"fastest of {args.repeats} per mode (all: no reuse {[round(r['wall_s'], 1) for r in runs[False]]}, "
          f"reuse {[round(r['wall_s'], 1) for r in runs[True]]})")
    print(f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPU(s), "
          f"python {platform.python_version()}, "
          f"{date.today().isoformat()}\n")
    print("| RCE phase | study wall time (s) | study CPU time (s) | sum of trial runs (s) | RCE computed | "
          "RCE time (s) | load avg at start |")
    print("|---|---|---|---|---|---|---|")
    for label, r in (("recomputed every trial (rce.cache=false)", no), ("computed once, reused (rce.cache=true)", yes)):
        print(f"| {label} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['trial_run_s']:.1f} | {r['rce_computed']} | "
              f"{r['rce_s']:.1f} | {r['load']:.1f} |")
    print(f"\nspeed-up of the study: wall x{no['wall_s'] / yes['wall_s']:.2f} ({no['wall_s'] - yes['wall_s']:.1f} s "
          f"saved), CPU x{no['cpu_s'] / yes['cpu_s']:.2f} ({no['cpu_s'] - yes['cpu_s']:.1f} s saved)")
    every = runs[False] + runs[True]
    same = all(r["params"] == every[0]["params"] and r["values"] == every[0]["values"] for r in every)
    print(f"same trials and identical objectives in every study: {same}")
    if not args.keep:
        for r in every:
            shutil.rmtree(r["root"], ignore_errors=True)
        shutil.rmtree(world, ignore_errors=True)
    if not same:
        raise SystemExit("the RCE reuse changed the results: " + repr([r["values"] for r in every]))


if __name__ == "__main__":
    main()
