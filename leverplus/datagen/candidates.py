"""RL pointer candidates (reference#rldata-candidates) and their scored RL-JSON records (reference#formats-rl-json, reference#rldata).

One code path for every generator of RL data: the simulated world (``leverplus.sim.generate``) and the generic
``python -m leverplus.generate_rl_data`` both call :func:`build_candidates` for the four generators and the
de-duplication, and :func:`score_queries` to ask a scorer for answers and turn each candidate into reference#formats-rl-json record.

Pointers here are POSITIONS in the query's candidate pool (a list of global train ids). The record writer maps them
to what the file stores: local positions plus ``pointer_global`` and ``candidate_pool_ids`` (the K=64 variant), or
global ids when the pool is the whole train split (the reference at HEAD, where ``pointer_pos == pointer``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

import numpy as np
import torch

from leverplus.data.formats.rl_json import VQA_EVAL_MODES
from leverplus.errors import LeverPlusInputError
from leverplus.evaluation.vqa_metric import (
    answer_relevance,
    vqa_accuracy,
    vqa_correct,
    vqa_postprocess,
)
from leverplus.model.decoding import StepFn, beam_search, sample_sequences

if TYPE_CHECKING:  # pragma: no cover
    from leverplus.datagen.scorers.base import Scorer

#: Priority of generators when two candidates are the same unordered ICD set (reference#rldata-candidates step 5).
GEN_PRIORITY = {"beam": 4, "retrieval": 3, "sample": 2, "random": 1}
#: Eval modes of a written candidate (reference#formats-rl-json ``vqa_eval_mode``).
EVAL_MODES = VQA_EVAL_MODES
#: Why a candidate can be left out of the file (strict evaluation, reference#correctness).
DROP_REASONS = ("no_official_annotation", "eval_error")
#: Seed-sequence stream ids of the per-query generators (kept from the simulator, so its files do not change).
SAMPLE_STREAM, RANDOM_STREAM = 2003, 2002


@dataclass(frozen=True)
class CandidateSettings:
    """How many candidates each generator proposes (reference CLI defaults, reference#rldata-driver)."""

    num_beams: int = 5
    temps: tuple[float, ...] = (1.0, 1.3)
    num_samples_per_temp: int = 2
    num_retrieval: int = 5
    num_random: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "temps", tuple(float(t) for t in self.temps))
        for name in ("num_beams", "num_samples_per_temp", "num_retrieval", "num_random"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise LeverPlusInputError(f"must be a non-negative integer, got {v!r}", field=f"candidates.{name}")
        if any(not t > 0 for t in self.temps):
            raise LeverPlusInputError(f"sampling temperatures must be > 0, got {list(self.temps)}",
                                      field="candidates.temps", fix="e.g. [1.0, 1.3]")

    def as_dict(self) -> dict:
        return {"num_beams": self.num_beams, "temps": list(self.temps),
                "num_samples_per_temp": self.num_samples_per_temp, "num_retrieval": self.num_retrieval,
                "num_random": self.num_random}


def query_generators(seed: int, query_id: int, shot_num: int) -> tuple[torch.Generator, np.random.Generator]:
    """(torch generator for sampling, numpy generator for random pairs), seeded by (seed, query, shot_num) only,
    so a query gets the same candidates whatever else runs (resume, shards, other shot files)."""
    torch_seed = int(np.random.SeedSequence([seed, SAMPLE_STREAM, int(query_id), shot_num]).generate_state(1)[0])
    return (torch.Generator().manual_seed(torch_seed),
            np.random.default_rng([seed, RANDOM_STREAM, int(query_id), shot_num]))


def retrieval_pointers(similarity: np.ndarray, shot_num: int, num_retrieval: int,
                       exclude: Iterable[int] = ()) -> list[tuple[list[int], float]]:
    """Retrieval candidates: windows of ``shot_num`` consecutive neighbours ``(s_{r+1}, ..., s_{r+S})`` by
    decreasing similarity, r = 0..num_retrieval-1 (most similar first, as the reference's pairs
    (s1,s2), (s2,s3), ...). Returns (positions, mean similarity). Excluded positions are never neighbours."""
    excluded = set(int(i) for i in exclude)
    order = [int(i) for i in np.argsort(-np.asarray(similarity, dtype=np.float64), kind="stable")
             if int(i) not in excluded]
    out = []
    for r in range(num_retrieval):
        if r + shot_num > len(order):
            break
        ptr = order[r:r + shot_num]
        out.append((ptr, float(np.asarray(similarity, dtype=np.float64)[ptr].mean())))
    return out


def random_pointers(num_items: int, shot_num: int, num_random: int, rng: np.random.Generator,
                    exclude: Iterable[int] = ()) -> list[list[int]]:
    """``num_random`` draws of ``shot_num`` distinct allowed positions (the reference's ``random.sample``)."""
    excluded = set(int(i) for i in exclude)
    allowed = np.asarray([i for i in range(num_items) if i not in excluded], dtype=np.int64)
    if num_random and shot_num > len(allowed):
        raise LeverPlusInputError(f"cannot draw {shot_num} distinct items from {len(allowed)} allowed ones",
                                  field="shot_num", fix="lower shot_num or enlarge the candidate pool")
    return [[int(allowed[i]) for i in rng.choice(len(allowed), size=shot_num, replace=False)]
            for _ in range(num_random)]


def dedupe_by_priority(candidates: Sequence[dict], priority: Optional[dict] = None) -> list[dict]:
    """De-duplicate by the unordered ICD set ``tuple(sorted(pointer))`` (reference#rldata-candidates step 5): a duplicate of higher
    priority replaces the stored candidate in place (the set keeps its first position); ties keep the first."""
    priority = GEN_PRIORITY if priority is None else priority
    kept: dict[tuple, dict] = {}
    for cand in candidates:
        key = tuple(sorted(cand["pointer"]))
        if key not in kept or priority[cand["gen_method"]] > priority[kept[key]["gen_method"]]:
            kept[key] = cand
    return list(kept.values())


def build_candidates(step: StepFn, similarity: np.ndarray, shot_num: int, settings: CandidateSettings, *,
                     sample_generator: torch.Generator, random_rng: np.random.Generator,
                     exclude: Iterable[int] = ()) -> list[dict]:
    """reference#rldata-candidates candidates for one query over a pool of ``K = len(similarity)`` items, in positions.

    * beam: pointer-net beam search (``decoding.beam_search``), ``beam_rank``/``beam_score``/``logprob_score``;
    * sample: for each τ in ``temps``, ``num_samples_per_temp`` draws (``logprob_score`` is τ-scaled, reference);
    * retrieval: :func:`retrieval_pointers` on the raw-embedding ``similarity`` (no model);
    * random: :func:`random_pointers`;
    then :func:`dedupe_by_priority` (beam > retrieval > sample > random). ``exclude`` (e.g. the query's own
    position when the pool is the whole train split) is never proposed by any generator.
    """
    K = len(similarity)
    exclude = sorted(set(int(i) for i in exclude))
    made: list[dict] = []
    if settings.num_beams:
        for d in beam_search(step, K, shot_num, num_beams=settings.num_beams, exclude=exclude):
            made.append({"gen_method": "beam", "pointer": list(d.pointer), "beam_rank": d.rank,
                         "beam_score": d.score, "logprob_score": d.logprob, "temperature": None,
                         "similarity_score": None})
    for temp in settings.temps:
        for d in sample_sequences(step, K, shot_num, temp, settings.num_samples_per_temp, sample_generator,
                                  exclude=exclude):
            made.append({"gen_method": "sample", "pointer": list(d.pointer), "beam_rank": None, "beam_score": None,
                         "logprob_score": d.logprob, "temperature": float(temp), "similarity_score": None})
    for ptr, sim in retrieval_pointers(similarity, shot_num, settings.num_retrieval, exclude):
        made.append({"gen_method": "retrieval", "pointer": ptr, "beam_rank": None, "beam_score": None,
                     "logprob_score": None, "temperature": None, "similarity_score": sim})
    for ptr in random_pointers(K, shot_num, settings.num_random, random_rng, exclude):
        made.append({"gen_method": "random", "pointer": ptr, "beam_rank": None, "beam_score": None,
                     "logprob_score": None, "temperature": None, "similarity_score": None})
    return dedupe_by_priority(made)


# ------------------------------------------------------------------------------------------------------
# Scoring: answers, correctness (official metric or fallback), gt_prob, relevance -> reference#formats-rl-json records
# ------------------------------------------------------------------------------------------------------


@dataclass
class QueryJob:
    """One query's candidates (positions into ``pool_ids``) waiting to be scored.

    ``local_pool``: write the K=64 variant (local ``pointer`` + ``pointer_global`` + ``candidate_pool_ids``);
    False: the pool is the whole train split and ``pointer`` holds global ids.
    """

    query_id: int
    pool_ids: Sequence[int]
    candidates: list[dict]
    local_pool: bool = True


@dataclass
class ScoreCounts:
    """Eval modes of the written candidates, candidates left out (strict evaluation) and queries left empty."""

    modes: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    empty_queries: list = field(default_factory=list)

    def add(self, other: "ScoreCounts") -> None:
        self.modes.update(other.modes)
        self.dropped.update(other.dropped)
        self.empty_queries.extend(other.empty_queries)

    def mode_counts(self) -> dict[str, int]:
        """Counts of every eval mode (zeros included), in :data:`EVAL_MODES` order."""
        return {m: int(self.modes.get(m, 0)) for m in EVAL_MODES}

    def dropped_counts(self) -> dict[str, int]:
        return {r: int(self.dropped.get(r, 0)) for r in DROP_REASONS}


def eval_mode_percent(counts: dict[str, int], ndigits: int = 2) -> dict[str, float]:
    """Share of each eval mode among the written candidates, in percent (all 0.0 when there are none)."""
    total = sum(counts.values())
    return {m: (round(100.0 * n / total, ndigits) if total else 0.0) for m, n in counts.items()}


def candidate_record(cand: dict, pool_ids: Sequence[int], *, local_pool: bool, raw: str, pred: str, correct: int,
                     acc: float, gt_prob: float, rel: dict, mode: str, split_used: Optional[str],
                     failed: bool, prompt: Optional[tuple[str, int]] = None,
                     info_score: Optional[float] = None) -> dict:
    """The reference#formats-rl-json candidate dict, fields in the reference's order (file bytes depend on it);
    ``info_score`` (the ICDs' InfoScore, for the ``hybrid`` reward) follows the relevance fields when given."""
    positions = [int(i) for i in cand["pointer"]]
    glob = [int(pool_ids[i]) for i in positions]
    out: dict[str, Any] = {"pointer": positions if local_pool else glob}
    if local_pool:
        out["pointer_global"] = glob
    out.update({"pointer_pos": list(positions), "gen_method": cand["gen_method"], "beam_rank": cand["beam_rank"],
                "beam_score": cand["beam_score"], "logprob_score": cand["logprob_score"],
                "temperature": cand["temperature"], "similarity_score": cand["similarity_score"],
                "vqa_raw_generation": raw, "vqa_pred_answer": pred})
    if prompt is not None:
        out["vqa_prompt_text"], out["vqa_prompt_len"] = prompt[0], int(prompt[1])
    out.update({"vqa_correct": int(correct), "vqa_acc_score": float(acc), "vqa_gt_prob": float(gt_prob), **rel})
    if info_score is not None:
        out["info_score"] = float(info_score)
    out.update({"vqa_eval_mode": mode, "eval_split_used": split_used, "eval_failed": bool(failed)})
    return out


_ZERO_REL = {"vqa_rel_token_f1": 0.0, "vqa_rel_edit_sim": 0.0, "vqa_rel_score": 0.0}


@dataclass
class _Scoring:
    """What scoring one batch of queries shares: the scorer, the evaluation settings, the memo tables and the
    counters."""

    scorer: "Scorer"
    split: str
    strict_eval: bool
    normalization: str
    acc_cache: dict
    rel_cache: dict
    counts: ScoreCounts

    def official_accuracy(self, q: int, pred: str, answers: Sequence[str]) -> float:
        # keyed by the answer itself: under "official", "Yes" and "yes" score differently when all
        # GTs are identical, so the normal form is not a valid key
        key = (self.split, q, pred, self.normalization)
        if key not in self.acc_cache:
            self.acc_cache[key] = vqa_accuracy(pred, answers, normalization=self.normalization)
        return self.acc_cache[key]

    def relevance(self, q: int, pred: str, query: dict) -> dict:
        if (self.split, q, pred) not in self.rel_cache:
            # relevance is a max over GTs, so duplicates can be dropped (order kept for determinism)
            gts = list(dict.fromkeys(query["gt_answers_norm"]))
            self.rel_cache[(self.split, q, pred)] = answer_relevance(pred, gts)
        return self.rel_cache[(self.split, q, pred)]

    def score(self, q: int, icds: list[int], pred: str, gt_prob: float, official: Optional[tuple],
              query: dict) -> Optional[tuple]:
        """(correct, acc, gt_prob, rel, mode, split_used, failed) of one answer, or None when strict evaluation
        drops it (counted in ``counts.dropped``)."""
        try:
            if official is not None:
                answers, split_used = official
                acc = self.official_accuracy(q, pred, answers)
                correct, mode = vqa_correct(acc), "vqaEval"
            elif self.strict_eval:
                self.counts.dropped["no_official_annotation"] += 1
                return None
            else:
                correct, acc = self.scorer.fallback_score(self.split, q, icds, pred, query["gt_answers_raw"])
                mode, split_used = "fallback", "fallback"
            rel = self.relevance(q, pred, query)
            return correct, acc, gt_prob, rel, mode, split_used, False
        except LeverPlusInputError:
            if self.strict_eval:
                self.counts.dropped["eval_error"] += 1
                return None
            return 0, 0.0, 0.0, dict(_ZERO_REL), "error", None, True


def _flat_prompts(jobs: Sequence[QueryJob]) -> tuple[list[int], list[list[int]]]:
    """(query id, global ICD ids) of every candidate of ``jobs``, in order: one scorer batch."""
    flat_q: list[int] = []
    flat_icds: list[list[int]] = []
    for job in jobs:
        for c in job.candidates:
            flat_q.append(int(job.query_id))
            flat_icds.append([int(job.pool_ids[i]) for i in c["pointer"]])
    return flat_q, flat_icds


def _query_record(job: QueryJob, query: dict, out: list[dict]) -> dict:
    """The on-disk record of one query: its ``query`` block, its pool (K=64 variant) and its candidates."""
    rec: dict[str, Any] = {"query": dict(query)}
    if job.local_pool:
        rec["candidate_pool_ids"] = [int(i) for i in job.pool_ids]
    rec["pointer_candidates"] = out
    return rec


def score_queries(scorer: "Scorer", split: str, jobs: Sequence[QueryJob], *, strict_eval: bool,
                  save_prompts: bool = False, cache: Optional[dict] = None,
                  normalization: str = "official") -> tuple[dict[int, Optional[dict]], ScoreCounts]:
    """Answer and score every candidate of ``jobs`` (one scorer batch over all their prompts), reference#rldata-driver
    order: generate, score (reference#correctness), ``vqa_gt_prob`` (reference#gt-prob), relevance
    (reference#relevance), ``info_score`` (``Scorer.info_score_batch``: one teacher-forced pass per candidate, for
    the ``hybrid`` reward), then reference#formats-rl-json fields.

    Correctness: the official VQA metric (``vqa_eval_mode="vqaEval"``) when ``scorer.official_answers`` has the
    query's annotations; otherwise strict evaluation drops the candidate (reference default) and non-strict uses
    ``scorer.fallback_score`` (``"fallback"``). A metric error (``LeverPlusInputError``, e.g. an empty GT list)
    drops the candidate in strict mode and stores an ``"error"`` record with zeros otherwise. Model errors are
    not caught: the run stops and resumes later. ``normalization`` goes to ``metrics.vqa_accuracy``.

    Returns ({query id: on-disk record, or None when every candidate was dropped}, counts). ``cache`` (shared
    across calls) memoises query blocks, official accuracies per answer and relevance per answer.
    """
    cache = {} if cache is None else cache
    acc_cache, rel_cache, query_cache = (cache.setdefault(k, {}) for k in ("acc", "rel", "query"))
    flat_q, flat_icds = _flat_prompts(jobs)
    if flat_q:
        raws = scorer.generate(split, flat_q, flat_icds)
        gt_probs = scorer.vqa_gt_prob_batch(split, flat_q, flat_icds)
        infos = scorer.info_score_batch(split, flat_q, flat_icds)
        prompts = scorer.prompts(split, flat_q, flat_icds) if save_prompts else None
    ctx = _Scoring(scorer, split, strict_eval, normalization, acc_cache, rel_cache, ScoreCounts())
    records: dict[int, Optional[dict]] = {}
    k = 0
    for job in jobs:
        q = int(job.query_id)
        if (split, q) not in query_cache:
            query_cache[(split, q)] = scorer.query_record(split, q)
        query = query_cache[(split, q)]
        official = scorer.official_answers(split, q)
        out = []
        for c in job.candidates:
            raw, gt_prob, icds, info = raws[k], float(gt_probs[k]), flat_icds[k], float(infos[k])
            prompt = prompts[k] if prompts is not None else None
            k += 1
            pred = vqa_postprocess(raw)
            scored = ctx.score(q, icds, pred, gt_prob, official, query)
            if scored is None:
                continue
            correct, acc, gt_prob, rel, mode, split_used, failed = scored
            ctx.counts.modes[mode] += 1
            out.append(candidate_record(c, job.pool_ids, local_pool=job.local_pool, raw=raw, pred=pred,
                                        correct=correct, acc=acc, gt_prob=gt_prob, rel=rel, mode=mode,
                                        split_used=split_used, failed=failed, prompt=prompt, info_score=info))
        if not out:
            ctx.counts.empty_queries.append(q)
        records[q] = _query_record(job, query, out) if out else None
    return records, ctx.counts


__all__ = ["CandidateSettings", "DROP_REASONS", "EVAL_MODES", "GEN_PRIORITY", "QueryJob", "ScoreCounts",
           "build_candidates", "candidate_record", "dedupe_by_priority", "eval_mode_percent", "query_generators",
           "random_pointers", "retrieval_pointers", "score_queries"]
