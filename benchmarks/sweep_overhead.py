"""Framework overhead per sweep run: config composition + MLflow tracking + the comparison, without training.

Times, on a real sqlite MLflow store in a temp dir:
  compose   composing one job's config (Hydra compose API, the sweeper does this for every job to dedupe)
  tracking  creating the run, logging the flattened params, ~40 metrics, tags and 4 small artifacts, finishing it
  compare   `leverplus.compare.compare_runs` + report files for a sweep of N runs, divided by N

    python benchmarks/sweep_overhead.py [--runs 40]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=40)
    args = ap.parse_args()

    import pandas as pd
    from hydra import compose, initialize_config_dir

    from leverplus.analysis.compare import compare_runs, write_report
    from leverplus.config.identity import to_container
    from leverplus.config.store import register_configs
    from leverplus.tracking.run import MlflowRun, flatten
    from leverplus.tracking.store import get_or_create_experiment
    from leverplus.utils import PACKAGE_ROOT

    register_configs()
    tmp = Path(tempfile.mkdtemp(prefix="lp-overhead-"))
    uri = f"sqlite:///{tmp}/mlflow.db"
    t0 = time.perf_counter()
    exp = get_or_create_experiment("overhead", uri, (tmp / "art").as_uri())
    t_create_db = time.perf_counter() - t0

    modes = ["hard_plus_soft", "separated", "hard_only", "soft_only"]
    t_compose = t_track = 0.0
    rows = []
    with initialize_config_dir(config_dir=str(PACKAGE_ROOT.parent / "conf"), version_base=None):
        for i in range(args.runs):
            seed, mode = i % 2, modes[(i // 2) % len(modes)]
            t0 = time.perf_counter()
            cfg = compose("train", overrides=[f"reward.mode={mode}", f"seed={seed}", "data.shot_nums=[2]"])
            flat = flatten(to_container(cfg))
            t_compose += time.perf_counter() - t0
            art = tmp / f"a{i}"
            art.mkdir()
            for name in ("config.yaml", "metrics.json", "per_query.jsonl"):
                (art / name).write_text(json.dumps({"x": list(range(200))}))
            role = "baseline" if (i // 2) % len(modes) == 0 else "arm"
            t0 = time.perf_counter()
            with MlflowRun(uri=uri, experiment_id=exp, run_name=f"r{i}",
                           tags={"sweep": "overhead", "arm": mode, "role": role, "seed": seed, "shot_num": 2}) as run:
                run.log_params(flat)
                for epoch in range(8):
                    run.log_metrics({"rce/loss": 1.0 / (epoch + 1), "val/loss": 0.5, "val/offline/top1_reward": 1.0},
                                    step=epoch)
                run.log_metrics({f"m{j}": float(j) for j in range(20)} | {"objective": 0.5}, step=8)
                for name in ("config.yaml", "metrics.json", "per_query.jsonl"):
                    run.log_artifact(art / name)
            t_track += time.perf_counter() - t0
            rows.append({"run_id": f"r{i}", "arm": mode, "role": role, "shot_num": 2, "seed": seed,
                         "objective": 0.5 + 0.01 * i, "acc": 0.5 + 0.001 * i, "params.reward.mode": mode,
                         "params.reward.hard_weight": "1.0", "params.reward.soft_weight": "1.0",
                         "params.rce.use_raw_reward": "False"})
    df = pd.DataFrame(rows).drop_duplicates(["arm", "seed"])
    t0 = time.perf_counter()
    report = compare_runs(df)
    write_report(report, tmp / "report")
    t_compare = time.perf_counter() - t0
    n = args.runs
    print(f"new sqlite store + experiment: {t_create_db:.2f} s (once per store)")
    print(f"per run: compose {1000 * t_compose / n:.0f} ms, tracking {1000 * t_track / n:.0f} ms, "
          f"compare {1000 * t_compare / len(df):.0f} ms  ->  total {(t_compose + t_track) / n + t_compare / len(df):.2f} s")


if __name__ == "__main__":
    main()
