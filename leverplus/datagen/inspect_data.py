"""``python -m leverplus.inspect_data FILE [FILE ...]``: a data-quality report of RL-data JSON files (reference#formats-rl-json).

Per file: queries, candidates per query, generator mix, eval-mode shares, positive ratio, the ``hybrid`` reward's
InfoScore coverage (the share of candidates with a real ``info_score``), and for each reward mode
(reference#reward-modes, default weights) the histogram of reward levels and the share of zero-variance groups — computed on the
*training view* (what ``leverplus.train`` keeps by default: ``eval_failed``/``error`` and ``fallback`` candidates
dropped), since a group whose rewards are all equal teaches RCE/GRPO nothing. Problems are flagged; ``--strict``
exits with status 1 when there is any.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from leverplus.data.formats.beam_json import read_beam_json
from leverplus.data.formats.rl_json import RLData, read_rl_json
from leverplus.data.groups import infoscore_lookup
from leverplus.data.rewards import compute_reward
from leverplus.datagen.augment import AUGMENTED_FIELD, level_set
from leverplus.errors import LeverPlusInputError

#: Reward modes reported by default: every mode computable from a candidate alone with default weights
#: (``hybrid`` needs InfoScores; ``legacy`` with its default α = β = 0 is identically 0).
DEFAULT_MODES = ("hard_plus_soft", "hard_plus_soft_v2", "hard_only", "soft_only", "hard01_plus_gtprob",
                 "hard_plus_gtprob_plus_rel")
#: The trainer's default reward mode: its zero-variance share is the one flagged.
PRIMARY_MODE = "hard_plus_soft"


@dataclass
class RewardStats:
    """Reward levels of one mode over the training view."""

    histogram: Dict[str, int]  # reward level (rounded) -> candidates; equal-width bins "[lo, hi)" when binned
    binned: bool  # more distinct levels than max_levels (a continuous reward such as vqa_gt_prob)
    distinct_levels: int
    zero_variance_share: float  # groups (>= 1 candidate) whose rewards are all equal
    groups: int


def reward_histogram(values: Sequence[float], max_levels: int = 12, bins: int = 10) -> tuple[Dict[str, int], bool]:
    """Counts per distinct value (sorted) when there are at most ``max_levels`` of them, else ``bins``
    equal-width bins over [min, max] (the last bin closed)."""
    counts = Counter(values)
    if len(counts) <= max_levels:
        return {repr(float(k)): v for k, v in sorted(counts.items())}, False
    lo, hi = min(values), max(values)
    width = (hi - lo) / bins
    out = [0] * bins
    for v in values:
        out[min(int((v - lo) / width), bins - 1)] += 1
    edges = [lo + i * width for i in range(bins + 1)]
    return {f"[{edges[i]:.4g}, {edges[i + 1]:.4g}{']' if i == bins - 1 else ')'}": out[i] for i in range(bins)}, True


@dataclass
class FileReport:
    path: str
    shot_num: int
    queries: int
    candidates: int
    candidates_per_query: Dict[str, float]  # min, mean, median, max
    gen_methods: Dict[str, int]
    eval_modes: Dict[str, int]
    eval_mode_share: Dict[str, float]  # percent
    positive_ratio: float  # candidates with vqa_correct (or acc > 0) among all candidates
    queries_all_positive: int
    queries_all_negative: int
    training_view: Dict[str, int]  # candidates / queries kept by the default filters
    rewards: Dict[str, RewardStats]
    finished: bool  # the file has _meta (not an interim save)
    problems: List[str] = field(default_factory=list)
    info_score_coverage: float = 0.0  # candidates with a finite info_score (hybrid needs 1.0)
    beam_match_coverage: Optional[float] = None  # with a beam JSON: candidates equal to an InfoScore beam
    # queries whose candidates (all of them, as stored) share one vqa_acc_score level: zero reward variance under
    # every mode that reads only the accuracy; what diversity augmentation (leverplus.datagen.augment) targets
    single_level_share: float = 0.0
    augmented_candidates: int = 0  # candidates added by diversity augmentation (augmented: true)
    augmented_share: float = 0.0


def beam_match_coverage(data: RLData, beam_json: str) -> float:
    """The share of candidates whose pointer equals one of their query's InfoScore beams: the candidates that
    ``hybrid_legacy`` gives a real InfoScore (the others fall back to ``beam_score``)."""
    beams = infoscore_lookup(read_beam_json(beam_json))
    hits = sum(c.pointer in beams.get(qid, {}) for qid, q in data.queries.items() for c in q.candidates)
    return round(hits / data.num_candidates, 4) if data.num_candidates else 0.0


def info_score_coverage(cands: Sequence[dict]) -> float:
    """The share of candidates carrying a real (non-null) ``info_score``: what ``reward.mode=hybrid`` reads; it
    refuses a file below 1.0 (``hybrid_legacy`` works without the field)."""
    if not cands:
        return 0.0
    return round(sum(c.get("info_score") is not None for c in cands) / len(cands), 4)


def _is_positive(c: dict) -> bool:
    v = c.get("vqa_correct")
    if v is not None:
        return bool(v)
    return float(c.get("vqa_acc_score") or 0.0) > 0


def _trainable(c: dict) -> bool:
    """Kept by the trainer's default filters (``drop_eval_errors``, ``skip_fallback_reward``)."""
    mode = c.get("vqa_eval_mode")
    return not (c.get("eval_failed") or mode == "error" or mode == "fallback")


def _peek_partial(path: str) -> bool:
    """True when the file starts with a ``_partial`` entry (an unfinished generator output)."""
    with open(path, "rb") as f:
        head = f.read(64)
    return b'"_partial"' in head


def _reward_stats(kept_groups: List[List[dict]], modes: Sequence[str], ndigits: int,
                  max_levels: int) -> Dict[str, RewardStats]:
    """Per reward mode: the histogram of the (rounded) rewards of the training view and its zero-variance share."""
    rewards: Dict[str, RewardStats] = {}
    for mode in modes:
        values: List[float] = []
        flat = 0
        for g in kept_groups:
            r = [round(compute_reward(c, mode), ndigits) for c in g]
            values += r
            flat += len(set(r)) == 1
        hist, binned = reward_histogram(values, max_levels) if values else ({}, False)
        rewards[mode] = RewardStats(histogram=hist, binned=binned, distinct_levels=len(set(values)),
                                    zero_variance_share=round(flat / len(kept_groups), 4) if kept_groups else 0.0,
                                    groups=len(kept_groups))
    return rewards


def _mode_problems(cands: List[dict], modes_count: Counter, share: Dict[str, float]) -> List[str]:
    """Candidates without an eval mode, scored by the fallback, or failed."""
    problems = []
    if modes_count.get("missing"):
        problems.append(f"{modes_count['missing']} candidates have no vqa_eval_mode (balanced variant?): "
                        "fallback-scored candidates cannot be told apart")
    if modes_count.get("fallback"):
        problems.append(f"{share['fallback']}% of candidates are fallback-scored (string match); training skips "
                        "them by default (data.skip_fallback_reward)")
    errors = sum(1 for c in cands if c.get("eval_failed") or c.get("vqa_eval_mode") == "error")
    if errors:
        problems.append(f"{errors} candidates failed evaluation (eval_failed / error); training drops them")
    return problems


def _group_problems(data: RLData, kept_groups: List[List[dict]], rewards: Dict[str, RewardStats],
                    zero_variance_warn: float) -> List[str]:
    """Queries the training view loses, groups of one, and groups without reward variance."""
    problems = []
    lost = len(data.queries) - len(kept_groups)
    if lost:
        problems.append(f"{lost} queries keep no candidate under the default training filters")
    singles = sum(len(g) == 1 for g in kept_groups)
    if singles:
        problems.append(f"{singles} queries keep a single candidate (a group of one has no learning signal)")
    if PRIMARY_MODE in rewards and rewards[PRIMARY_MODE].zero_variance_share >= zero_variance_warn:
        problems.append(f"{100 * rewards[PRIMARY_MODE].zero_variance_share:.1f}% of groups have zero reward "
                        f"variance under {PRIMARY_MODE} (threshold {100 * zero_variance_warn:.0f}%)")
    return problems


def _inconsistent_correct(c: dict) -> bool:
    """A vqaEval candidate whose ``vqa_correct`` disagrees with ``vqa_acc_score > 0``."""
    return (c.get("vqa_correct") is not None and c.get("vqa_acc_score") is not None
            and int(bool(c["vqa_correct"])) != int(c["vqa_acc_score"] > 0) and c.get("vqa_eval_mode") == "vqaEval")


def _training_view(data: RLData) -> List[List[dict]]:
    """The candidates (raw dicts) the default training filters keep, per query that keeps any."""
    kept_groups = [[c.raw for c in q.candidates if _trainable(c.raw)] for q in data.queries.values()]
    return [g for g in kept_groups if g]


def _one_sided_queries(data: RLData) -> Tuple[int, int]:
    """(queries whose candidates are all positive, queries with no positive candidate)."""
    all_pos = sum(all(_is_positive(c.raw) for c in q.candidates) for q in data.queries.values())
    all_neg = sum(not any(_is_positive(c.raw) for c in q.candidates) for q in data.queries.values())
    return all_pos, all_neg


def _content_problems(data: RLData, cands: List[dict], positives: List[bool], max_pool_size: int) -> List[str]:
    """Inconsistent correctness, repeated ICD sets, no reward contrast, oversized pools."""
    problems = []
    n = len(cands)
    bad_correct = sum(1 for c in cands if _inconsistent_correct(c))
    if bad_correct:
        problems.append(f"{bad_correct} vqaEval candidates have vqa_correct != (vqa_acc_score > 0)")
    dups = sum(len(q.candidates) - len({tuple(sorted(c.pointer)) for c in q.candidates})
               for q in data.queries.values())
    if dups:
        problems.append(f"{dups} candidates repeat an ICD set already in their query (not de-duplicated)")
    if n and sum(positives) in (0, n):
        problems.append(f"every candidate is {'positive' if sum(positives) else 'negative'}: no reward contrast")
    big = sum(1 for q in data.queries.values() if q.candidate_pool_ids and len(q.candidate_pool_ids) > max_pool_size)
    if big:
        problems.append(f"{big} candidate pools exceed {max_pool_size} ids (the trainer truncates them)")
    return problems


def _meta_problems(data: RLData, path: str, modes_count: Counter) -> Tuple[List[str], List[str]]:
    """(problems to list first: an unfinished file; problems to list last: ``_meta`` counts that disagree)."""
    first, last = [], []
    if not data.meta:
        first.append("unfinished generator output (_partial): resume the run before training on it"
                     if _peek_partial(path) else "no _meta: an interim save or a hand-made file")
    stored = data.meta.get("eval_mode_counts") if data.meta else None
    if isinstance(stored, dict):
        ours = {m: k for m, k in modes_count.items() if m != "missing"}
        if {m: k for m, k in stored.items() if k} != ours:
            last.append(f"_meta.eval_mode_counts {stored} disagree with the candidates {ours}")
    return first, last


def _size_summary(sizes: List[int]) -> Dict[str, float]:
    return {"min": min(sizes), "mean": round(statistics.fmean(sizes), 3), "median": float(statistics.median(sizes)),
            "max": max(sizes)}


def inspect_rl(path: str, *, shot_num: Optional[int] = None, modes: Sequence[str] = DEFAULT_MODES,
               ndigits: int = 4, max_levels: int = 12, zero_variance_warn: float = 0.5,
               max_pool_size: int = 64, beam_json: Optional[str] = None) -> FileReport:
    """Statistics and problems of one RL file (validated by ``read_rl_json`` first); with ``beam_json`` also the
    share of candidates that match an InfoScore beam (``hybrid_legacy``'s coverage)."""
    data: RLData = read_rl_json(path, shot_num=shot_num)
    sizes = [len(q.candidates) for q in data.queries.values()]
    cands = [c.raw for q in data.queries.values() for c in q.candidates]
    gen = Counter(c.get("gen_method") or "missing" for c in cands)
    modes_count = Counter(c.get("vqa_eval_mode") or "missing" for c in cands)
    n = len(cands)
    share = {m: round(100.0 * k / n, 2) for m, k in sorted(modes_count.items())}
    positives = [_is_positive(c) for c in cands]
    all_pos, all_neg = _one_sided_queries(data)
    kept_groups = _training_view(data)
    rewards = _reward_stats(kept_groups, modes, ndigits, max_levels)
    first, last = _meta_problems(data, path, modes_count)
    coverage = info_score_coverage(cands)
    augmented = sum(c.get(AUGMENTED_FIELD) is True for c in cands)
    if 0.0 < coverage < 1.0:
        last.append(f"only {100 * coverage:.2f}% of candidates have info_score: reward.mode=hybrid refuses this file "
                    "(regenerate it, or use hybrid_legacy)")
    problems = (first + _mode_problems(cands, modes_count, share)
                + _group_problems(data, kept_groups, rewards, zero_variance_warn)
                + _content_problems(data, cands, positives, max_pool_size) + last)
    return FileReport(
        path=path, shot_num=data.shot_num, queries=len(data.queries), candidates=n,
        candidates_per_query=_size_summary(sizes),
        gen_methods=dict(sorted(gen.items())), eval_modes=dict(sorted(modes_count.items())), eval_mode_share=share,
        positive_ratio=round(sum(positives) / n, 4) if n else 0.0, queries_all_positive=all_pos,
        queries_all_negative=all_neg,
        training_view={"queries": len(kept_groups), "candidates": sum(len(g) for g in kept_groups)},
        rewards=rewards, finished=bool(data.meta), problems=problems, info_score_coverage=coverage,
        beam_match_coverage=beam_match_coverage(data, beam_json) if beam_json else None,
        single_level_share=_single_level_share(data), augmented_candidates=augmented,
        augmented_share=round(augmented / n, 4) if n else 0.0)


def _single_level_share(data: RLData) -> float:
    """The share of queries whose candidates all have the same ``vqa_acc_score`` (rounded to 6 digits)."""
    flat = sum(len(level_set([c.raw for c in q.candidates])) == 1 for q in data.queries.values())
    return round(flat / len(data.queries), 4) if data.queries else 0.0


def format_report(r: FileReport) -> str:
    """Human-readable report."""
    cpq = r.candidates_per_query
    lines = [f"== {r.path}",
             f"shot_num {r.shot_num} | queries {r.queries} | candidates {r.candidates} | per query min {cpq['min']} "
             f"mean {cpq['mean']} median {cpq['median']} max {cpq['max']}",
             "generators: " + ", ".join(f"{k} {v}" for k, v in r.gen_methods.items()),
             "eval modes: " + ", ".join(f"{k} {v} ({r.eval_mode_share[k]:.2f}%)" for k, v in r.eval_modes.items()),
             f"positive ratio {100 * r.positive_ratio:.2f}% | queries all positive {r.queries_all_positive}, "
             f"all negative {r.queries_all_negative}",
             f"single-level queries (one vqa_acc_score level) {100 * r.single_level_share:.2f}% | augmented "
             f"candidates {r.augmented_candidates} ({100 * r.augmented_share:.2f}%)",
             f"training view (default filters): {r.training_view['queries']} queries, "
             f"{r.training_view['candidates']} candidates",
             f"hybrid InfoScore coverage {100 * r.info_score_coverage:.2f}% of candidates have info_score"
             + ("" if r.info_score_coverage == 1.0 else " (reward.mode=hybrid needs 100%; hybrid_legacy does not)")
             + ("" if r.beam_match_coverage is None else
                f"; hybrid_legacy: {100 * r.beam_match_coverage:.2f}% match an InfoScore beam"),
             "reward levels (training view):"]
    for mode, s in r.rewards.items():
        kind = f"{s.distinct_levels} levels, binned" if s.binned else f"{s.distinct_levels} levels"
        shown = ", ".join(f"{k}: {v}" for k, v in s.histogram.items())
        lines.append(f"  {mode:<26} zero-variance groups {100 * s.zero_variance_share:5.1f}% ({kind}) | {shown}")
    lines.append("problems:" if r.problems else "problems: none")
    lines += [f"  ! {p}" for p in r.problems]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m leverplus.inspect_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="RL-data JSON files")
    parser.add_argument("--shot-num", type=int, default=None, help="expected pointer length (default: inferred)")
    parser.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), help="reward modes to histogram")
    parser.add_argument("--zero-variance-warn", type=float, default=0.5,
                        help="flag when this share of groups has zero variance under hard_plus_soft")
    parser.add_argument("--beam-json", default=None,
                        help="InfoScore beam JSON: also report the share of candidates hybrid_legacy finds in it")
    parser.add_argument("--json", action="store_true", help="print the reports as JSON")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if any problem is flagged")
    args = parser.parse_args(argv)
    reports = []
    try:
        for path in args.files:
            reports.append(inspect_rl(path, shot_num=args.shot_num, modes=args.modes,
                                      zero_variance_warn=args.zero_variance_warn, beam_json=args.beam_json))
    except LeverPlusInputError as e:
        print(f"[leverplus] error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([asdict(r) for r in reports], indent=2))
    else:
        print("\n\n".join(format_report(r) for r in reports))
    return 1 if args.strict and any(r.problems for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
