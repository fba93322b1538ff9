"""RCE τ schedule (reference#temperature-schedule), adaptive KL β (reference#adaptive-kl), adaptive policy temperature, LR multiplier, GRPO top-k (reference#grpo-epoch).

Expected values are computed by hand in the comments.
"""

from __future__ import annotations

import math

import pytest
import torch

from leverplus.errors import LeverPlusInputError
from leverplus.training.schedules import (
    AdaptiveKLController,
    AdaptivePolicyTemperature,
    grpo_top_k,
    lr_multiplier,
    make_lr_scheduler,
    rce_temperature,
)


def test_rce_temperature_endpoints_midpoint_and_short_runs():
    assert rce_temperature(0, 100) == 2.0  # progress 0 -> start
    assert rce_temperature(99, 100) == pytest.approx(0.5)  # progress 99/99 = 1 -> end
    # T = 67: step 33 -> 33/66 = 0.5 -> 2.0 + (0.5 − 2.0)·0.5 = 1.25
    assert rce_temperature(33, 67) == pytest.approx(1.25)
    assert rce_temperature(500, 100) == pytest.approx(0.5)  # clipped at 1
    assert rce_temperature(-3, 100) == 2.0  # clipped at 0
    assert rce_temperature(0, 1) == 0.5 and rce_temperature(0, 0) == 0.5  # T <= 1 -> end
    # "scratch" 0.5 -> 0.1, T = 5, step 1: progress 1/4 -> 0.5 − 0.4·0.25 = 0.4
    assert rce_temperature(1, 5, start=0.5, end=0.1) == pytest.approx(0.4)
    with pytest.raises(LeverPlusInputError):
        rce_temperature(0, 10, start=0.0)


def test_kl_beta_up_down_unchanged():
    # kl 0.2 > 0.1 -> 0.1·1.5 = 0.15
    assert AdaptiveKLController(beta=0.1).update(0.2) == pytest.approx(0.15)
    # kl 0.005 < 0.01 -> 0.1/1.5 = 0.0666667
    assert AdaptiveKLController(beta=0.1).update(0.005) == pytest.approx(0.1 / 1.5)
    # inside [0.01, 0.1], including both boundaries (strict comparisons) -> unchanged
    for kl in (0.05, 0.1, 0.01):
        assert AdaptiveKLController(beta=0.1).update(kl) == pytest.approx(0.1)
    # three increases in a row: 0.1·1.5³ = 0.3375, and the attribute follows
    ctl = AdaptiveKLController(beta=0.1)
    for _ in range(3):
        ctl.update(1.0)
    assert ctl.beta == pytest.approx(0.3375)


def test_kl_beta_clamps_disabled_and_nan():
    assert AdaptiveKLController(beta=8.0).update(1.0) == 10.0  # 12 -> clipped to beta_max 10
    assert AdaptiveKLController(beta=0.0012).update(0.0) == pytest.approx(0.001)  # 0.0008 -> beta_min
    # the reference clips on every update: starting from β = 0 with an in-range KL gives beta_min
    assert AdaptiveKLController(beta=0.0).update(0.05) == pytest.approx(0.001)
    assert AdaptiveKLController(beta=0.1, enabled=False).update(5.0) == 0.1
    assert AdaptiveKLController(beta=0.1).update(float("nan")) == 0.1
    # custom bounds and factor: 0.5·2 = 1 -> clipped to 0.8
    assert AdaptiveKLController(beta=0.5, factor=2.0, beta_max=0.8).update(0.5) == pytest.approx(0.8)
    with pytest.raises(LeverPlusInputError):
        AdaptiveKLController(factor=1.0)


def test_adaptive_policy_temperature():
    # off by default: unchanged
    assert AdaptivePolicyTemperature().update(10.0) == 1.0
    # kl 0.2 > 0.1 -> 1·1.1 = 1.1 (softer); kl 0.001 < 0.01 -> 1/1.1 = 0.909091 (sharper)
    assert AdaptivePolicyTemperature(enabled=True).update(0.2) == pytest.approx(1.1)
    assert AdaptivePolicyTemperature(enabled=True).update(0.001) == pytest.approx(1 / 1.1)
    assert AdaptivePolicyTemperature(enabled=True).update(0.05) == 1.0
    # clip: 3.9·1.1 = 4.29 -> 4.0 ; 0.52/1.1 = 0.4727 -> 0.5
    assert AdaptivePolicyTemperature(init=3.9, enabled=True).update(1.0) == 4.0
    assert AdaptivePolicyTemperature(init=0.52, enabled=True).update(0.0) == 0.5
    with pytest.raises(LeverPlusInputError):
        AdaptivePolicyTemperature(init=10.0)


def test_lr_multiplier_warmup_and_cosine_points():
    # T = 100, warmup 0.1 -> W = ceil(10) = 10: warmup (step+1)/10
    assert lr_multiplier(0, 100) == pytest.approx(0.1)
    assert lr_multiplier(4, 100) == pytest.approx(0.5)
    assert lr_multiplier(9, 100) == pytest.approx(1.0)
    # cosine: progress = (step − 10)/90; step 10 -> 0 -> 1; step 55 -> 0.5 -> 0.5·(1 + cos(π/2)) = 0.5
    assert lr_multiplier(10, 100) == pytest.approx(1.0)
    assert lr_multiplier(55, 100) == pytest.approx(0.5)
    assert lr_multiplier(100, 100) == pytest.approx(0.0)  # progress 1 -> min_ratio 0
    assert lr_multiplier(500, 100) == pytest.approx(0.0)  # past the end stays at min_ratio
    # min_ratio 0.1 at step 55: 0.1 + 0.9·0.5 = 0.55
    assert lr_multiplier(55, 100, min_ratio=0.1) == pytest.approx(0.55)
    # T = 50, warmup 0.2 -> W = 10; step 20 -> progress 10/40 = 0.25 -> 0.5·(1 + cos(π/4)) = 0.853553
    assert lr_multiplier(20, 50, warmup_ratio=0.2) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    # ceil: T = 15, warmup 0.1 -> 1.5 -> W = 2: step 0 -> 1/2, step 1 -> 2/2
    assert lr_multiplier(0, 15) == pytest.approx(0.5) and lr_multiplier(1, 15) == pytest.approx(1.0)
    assert lr_multiplier(0, 100, warmup_ratio=0.0) == 1.0  # no warmup: cosine starts at 1
    assert lr_multiplier(37, 100, schedule="constant") == 1.0  # the reference behaviour
    with pytest.raises(LeverPlusInputError) as err:
        lr_multiplier(0, 100, schedule="linear")
    assert "warmup_cosine" in str(err.value) and "constant" in str(err.value)


def test_make_lr_scheduler_drives_an_optimizer():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make_lr_scheduler(opt, total_steps=20, warmup_ratio=0.1)  # W = 2, cosine over 18 steps
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # step 0: 1/2; step 1: 2/2; step 2: progress 0 -> 1; step 11: progress 9/18 = 0.5 -> 0.5
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0) and lrs[11] == pytest.approx(0.5)
    with pytest.raises(LeverPlusInputError):
        make_lr_scheduler(opt, total_steps=20, schedule="step")


def test_grpo_top_k_reference_and_custom_schedules():
    # reference ((1, 3), (None, 5)): epoch 0 -> 3, later -> 5
    assert [grpo_top_k(e) for e in range(4)] == [3, 5, 5, 5]
    sched = ((2, 3), (3, None), (None, 8))  # epochs 0-1 -> 3; 2-4 -> all (None); 5+ -> 8
    assert [grpo_top_k(e, sched) for e in range(7)] == [3, 3, None, None, None, 8, 8]
    assert grpo_top_k(0, ((None, None),)) is None
    with pytest.raises(LeverPlusInputError, match="past the top-k schedule"):
        grpo_top_k(1, ((1, 3),))
    with pytest.raises(LeverPlusInputError, match="not last"):
        grpo_top_k(0, ((None, 3), (1, 5)))
    with pytest.raises(LeverPlusInputError, match="positive int"):
        grpo_top_k(0, ((1, 0), (None, 5)))
