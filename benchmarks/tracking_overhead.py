"""What MLflow tracking adds to one warm single run: ``run(cfg)`` with tracking on vs ``tracking.enabled=false``.

Every measurement is a fresh Python process (as ``python -m leverplus.train`` is) that composes the config and times
``leverplus.train.run`` alone, so interpreter start-up and the imports both modes share are left out, while what only
tracking does (opening the sqlite store, MLflow's lazy imports, creating the run, logging, copying artifacts) is in.
A warm-up run first fills the simulated-data cache and creates the store and experiment, as in a user's second run.
Modes alternate within each repeat so that load on a shared machine hits both alike; medians are reported.

    python benchmarks/tracking_overhead.py [--repeats 5] [--code DIR] [--extra OVERRIDE ...]

``--code DIR`` puts another checkout first on ``PYTHONPATH`` (compare two versions in one sitting).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

#: the run measured: the tiny simulated world, the default recipe otherwise
BASE_OVERRIDES = ["data=sim_tiny", "progress=false"]

DRIVER = r"""
import json, sys, time
from hydra import compose, initialize_config_dir
from leverplus.config.store import register_configs
from leverplus.utils import PACKAGE_ROOT
import leverplus.train as train

register_configs()
with initialize_config_dir(config_dir=str(PACKAGE_ROOT.parent / "conf"), version_base=None):
    cfg = compose("train", overrides=json.loads(sys.argv[1]))
t0 = time.perf_counter()
train.run(cfg)
print("@@" + json.dumps({"run_s": time.perf_counter() - t0}))
"""


def _one(overrides: List[str], launch: Path, code: str) -> Dict[str, float]:
    path = code + os.pathsep + os.environ.get("PYTHONPATH", "")
    env = dict(os.environ, LEVERPLUS_LAUNCH_DIR=str(launch), PYTHONPATH=path)
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(overrides)], cwd=launch, env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"run failed ({out.returncode}):\n{out.stderr[-3000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("@@")][-1]
    return json.loads(line[2:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--code", default=str(Path(__file__).resolve().parents[1]),
                    help="checkout to import leverplus from")
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for both modes")
    args = ap.parse_args()
    launch = Path(tempfile.mkdtemp(prefix="lp-trackbench-"))
    common = BASE_OVERRIDES + [f"data.cache_dir={launch / 'cache'}"] + list(args.extra)
    modes = {"tracked": ["tracking.enabled=true"], "untracked": ["tracking.enabled=false"]}
    _one(common + modes["tracked"] + [f"output_dir={launch / 'warm'}"], launch, args.code)  # warm-up
    times: Dict[str, List[float]] = {m: [] for m in modes}
    for i in range(args.repeats):
        order = list(modes) if i % 2 == 0 else list(reversed(modes))
        for m in order:
            r = _one(common + modes[m] + [f"output_dir={launch / f'{m}{i}'}"], launch, args.code)
            times[m].append(r["run_s"])
    med = {m: statistics.median(v) for m, v in times.items()}
    print(json.dumps({"code": args.code, "repeats": args.repeats, "overrides": common,
                      "tracked_s": times["tracked"], "untracked_s": times["untracked"],
                      "median_tracked_s": round(med["tracked"], 3), "median_untracked_s": round(med["untracked"], 3),
                      "median_overhead_s": round(med["tracked"] - med["untracked"], 3)}, indent=1))


if __name__ == "__main__":
    main()
