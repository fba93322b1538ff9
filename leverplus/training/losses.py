"""RL losses as pure functions of tensors: RCE (reference#rce-loss) and GRPO = PPO-clip + k3 KL (reference#grpo-loss).

Nothing here sees a model. Inputs are per-member *sequence* log-probabilities ``log π(a_i | q, C)`` of shape
``[B, G]`` (B queries, G group members, padded), rewards ``[B, G]`` and an optional bool ``mask [B, G]`` that is
True for real members. Padded members never change a result: their values may be any junk, NaN included.
With B = 1 and no padding every function is exactly the reference formula.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from leverplus.errors import LeverPlusInputError

# ---------------------------------------------------------------------------------------------------
# Input checks and masking helpers
# ---------------------------------------------------------------------------------------------------


def _check_2d(name: str, x: Tensor, shape: Optional[torch.Size] = None) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise LeverPlusInputError(f"expected a [B, G] tensor, got {got}", field=name,
                                  fix="pass one row per query and one column per group member (pad + mask)")
    if shape is not None and x.shape != shape:
        raise LeverPlusInputError(f"shape {tuple(x.shape)} does not match {tuple(shape)}", field=name,
                                  fix="all per-member tensors of one batch must share the [B, G] shape")


def _valid(mask: Optional[Tensor], like: Tensor) -> Tensor:
    """The bool member mask (all True when ``mask`` is None)."""
    if mask is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    _check_2d("mask", mask, like.shape)
    if mask.dtype != torch.bool:
        raise LeverPlusInputError(f"mask must be a bool tensor, got {mask.dtype}", field="mask",
                                  fix="pass mask.bool() (True = real member, False = padding)")
    return mask


def _check_finite(name: str, x: Tensor, valid: Tensor) -> None:
    if not torch.isfinite(x[valid]).all():
        raise LeverPlusInputError("NaN or inf on a valid (unmasked) member", field=name,
                                  fix="check the rewards of the batch, or mask the member out")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise LeverPlusInputError(f"{name} must be positive, got {value}", field=name,
                                  fix="use a positive value (see the function's documented default)")


def _member_order(rewards: Tensor, valid: Tensor, *, descending: bool) -> Tensor:
    """Per row, member indices: valid members first, sorted by reward, ties by lower index first (stable)."""
    key = torch.where(valid, rewards, torch.zeros_like(rewards))
    order = torch.sort(key, dim=-1, descending=descending, stable=True).indices
    invalid_first_key = (~valid.gather(-1, order)).to(torch.int32)
    return order.gather(-1, torch.sort(invalid_first_key, dim=-1, stable=True).indices)


def ascending_rank_scores(rewards: Tensor, *, mask: Optional[Tensor] = None) -> Tensor:
    """``ρ = rank/(n−1)`` with ascending ranks among the n valid members (worst 0, best 1); 0 when n ≤ 1 or padded.

    This is the reference ``argsort(argsort(r))/(G−1)`` (reference#rce-loss rank path); ties are broken stably, so of two
    equal rewards the earlier member gets the lower rank.
    """
    _check_2d("rewards", rewards)
    valid = _valid(mask, rewards)
    order = _member_order(rewards, valid, descending=False)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(rewards.shape[-1], device=rewards.device).expand_as(order))
    n = valid.sum(-1, keepdim=True)
    rho = rank.to(rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()) / (n - 1).clamp(min=1)
    return torch.where(valid, rho, torch.zeros_like(rho))


# ---------------------------------------------------------------------------------------------------
# RCE: reward-weighted cross-entropy (reference#rce-loss)
# ---------------------------------------------------------------------------------------------------


def rce_loss(log_probs: Tensor, rewards: Tensor, *, temperature: float, mask: Optional[Tensor] = None,
             use_rank: bool = False) -> dict[str, Tensor]:
    """``L = mean_q Σ_i w_i · (−log π(a_i))`` with ``w = softmax(r/τ)`` over the valid members of query q.

    ``−log π(a_i)`` is the step-summed CE of member i (label smoothing 0, as the trainer). ``use_rank=True`` uses
    ``w = softmax(ρ/τ)`` with ``ρ`` from ``ascending_rank_scores`` (a reference path the trainer never enables).
    The weights are constants (no gradient through rewards). Queries without a valid member are left out of the
    mean (loss 0 if none has one).

    Returns ``loss`` (scalar), ``per_query`` [B] and ``weights`` [B, G] (0 on padded members).
    """
    _check_2d("log_probs", log_probs)
    _check_2d("rewards", rewards, log_probs.shape)
    _positive("temperature", temperature)
    valid = _valid(mask, log_probs)
    _check_finite("rewards", rewards, valid)
    has_member = valid.any(-1)

    scores = (ascending_rank_scores(rewards, mask=valid) if use_rank else rewards).to(log_probs.dtype)
    logits = torch.where(valid, scores.detach() / temperature, torch.full_like(log_probs, float("-inf")))
    logits = torch.where(has_member[:, None], logits, torch.zeros_like(logits))  # keep empty rows finite
    weights = torch.where(valid, torch.softmax(logits, dim=-1), torch.zeros_like(logits))

    nll = torch.where(valid, -log_probs, torch.zeros_like(log_probs))
    per_query = (weights * nll).sum(-1)
    loss = per_query.sum() / has_member.sum().clamp(min=1)
    return {"loss": loss, "per_query": per_query, "weights": weights}


# ---------------------------------------------------------------------------------------------------
# GRPO: group advantages, k3 KL, PPO-clip (reference#grpo-loss)
# ---------------------------------------------------------------------------------------------------


def group_advantages(rewards: Tensor, *, mask: Optional[Tensor] = None, std_floor: float = 0.1,
                     clip: float = 5.0) -> Tensor:
    """``A = clamp((r − mean_g) / max(std_g, std_floor), −clip, clip)`` per query over its valid members.

    ``std_g`` is unbiased (torch default). References: std_floor 0.1, clip 5.0. A query with a single valid member
    gets A = 0 (the reference divides by a NaN std there); padded members get 0. Returns a detached [B, G] tensor.
    """
    _check_2d("rewards", rewards)
    _positive("std_floor", std_floor)
    _positive("clip", clip)
    valid = _valid(mask, rewards)
    _check_finite("rewards", rewards, valid)
    r = rewards.detach().to(rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype())

    n = valid.sum(-1, keepdim=True)
    mean = torch.where(valid, r, torch.zeros_like(r)).sum(-1, keepdim=True) / n.clamp(min=1)
    dev = torch.where(valid, r - mean, torch.zeros_like(r))
    std = ((dev ** 2).sum(-1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
    adv = (dev / std.clamp(min=std_floor)).clamp(-clip, clip)
    return torch.where(valid & (n >= 2), adv, torch.zeros_like(adv))


def rank_advantages(rewards: Tensor, *, mask: Optional[Tensor] = None) -> Tensor:
    """``A = 2ρ − 1 = 1 − 2·rank/(n−1)`` per query over its n valid members (``rank`` 0 = best reward): best +1,
    worst −1, evenly spaced between (reference#advantage, the rank form of commits 9b68708 / 0500631).

    ``ρ`` is ``ascending_rank_scores`` (ties broken stably: of two equal rewards the earlier member ranks lower).
    Scale-free, so no std floor or clip applies. A query with a single valid member gets A = 0, padded members 0.
    Returns a detached [B, G] tensor."""
    _check_2d("rewards", rewards)
    valid = _valid(mask, rewards)
    _check_finite("rewards", rewards, valid)
    n = valid.sum(-1, keepdim=True)
    adv = 2.0 * ascending_rank_scores(rewards.detach(), mask=valid) - 1.0
    return torch.where(valid & (n >= 2), adv, torch.zeros_like(adv))


def kl_k3(log_ratio: Tensor) -> Tensor:
    """k3 KL estimator ``exp(x) − 1 − x`` elementwise, ``x = log(π_new/π_old)`` (= ratio − 1 − log ratio); ≥ 0."""
    return torch.expm1(log_ratio) - log_ratio


def _check_grpo_args(log_probs: Tensor, old_log_probs: Tensor, rewards: Tensor, clip_epsilon: float,
                     kl_beta: float) -> None:
    _check_2d("log_probs", log_probs)
    _check_2d("old_log_probs", old_log_probs, log_probs.shape)
    _check_2d("rewards", rewards, log_probs.shape)
    if not 0 < clip_epsilon < 1:
        raise LeverPlusInputError(f"clip_epsilon must lie in (0, 1), got {clip_epsilon}", field="clip_epsilon",
                                  fix="use e.g. the reference 0.2")
    if not kl_beta >= 0:
        raise LeverPlusInputError(f"kl_beta must be >= 0, got {kl_beta}", field="kl_beta",
                                  fix="use e.g. the reference 0.1")


def _grpo_advantages(rewards: Tensor, valid: Tensor, advantages: Optional[Tensor], like: Tensor, *,
                     std_floor: float, adv_clip: float) -> Tensor:
    """The detached advantages in ``like``'s dtype (0 on padded members): given, or ``group_advantages(rewards)``."""
    if advantages is None:
        adv = group_advantages(rewards, mask=valid, std_floor=std_floor, clip=adv_clip)
    else:
        _check_2d("advantages", advantages, like.shape)
        _check_finite("advantages", advantages, valid)
        adv = advantages
    return torch.where(valid, adv.detach().to(like.dtype), torch.zeros_like(like))


@torch.no_grad()
def _ratio_stats(ratio: Tensor, adv: Tensor, valid: Tensor, clip_epsilon: float) -> dict[str, Tensor]:
    """Detached statistics pooled over all valid members (0 when there are too few)."""
    r, a = ratio[valid], adv[valid]
    empty = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    outside = (r < 1 - clip_epsilon) | (r > 1 + clip_epsilon)
    return {
        "mean_ratio": r.mean() if r.numel() else empty,
        "clip_ratio": outside.to(ratio.dtype).mean() if r.numel() else empty,
        "adv_mean": a.mean() if a.numel() else empty,
        "adv_std": a.std() if a.numel() >= 2 else empty,
        "adv_max_abs": a.abs().max() if a.numel() else empty,
    }


def grpo_loss(log_probs: Tensor, old_log_probs: Tensor, rewards: Tensor, *, clip_epsilon: float = 0.2,
              kl_beta: float = 0.1, mask: Optional[Tensor] = None, std_floor: float = 0.1, adv_clip: float = 5.0,
              use_ppo_clip_only: bool = False, advantages: Optional[Tensor] = None) -> dict[str, Tensor]:
    """GRPO loss per query q, over its valid members i (reference#grpo-loss steps 3-6; B = 1 is exactly the reference):

        A       = group_advantages(r)  (or ``advantages`` when given)
        ratio_i = exp(new_i − old_i)
        L_PPO_q = −mean_i min(ratio_i·A_i, clamp(ratio_i, 1−ε, 1+ε)·A_i)
        kl_q    = mean_i kl_k3(new_i − old_i)
        loss    = mean_q (L_PPO_q + β·kl_q)         (β term dropped if use_ppo_clip_only; kl still reported)

    ``old_log_probs`` and the advantages are constants (detached). Returned scalars: ``loss`` (differentiable),
    ``ppo_loss`` and ``kl`` (means over queries with a valid member), ``kl_loss`` (= β·kl, or 0 when clip-only),
    and detached statistics pooled over all valid members: ``mean_ratio``, ``clip_ratio`` (fraction of ratios
    outside [1−ε, 1+ε]), ``adv_mean``, ``adv_std`` (unbiased; 0 with fewer than 2 members), ``adv_max_abs``.
    Also ``per_query_loss`` [B] (0 for a query without valid members), the detached ``per_query_kl`` [B] (kl_q)
    and ``per_query_max_abs_adv`` [B] (max_i |A_i|, the reference's per-query ``max_advantage``; 0 when empty).
    """
    _check_grpo_args(log_probs, old_log_probs, rewards, clip_epsilon, kl_beta)
    valid = _valid(mask, log_probs)
    zeros = torch.zeros_like(log_probs)
    adv = _grpo_advantages(rewards, valid, advantages, log_probs, std_floor=std_floor, adv_clip=adv_clip)

    log_ratio = torch.where(valid, log_probs - old_log_probs.detach(), zeros)
    ratio = torch.exp(log_ratio)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_epsilon, 1 + clip_epsilon) * adv)

    n = valid.sum(-1)
    has_member = n > 0
    ppo_q = -torch.where(valid, surrogate, zeros).sum(-1) / n.clamp(min=1)
    kl_q = torch.where(valid, kl_k3(log_ratio), zeros).sum(-1) / n.clamp(min=1)
    per_query = ppo_q if use_ppo_clip_only else ppo_q + kl_beta * kl_q

    n_queries = has_member.sum().clamp(min=1)
    loss = per_query.sum() / n_queries
    ppo_loss = ppo_q.sum() / n_queries
    kl = kl_q.sum() / n_queries
    kl_loss = torch.zeros_like(kl) if use_ppo_clip_only else kl_beta * kl
    stats = _ratio_stats(ratio, adv, valid, clip_epsilon)
    max_abs_q = torch.where(valid, adv.abs(), zeros).amax(-1) if adv.shape[-1] else zeros.sum(-1)
    return {"loss": loss, "ppo_loss": ppo_loss, "kl_loss": kl_loss, "kl": kl, **stats, "per_query_loss": per_query,
            "per_query_kl": kl_q.detach(), "per_query_max_abs_adv": max_abs_q.detach()}


# ---------------------------------------------------------------------------------------------------
# GRPO epoch statistics (TRL's names: grpo/frac_reward_zero_std, grpo/reward_mean, ...)
# ---------------------------------------------------------------------------------------------------

#: A group's selected rewards count as flat (no GRPO signal) when their variance is at most this, i.e. std <= 1e-6.
#: A metric threshold only: training never reads it.
ZERO_STD_VAR_TOL = 1e-12
#: The ``grpo_loss`` outputs averaged over an epoch (query-weighted means of the batch values).
GRPO_LOSS_KEYS = ("loss", "ppo_loss", "kl_loss", "kl", "mean_ratio", "clip_ratio", "adv_mean", "adv_std")


@torch.no_grad()
def count_zero_std_groups(rewards: Tensor, mask: Tensor, *, var_tol: float = ZERO_STD_VAR_TOL) -> int:
    """How many rows have fewer than 2 valid members or an (unbiased) reward variance ``<= var_tol``."""
    sel = mask.float()
    cnt = sel.sum(1)
    mean = (rewards * sel).sum(1) / cnt.clamp(min=1)
    spread = (((rewards - mean[:, None]) * sel) ** 2).sum(1)
    return int(((cnt < 2) | (spread <= var_tol * (cnt - 1).clamp(min=1))).sum())


class GRPOEpochStats:
    """Accumulates one GRPO epoch's metrics batch by batch; :meth:`summary` gives the epoch values.

    ``grpo_loss`` outputs (``GRPO_LOSS_KEYS``): means over the epoch's queries of each batch's value;
    ``frac_reward_zero_std``: the fraction of queries whose *selected* members' rewards are flat (TRL's metric);
    ``reward_mean`` / ``reward_std``: over every real member of every query, on the raw rewards (population std);
    ``max_advantage``: the mean over the epoch's queries of max_i |A_i| (the reference's epoch ``max_advantage``,
    which averages the per-query value; the same at every batch size).
    """

    def __init__(self) -> None:
        self.sums = {key: 0.0 for key in GRPO_LOSS_KEYS}
        self.zero_std, self.reward_sum, self.reward_sq, self.n_members, self.n = 0, 0.0, 0.0, 0, 0
        self.max_adv_sum = 0.0

    @torch.no_grad()
    def add(self, out: dict[str, Tensor], selected_rewards: Tensor, selected_mask: Tensor, raw_rewards: Tensor,
            member_mask: Tensor) -> None:
        """One batch: ``out`` from ``grpo_loss``, the rewards it saw with their mask ``[B, k]``, and the raw
        rewards of all members with the member mask ``[B, G]``."""
        size = int(member_mask.shape[0])
        for key in GRPO_LOSS_KEYS:
            self.sums[key] += float(out[key].detach()) * size
        self.zero_std += count_zero_std_groups(selected_rewards, selected_mask)
        raw = raw_rewards * member_mask
        self.reward_sum += float(raw.sum())
        self.reward_sq += float((raw**2).sum())
        self.n_members += int(member_mask.sum())
        self.n += size
        if "per_query_max_abs_adv" in out:
            self.max_adv_sum += float(out["per_query_max_abs_adv"].sum())

    def summary(self) -> dict[str, float]:
        mean_r = self.reward_sum / max(self.n_members, 1)
        return {
            **{key: self.sums[key] / max(self.n, 1) for key in GRPO_LOSS_KEYS},
            "frac_reward_zero_std": self.zero_std / max(self.n, 1),
            "reward_mean": mean_r,
            "reward_std": math.sqrt(max(self.reward_sq / max(self.n_members, 1) - mean_r**2, 0.0)),
            "max_advantage": self.max_adv_sum / max(self.n, 1),
        }


# ---------------------------------------------------------------------------------------------------
# Member selection: curriculum top-k (reference#grpo-loss step 1) and top-1 (use_top1_only, reference#rce-loss)
# ---------------------------------------------------------------------------------------------------


def top_k_members(rewards: Tensor, *, mask: Optional[Tensor], k: Optional[int]) -> tuple[Tensor, Tensor]:
    """Per query, the indices of its ``k`` largest valid rewards, best first, and the validity of each pick.

    ``k' = min(k, G)`` (``k=None`` -> all G). Ties go to the lower index (the reference ``torch.topk`` leaves them
    arbitrary). A query with fewer than k' valid members is padded with masked-out indices (mask False).
    Gather labels / old log-probs / rewards with ``tensor.gather(1, idx)``. Returns ``(idx [B, k'], mask [B, k'])``.
    """
    _check_2d("rewards", rewards)
    valid = _valid(mask, rewards)
    _check_finite("rewards", rewards, valid)
    g = rewards.shape[-1]
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise LeverPlusInputError(f"k must be a positive int or None, got {k!r}", field="top_k",
                                  fix="use None for all members, or e.g. 3 / 5 as the reference curriculum")
    keep = g if k is None else min(k, g)
    idx = _member_order(rewards, valid, descending=True)[:, :keep]
    return idx, valid.gather(-1, idx)


def top1_member(rewards: Tensor, *, mask: Optional[Tensor] = None, compat_index0: bool = False) -> Tensor:
    """Index [B] of each query's highest-reward valid member (ties -> lowest index; no valid member -> 0).

    ``compat_index0=True`` returns 0 for every query: the reference ``use_top1_only`` trains on the first stored
    candidate, not the best one (reference#rce-loss [QUIRK]). Our default (False) picks the best.
    """
    _check_2d("rewards", rewards)
    if rewards.shape[-1] < 1:
        raise LeverPlusInputError("empty groups (G = 0)", field="rewards", fix="every query needs a member")
    if compat_index0:
        return torch.zeros(rewards.shape[0], dtype=torch.long, device=rewards.device)
    return top_k_members(rewards, mask=mask, k=1)[0][:, 0]
