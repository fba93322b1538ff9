"""Data curation: query filters that reshape an RL file's training view (mixed queries, a positive-ratio range).

The reference reshaped its RL files with offline scripts before training (reference#data-surgery): the "balanced"
filter kept *mixed* queries, with at least one correct and one wrong candidate, and the VQAv2 generator kept a
query only when its positive ratio lay in [0.4, 0.6]. Here both are ``data.*`` options applied to the candidates
that survive the candidate filters, so a curated variant is one more sweep arm over the same file. A candidate is
positive when ``vqa_correct`` is 1, or, without that field (the "balanced" shape), when ``vqa_acc_score > 0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence


def is_positive(candidate: Mapping[str, Any]) -> bool:
    """``vqa_correct`` when present and not null, else ``vqa_acc_score > 0`` (missing counts as 0)."""
    correct = candidate.get("vqa_correct")
    if correct is not None:
        return bool(correct)
    return float(candidate.get("vqa_acc_score") or 0.0) > 0.0


def positive_ratio(candidates: Sequence[Mapping[str, Any]]) -> float:
    """The share of positive candidates (0.0 for an empty list)."""
    return sum(is_positive(c) for c in candidates) / len(candidates) if candidates else 0.0


@dataclass(frozen=True)
class Curation:
    """The query filters of ``data.mixed_queries`` and ``data.positive_ratio_min`` / ``_max`` (defaults: off)."""

    mixed_queries: bool = False
    positive_ratio_min: float = 0.0
    positive_ratio_max: float = 1.0

    @property
    def active(self) -> bool:
        return self.mixed_queries or self.positive_ratio_min > 0.0 or self.positive_ratio_max < 1.0

    def drop_reason(self, candidates: Sequence[Mapping[str, Any]]) -> Optional[str]:
        """Why the query with these (kept) candidates is dropped (a ``FilterStats`` key), or None when kept.

        ``not_mixed``: all positive or all negative; ``positive_ratio``: the share of positives is outside
        ``[positive_ratio_min, positive_ratio_max]`` (both ends included)."""
        if not self.active or not candidates:
            return None
        n_pos = sum(is_positive(c) for c in candidates)
        if self.mixed_queries and n_pos in (0, len(candidates)):
            return "not_mixed"
        if not self.positive_ratio_min <= n_pos / len(candidates) <= self.positive_ratio_max:
            return "positive_ratio"
        return None


__all__ = ["Curation", "is_positive", "positive_ratio"]
