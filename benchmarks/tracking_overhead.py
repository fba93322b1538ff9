"""What MLflow tracking adds to one warm single run: ``run(cfg)`` with tracking on vs ``tracking.enabled=false``.

Every measurement is a fresh Python process (as ``python -m leverplus.train`` is) that composes the config and times
``leverplus.train.run`` alone, so interpreter start-up and the imports both modes share are left out, while what only
tracking does (opening the sqlite store, MLflow's lazy imports, creating the run, logging, copying artifacts) is in.
A warm-up run first fills the simulated-data cache and creates the store and experiment, as in a user's second run.
Modes alternate within each repeat so that load on a shared machine hits both alike; medians are reported, of wall
time and of CPU time (the process's and its children's, the tracking worker process included: on a shared machine
the wall figures are noisy, the CPU figures much less), with the load average (``/proc/loadavg``) before and after.
Modes: ``tracked`` (the default: a single sqlite run tracked through the worker process), ``untracked``
(``tracking.enabled=false``) and, with ``--in-process``, ``in_process`` (``tracking.worker_process=false``: the
store opened in the training process, as sweeps do).

    python benchmarks/tracking_overhead.py [--repeats 5] [--in-process] [--code DIR] [--extra OVERRIDE ...]

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
import json, resource, sys, time
from hydra import compose, initialize_config_dir
from leverplus.config.store import register_configs
from leverplus.utils import PACKAGE_ROOT
import leverplus.train as train

register_configs()
with initialize_config_dir(config_dir=str(PACKAGE_ROOT.parent / "conf"), version_base=None):
    cfg = compose("train", overrides=json.loads(sys.argv[1]))
def cpu():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime
c0, t0 = cpu(), time.perf_counter()
train.run(cfg)
print("@@" + json.dumps({"run_s": time.perf_counter() - t0, "cpu_s": cpu() - c0}))
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


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--code", default=str(Path(__file__).resolve().parents[1]),
                    help="checkout to import leverplus from")
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every mode")
    ap.add_argument("--in-process", action="store_true", help="also time tracking.worker_process=false")
    args = ap.parse_args()
    launch = Path(tempfile.mkdtemp(prefix="lp-trackbench-"))
    common = BASE_OVERRIDES + [f"data.cache_dir={launch / 'cache'}"] + list(args.extra)
    modes = {"tracked": ["tracking.enabled=true"], "untracked": ["tracking.enabled=false"]}
    if args.in_process:
        modes["in_process"] = ["tracking.enabled=true", "tracking.worker_process=false"]
    load_before = _load()
    _one(common + modes["tracked"] + [f"output_dir={launch / 'warm'}"], launch, args.code)  # warm-up
    times: Dict[str, List[float]] = {m: [] for m in modes}
    cpus: Dict[str, List[float]] = {m: [] for m in modes}
    for i in range(args.repeats):
        order = list(modes) if i % 2 == 0 else list(reversed(modes))
        for m in order:
            r = _one(common + modes[m] + [f"output_dir={launch / f'{m}{i}'}"], launch, args.code)
            times[m].append(round(r["run_s"], 3))
            cpus[m].append(round(r.get("cpu_s", float("nan")), 3))
    med = {m: statistics.median(v) for m, v in times.items()}
    cpu = {m: statistics.median(v) for m, v in cpus.items()}
    out = {"code": args.code, "repeats": args.repeats, "overrides": common, "load_before": load_before,
           "load_after": _load()}
    for m in modes:
        out.update({f"{m}_s": times[m], f"{m}_cpu_s": cpus[m], f"median_{m}_s": round(med[m], 3),
                    f"median_{m}_cpu_s": round(cpu[m], 3)})
    for m in (x for x in modes if x != "untracked"):
        prefix = "" if m == "tracked" else f"{m}_"
        out[f"median_{prefix}overhead_s"] = round(med[m] - med["untracked"], 3)
        out[f"median_{prefix}overhead_cpu_s"] = round(cpu[m] - cpu["untracked"], 3)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
