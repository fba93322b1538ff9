"""InfoScore beam search (reference#formats-beam-json) over any scorer's teacher-forced answer probability.

``InfoScore(c | C) = P(y | [c] + C + query) − P(y | C + query)``: how much prepending ICD ``c`` to the chosen ICDs
``C`` raises the probability of the query's answer ``y``. The simulator and ``generate_beam_data`` both run
:func:`infoscore_beam_search`; only the probability function differs.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from leverplus.errors import LeverPlusInputError

ProbFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(query ids [B], ICDs [B, t] global ids in prompt order, t may be 0) -> P(y_query | prompt) [B]."""


def _topk_desc(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries along the last axis; ties: lower index first (stable)."""
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k]


def _check_search(anchors: np.ndarray, pools: np.ndarray, beam_size: int, max_shot: int) -> None:
    if pools.ndim != 2 or pools.shape[0] != len(anchors):
        raise LeverPlusInputError(f"pools must have shape [{len(anchors)}, K], got {pools.shape}", field="pools")
    K = pools.shape[1]
    if beam_size < 1 or max_shot < 1:
        raise LeverPlusInputError(f"beam_size and max_shot must be >= 1, got {beam_size} and {max_shot}",
                                  field="beam_size")
    if K < max_shot + beam_size - 1:
        raise LeverPlusInputError(f"a pool of {K} cannot feed {beam_size} beams of {max_shot} ICDs",
                                  field="candidate_num", fix="raise candidate_num or lower beam_size")
    if (pools == anchors[:, None]).any():
        raise LeverPlusInputError("an anchor is in its own candidate pool", field="pools",
                                  fix="exclude each query from its pool")


def _beam_records(anchors: np.ndarray, chosen: np.ndarray, history: np.ndarray, max_shot: int) -> dict[int, dict]:
    """Beam-JSON records from the final beams ``chosen`` [A, nb, S] and their per-step scores ``history``."""
    records: dict[int, dict] = {}
    for a in range(len(anchors)):
        qid = int(anchors[a])
        id_list = [[int(x) for x in chosen[a, b]] + [qid] for b in range(chosen.shape[1])]
        shot_scores = [[float(s) for s in history[a, b]] for b in range(chosen.shape[1])]
        score_list = [row[-1] for row in shot_scores]
        beams = [{"shots": [{"id": i, "score": s} for i, s in zip(reversed(ids[:-1]), scores)],
                  "final_score": final, "full_sequence": ids}
                 for ids, scores, final in zip(id_list, shot_scores, score_list)]
        records[qid] = {"id_list": id_list, "score_list": score_list, "shot_scores": shot_scores,
                        "beams": beams, "few_shot_num": max_shot}
    return records


def infoscore_beam_search(prob_fn: ProbFn, anchors: np.ndarray, pools: np.ndarray, beam_size: int,
                          max_shot: int, *, per_beam_largest: bool = True) -> dict[int, dict]:
    """InfoScore beam search over each anchor's pool, vectorised over anchors, beams and candidates.

    Step t, for each beam with chosen ICDs ``C`` (prompt order) and each pool item ``c`` not in ``C``, score
    ``prob_fn([c] + C) − prob_fn(C)``. Each beam keeps its ``beam_size`` largest scores, then the global
    ``beam_size`` largest survive (``beam_filter``).
    New ICDs are prepended. Ties go to the lower pool position. Returns beam-JSON records keyed by anchor id:
    ``id_list`` (beams ``[icd..., query]``), ``score_list`` (last step's InfoScore, as the reference),
    ``shot_scores`` (per-step history), ``beams`` and ``few_shot_num``.

    ``anchors`` [A] ints, ``pools`` [A, K] global ids (never containing the anchor). One ``prob_fn`` call per
    step covers all anchors; a caller that wants results independent of batching passes one anchor at a time.
    """
    anchors = np.asarray(anchors, dtype=np.int64)
    pools = np.asarray(pools, dtype=np.int64)
    _check_search(anchors, pools, beam_size, max_shot)
    A, K = pools.shape
    rows = np.arange(A)[:, None]
    chosen = np.zeros((A, 1, 0), dtype=np.int64)  # [A, nb, t], prompt order
    history = np.zeros((A, 1, 0))  # [A, nb, t], per-step InfoScore in selection order
    p_cur = np.asarray(prob_fn(anchors, np.zeros((A, 0), dtype=np.int64)), dtype=np.float64)[:, None]  # [A, nb]
    for _ in range(max_shot):
        nb, t = chosen.shape[1], chosen.shape[2]
        new = np.broadcast_to(pools[:, None, :, None], (A, nb, K, 1))
        old = np.broadcast_to(chosen[:, :, None, :], (A, nb, K, t))
        icds = np.concatenate([new, old], axis=3).reshape(A * nb * K, t + 1)
        p_new = np.asarray(prob_fn(np.repeat(anchors, nb * K), icds), dtype=np.float64).reshape(A, nb, K)
        score = p_new - p_cur[:, :, None]
        used = (pools[:, None, :, None] == chosen[:, :, None, :]).any(axis=3)
        if per_beam_largest:
            score = np.where(used, -np.inf, score)
            per_beam = _topk_desc(score, beam_size)  # [A, nb, bs]
        else:  # smallest first; used items go last (the reference removed them from the candidates)
            per_beam = np.argsort(np.where(used, np.inf, score), axis=-1, kind="stable")[..., :beam_size]
        flat = np.take_along_axis(score, per_beam, axis=2).reshape(A, nb * beam_size)
        keep = _topk_desc(flat, beam_size)  # [A, bs], beam_filter
        parent = keep // beam_size
        pos = np.take_along_axis(per_beam.reshape(A, nb * beam_size), keep, axis=1)
        chosen = np.concatenate([pools[rows, pos][:, :, None], chosen[rows, parent]], axis=2)
        history = np.concatenate([history[rows, parent], np.take_along_axis(flat, keep, axis=1)[:, :, None]],
                                 axis=2)
        p_cur = p_new[rows, parent, pos]
    return _beam_records(anchors, chosen, history, max_shot)


__all__ = ["ProbFn", "infoscore_beam_search"]
