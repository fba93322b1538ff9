"""Padded batches of many groups: query embeddings, candidate embeddings, labels, member/pool masks and rewards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from leverplus.data.groups import Group
from leverplus.errors import LeverPlusInputError


@dataclass
class Batch:
    """Padded tensors for B queries. Masks are True where an entry is real."""

    query_ids: List[int]
    query_emb: torch.Tensor  # [B, d]
    cand_emb: torch.Tensor  # [B, K, d]
    cand_mask: torch.Tensor  # [B, K] bool
    labels: torch.Tensor  # [B, G, S] (padded members point at position 0)
    member_mask: torch.Tensor  # [B, G] bool
    rewards: torch.Tensor  # [B, G] normalised
    rewards_raw: torch.Tensor  # [B, G]
    acc: torch.Tensor  # [B, G]
    old_log_probs: Optional[torch.Tensor] = None  # [B, G], set by the trainer for GRPO
    pool_idx: Optional[torch.Tensor] = None  # [B, K] embedding rows of the pool (padding: row 0, masked)

    def to(self, device: str | torch.device) -> "Batch":
        """This batch on ``device``: itself when every tensor is already there (the CPU case), else a moved copy."""
        device = torch.device(device)
        tensors = [v for v in self.__dict__.values() if isinstance(v, torch.Tensor)]
        if all(v.device == device for v in tensors):
            return self
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return Batch(**moved)


def _length_mask(lengths: Sequence[int]) -> torch.Tensor:
    """``[B, max(lengths)]`` bool, True at the first ``lengths[b]`` entries of row b."""
    n = torch.tensor(list(lengths))
    return torch.arange(max(lengths))[None, :] < n[:, None]


def _check_one_shot(groups: Sequence[Group]) -> None:
    if not groups:
        raise ValueError("a batch needs at least one group")
    shots = {g.shot_num for g in groups}
    if len(shots) != 1:
        raise ValueError(f"a batch must have one shot_num, got {sorted(shots)}")


class PaddedGroups:
    """A phase's groups padded once into row tables, so that a batch is a few row gathers instead of a collate.

    ``table(chunk)`` gives the same batch whichever groups the table holds besides the chunk's: every table is sliced
    to the chunk's largest pool and group before the gather, so a phase's table returns exactly
    ``collate(chunk, ...)``. The per-group Python work and the ``pad_sequence`` calls happen here, once per phase, not
    in every step (at batch 32 they were about a tenth of a training step). ``chunk`` must consist of groups the table
    was built from; padded group members point at position 0, padded pool entries at row 0 (masked).
    """

    def __init__(self, groups: Sequence[Group], embeddings: torch.Tensor,
                 old_log_probs: Optional[Mapping] = None) -> None:
        if not groups:
            raise ValueError("a batch needs at least one group")
        pad = torch.nn.utils.rnn.pad_sequence
        self.embeddings = embeddings
        self._row = {id(g): i for i, g in enumerate(groups)}
        self._pool_len = [len(g.pool_ids) for g in groups]
        self._size = [g.size for g in groups]
        width = max(int(g.labels.shape[1]) for g in groups)  # shot counts may differ between batches
        self.query_ids = torch.tensor([g.query_id for g in groups])
        self.pool_idx = pad([torch.as_tensor(g.pool_ids, dtype=torch.long) for g in groups], batch_first=True)
        self.cand_mask = _length_mask(self._pool_len)
        self.member_mask = _length_mask(self._size)
        self.labels = pad([F.pad(g.labels, (0, width - int(g.labels.shape[1]))) for g in groups], batch_first=True)
        self.rewards = pad([g.rewards for g in groups], batch_first=True)
        self.rewards_raw = pad([g.rewards_raw for g in groups], batch_first=True)
        self.acc = pad([g.acc for g in groups], batch_first=True)
        self.old_log_probs = (pad([old_log_probs[g.query_id] for g in groups], batch_first=True)
                              if old_log_probs is not None else None)

    def __call__(self, chunk: Sequence[Group]) -> Batch:
        _check_one_shot(chunk)
        try:
            rows = [self._row[id(g)] for g in chunk]
        except KeyError:
            raise ValueError("PaddedGroups got a group it was not built from; build the table from the groups "
                             "the batches are drawn from") from None
        k = max(self._pool_len[r] for r in rows)
        m = max(self._size[r] for r in rows)
        s = int(chunk[0].labels.shape[1])
        idx = torch.tensor(rows)

        def take(table: torch.Tensor, *cols: int) -> torch.Tensor:
            # slice first, then gather: index_select returns a contiguous [len(chunk), ...] copy
            return table[(slice(None),) + tuple(slice(0, c) for c in cols)].index_select(0, idx)

        pool_idx, cand_mask = take(self.pool_idx, k), take(self.cand_mask, k)
        cand_emb = F.embedding(pool_idx, self.embeddings) * cand_mask[..., None].to(self.embeddings.dtype)
        return Batch(
            query_ids=[g.query_id for g in chunk],
            query_emb=F.embedding(self.query_ids.index_select(0, idx), self.embeddings),
            cand_emb=cand_emb,
            cand_mask=cand_mask,
            labels=take(self.labels, m, s),
            member_mask=take(self.member_mask, m),
            rewards=take(self.rewards, m),
            rewards_raw=take(self.rewards_raw, m),
            acc=take(self.acc, m),
            old_log_probs=take(self.old_log_probs, m) if self.old_log_probs is not None else None,
            pool_idx=pool_idx,
        )


def collate(groups: Sequence[Group], embeddings: torch.Tensor, old_log_probs: Optional[Mapping] = None) -> Batch:
    """Pad B groups (sizes G_b, pools K_b, same shot count) into one Batch. For many batches over one set of groups,
    build a ``PaddedGroups`` once and call it per batch instead."""
    _check_one_shot(groups)
    return PaddedGroups(groups, embeddings, old_log_probs)(groups)


def check_groups(groups: Sequence[Group], embeddings: torch.Tensor, what: str = "groups") -> None:
    """Validate once what the model would otherwise check in every batch: a finite 2-D embedding table, and per
    group a non-empty pool of existing rows, integer labels inside the pool, and enough pool items for the shots.
    The trainer runs this over its data and then trains with the model's per-call checks off."""
    if embeddings.dim() != 2:
        raise LeverPlusInputError(f"expected an [N, d] table, got {tuple(embeddings.shape)}", field="embeddings")
    finite = torch.isfinite(embeddings).all(dim=1)
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0])
        raise LeverPlusInputError(f"row {row} contains NaN or inf", field="embeddings", fix="re-export the embeddings")
    n = embeddings.shape[0]
    for g in groups:
        record = f"query {g.query_id} ({what})"
        k = len(g.pool_ids)
        if k == 0:
            raise LeverPlusInputError("the pool is empty", record=record, field="pool_ids")
        if not 0 <= g.query_id < n or min(g.pool_ids) < 0 or max(g.pool_ids) >= n:
            raise LeverPlusInputError(f"points outside the embedding table of {n} rows", record=record,
                                      field="pool_ids/query_id", fix="use the embedding file the data were made with")
        if g.labels.dtype.is_floating_point or g.labels.dtype == torch.bool or g.labels.dim() != 2:
            raise LeverPlusInputError(f"labels must be integer [G, S] positions, got {g.labels.dtype} "
                                      f"{tuple(g.labels.shape)}", record=record, field="labels")
        if g.labels.numel() and (int(g.labels.min()) < 0 or int(g.labels.max()) >= k):
            raise LeverPlusInputError(f"labels must lie in [0, {k}), got {g.labels.min()}..{g.labels.max()}",
                                      record=record, field="labels")
        if g.shot_num > k:
            raise LeverPlusInputError(f"cannot pick {g.shot_num} distinct items from a pool of {k}", record=record,
                                      field="shot_num", fix="lower the shot number or enlarge the candidate pool")


def iterate_batches(
    groups: Sequence[Group], batch_size: int, *, shuffle: bool, generator: Optional[torch.Generator] = None
) -> Iterator[List[Group]]:
    """Yield lists of groups; one shot_num per batch (joint multi-shot training mixes batches, not queries)."""
    if batch_size < 1:
        raise LeverPlusInputError(f"batch_size={batch_size} must be >= 1", field="data.batch_size")
    by_shot: Dict[int, List[Group]] = {}
    for g in groups:
        by_shot.setdefault(g.shot_num, []).append(g)
    chunks: List[List[Group]] = []
    for shot in sorted(by_shot):
        items = by_shot[shot]
        order = torch.randperm(len(items), generator=generator).tolist() if shuffle else range(len(items))
        items = [items[i] for i in order]
        chunks.extend(items[i : i + batch_size] for i in range(0, len(items), batch_size))
    if shuffle and len(by_shot) > 1:
        perm = torch.randperm(len(chunks), generator=generator).tolist()
        chunks = [chunks[i] for i in perm]
    yield from chunks


def num_batches(groups: Sequence[Group], batch_size: int) -> int:
    counts: Dict[int, int] = {}
    for g in groups:
        counts[g.shot_num] = counts.get(g.shot_num, 0) + 1
    return sum(-(-n // batch_size) for n in counts.values())

