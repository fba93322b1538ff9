"""Downstream table on the embedded world: shots 1-4 x {RL-trained selector, similarity top-k, random, zero-shot}.

For each shot S the default pipeline (SFT -> RCE, the RCE-only default) is trained on the S-shot RL file and
evaluated on the test queries with their 64-candidate pools. Prints accuracy, n and 95% CI per method, and the
paired differences selector − similarity and similarity − random (paired bootstrap over the same test queries).

    python benchmarks/sim_table.py [--shots 1 2 3 4] [overrides ...]
"""

from __future__ import annotations

import argparse
import time

from hydra import compose, initialize_config_dir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from leverplus.config.store import register_configs
    from leverplus.evaluation.downstream import paired_comparison
    from leverplus.pipeline import load_data, train_and_evaluate
    from leverplus.utils import PACKAGE_ROOT

    register_configs()
    lines = ["| shot | method | test acc | 95% CI | n |", "|---|---|---|---|---|"]
    diffs = ["| shot | comparison | Δ acc (pp) | paired 95% CI | p |", "|---|---|---|---|---|"]
    for shot in args.shots:
        with initialize_config_dir(config_dir=str(PACKAGE_ROOT.parent / "conf"), version_base=None):
            cfg = compose("train", overrides=["tracking.enabled=false", "progress=false", f"data.shot_nums=[{shot}]",
                                              "eval.downstream_splits=[test]", "objective=test/downstream_acc",
                                              *args.overrides])
        t0 = time.perf_counter()
        out = train_and_evaluate(cfg, load_data(cfg), PACKAGE_ROOT.parent / "outputs" / "sim_table", say=lambda s: None)
        rows = {}
        for r in out.per_query:
            if r.get("kind") == "downstream":
                rows.setdefault(r["method"], []).append(r)
        for method in ["selector", "similarity", "random", "zero_shot"]:
            m = out.metrics
            pre = f"test/downstream/shot{shot}/{method}"
            lines.append(f"| {shot} | {method} | {100 * m[pre + '_acc']:.2f} | [{100 * m[pre + '_ci_lo']:.2f}, "
                         f"{100 * m[pre + '_ci_hi']:.2f}] | {int(m[pre + '_n'])} |")
        for a, b in [("selector", "similarity"), ("similarity", "random"), ("random", "zero_shot")]:
            res = paired_comparison(rows[a], rows[b], n_boot=5000)
            diffs.append(f"| {shot} | {a} − {b} | {100 * res.delta:+.2f} | [{100 * res.lo:+.2f}, {100 * res.hi:+.2f}] | "
                         f"{res.p_value:.4f} |")
        print(f"shot {shot} done in {time.perf_counter() - t0:.0f} s", flush=True)
    print("\n".join(lines))
    print()
    print("\n".join(diffs))


if __name__ == "__main__":
    main()
