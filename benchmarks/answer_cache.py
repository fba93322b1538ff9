"""LVLM calls with the answer cache: evaluating N arms whose ICD selections overlap vs evaluating one arm.

The simulated scorer (default world, test split) stands in for the LVLM; what is counted is prompts the wrapped
scorer had to generate (``CachedScorer.generated``), which on real data is LVLM forward passes. Each arm equals a
base selection except on a fraction f of the queries, perturbed by one of three models:

- ``independent``: each arm picks its own f·n queries and gives them fresh random ICDs (worst case: every
  perturbation is a new prompt);
- ``alternatives``: each arm picks its own f·n queries and gives each one of A fixed alternative selections of
  that query (arms disagree among a few near-tied choices);
- ``contested``: the same f·n queries are contested in every arm, and each arm picks the base or one of the A
  alternatives for each of them (arms disagree on the hard queries only).

Target of the issue: evaluating every arm of the one-seed reward grid (84 arms) costs at most 1.3x the LVLM calls
of evaluating one arm. ``python benchmarks/answer_cache.py [--arms 84] [--shot 2] [--alternatives 3]``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np

from leverplus.config.sim_params import SimParams
from leverplus.evaluation.answer_cache import AnswerCache, CachedScorer, scorer_identity
from leverplus.sim.lvlm import SimLVLM
from leverplus.sim.scorer import SimScorer
from leverplus.sim.world import World

FRACTIONS = (0.05, 0.1, 0.3)
TARGET_RATIO = 1.3  # the issue's budget: all arms of the one-seed reward grid <= 1.3x one arm's LVLM calls
SPLIT = "test"


def _candidates(world: World, n: int, shot: int, alternatives: int, seed: int) -> np.ndarray:
    """[n, 1 + A, shot]: per query the base selection and A alternatives, disjoint slices of a seeded pool order."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 1 + alternatives, shot), dtype=np.int64)
    for q in range(n):
        pool = np.asarray(world.pool(SPLIT, q))
        order = rng.permutation(len(pool))[: (1 + alternatives) * shot]
        out[q] = pool[order].reshape(1 + alternatives, shot)
    return out


def _arm(model: str, f: float, cands: np.ndarray, world: World, arm: int, contested: np.ndarray) -> List[List[int]]:
    """The ICD selection of one arm (arm 0 is the base selection)."""
    n, a1, shot = cands.shape
    sel = cands[:, 0].copy()
    if arm == 0:
        return sel.tolist()
    rng = np.random.default_rng(1000 + arm)
    if model == "contested":
        pick = rng.integers(0, a1, size=len(contested))  # 0 = the base selection
        sel[contested] = cands[contested, pick]
        return sel.tolist()
    qs = rng.choice(n, size=int(round(f * n)), replace=False)
    if model == "alternatives":
        sel[qs] = cands[qs, rng.integers(1, a1, size=len(qs))]
    else:  # independent: fresh random ICDs from the query's pool
        for q in qs:
            pool = np.asarray(world.pool(SPLIT, int(q)))
            sel[q] = pool[rng.choice(len(pool), size=shot, replace=False)]
    return sel.tolist()


def run_model(scorer: SimScorer, model: str, f: float, cands: np.ndarray, arms: int, store: Path) -> Dict[str, float]:
    """Evaluate ``arms`` arms through one cache file; prompts generated for the first arm and for all of them."""
    world, n = scorer.world, cands.shape[0]
    contested = np.random.default_rng(7).choice(n, size=int(round(f * n)), replace=False)
    cs = CachedScorer(scorer, AnswerCache(store), scorer_identity(scorer))
    qs = list(range(n))
    one = None
    t0 = time.perf_counter()
    for arm in range(arms):
        cs.answer_batch(SPLIT, qs, _arm(model, f, cands, world, arm, contested))
        if arm == 0:
            one = cs.generated
    wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    cs.answer_batch(SPLIT, qs, cands[:, 0].tolist())  # all hits: the cache's own cost per prompt
    hit_us = 1e6 * (time.perf_counter() - t1) / n
    cs.cache.close()
    return {"one": one, "all": cs.generated, "ratio": cs.generated / one, "wall": wall, "hit_us": hit_us}


def _table(rows: List[dict], arms: int, n: int) -> str:
    lines = [f"| perturbation | f | prompts, 1 arm | prompts, {arms} arms (cache) | ratio | without cache | "
             f"<= {TARGET_RATIO}x | wall, {arms} arms | per cached prompt |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['f']:.2f} | {r['one']} | {r['all']} | {r['ratio']:.2f}x | {arms * n} | "
                     f"{'yes' if r['ratio'] <= TARGET_RATIO else 'no'} | {r['wall']:.1f} s | {r['hit_us']:.0f} µs |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arms", type=int, default=84, help="arms of the one-seed reward grid")
    ap.add_argument("--shot", type=int, default=2)
    ap.add_argument("--alternatives", type=int, default=3, help="A: alternative selections per query")
    args = ap.parse_args()
    scorer = SimScorer(SimLVLM(World(SimParams())))
    n = scorer.num_items(SPLIT)
    cands = _candidates(scorer.world, n, args.shot, args.alternatives, seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in ("independent", "alternatives", "contested"):
            for f in FRACTIONS:
                r = run_model(scorer, model, f, cands, args.arms, Path(tmp) / f"{model}-{f}.sqlite")
                rows.append({"model": model, "f": f, **r})
                print(f"{model} f={f}: {r['all']} / {r['one']} = {r['ratio']:.2f}x", flush=True)
    print(f"\n{args.arms} arms, default simulated world, {SPLIT} split (n = {n}), shot {args.shot}, "
          f"A = {args.alternatives}; {platform.platform()}, {os.cpu_count()} CPUs, "
          f"{datetime.date.today().isoformat()}\n")
    print(_table(rows, args.arms, n))


if __name__ == "__main__":
    main()
