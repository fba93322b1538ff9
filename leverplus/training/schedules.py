"""Schedules: RCE temperature τ (reference#temperature-schedule), adaptive KL β (reference#adaptive-kl), optional adaptive policy temperature,
learning-rate multiplier, and the GRPO curriculum top-k (reference#grpo-epoch).

All are small pure functions or tiny stateful controllers; every constant the reference hard-coded is a keyword
argument whose default is the reference value (unless the docstring says otherwise).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from leverplus.errors import LeverPlusInputError


def _require(ok: bool, field: str, problem: str, fix: str) -> None:
    if not ok:
        raise LeverPlusInputError(problem, field=field, fix=fix)


# ---------------------------------------------------------------------------------------------------
# RCE temperature (reference#temperature-schedule)
# ---------------------------------------------------------------------------------------------------


def rce_temperature(step: int, total_steps: int, start: float = 2.0, end: float = 0.5) -> float:
    """``τ = start + (end − start)·clip(step/(T−1), 0, 1)``; ``T ≤ 1`` -> ``end``.

    ``T = rce_epochs·|loader|`` and ``step = epoch·|loader| + batch_idx`` in the trainer. Reference 2.0 -> 0.5
    ("from scratch" scripts: 0.5 -> 0.1 or 0.2).
    """
    _require(start > 0 and end > 0, "rce_temperature", f"temperatures must be positive, got {start} -> {end}",
             "use positive start/end temperatures, e.g. 2.0 -> 0.5")
    if total_steps <= 1:
        return float(end)
    progress = min(1.0, max(0.0, step / (total_steps - 1)))
    return float(start + (end - start) * progress)


# ---------------------------------------------------------------------------------------------------
# Adaptive KL β (reference#adaptive-kl) and adaptive policy temperature (our optional addition)
# ---------------------------------------------------------------------------------------------------


class AdaptiveKLController:
    """β after every optimiser step (or every query, ``grpo.kl_update=per_query``): ``kl > target_max`` -> β·factor, ``kl < target_min`` -> β/factor, then clip
    to ``[beta_min, beta_max]`` (the reference clips on every update, also when β is unchanged).

    Defaults are the reference's hard-coded values (0.01 / 0.1 / 1.5 / 0.001 / 10). ``enabled=False``
    (``--disable_adaptive_kl``) keeps β fixed. A NaN/inf KL leaves β unchanged (the reference would compare False
    twice and only clip). The initial β is used as given (the reference's scripts also start from β = 0).
    """

    def __init__(self, beta: float = 0.1, target_min: float = 0.01, target_max: float = 0.1, factor: float = 1.5,
                 beta_min: float = 0.001, beta_max: float = 10.0, enabled: bool = True) -> None:
        _require(beta >= 0, "kl_beta", f"initial beta must be >= 0, got {beta}", "use e.g. 0.1")
        _require(0 <= target_min <= target_max, "kl_target", f"need 0 <= target_min <= target_max, got "
                 f"{target_min}, {target_max}", "use e.g. 0.01 and 0.1")
        _require(factor > 1, "kl_factor", f"factor must be > 1, got {factor}", "use e.g. 1.5")
        _require(0 <= beta_min <= beta_max, "kl_beta_bounds", f"need 0 <= beta_min <= beta_max, got {beta_min}, "
                 f"{beta_max}", "use e.g. 0.001 and 10.0")
        self.beta = float(beta)
        self.target_min, self.target_max, self.factor = target_min, target_max, factor
        self.beta_min, self.beta_max, self.enabled = beta_min, beta_max, enabled
        self.n_updates = 0  # calls of update (the β cadence: one per optimiser step, or one per query)

    def update(self, kl: float) -> float:
        """Adapt β to the KL of the last step (or query); returns the new β."""
        self.n_updates += 1
        kl = float(kl)
        if not self.enabled or not math.isfinite(kl):
            return self.beta
        if kl > self.target_max:
            self.beta *= self.factor
        elif kl < self.target_min:
            self.beta /= self.factor
        self.beta = min(self.beta_max, max(self.beta_min, self.beta))
        return self.beta


class AdaptivePolicyTemperature:
    """Optional (off by default; not in the reference): a KL-adaptive temperature T that divides the policy
    logits before the softmax.

    ``kl > target_max`` -> T·factor (a softer policy moves less mass, pulling the KL back), ``kl < target_min``
    -> T/factor, then clip to ``[t_min, t_max]``. Disabled or NaN KL -> unchanged.
    """

    def __init__(self, init: float = 1.0, target_min: float = 0.01, target_max: float = 0.1, factor: float = 1.1,
                 t_min: float = 0.5, t_max: float = 4.0, enabled: bool = False) -> None:
        _require(0 < t_min <= init <= t_max, "policy_temperature", f"need 0 < t_min <= init <= t_max, got "
                 f"{t_min}, {init}, {t_max}", "use e.g. t_min=0.5, init=1.0, t_max=4.0")
        _require(0 <= target_min <= target_max, "policy_temperature_target", f"need 0 <= target_min <= "
                 f"target_max, got {target_min}, {target_max}", "use e.g. 0.01 and 0.1")
        _require(factor > 1, "policy_temperature_factor", f"factor must be > 1, got {factor}", "use e.g. 1.1")
        self.temperature = float(init)
        self.target_min, self.target_max, self.factor = target_min, target_max, factor
        self.t_min, self.t_max, self.enabled = t_min, t_max, enabled

    def update(self, kl: float) -> float:
        """Adapt T to the KL of the last step; returns the new T."""
        kl = float(kl)
        if not self.enabled or not math.isfinite(kl):
            return self.temperature
        if kl > self.target_max:
            self.temperature *= self.factor
        elif kl < self.target_min:
            self.temperature /= self.factor
        self.temperature = min(self.t_max, max(self.t_min, self.temperature))
        return self.temperature


# ---------------------------------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------------------------------

LR_SCHEDULES = ("warmup_cosine", "constant")


def lr_multiplier(step: int, total_steps: int, schedule: str = "warmup_cosine", warmup_ratio: float = 0.1,
                  min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based) of ``total_steps``.

    * ``"constant"``: 1 (the reference RL trainer: no schedule; its warmup_ratio=0.1 is unused);
    * ``"warmup_cosine"`` (our default): with ``W = ceil(warmup_ratio·T)``, steps ``0..W−1`` ramp linearly
      ``(step+1)/W`` (so the first step is not wasted at lr 0), then cosine from 1 to ``min_ratio`` with
      ``progress = (step − W)/(T − W)`` (clipped to [0, 1] past the end).
    """
    _require(schedule in LR_SCHEDULES, "lr_schedule", f"unknown lr schedule {schedule!r}",
             f"use one of: {', '.join(LR_SCHEDULES)}")
    _require(total_steps >= 1, "total_steps", f"total_steps must be >= 1, got {total_steps}",
             "pass epochs x batches per epoch")
    _require(step >= 0, "step", f"step must be >= 0, got {step}", "count optimiser steps from 0")
    _require(0 <= warmup_ratio <= 1, "warmup_ratio", f"warmup_ratio must lie in [0, 1], got {warmup_ratio}",
             "use e.g. 0.1")
    _require(0 <= min_ratio <= 1, "min_ratio", f"min_ratio must lie in [0, 1], got {min_ratio}", "use e.g. 0.0")
    if schedule == "constant":
        return 1.0
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_lr_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, schedule: str = "warmup_cosine",
                      warmup_ratio: float = 0.1, min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying ``lr_multiplier``; call ``scheduler.step()`` after each ``optimizer.step()``."""
    lr_multiplier(0, total_steps, schedule, warmup_ratio, min_ratio)  # validate now, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, schedule, warmup_ratio, min_ratio))


# ---------------------------------------------------------------------------------------------------
# GRPO curriculum top-k (reference#grpo-epoch)
# ---------------------------------------------------------------------------------------------------


def grpo_top_k(epoch: int, schedule: Sequence[tuple[Optional[int], Optional[int]]] = ((1, 3), (None, 5))
               ) -> Optional[int]:
    """Top-k for GRPO ``epoch`` (0-based) from stages ``(num_epochs, k)`` taken in order.

    ``num_epochs=None`` means "all remaining epochs" (only allowed in the last stage); ``k=None`` means all members.
    The reference curriculum ((1, 3), (None, 5)) gives k=3 in epoch 0 and k=5 afterwards. An epoch past a schedule
    without an open-ended last stage raises, rather than silently reusing a stage.
    """
    _require(isinstance(epoch, int) and epoch >= 0, "epoch", f"epoch must be an int >= 0, got {epoch!r}",
             "count GRPO epochs from 0")
    _require(len(schedule) > 0, "grpo_top_k_schedule", "the top-k schedule is empty", "use e.g. [(1, 3), (None, 5)]")
    for i, stage in enumerate(schedule):  # validate every stage up front, not only those reached so far
        _require(len(stage) == 2, "grpo_top_k_schedule", f"stage {i} is {stage!r}, not (num_epochs, k)",
                 "write each stage as (num_epochs or None, k or None)")
        num_epochs, k = stage
        _require(k is None or (isinstance(k, int) and not isinstance(k, bool) and k >= 1), "grpo_top_k_schedule",
                 f"stage {i}: k must be a positive int or None, got {k!r}", "use e.g. 3, 5 or None (all)")
        _require(num_epochs is None or (isinstance(num_epochs, int) and not isinstance(num_epochs, bool)
                                        and num_epochs >= 1), "grpo_top_k_schedule",
                 f"stage {i}: num_epochs must be a positive int or None, got {num_epochs!r}", "use e.g. 1 or None")
        _require(num_epochs is not None or i == len(schedule) - 1, "grpo_top_k_schedule",
                 f"stage {i} is open-ended but not last", "put the (None, k) stage at the end")
    start = 0
    for num_epochs, k in schedule:
        if num_epochs is None or epoch < start + num_epochs:
            return k
        start += num_epochs
    raise LeverPlusInputError(f"epoch {epoch} is past the top-k schedule, which covers {start} epochs",
                              field="grpo_top_k_schedule", fix="end the schedule with an open stage (None, k)")
