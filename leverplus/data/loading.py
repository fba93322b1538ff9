"""Loading a run's inputs: every file read and validated before anything is trained, then the RL groups.

Two sources give the same :class:`LoadedData`: the user's Lever-Plus files (:func:`load_files`) and the simulated
world (``leverplus.sim.source``); everything after :func:`assemble` is shared."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from leverplus.config.reward_modes import needs_infoscores
from leverplus.data.eval_queries import EvalQuerySet
from leverplus.data.formats.beam_json import BeamRecord, read_beam_json
from leverplus.data.formats.embeddings import read_embeddings
from leverplus.data.formats.io import file_fingerprint
from leverplus.data.formats.rl_json import RLData, read_rl_json
from leverplus.data.groups import (
    FilterStats,
    Group,
    GroupOptions,
    GroupSkeleton,
    beam_groups,
    check_reward_fields,
    group_skeletons,
    groups_from_skeletons,
    infoscore_lookup,
    split_query_ids,
)
from leverplus.errors import LeverPlusInputError
from leverplus.utils import enum_value, launch_dir

log = logging.getLogger(__name__)


@dataclass
class LoadedData:
    """Everything read from disk (validated), before groups are built."""

    source: str
    embeddings: torch.Tensor  # [N, d]
    rl: Dict[int, RLData]  # shot_num -> file
    beams: Optional[Dict[int, BeamRecord]]
    sft_checkpoint: Optional[str]
    files: List[Path]
    fingerprint: str
    eval_sets: Dict[str, EvalQuerySet] = field(default_factory=dict)
    scorer: Optional[Any] = None  # an ``evaluation.downstream.Scorer`` (the LVLM that answers), when the source has one
    pools: Dict[int, List[int]] = field(default_factory=dict)  # query id -> candidate pool (for SFT)
    # reward-independent group parts, shared by every arm of a sweep: (shot, split, ids, filters) -> (skeletons,
    # their filter stats); ("sft", ids, max_pool_size) -> SFT beam groups
    group_cache: Dict[tuple, Any] = field(default_factory=dict)


def resolve_input(path: str, what: str, fix: str) -> Path:
    """An input path made absolute against the launch directory; a clear error when it does not exist."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = launch_dir() / p
    if not p.exists():
        raise LeverPlusInputError(f"{what} not found", file=str(p), fix=fix)
    return p


def file_state(paths: Sequence[Path]) -> tuple:
    """(path, size, mtime) of each file: a cheap "unchanged since loaded" check for per-process memos."""
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)


def requested_shots(cfg: Any) -> List[int]:
    shot_nums = [int(s) for s in cfg.data.shot_nums]
    if not shot_nums:
        raise LeverPlusInputError("data.shot_nums is empty", field="data.shot_nums", fix="e.g. data.shot_nums=[2]")
    return shot_nums


def load_files(cfg: Any) -> LoadedData:
    """``data=files``: the user's Lever-Plus files named in ``data.files``."""
    shot_nums = requested_shots(cfg)
    f = cfg.data.files
    if not f.embeddings:
        raise LeverPlusInputError(
            "no embedding file given", field="data.files.embeddings", fix="pass data.files.embeddings=/path/emb.pt"
        )
    emb_path = resolve_input(f.embeddings, "embedding file", "check data.files.embeddings")
    rl_map = {int(k): v for k, v in dict(f.rl_json).items()}
    missing = [s for s in shot_nums if s not in rl_map]
    if missing:
        raise LeverPlusInputError(
            f"no RL JSON for shot_num {missing}",
            field="data.files.rl_json",
            fix="pass data.files.rl_json={2:/path/rl_data.json} (one per shot_num in data.shot_nums)",
        )
    rl_paths = {s: resolve_input(rl_map[s], f"RL JSON for shot {s}", "check data.files.rl_json") for s in shot_nums}
    beam_path = resolve_input(f.beam_json, "beam JSON", "check data.files.beam_json") if f.beam_json else None
    sft_ckpt = (
        str(resolve_input(f.sft_checkpoint, "SFT checkpoint", "check data.files.sft_checkpoint"))
        if f.sft_checkpoint
        else None
    )
    return assemble("files", emb_path, rl_paths, beam_path, sft_ckpt)


def assemble(source: str, emb_path: Path, rl_paths: Dict[int, Path], beam_path: Optional[Path],
             sft_ckpt: Optional[str], *, eval_sets: Optional[Dict[str, EvalQuerySet]] = None,
             scorer: Any = None, extra_files: Sequence[Path] = ()) -> LoadedData:
    """Read and validate the embeddings, RL files and beams, and fingerprint every input file."""
    embeddings = read_embeddings(emb_path)
    n_items = embeddings.shape[0]
    rl = {s: read_rl_json(p, shot_num=s, num_items=n_items) for s, p in rl_paths.items()}
    beams = read_beam_json(beam_path, num_items=n_items) if beam_path else None
    files = [emb_path, *rl_paths.values()] + ([beam_path] if beam_path else []) + ([Path(sft_ckpt)] if sft_ckpt else [])
    files += list(extra_files)
    pools: Dict[int, List[int]] = {}
    for data in rl.values():
        for qid, q in data.queries.items():
            if q.candidate_pool_ids is not None and qid not in pools:
                pools[qid] = list(q.candidate_pool_ids)
    return LoadedData(
        source=source,
        embeddings=embeddings,
        rl=rl,
        beams=beams,
        sft_checkpoint=sft_ckpt,
        files=files,
        fingerprint=file_fingerprint(files),
        eval_sets=dict(eval_sets or {}),
        scorer=scorer,
        pools=pools,
    )


@dataclass
class PreparedGroups:
    train: List[Group]
    val: List[Group]
    sft_train: List[Group]
    stats: Dict[int, FilterStats]


def _cached_skeletons(data: LoadedData, rl: RLData, opts: GroupOptions, key: tuple,
                      ids: List[int]) -> Tuple[List[GroupSkeleton], FilterStats]:
    """The skeletons of ``ids`` (and their filter stats), built once per ``key`` in ``data.group_cache``."""
    if key not in data.group_cache:
        sk_stats = FilterStats()
        sks = group_skeletons(rl, opts, fallback_pools=data.pools or None, query_ids=ids, stats=sk_stats)
        data.group_cache[key] = (sks, sk_stats)
    return data.group_cache[key]


def _sft_groups(cfg, data: LoadedData, val: List[Group]) -> List[Group]:
    """The SFT beam groups of every beam query outside the RL validation split (cached per ids and pool size)."""
    val_ids = {g.query_id for g in val}
    ids = [q for q in data.beams if q not in val_ids]
    key = ("sft", tuple(ids), cfg.data.max_pool_size)
    if key not in data.group_cache:
        data.group_cache[key] = beam_groups(data.beams, data.pools, ids, max_pool_size=cfg.data.max_pool_size)
    return list(data.group_cache[key])


def check_reward_contrast(train: Sequence[Group], files: Sequence[str], mode: str) -> int:
    """Count the training groups whose candidates all get the same raw reward (nothing to prefer among them).

    None with contrast: refused (RCE and GRPO would learn nothing from the rewards). Some without: a warning with
    the count. Returns the count.
    """
    flat = sum(1 for g in train if g.size < 2 or bool((g.rewards_raw == g.rewards_raw[0]).all()))
    where = ", ".join(map(str, files))
    if train and flat == len(train):
        raise LeverPlusInputError(
            f"none of the {len(train)} training groups has reward contrast under reward.mode={mode}: every group's "
            "candidates get the same reward, so there is nothing to learn", file=where, field="reward.mode",
            fix="check the reward fields of the file (vqa_correct, vqa_acc_score, ...) or choose another reward.mode")
    said = (where, mode, flat, len(train))
    if flat and said not in _CONTRAST_REPORTED:  # once per process: a run checks its groups before and in training
        _CONTRAST_REPORTED.add(said)
        log.warning(f"{where}: {flat} of {len(train)} training groups ({100.0 * flat / len(train):.0f}%) have no "
                    f"reward contrast under reward.mode={mode} (all candidates get the same reward)")
    return flat


#: contrast warnings already given in this process (see check_reward_contrast)
_CONTRAST_REPORTED: set = set()


def prepare_groups(cfg, data: LoadedData, *, with_sft: bool = True) -> PreparedGroups:
    """RL train/val groups (filtered, rewards computed) and, when ``with_sft``, the SFT beam groups.

    The reward-independent part (filters, pools, labels) is built once per loaded data and filter options and
    reused: the arms of a reward sweep differ only in their rewards."""
    opts = GroupOptions.from_config(cfg.data, cfg.reward)
    infos = infoscore_lookup(data.beams) if needs_infoscores(opts.reward_mode) else None
    train, val, stats = [], [], {}
    filter_key = (opts.drop_eval_errors, opts.skip_fallback_reward,
                  tuple(opts.filter_gen_methods) if opts.filter_gen_methods is not None else None, opts.max_pool_size,
                  opts.curation)
    for shot, rl in sorted(data.rl.items()):
        train_ids, val_ids = split_query_ids(list(rl.queries), cfg.data.train_fraction, cfg.data.split_file)
        st = FilterStats()
        splits = [(ids, out, _cached_skeletons(data, rl, opts, (shot, split, tuple(ids)) + filter_key, ids))
                  for split, ids, out in (("train", train_ids, train), ("val", val_ids, val))]
        check_reward_fields(rl, [sk for _, _, (sks, _) in splits for sk in sks], opts.reward_mode)
        for ids, out, (sks, sk_stats) in splits:
            st.add(sk_stats)
            out += groups_from_skeletons(rl, sks, opts, embeddings=data.embeddings, infoscores=infos, stats=st)
        stats[shot] = st
    if not train:
        raise LeverPlusInputError(
            "no training query survived the filters",
            field="data",
            fix="check data.skip_fallback_reward / filter_gen_methods / require_positive_query / mixed_queries / "
                "positive_ratio_min / positive_ratio_max",
        )
    check_reward_contrast(train, [data.rl[s].path for s in sorted(data.rl)], enum_value(cfg.reward.mode))
    sft_train: List[Group] = []
    if with_sft and data.beams is not None and data.sft_checkpoint is None:
        sft_train = _sft_groups(cfg, data, val)
    return PreparedGroups(train=train, val=val, sft_train=sft_train, stats=stats)
