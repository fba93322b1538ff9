"""Evaluation queries of one split: the queries the downstream evaluation answers, with their ICD pools."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch


@dataclass
class EvalQuerySet:
    """Evaluation queries of one split with their candidate pools (global train ids)."""

    split: str
    query_index: List[int]
    query_emb: torch.Tensor  # [M, d]
    pools: List[List[int]]

    def __len__(self) -> int:
        return len(self.query_index)

    def head(self, n: int) -> "EvalQuerySet":
        """The first ``n`` queries (the reports evaluate the first n queries of a split)."""
        return EvalQuerySet(self.split, self.query_index[:n], self.query_emb[:n], self.pools[:n])
