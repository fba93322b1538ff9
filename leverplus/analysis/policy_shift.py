"""How far training moved the selector's policy: the share of evaluation queries whose ICD sequence changed.

Why: under a deterministic LVLM, a query whose prompt (its selected in-context examples, in order) is the same for
the arm and the baseline gets exactly the same answer, so it contributes a difference of exactly 0; per-query
accuracy lies in [0, 1], so a changed query contributes at most 1 in absolute value. Hence, per seed,
``|Δ accuracy| <= changed fraction``, and over seeds ``|mean Δ| <= mean changed fraction``. A cell whose bound is
~0 shows "no effect because nothing changed", which reads differently from "changed, but no better".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

ICDS_COL = "icds"  # per-query column: the selected ICD indices of the query, in prompt order


@dataclass(frozen=True)
class PolicyShift:
    """Share of the queries (matched by query_index) whose ICD sequence differs from the baseline's, per seed and
    averaged over seeds. ``bound`` = ``mean_fraction``: the bound on |Δ accuracy| (accuracy units, not pp)."""

    mean_fraction: float
    fractions: Tuple[float, ...]  # one per seed in ``seeds``
    seeds: Tuple[int, ...]
    n_queries: int  # matched queries over all those seeds

    @property
    def bound(self) -> float:
        return self.mean_fraction


def _icds_by_query(q: pd.DataFrame, shot: int) -> Optional[pd.Series]:
    """query_index -> ICD sequence (tuple of ints) at ``shot``; None when the table has no (complete) icds."""
    if ICDS_COL not in q.columns:
        return None
    if "shot_num" in q.columns:
        q = q[q["shot_num"].astype(int) == shot]
    if q[ICDS_COL].isna().any():
        return None
    seqs = [tuple(int(i) for i in s) for s in q[ICDS_COL]]
    return pd.Series(seqs, index=q["query_index"].astype(int).to_numpy(), dtype=object)


def changed_fraction(arm: pd.DataFrame, base: pd.DataFrame, shot: int) -> Optional[Tuple[int, int]]:
    """(queries whose ICD sequence differs, queries both runs answered) at ``shot``; None when either table lacks
    icds. Sequences are compared in order: the same examples in another order are another prompt."""
    a, b = _icds_by_query(arm, shot), _icds_by_query(base, shot)
    if a is None or b is None:
        return None
    common = a.index.intersection(b.index)
    changed = sum(a.loc[i] != b.loc[i] for i in common)
    return int(changed), int(len(common))


def policy_shift(pairs: Sequence[Tuple[int, str, str]], shot: int,
                 per_query: Mapping[str, pd.DataFrame]) -> Optional[PolicyShift]:
    """The :class:`PolicyShift` over ``pairs`` = (seed, arm run id, baseline run id); seeds where a run has no
    per-query table, no icds or no common query are skipped; None when no seed is left."""
    fractions, seeds, total = [], [], 0
    for seed, arm_run, base_run in pairs:
        if arm_run not in per_query or base_run not in per_query:
            continue
        got = changed_fraction(per_query[arm_run], per_query[base_run], shot)
        if got is None or got[1] == 0:
            continue
        fractions.append(got[0] / got[1])
        seeds.append(int(seed))
        total += got[1]
    if not fractions:
        return None
    return PolicyShift(float(np.mean(fractions)), tuple(fractions), tuple(seeds), total)
