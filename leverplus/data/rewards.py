"""Rewards: one candidate dict -> one float, and per-group normalisation.

Every reward mode of reference#reward-modes is a small function in the ``REWARD_MODES`` registry, keyed by the
``reward_mode`` config string, so a new variant is one decorated function, never a copied file. What each mode
reads (its ``reward.*`` knobs and candidate fields) is declared once in ``REWARD_MODE_SPECS``
(leverplus/config/reward_modes.py: config sits below data, and the config enum and the run key need the list);
``register_reward`` checks each function against its declaration. ``compute_reward`` looks the mode up, runs it on
exactly the knobs it declares and clips the result to ``[-clip, clip]`` (reference#reward-modes, ``reward_clip``).

Candidate fields (reference#formats-rl-json), read as ``float(field or 0)`` so a missing or null field counts as 0
(the group builder first refuses files lacking a field the mode needs: ``check_reward_fields`` in groups.py):

* ``h = vqa_correct``     (0/1; absent in the VQAv2 "balanced" data, so ``hard_plus_soft`` is the accuracy there)
* ``s = vqa_acc_score``   (official VQA accuracy in [0, 1])
* ``p = vqa_gt_prob``     (expected-accuracy probability, not bounded by 1)
* ``ρ = vqa_rel_score``   (answer relevance)

* ``info_score``         (InfoScore of the candidate's ICDs, written by the RL-data generator; ``hybrid`` only)

``normalize_group`` turns the raw rewards of one query's group into ``beam_rewards`` (reference#reward-normalisation).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from leverplus.config.reward_modes import REWARD_MODE_SPECS, takes_info
from leverplus.errors import LeverPlusInputError

RewardFn = Callable[..., float]
REWARD_MODES: dict[str, RewardFn] = {}
NORMALIZE_METHODS = ("z_score", "z_score_clamp", "rank_normalize", "none")
CORRECTNESS_MODES = ("01", "pm1")


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: add ``fn(candidate, *, <knobs>) -> float`` (unclipped) to ``REWARD_MODES`` under ``name``.

    ``name`` must be declared in ``REWARD_MODE_SPECS``, and ``fn``'s keyword-only arguments must be exactly the
    declared ``reads`` (plus ``info`` for a mode that ``takes_info``): what the run key drops as ignored is then
    what the formula really does not receive.
    """

    def decorator(fn: RewardFn) -> RewardFn:
        if name in REWARD_MODES:
            raise LeverPlusInputError(f"reward mode {name!r} is registered twice", field="reward_mode",
                                      fix="give the new reward function a distinct name")
        spec = REWARD_MODE_SPECS.get(name)
        if spec is None:
            raise LeverPlusInputError(f"reward mode {name!r} is not declared", field="reward_mode",
                                      fix="add it to REWARD_MODE_SPECS in leverplus/config/reward_modes.py")
        declared = set(spec.reads) | ({"info"} if takes_info(name) else set())
        if _keyword_args(fn) != declared:
            raise LeverPlusInputError(
                f"reward mode {name!r}: the function takes {sorted(_keyword_args(fn))}, the declaration reads "
                f"{sorted(declared)}", field="reward_mode",
                fix="make the keyword-only arguments and REWARD_MODE_SPECS[name].reads agree")
        REWARD_MODES[name] = fn
        return fn

    return decorator


def _keyword_args(fn: RewardFn) -> set:
    """Names of ``fn``'s keyword-only parameters."""
    return {p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


# ---------------------------------------------------------------------------------------------------
# Reading candidate fields
# ---------------------------------------------------------------------------------------------------


def _to_float(value: object, name: str) -> float:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise LeverPlusInputError(f"expected a number, got {value!r}", field=name,
                                  fix="store a number (or null) in this candidate field") from None
    if not math.isfinite(x):
        raise LeverPlusInputError(f"value is not finite ({value!r})", field=name,
                                  fix="store a finite number (or null) in this candidate field")
    return x


def _field(c: Mapping, name: str) -> float:
    """``float(c[name] or 0)``: missing and null count as 0 (reference behaviour at HEAD)."""
    return _to_float(c.get(name) or 0, name)


def _optional_field(c: Mapping, name: str) -> Optional[float]:
    """The field as a float, or None when missing/null (the legacy mode distinguishes the two)."""
    value = c.get(name)
    return None if value is None else _to_float(value, name)


# ---------------------------------------------------------------------------------------------------
# The modes of reference#reward-modes (unclipped; compute_reward clips)
# ---------------------------------------------------------------------------------------------------


@register_reward("hard_plus_soft")
def hard_plus_soft(c: Mapping, *, hard_weight: float, soft_weight: float) -> float:
    """``hw·h + sw·s`` (the default): negatives 0, positives 1 + {.3, .6, .9, 1}."""
    return hard_weight * _field(c, "vqa_correct") + soft_weight * _field(c, "vqa_acc_score")


@register_reward("hard_plus_soft_v2")
def hard_plus_soft_v2(c: Mapping, *, hard_weight: float, soft_weight: float) -> float:
    """``sw·s + 2·hw·h``: positives 2.3-3.0."""
    return soft_weight * _field(c, "vqa_acc_score") + 2.0 * hard_weight * _field(c, "vqa_correct")


@register_reward("separated")
def separated(c: Mapping, *, hard_weight: float, soft_weight: float) -> float:
    """``2·hw + sw·s`` if ``h == 1`` else ``sw·s`` (equal to ``hard_plus_soft_v2`` for binary h)."""
    s = _field(c, "vqa_acc_score")
    return 2.0 * hard_weight + soft_weight * s if _field(c, "vqa_correct") == 1.0 else soft_weight * s


@register_reward("hard_only")
def hard_only(c: Mapping, *, hard_weight: float) -> float:
    """``hw·h``."""
    return hard_weight * _field(c, "vqa_correct")


@register_reward("soft_only")
def soft_only(c: Mapping, *, soft_weight: float) -> float:
    """``sw·s``."""
    return soft_weight * _field(c, "vqa_acc_score")


@register_reward("hard01_plus_gtprob")
def hard01_plus_gtprob(c: Mapping, *, hard_weight: float, soft_weight: float) -> float:
    """``hw·h + sw·p``."""
    return hard_weight * _field(c, "vqa_correct") + soft_weight * _field(c, "vqa_gt_prob")


@register_reward("hard01_plus_gtprob_separated")
def hard01_plus_gtprob_separated(c: Mapping, *, hard_weight: float, soft_weight: float) -> float:
    """``2·hw + sw·p`` if ``h == 1`` else ``sw·p``."""
    p = _field(c, "vqa_gt_prob")
    return 2.0 * hard_weight + soft_weight * p if _field(c, "vqa_correct") == 1.0 else soft_weight * p


@register_reward("hard_plus_gtprob_plus_rel")
def hard_plus_gtprob_plus_rel(c: Mapping, *, hard_weight: float, soft_weight: float, rel_weight: float) -> float:
    """``hw·h + sw·p + rw·(1−h)·ρ``: relevance shapes the negatives only."""
    h, p, rho = _field(c, "vqa_correct"), _field(c, "vqa_gt_prob"), _field(c, "vqa_rel_score")
    return hard_weight * h + soft_weight * p + rel_weight * (1.0 - h) * rho


@register_reward("legacy")
def legacy(c: Mapping, *, reward_alpha: float, reward_beta: float, correctness_mode: str, use_logprob: bool) -> float:
    """``α·quality + β·c`` (the defaults α = β = 0 give reward ≡ 0).

    ``c``: x = ``vqa_correct`` if present, else ``vqa_acc_score`` if present; "01" -> x, "pm1" -> 2x − 1;
    neither present -> 0 in both modes (as the reference).
    ``quality``: ``−logprob_score`` if ``use_logprob`` and present, else ``beam_score`` if present, else 0.
    """
    correct, acc = _optional_field(c, "vqa_correct"), _optional_field(c, "vqa_acc_score")
    x = correct if correct is not None else acc
    if x is None:
        correctness = 0.0
    else:
        correctness = x if correctness_mode == "01" else 2.0 * x - 1.0

    logprob, beam_score = _optional_field(c, "logprob_score"), _optional_field(c, "beam_score")
    if use_logprob and logprob is not None:
        quality = -logprob
    elif beam_score is not None:
        quality = beam_score
    else:
        quality = 0.0
    return reward_alpha * quality + reward_beta * correctness


def _info_mix(c: Mapping, mode: str, helper: str, *, hard_weight: float, soft_weight: float, info: Optional[float],
              info_weight: float) -> float:
    """``info_weight·info + (1 − info_weight)·corr`` with ``corr`` the ``separated`` reward and ``info`` in [0, 1]."""
    if info is None:
        raise LeverPlusInputError(
            f"reward mode {mode!r} needs a group-scaled InfoScore value (info) for each candidate", field="info",
            fix=f"compute per group with leverplus.data.rewards.{helper} and pass info=values[i] to compute_reward")
    info = _to_float(info, "info")
    if not 0.0 <= info <= 1.0:
        raise LeverPlusInputError(f"info must lie in [0, 1], got {info}", field="info",
                                  fix=f"pass the min-max scaled value from {helper}")
    if not 0.0 <= info_weight <= 1.0:
        raise LeverPlusInputError(f"info_weight must lie in [0, 1], got {info_weight}", field="info_weight",
                                  fix="choose a mixing weight between 0 (correctness only) and 1 (InfoScore only)")
    corr = separated(c, hard_weight=hard_weight, soft_weight=soft_weight)
    return info_weight * info + (1.0 - info_weight) * corr


@register_reward("hybrid")
def hybrid(c: Mapping, *, hard_weight: float, soft_weight: float, info: Optional[float], info_weight: float) -> float:
    """``info_weight·info + (1 − info_weight)·corr`` with ``corr`` the ``separated`` reward (reference#reward-modes).

    ``info`` in [0, 1] is the candidate's ``info_score`` min-max scaled against the other InfoScores of its group
    (:func:`group_info_scores`, passed in by the caller); ``corr`` with hw = sw = 1 is the historical ``2 + s``.
    """
    return _info_mix(c, "hybrid", "group_info_scores(candidates)", hard_weight=hard_weight,
                     soft_weight=soft_weight, info=info, info_weight=info_weight)


@register_reward("hybrid_legacy")
def hybrid_legacy(c: Mapping, *, hard_weight: float, soft_weight: float, info: Optional[float],
                  info_weight: float) -> float:
    """The same mix with the earlier ``info``: :func:`hybrid_info_values` (the beam JSON's InfoScore when the
    pointer matches an InfoScore beam, else the pointer net's ``beam_score``, min-max scaled together)."""
    return _info_mix(c, "hybrid_legacy", "hybrid_info_values(candidates, infoscores)", hard_weight=hard_weight,
                     soft_weight=soft_weight, info=info, info_weight=info_weight)


# ---------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------


def compute_reward(
    candidate: Mapping,
    mode: str,
    hard_weight: float = 1.0,
    soft_weight: float = 1.0,
    rel_weight: float = 0.1,
    *,
    reward_alpha: float = 0.0,
    reward_beta: float = 0.0,
    correctness_mode: str = "01",
    use_logprob: bool = False,
    info: Optional[float] = None,
    info_weight: float = 0.5,
    clip: float = 5.0,
) -> float:
    """Reward of one RL candidate under ``mode`` (reference#reward-modes), clipped to ``[-clip, clip]`` (reference: 5).

    Raises ``LeverPlusInputError`` for an unknown mode (the message lists the valid ones), an unknown
    ``correctness_mode``, a non-numeric or non-finite field, and ``hybrid`` without ``info``.
    """
    if not isinstance(candidate, Mapping):
        raise LeverPlusInputError(f"a candidate must be a dict, got {type(candidate).__name__}",
                                  field="pointer_candidates", fix="pass one pointer_candidates entry (a dict)")
    if mode not in REWARD_MODES:
        raise LeverPlusInputError(f"unknown reward mode {mode!r}", field="reward_mode",
                                  fix=f"use one of: {', '.join(sorted(REWARD_MODES))}")
    if correctness_mode not in CORRECTNESS_MODES:
        raise LeverPlusInputError(f"unknown correctness mode {correctness_mode!r}", field="correctness_mode",
                                  fix=f"use one of: {', '.join(CORRECTNESS_MODES)}")
    if not clip > 0:
        raise LeverPlusInputError(f"clip must be positive, got {clip}", field="clip", fix="use e.g. 5.0")
    knobs = dict(hard_weight=hard_weight, soft_weight=soft_weight, rel_weight=rel_weight, reward_alpha=reward_alpha,
                 reward_beta=reward_beta, correctness_mode=correctness_mode, use_logprob=use_logprob,
                 info_weight=info_weight)
    spec = REWARD_MODE_SPECS[mode]
    params = {k: knobs[k] for k in spec.reads}
    if takes_info(mode):
        params["info"] = info
    reward = REWARD_MODES[mode](candidate, **params)
    return max(-clip, min(clip, float(reward)))


def group_info_scores(candidates: Sequence[Mapping], field: str = "info_score") -> list[float]:
    """``hybrid``'s ``info``: each candidate's ``field`` min-max scaled against the group's other values, in [0, 1].

    ``(x − min) / (max − min)`` over the group; 0.5 for every candidate when all values are equal (a single
    candidate included: no ordering information). Every candidate must carry the field (the RL-data generator
    writes it for all of them); a missing or null one raises ``LeverPlusInputError`` naming the candidate index.
    """
    raw: list[float] = []
    for i, c in enumerate(candidates):
        value = c.get(field) if isinstance(c, Mapping) else None
        if value is None:
            raise LeverPlusInputError(f"candidate {i} of the group has no {field}", field=field,
                                      fix="regenerate the RL data (leverplus.generate_rl_data writes it for every "
                                          "candidate) or use reward.mode=hybrid_legacy")
        raw.append(_to_float(value, field))
    if not raw:
        return []
    lo, hi = min(raw), max(raw)
    if hi == lo:
        return [0.5] * len(raw)
    return [(x - lo) / (hi - lo) for x in raw]


def hybrid_info_values(candidates: Sequence[Mapping], infoscores: Sequence[Optional[float]]) -> list[float]:
    """Group-scaled InfoScore in [0, 1] for each candidate of one query, for ``hybrid_legacy``.

    Choice made here (the reference has no working ``hybrid``):
    * raw value = ``infoscores[i]`` when not None (the caller fills it from the beam JSON when the candidate's
      pointer matches an InfoScore beam), else the candidate's ``beam_score`` (the historical source), else missing;
    * the present values are min-max scaled within the group, so InfoScores around 1e-7 and beam scores around 1
      both span [0, 1];
    * a missing value -> 0.0 (no evidence of information gain, so no bonus; the historical code gave 0.5);
    * all present values equal (including a single one) -> 0.5 for each of them (no ordering information).
    """
    if len(candidates) != len(infoscores):
        raise LeverPlusInputError(
            f"{len(candidates)} candidates but {len(infoscores)} InfoScores", field="infoscores",
            fix="pass one InfoScore (or None) per candidate, in the same order")
    raw: list[Optional[float]] = []
    for c, score in zip(candidates, infoscores):
        if score is not None:
            raw.append(_to_float(score, "infoscore"))
        else:
            raw.append(_optional_field(c, "beam_score"))
    present = [x for x in raw if x is not None]
    if not present:
        return [0.0] * len(raw)
    lo, hi = min(present), max(present)
    if hi == lo:
        return [0.0 if x is None else 0.5 for x in raw]
    return [0.0 if x is None else (x - lo) / (hi - lo) for x in raw]


def normalize_group(rewards: Tensor, method: str = "z_score_clamp", clamp: float = 3.0,
                    eps: float = 1e-12) -> Tensor:
    """Normalise one query's raw rewards ``[G]`` into ``beam_rewards`` (reference#reward-normalisation); returns a new float tensor.

    μ and the **unbiased** σ are taken over the group.
    * ``z_score``: ``(r − μ)/σ`` if ``σ > eps`` (reference 1e-12), else the raw rewards unchanged (also for G = 1);
    * ``z_score_clamp`` (default): the same, then clamped to ``±clamp`` (reference 3.0);
    * ``rank_normalize``: best -> +1, worst -> −1 via ``1 − 2·rank/(G−1)``, rank 0 = best, ties broken by stable
      order (the earlier candidate ranks first); 0 when G = 1;
    * ``none``: unchanged.
    """
    if method not in NORMALIZE_METHODS:
        raise LeverPlusInputError(f"unknown normalize method {method!r}", field="normalize_method",
                                  fix=f"use one of: {', '.join(NORMALIZE_METHODS)}")
    r = torch.as_tensor(rewards)
    r = (r.clone() if r.is_floating_point() else r.to(torch.get_default_dtype())).detach()
    if r.dim() != 1:
        raise LeverPlusInputError(f"expected one group of rewards with shape [G], got shape {tuple(r.shape)}",
                                  field="rewards", fix="normalise each query's group separately")
    if not torch.isfinite(r).all():
        raise LeverPlusInputError(f"rewards contain NaN or inf: {r.tolist()}", field="rewards",
                                  fix="check the reward inputs of this group")
    g = r.numel()
    if method == "none" or g == 0:
        return r
    if method == "rank_normalize":
        if g == 1:
            return torch.zeros_like(r)
        order = torch.sort(r, descending=True, stable=True).indices  # order[k] = candidate with rank k
        rank = torch.empty_like(order)
        rank[order] = torch.arange(g)
        return 1.0 - 2.0 * rank.to(r.dtype) / (g - 1)
    if g < 2:
        return r
    mu, sigma = r.mean(), r.std()  # torch default: unbiased
    if not sigma > eps:
        return r
    z = (r - mu) / sigma
    return z.clamp(-clamp, clamp) if method == "z_score_clamp" else z


def sequence_diversity(icd_embeddings: Tensor) -> float:
    """``1 − mean pairwise cosine`` of the S chosen ICD embeddings ``[S, d]`` (pairs i < j); 0 for S < 2.

    A zero vector has cosine 0 with everything (``F.normalize`` semantics), so it counts as maximally diverse.
    """
    e = torch.as_tensor(icd_embeddings)
    if e.dim() != 2:
        raise LeverPlusInputError(f"expected ICD embeddings of shape [S, d], got {tuple(e.shape)}",
                                  field="icd_embeddings", fix="pass one row per chosen ICD")
    s = e.shape[0]
    if s < 2:
        return 0.0
    u = torch.nn.functional.normalize(e.double(), dim=-1)
    cos = u @ u.T
    i, j = torch.triu_indices(s, s, offset=1)
    return float(1.0 - cos[i, j].mean())
