"""Several selectors and the baselines on one query set at several shots, with every pairwise paired difference.

Each method (a trained checkpoint, or a model-free baseline) is evaluated through the downstream harness
(:func:`~leverplus.evaluation.downstream.downstream_eval`) at every shot, on the same queries, so that any two
methods at one shot can be compared query by query (paired bootstrap of the accuracy difference).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Dict, List, Mapping, Sequence, Tuple

import torch

from leverplus.data.eval_queries import EvalQuerySet
from leverplus.evaluation.downstream import Scorer, downstream_eval, paired_comparison
from leverplus.evaluation.stats import PairedResult


@dataclass
class HeadToHead:
    """``summaries[(method, shot)]``: acc, ci_lo, ci_hi, n; ``rows[(method, shot)]``: per-query rows;
    ``pairs[(a, b, shot)]``: the paired difference a − b over the same queries."""

    methods: List[str]
    shots: List[int]
    summaries: Dict[Tuple[str, int], Dict[str, float]] = field(default_factory=dict)
    rows: Dict[Tuple[str, int], List[dict]] = field(default_factory=dict)
    pairs: Dict[Tuple[str, str, int], PairedResult] = field(default_factory=dict)


def head_to_head(scorer: Scorer, qset: EvalQuerySet, embeddings: torch.Tensor, shots: Sequence[int],
                 selectors: Mapping[str, object], baselines: Sequence[str], *, pool_mode: str = "query_pool",
                 seed: int = 0, normalization: str = "official", n_boot: int = 2000) -> HeadToHead:
    """Every selector (label -> policy) and baseline at every shot, and all pairwise paired differences."""
    methods = list(selectors) + list(baselines)
    out = HeadToHead(methods=methods, shots=[int(s) for s in shots])
    for shot in out.shots:
        for label, model in selectors.items():
            summ, rows = downstream_eval(scorer, qset, embeddings, shot, ["selector"], model=model,
                                         pool_mode=pool_mode, seed=seed, normalization=normalization)
            out.summaries[(label, shot)] = summ["selector"]
            out.rows[(label, shot)] = [{**r, "method": label} for r in rows["selector"]]
        for method in baselines:
            summ, rows = downstream_eval(scorer, qset, embeddings, shot, [method], pool_mode=pool_mode, seed=seed,
                                         normalization=normalization)
            out.summaries[(method, shot)] = summ[method]
            out.rows[(method, shot)] = rows[method]
        for a, b in combinations(methods, 2):
            out.pairs[(a, b, shot)] = paired_comparison(out.rows[(a, shot)], out.rows[(b, shot)], n_boot=n_boot,
                                                        seed=seed)
    return out


def format_accuracy_table(res: HeadToHead, title: str = "") -> str:
    """Markdown: one row per method, one column per shot: accuracy (%) [95% CI], and n."""
    head = [f"**{title}**", ""] if title else []
    lines = head + ["| method | " + " | ".join(f"S{s}" for s in res.shots) + " | n |",
                    "|---|" + "---|" * (len(res.shots) + 1)]
    for m in res.methods:
        cells = []
        for s in res.shots:
            x = res.summaries[(m, s)]
            cells.append(f"{100 * x['acc']:.2f} [{100 * x['ci_lo']:.2f}, {100 * x['ci_hi']:.2f}]")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {int(res.summaries[(m, res.shots[0])]['n'])} |")
    return "\n".join(lines)


def format_pairs_table(res: HeadToHead) -> str:
    """Markdown: one row per (pair, shot): Δ accuracy (pp) with its 95% CI, p and n."""
    lines = ["| a − b | shot | Δ (pp) | 95% CI | p | n |", "|---|---|---|---|---|---|"]
    for (a, b, s), p in res.pairs.items():
        lines.append(f"| {a} − {b} | {s} | {100 * p.delta:+.2f} | [{100 * p.lo:+.2f}, {100 * p.hi:+.2f}] | "
                     f"{p.p_value:.3g} | {p.n} |")
    return "\n".join(lines)


__all__ = ["HeadToHead", "format_accuracy_table", "format_pairs_table", "head_to_head"]
