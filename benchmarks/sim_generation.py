"""Time the generation of a simulated world and (optionally) measure its baseline accuracies.

Run by hand, not in tests:

    python benchmarks/sim_generation.py                 # default world, all shot counts, into a temp folder
    python benchmarks/sim_generation.py --baselines     # + zero-shot / random / similarity / latent oracle table
    python benchmarks/sim_generation.py --seed 1 --out /tmp/world

Target (docs/sim.md): the default world for all four shot counts in <= 30 s on 2 cores.
The baseline table is what docs/sim.md reports: test queries with their 64-pools, answers sampled from the
simulated LVLM and scored by the official VQA accuracy (mean, 95% CI, n), next to the exact expectation.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from leverplus.config.sim_params import SimParams, params_hash
from leverplus.evaluation.vqa_metric import vqa_accuracy
from leverplus.sim.generate import generate_world_data
from leverplus.sim.lvlm import SimLVLM
from leverplus.sim.world import World


def _mean_ci(x: np.ndarray) -> tuple[float, float]:
    """Mean and 95% normal-approximation half-width."""
    return float(x.mean()), 1.96 * float(x.std(ddof=1)) / math.sqrt(len(x))


def selections(world: World, split: str, method: str, shot: int, seed: int = 0) -> list[list[int]]:
    """ICDs (prompt order) per query of ``split`` from its pool.

    random: ``shot`` distinct pool items (seeded); similarity: top-``shot`` visible cosine, most similar last;
    oracle: top-``shot`` hidden utility ``a_rel·cos(z_q, z_c) + a_type·[type match]``, most useful last;
    subspace: top-``shot`` cosine after projecting the visible embeddings on the latent and type directions —
    what a selector that learned to ignore the nuisance directions (a linear map) could reach.
    """
    p, rng = world.params, np.random.default_rng(seed)
    items, train = world.items(split), world.items("train")
    out = []
    for q in world.query_ids(split):
        pool = world.pool(split, q)
        if method == "zero_shot" or shot == 0:
            out.append([])
        elif method == "random":
            out.append([int(i) for i in rng.choice(pool, shot, replace=False)])
        elif method == "similarity":
            score = world.visible_similarity(split, q, pool)
            out.append([int(i) for i in pool[np.argsort(-score, kind="stable")[:shot]][::-1]])
        elif method == "subspace":
            basis = np.concatenate([world.proj_latent, world.type_directions.T], axis=1)
            e_q = items.embedding[q].astype(np.float64) @ basis
            e_c = train.embedding[pool].astype(np.float64) @ basis
            score = (e_c @ e_q) / np.linalg.norm(e_c, axis=1) / np.linalg.norm(e_q)
            out.append([int(i) for i in pool[np.argsort(-score, kind="stable")[:shot]][::-1]])
        elif method == "oracle":
            score = (p.relevance_gain * world.hidden_relevance(split, q, pool)
                     + p.type_gain * (train.answer_type[pool] == items.answer_type[q]))
            out.append([int(i) for i in pool[np.argsort(-score, kind="stable")[:shot]][::-1]])
        else:
            raise ValueError(method)
    return out


def baseline_table(params: SimParams, split: str = "test") -> list[dict]:
    """Sampled and expected accuracy of each baseline at shots 1-4 (zero-shot once)."""
    world = World(params)
    lvlm = SimLVLM(world)
    queries = world.query_ids(split)
    rows = []
    plan = [("zero_shot", 0)] + [(m, s) for m in ("random", "similarity", "subspace", "oracle")
                                    for s in (1, 2, 3, 4)]
    per_query = {}
    for method, shot in plan:
        icds = selections(world, split, method, shot)
        answers = [lvlm.answer(split, int(q), c) for q, c in zip(queries, icds)]
        acc = np.array([vqa_accuracy(a, lvlm.gt_answers(split, int(q))) for a, q in zip(answers, queries)])
        expected = lvlm.expected_accuracy_many(split, zip(queries, icds))
        per_query[method, shot] = expected
        mean, half = _mean_ci(acc)
        rows.append({"method": method, "shot": shot, "n": len(acc), "acc": mean, "ci95": half,
                     "expected_acc": float(expected.mean()),
                     "p_correct": float(np.mean([lvlm.p_correct(split, int(q), c) for q, c in zip(queries, icds)]))})
    for shot in (1, 2, 3, 4):  # paired differences of the exact expectations (CI over queries)
        for a, b in (("similarity", "random"), ("subspace", "similarity"), ("oracle", "similarity")):
            mean, half = _mean_ci(per_query[a, shot] - per_query[b, shot])
            rows.append({"method": f"{a} - {b}", "shot": shot, "n": len(queries), "expected_acc": mean, "ci95": half})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="folder to write into (default: a temp folder)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the target is 2 cores)")
    ap.add_argument("--baselines", action="store_true", help="also print the baseline accuracy table")
    ap.add_argument("--json", action="store_true", help="print the baseline rows as JSON too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = SimParams(seed=args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / params_hash(params)
        start = time.perf_counter()
        paths = generate_world_data(params, out)
        wall = time.perf_counter() - start
        print(f"generated world {params_hash(params)} (seed {params.seed}) in {wall:.1f} s -> {paths.root}")
        for f in paths.all_files():
            print(f"  {f.stat().st_size / 1e6:8.2f} MB  {f.name}")
        manifest = json.loads(paths.manifest.read_text())
        print("  counts:", manifest["counts"])
        for shot, counts in manifest["eval_mode_counts"].items():
            print(f"  shot {shot}: candidates by eval mode {counts}")

    if args.baselines:
        rows = baseline_table(params)
        print(f"\nbaselines on test queries ({rows[0]['n']} queries, per-query {params.candidate_num}-pools)")
        print(f"{'method':<24}{'shot':>5}{'acc':>8}{'±95%':>7}{'E[acc]':>8}{'p_corr':>8}")
        for r in rows:
            acc = f"{100 * r['acc']:8.1f}{100 * r['ci95']:7.1f}" if "acc" in r else f"{'':8}{100 * r['ci95']:7.1f}"
            pc = f"{100 * r['p_correct']:8.1f}" if "p_correct" in r else ""
            print(f"{r['method']:<24}{r['shot']:>5}{acc}{100 * r['expected_acc']:8.1f}{pc}")
        if args.json:
            print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
