"""Groups: one per query, its candidates (pointer sequences into the query's pool), their rewards (raw and
group-normalised) and masks; the filters that drop candidates or queries; the train/val split.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from leverplus.config.reward_modes import REWARD_MODE_SPECS, info_field, needs_infoscores
from leverplus.data.curation import Curation
from leverplus.data.formats.beam_json import BeamRecord
from leverplus.data.formats.rl_json import VARIANT_ABSENT_FIELDS, RLData
from leverplus.data.rewards import (
    compute_reward,
    group_info_scores,
    hybrid_info_values,
    normalize_group,
    sequence_diversity,
)
from leverplus.errors import LeverPlusInputError
from leverplus.utils import enum_value


@dataclass
class Group:
    """One query's candidates, ready for training (all tensors on CPU)."""

    query_id: int
    shot_num: int
    pool_ids: List[int]  # global train-row ids; labels index into this list
    labels: torch.Tensor  # [G, S] local positions, prompt order
    rewards_raw: torch.Tensor  # [G] clipped reward-formula output
    rewards: torch.Tensor  # [G] group-normalised
    acc: torch.Tensor  # [G] vqa_acc_score (0 when absent), for offline evaluation
    candidate_index: List[int]  # position of each member in the file's pointer_candidates
    gen_methods: List[Optional[str]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])

    def global_pointers(self) -> List[Tuple[int, ...]]:
        return [tuple(self.pool_ids[j] for j in row) for row in self.labels.tolist()]


@dataclass
class GroupOptions:
    """Everything that decides how candidates become a group (mirrors DataConfig + RewardConfig)."""

    reward_mode: str = "hard_plus_soft"
    hard_weight: float = 1.0
    soft_weight: float = 1.0
    rel_weight: float = 0.1
    reward_alpha: float = 0.0
    reward_beta: float = 0.0
    correctness_mode: str = "01"
    use_logprob: bool = False
    info_weight: float = 0.5
    reward_clip: float = 5.0
    diversity_weight: float = 0.0
    skip_fallback_reward: bool = True
    drop_eval_errors: bool = True
    filter_gen_methods: Optional[Sequence[str]] = None
    require_positive_query: bool = False
    positive_reward_threshold: float = 1.0
    max_pool_size: int = 64
    mixed_queries: bool = False
    positive_ratio_min: float = 0.0
    positive_ratio_max: float = 1.0
    normalize_method: str = "z_score_clamp"
    normalize_clamp: float = 3.0

    @property
    def curation(self) -> Curation:
        return Curation(self.mixed_queries, self.positive_ratio_min, self.positive_ratio_max)

    @classmethod
    def from_config(cls, data_cfg, reward_cfg) -> "GroupOptions":
        return cls(
            reward_mode=enum_value(reward_cfg.mode),
            hard_weight=reward_cfg.hard_weight,
            soft_weight=reward_cfg.soft_weight,
            rel_weight=reward_cfg.rel_weight,
            reward_alpha=reward_cfg.reward_alpha,
            reward_beta=reward_cfg.reward_beta,
            correctness_mode=enum_value(reward_cfg.correctness_mode),
            use_logprob=reward_cfg.use_logprob,
            info_weight=reward_cfg.info_weight,
            reward_clip=reward_cfg.clip,
            diversity_weight=reward_cfg.diversity_weight,
            skip_fallback_reward=data_cfg.skip_fallback_reward,
            drop_eval_errors=data_cfg.drop_eval_errors,
            filter_gen_methods=list(data_cfg.filter_gen_methods) if data_cfg.filter_gen_methods else None,
            require_positive_query=data_cfg.require_positive_query,
            positive_reward_threshold=data_cfg.positive_reward_threshold,
            max_pool_size=data_cfg.max_pool_size,
            mixed_queries=data_cfg.mixed_queries,
            positive_ratio_min=data_cfg.positive_ratio_min,
            positive_ratio_max=data_cfg.positive_ratio_max,
            normalize_method=enum_value(data_cfg.normalize_method),
            normalize_clamp=data_cfg.normalize_clamp,
        )


@dataclass
class FilterStats:
    """What the filters dropped (logged so a user sees why a run has fewer queries than the file)."""

    queries_in: int = 0
    queries_kept: int = 0
    candidates_in: int = 0
    candidates_kept: int = 0
    dropped: Dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    def add(self, other: "FilterStats") -> None:
        """Add another stage's counts to these (``other`` is left unchanged)."""
        self.queries_in += other.queries_in
        self.queries_kept += other.queries_kept
        self.candidates_in += other.candidates_in
        self.candidates_kept += other.candidates_kept
        for reason, n in other.dropped.items():
            self.drop(reason, n)


def infoscore_lookup(beams: Optional[Mapping[int, BeamRecord]]) -> Dict[int, Dict[Tuple[int, ...], float]]:
    """query id -> {ICD sequence in prompt order: total InfoScore of that beam} (for the hybrid reward)."""
    out: Dict[int, Dict[Tuple[int, ...], float]] = {}
    for qid, rec in (beams or {}).items():
        out[qid] = {seq: rec.sequence_infoscore(i) for i, seq in enumerate(rec.icd_sequences)}
    return out


@dataclass
class GroupSkeleton:
    """The reward-independent part of a group: surviving candidates, pool, local labels, accuracies. Every arm of
    a reward sweep shares it, so :func:`prepare_groups <leverplus.pipeline.prepare_groups>` builds it once per
    process and only recomputes the rewards."""

    query_id: int
    kept: List[Any]  # RLCandidate, in file order
    pool_ids: List[int]
    labels: torch.Tensor  # [G, S]
    acc: torch.Tensor  # [G]


def _drop_reason(raw: Mapping[str, Any], opts: GroupOptions) -> Optional[str]:
    """The filter that drops one candidate (its ``FilterStats`` key), or None when it is kept."""
    mode = raw.get("vqa_eval_mode")
    if opts.drop_eval_errors and (raw.get("eval_failed") or mode == "error"):
        return "eval_error"
    if opts.skip_fallback_reward and mode == "fallback":
        return "fallback"
    if opts.filter_gen_methods is not None and raw.get("gen_method") not in opts.filter_gen_methods:
        return "gen_method"
    return None


def _kept_candidates(q: Any, opts: GroupOptions, stats: FilterStats) -> List[Any]:
    """The query's candidates that pass every filter, in file order (drops counted in ``stats``)."""
    kept = []
    for cand in q.candidates:
        stats.candidates_in += 1
        reason = _drop_reason(cand.raw, opts)
        if reason is not None:
            stats.drop(reason)
            continue
        kept.append(cand)
    return kept


def _query_pool(qid: int, q: Any, kept: Sequence[Any], opts: GroupOptions,
                fallback_pools: Optional[Mapping[int, Sequence[int]]]) -> List[int]:
    """The file's ``candidate_pool_ids``, else the data source's pool, else the sorted union of the surviving
    pointers (the reference); truncated to ``max_pool_size``."""
    if q.candidate_pool_ids is not None:
        pool = list(q.candidate_pool_ids)
    elif fallback_pools is not None and qid in fallback_pools:
        pool = list(fallback_pools[qid])
    else:
        pool = sorted({i for c in kept for i in c.pointer})
    return pool[: opts.max_pool_size]


def _local_labels(rl: RLData, qid: int, kept: Sequence[Any], pool: List[int], opts: GroupOptions) -> List[List[int]]:
    """Each pointer as positions into ``pool``; an id outside it is an error (the reference's KeyError)."""
    pos = {gid: j for j, gid in enumerate(pool)}
    labels = []
    for c in kept:
        missing = [g for g in c.pointer if g not in pos]
        if missing:
            raise LeverPlusInputError(
                f"pointer ids {missing} are not in the query's pool (size {len(pool)} after truncation to "
                f"data.max_pool_size={opts.max_pool_size})",
                file=rl.path,
                record=f"query {qid}, candidate {c.index}",
                field="pointer",
                fix="raise data.max_pool_size or repair candidate_pool_ids",
            )
        labels.append([pos[g] for g in c.pointer])
    return labels


def group_skeletons(
    rl: RLData,
    opts: GroupOptions,
    *,
    fallback_pools: Optional[Mapping[int, Sequence[int]]] = None,
    query_ids: Optional[Sequence[int]] = None,
    stats: Optional[FilterStats] = None,
) -> List[GroupSkeleton]:
    """Filter the candidates, then the queries (curation, leverplus/data/curation.py), and build pools and labels
    (the first half of :func:`build_groups`). Reads only the filter, curation and pool options of ``opts``; records
    queries/candidates in and every filter drop in ``stats``."""
    stats = stats if stats is not None else FilterStats()
    wanted = set(query_ids) if query_ids is not None else None
    curation = opts.curation
    out: List[GroupSkeleton] = []
    for qid, q in rl.queries.items():
        if wanted is not None and qid not in wanted:
            continue
        stats.queries_in += 1
        kept = _kept_candidates(q, opts, stats)
        if not kept:
            stats.drop("empty_query")
            continue
        reason = curation.drop_reason([c.raw for c in kept])
        if reason is not None:
            stats.drop(reason)
            continue
        pool = _query_pool(qid, q, kept, opts, fallback_pools)
        labels = _local_labels(rl, qid, kept, pool, opts)
        out.append(GroupSkeleton(
            query_id=qid,
            kept=kept,
            pool_ids=pool,
            labels=torch.tensor(labels, dtype=torch.long),
            acc=torch.tensor([float(c.raw.get("vqa_acc_score") or 0.0) for c in kept], dtype=torch.float32),
        ))
    return out


def required_candidate_fields(mode: str) -> Tuple[str, ...]:
    """The candidate fields ``mode`` needs in every candidate: its declared ``candidate_fields`` less its
    ``optional_fields`` and its ``info_field`` (checked where it is scaled, with its own fix), from
    leverplus/config/reward_modes.py, so a newly declared mode is checked automatically."""
    spec = REWARD_MODE_SPECS.get(str(enum_value(mode)))
    if spec is None:
        return ()
    return tuple(f for f in spec.candidate_fields if f not in spec.optional_fields and f != spec.info_field)


def check_reward_fields(rl: RLData, skeletons: Sequence[GroupSkeleton], mode: str) -> None:
    """Every kept candidate of ``skeletons`` carries the fields the reward mode reads (a missing or null one would
    count as 0). Called by :func:`build_groups` and, once per file over both splits, by ``prepare_groups``.

    * no kept candidate has any of them (renamed or missing reward fields): refused, naming the first candidate;
    * a field missing in some or all candidates: refused, naming the first candidate lacking it;
    * except a field a file variant lacks by design (``VARIANT_ABSENT_FIELDS``: the "balanced" files have no
      ``vqa_correct``) missing from every candidate while another required field is present: a warning naming the
      file and field, which then counts as 0 (reference behaviour).
    """
    required = required_candidate_fields(mode)
    if not required or not skeletons:
        return
    present = {f: 0 for f in required}
    first_missing: Dict[str, Tuple[int, int]] = {}
    total = 0
    for sk in skeletons:
        for c in sk.kept:
            total += 1
            for f in required:
                if c.raw.get(f) is not None:
                    present[f] += 1
                elif f not in first_missing:
                    first_missing[f] = (sk.query_id, c.index)
    fix = (f"store {', '.join(required)} in every candidate (reference#formats-rl-json), or pick a reward.mode "
           "whose fields the file has")
    if not any(present.values()):
        qid, idx = first_missing[required[0]]
        raise LeverPlusInputError(
            f"no candidate has any field reward.mode={mode} reads ({', '.join(required)}); every reward would be 0",
            file=rl.path, record=f"query {qid}, candidate {idx}", field=required[0], fix=fix)
    for f in required:
        if present[f] == total or (present[f] == 0 and f in VARIANT_ABSENT_FIELDS):
            continue
        qid, idx = first_missing[f]
        raise LeverPlusInputError(
            f"missing or null in {total - present[f]} of {total} candidates (reward.mode={mode} reads it; it would "
            "silently count as 0)", file=rl.path, record=f"query {qid}, candidate {idx}", field=f, fix=fix)
    absent = [f for f in required if present[f] == 0]
    if absent:
        warnings.warn(f"{rl.path}: no candidate has {', '.join(absent)} (read by reward.mode={mode}); it counts as 0 "
                      "for every candidate", stacklevel=2)


def _candidate_reward(rl: RLData, qid: int, c: Any, info: Optional[float], opts: GroupOptions,
                      embeddings: Optional[torch.Tensor]) -> float:
    """One candidate's clipped reward (plus the optional diversity bonus, clipped again); a reward error names
    the candidate."""
    try:
        r = compute_reward(
            c.raw,
            opts.reward_mode,
            opts.hard_weight,
            opts.soft_weight,
            opts.rel_weight,
            reward_alpha=opts.reward_alpha,
            reward_beta=opts.reward_beta,
            correctness_mode=opts.correctness_mode,
            use_logprob=opts.use_logprob,
            info=info,
            info_weight=opts.info_weight,
            clip=opts.reward_clip,
        )
    except LeverPlusInputError as e:
        raise LeverPlusInputError(
            e.problem, file=rl.path, record=f"query {qid}, candidate {c.index}", field=e.field, fix=e.fix
        ) from e
    if opts.diversity_weight and embeddings is not None:
        r = r + opts.diversity_weight * sequence_diversity(embeddings[list(c.pointer)])
        r = max(-opts.reward_clip, min(opts.reward_clip, r))
    return float(r)


def _field_info_values(rl: RLData, sk: GroupSkeleton, name: str, mode: str) -> List[Optional[float]]:
    """``group_info_scores`` of the kept candidates' ``name`` field; a candidate without it names the file."""
    for c in sk.kept:
        if c.raw.get(name) is None:
            raise LeverPlusInputError(
                f"reward.mode={mode} needs {name} on every candidate and this one has none (a file written before "
                "the RL-data generator stored it?)", file=rl.path, record=f"query {sk.query_id}, candidate {c.index}",
                field=name, fix="regenerate the RL data with leverplus.generate_rl_data, or use "
                                "reward.mode=hybrid_legacy (beam-JSON InfoScores, else beam_score)")
    return list(group_info_scores([c.raw for c in sk.kept], name))


def _info_values(rl: RLData, sk: GroupSkeleton, opts: GroupOptions,
                 infoscores: Optional[Mapping[int, Mapping[Tuple[int, ...], float]]]) -> List[Optional[float]]:
    """The hybrid rewards' info term per kept candidate (None for every other reward mode)."""
    name = info_field(opts.reward_mode)
    if name is not None:
        return _field_info_values(rl, sk, name, opts.reward_mode)
    if not needs_infoscores(opts.reward_mode):
        return [None] * len(sk.kept)
    table = (infoscores or {}).get(sk.query_id, {})
    scores = [table.get(c.pointer) for c in sk.kept]
    return list(hybrid_info_values([c.raw for c in sk.kept], scores))


def groups_from_skeletons(
    rl: RLData,
    skeletons: Sequence[GroupSkeleton],
    opts: GroupOptions,
    *,
    embeddings: Optional[torch.Tensor] = None,
    infoscores: Optional[Mapping[int, Mapping[Tuple[int, ...], float]]] = None,
    stats: Optional[FilterStats] = None,
) -> List[Group]:
    """Rewards (raw, clipped, then group-normalised) for each skeleton, and the ``require_positive_query``
    filter: the second half of :func:`build_groups`."""
    stats = stats if stats is not None else FilterStats()
    groups: List[Group] = []
    if needs_infoscores(opts.reward_mode) and not infoscores:
        # Still works (falls back to beam_score), but say so once.
        warnings.warn(f"reward.mode={opts.reward_mode} without a beam JSON: info falls back to each candidate's "
                      "beam_score")
    for sk in skeletons:
        qid, kept = sk.query_id, sk.kept
        info_vals = _info_values(rl, sk, opts, infoscores)
        rewards = [_candidate_reward(rl, qid, c, info, opts, embeddings) for c, info in zip(kept, info_vals)]
        if opts.require_positive_query and not any(r >= opts.positive_reward_threshold for r in rewards):
            stats.drop("no_positive")
            continue
        raw_t = torch.tensor(rewards, dtype=torch.float32)
        groups.append(
            Group(
                query_id=qid,
                shot_num=rl.shot_num,
                pool_ids=list(sk.pool_ids),
                labels=sk.labels,
                rewards_raw=raw_t,
                rewards=normalize_group(raw_t, opts.normalize_method, opts.normalize_clamp),
                acc=sk.acc,
                candidate_index=[c.index for c in kept],
                gen_methods=[c.raw.get("gen_method") for c in kept],
            )
        )
        stats.queries_kept += 1
        stats.candidates_kept += len(kept)
    return groups


def build_groups(
    rl: RLData,
    opts: GroupOptions,
    *,
    embeddings: Optional[torch.Tensor] = None,
    infoscores: Optional[Mapping[int, Mapping[Tuple[int, ...], float]]] = None,
    fallback_pools: Optional[Mapping[int, Sequence[int]]] = None,
    query_ids: Optional[Sequence[int]] = None,
    stats: Optional[FilterStats] = None,
) -> List[Group]:
    """Turn validated RL records into training groups (reference#dataset-rl), in sorted query-id order.

    Pools: ``candidate_pool_ids`` when present; else ``fallback_pools[qid]`` when the data source gives one; else the
    reference's per-query sorted union of the surviving pointers' ids. Pools longer than ``max_pool_size`` are
    truncated like the reference, but a pointer outside the truncated pool is an error (the reference's KeyError).
    Two stages: :func:`group_skeletons` (filters, pools, labels) then :func:`groups_from_skeletons` (rewards).
    """
    stats = stats if stats is not None else FilterStats()
    skeletons = group_skeletons(rl, opts, fallback_pools=fallback_pools, query_ids=query_ids, stats=stats)
    check_reward_fields(rl, skeletons, opts.reward_mode)
    return groups_from_skeletons(rl, skeletons, opts, embeddings=embeddings, infoscores=infoscores, stats=stats)


def split_query_ids(
    query_ids: Sequence[int], train_fraction: float = 0.8, split_file: Optional[str] = None
) -> Tuple[List[int], List[int]]:
    """Train/val split by sorted query id (reference: first int(0.8 n) train), or an explicit JSON split file."""
    ids = sorted(query_ids)
    if split_file:
        path = Path(split_file)
        try:
            spec = json.loads(path.read_text())
            train, val = [int(i) for i in spec["train"]], [int(i) for i in spec["val"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LeverPlusInputError(
                f"cannot read the split ({e})", file=str(path), fix='write {"train": [ids...], "val": [ids...]}'
            ) from e
        overlap = set(train) & set(val)
        if overlap:
            raise LeverPlusInputError(
                f"{len(overlap)} query ids are in both train and val, e.g. {sorted(overlap)[:5]}", file=str(path)
            )
        return sorted(train), sorted(val)
    if not 0.0 < train_fraction < 1.0:
        raise LeverPlusInputError(f"data.train_fraction={train_fraction} must be in (0, 1)")
    n_train = int(train_fraction * len(ids))
    return ids[:n_train], ids[n_train:]


def beam_groups(
    beams: Mapping[int, BeamRecord],
    pools: Mapping[int, Sequence[int]],
    query_ids: Sequence[int],
    *,
    max_pool_size: int = 64,
) -> List[Group]:
    """SFT groups from the InfoScore beam JSON: every beam is a target sequence over the query's pool.

    The pool is the query's RL/anchor pool when known (the reference's v2 SFT used the 2 gold ICDs as the pool with
    parity labels — reference#defect-c4 — so it learned nothing transferable); beam ids missing from it are appended.
    """
    groups = []
    for qid in sorted(query_ids):
        rec = beams.get(qid)
        if rec is None:
            continue
        seqs = rec.icd_sequences
        pool = list(pools.get(qid, []))[:max_pool_size]
        for s in seqs:
            for i in s:
                if i not in pool:
                    pool.append(i)
        pos = {gid: j for j, gid in enumerate(pool)}
        labels = torch.tensor([[pos[i] for i in s] for s in seqs], dtype=torch.long)
        scores = torch.tensor([rec.sequence_infoscore(i) for i in range(len(seqs))], dtype=torch.float32)
        groups.append(
            Group(
                query_id=qid,
                shot_num=labels.shape[1],
                pool_ids=pool,
                labels=labels,
                rewards_raw=scores,
                rewards=scores,
                acc=torch.zeros(len(seqs)),
                candidate_index=list(range(len(seqs))),
                gen_methods=["infoscore_beam"] * len(seqs),
            )
        )
    return groups

