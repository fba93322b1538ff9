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

Target of the issue: evaluating every arm of the one-seed reward grid (84 distinct jobs = 21 arms x 4 shots) costs
at most 1.3x the LVLM calls of evaluating one arm. Prompts of different shots never coincide, so the grid's ratio
is the ratio of its 21 arms at one shot; the 84 column is 84 arms over the same prompts (a stricter bound).

``--runs DIR ...`` also feeds the downstream selector ICDs of real trained runs (``DIR/per_query.jsonl`` of
``python -m leverplus.train ... hydra.run.dir=DIR`` on the default world) through the cache, arm after arm.

``python benchmarks/answer_cache.py [--arms 21 84] [--shot 2] [--alternatives 3] [--runs DIR ...]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

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


def run_model(scorer: SimScorer, model: str, f: float, cands: np.ndarray, arms: Sequence[int],
              store: Path) -> Dict[str, float]:
    """Evaluate max(arms) arms through one cache file; prompts generated after the first arm and after each count
    of ``arms`` (arms are the same whatever the total, so the count after k arms is the k-arm result)."""
    world, n = scorer.world, cands.shape[0]
    contested = np.random.default_rng(7).choice(n, size=int(round(f * n)), replace=False)
    cs = CachedScorer(scorer, AnswerCache(store), scorer_identity(scorer))
    qs = list(range(n))
    out: Dict[str, float] = {}
    t0 = time.perf_counter()
    for arm in range(max(arms)):
        cs.answer_batch(SPLIT, qs, _arm(model, f, cands, world, arm, contested))
        if arm == 0:
            out["one"] = cs.generated
        if arm + 1 in arms:
            out[f"all{arm + 1}"] = cs.generated
    out["wall"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    cs.answer_batch(SPLIT, qs, cands[:, 0].tolist())  # all hits: the cache's own cost per prompt
    out["hit_us"] = 1e6 * (time.perf_counter() - t1) / n
    cs.cache.close()
    return out


def run_real(scorer: SimScorer, run_dirs: Sequence[str], store: Path) -> List[dict]:
    """The selector ICDs of real runs (test split), arm after arm through one cache: cumulative prompts generated."""
    cs = CachedScorer(scorer, AnswerCache(store), scorer_identity(scorer))
    rows = []
    for d in run_dirs:
        recs = [json.loads(line) for line in open(Path(d) / "per_query.jsonl", encoding="utf-8")]
        recs = [r for r in recs if r.get("kind") == "downstream" and r.get("method") == "selector"
                and r.get("split") == SPLIT]
        before = cs.generated
        cs.answer_batch(SPLIT, [r["query_index"] for r in recs], [r["icds"] for r in recs])
        rows.append({"run": Path(d).name, "n": len(recs), "new": cs.generated - before, "total": cs.generated})
    cs.cache.close()
    return rows


def _table(rows: List[dict], arms: Sequence[int], n: int) -> str:
    head = " | ".join(f"prompts, {a} arms | ratio, {a} arms" for a in arms)
    lines = [f"| perturbation | f | prompts, 1 arm | {head} | without cache, {max(arms)} arms | "
             f"{max(arms)} arms: wall | per cached prompt |", "|---" * (6 + 2 * len(arms)) + "|"]
    for r in rows:
        cells = " | ".join(f"{r[f'all{a}']} | {r[f'all{a}'] / r['one']:.2f}x{'' if r[f'all{a}'] / r['one'] <= TARGET_RATIO else ' (> ' + str(TARGET_RATIO) + 'x)'}"
                           for a in arms)
        lines.append(f"| {r['model']} | {r['f']:.2f} | {r['one']} | {cells} | {max(arms) * n} | {r['wall']:.1f} s | "
                     f"{r['hit_us']:.0f} µs |")
    return "\n".join(lines)


def _real_table(rows: List[dict]) -> str:
    lines = ["| run (arm) | prompts | new prompts | cumulative generated | ratio to the first arm |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['n']} | {r['new']} | {r['total']} | {r['total'] / rows[0]['total']:.3f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arms", type=int, nargs="+", default=[21, 84], help="arm counts to report (21 per shot in "
                    "the one-seed reward grid, 84 distinct jobs in all)")
    ap.add_argument("--shot", type=int, default=2)
    ap.add_argument("--alternatives", type=int, default=3, help="A: alternative selections per query")
    ap.add_argument("--runs", nargs="*", default=[], help="run folders with per_query.jsonl (default world)")
    args = ap.parse_args()
    arms = sorted(set(args.arms))
    scorer = SimScorer(SimLVLM(World(SimParams())))
    n = scorer.num_items(SPLIT)
    cands = _candidates(scorer.world, n, args.shot, args.alternatives, seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in ("independent", "alternatives", "contested"):
            for f in FRACTIONS:
                r = run_model(scorer, model, f, cands, arms, Path(tmp) / f"{model}-{f}.sqlite")
                rows.append({"model": model, "f": f, **r})
                print(f"{model} f={f}: " + ", ".join(f"{a} arms {r[f'all{a}'] / r['one']:.2f}x" for a in arms),
                      flush=True)
        real = run_real(scorer, args.runs, Path(tmp) / "real.sqlite") if args.runs else []
    print(f"\ndefault simulated world, {SPLIT} split (n = {n}), shot {args.shot}, A = {args.alternatives}; "
          f"{platform.platform()}, {os.cpu_count()} CPUs, {datetime.date.today().isoformat()}\n")
    print(_table(rows, arms, n))
    if real:
        print("\nreal trained arms (selector ICDs of the test split, in this order through one cache):\n")
        print(_real_table(real))


if __name__ == "__main__":
    main()
