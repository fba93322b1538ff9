"""Tests for leverplus.stats: t and Wilson intervals, paired t-test, paired bootstrap, verdict, sign-flip test,
TOST and the four-way verdict, power/MDE, adaptive seed allocation, BH within families.
Hand values are worked out in the comments (t and z quantiles from tables or closed forms)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy import stats as sps

from leverplus.errors import LeverPlusInputError
from leverplus.evaluation.stats import (
    Estimate,
    MarginVerdict,
    PairedResult,
    bh_by_family,
    equivalence_test,
    family_labels,
    four_way_verdict,
    look_schedule,
    mde_paired,
    mean_ci,
    next_allocation,
    paired_bootstrap,
    paired_permutation_test,
    paired_t_test,
    paired_verdict,
    plan_from_pilot,
    power_paired,
    proportion_ci,
    seeds_needed,
    sign_flip_test,
    verdict,
)

T_4_975 = 2.7764451  # t quantile, df=4, 0.975
T_3_975 = 3.1824463  # df=3
T_1_95 = 6.3137515  # df=1, 0.95 (90% interval)
Z_975 = 1.9599640


# ----------------------------------------------------------------------------------------------------------
# mean_ci
# ----------------------------------------------------------------------------------------------------------


def test_mean_ci_by_hand():
    # [1..5]: mean 3, s = sqrt(10/4) = 1.5811388, se = s/sqrt(5) = 0.7071068, half = 2.7764451 * se = 1.9632432
    est = mean_ci([1, 2, 3, 4, 5])
    assert est.mean == 3.0 and est.n == 5
    assert est.std == pytest.approx(math.sqrt(2.5))
    assert est.lo == pytest.approx(3 - T_4_975 * math.sqrt(0.5), abs=1e-6)
    assert est.hi == pytest.approx(3 + T_4_975 * math.sqrt(0.5), abs=1e-6)
    assert est.lo == pytest.approx(1.0367568, abs=1e-6)


def test_mean_ci_other_confidence():
    # [0, 1], 90%: mean .5, s = sqrt(.5), se = .5, half = 6.3137515 * .5 = 3.1568758
    est = mean_ci([0.0, 1.0], confidence=0.90)
    assert (est.lo, est.hi) == pytest.approx((0.5 - T_1_95 / 2, 0.5 + T_1_95 / 2), abs=1e-6)


def test_mean_ci_single_value_and_errors():
    est = mean_ci([0.7])
    assert est.mean == 0.7 and est.n == 1
    assert math.isnan(est.lo) and math.isnan(est.hi) and math.isnan(est.std)
    with pytest.raises(LeverPlusInputError):
        mean_ci([])
    with pytest.raises(LeverPlusInputError, match="record 1"):
        mean_ci([1.0, float("nan")])
    with pytest.raises(LeverPlusInputError, match="confidence"):
        mean_ci([1.0, 2.0], confidence=95)
    with pytest.raises(LeverPlusInputError):
        mean_ci([[1.0, 2.0]])


def test_mean_ci_constant_values_has_zero_width():
    est = mean_ci([0.3, 0.3, 0.3])
    assert est.lo == pytest.approx(0.3) and est.hi == pytest.approx(0.3) and est.std == pytest.approx(0.0)


# ----------------------------------------------------------------------------------------------------------
# proportion_ci (Wilson)
# ----------------------------------------------------------------------------------------------------------


def test_wilson_8_of_10_by_hand():
    # p = .8, z^2/n = 3.8414588/10 = .38414588, centre = (.8 + .19207294)/1.38414588 = .7167401
    # half = 1.959964/1.38414588 * sqrt(.8*.2/10 + 3.8414588/400) = 1.4159951 * .1600113 = .2265776
    est = proportion_ci(8, 10)
    assert est.mean == 0.8 and est.n == 10
    assert est.lo == pytest.approx(0.4901625, abs=1e-6)
    assert est.hi == pytest.approx(0.9433178, abs=1e-6)
    assert est.std == pytest.approx(0.4)  # sqrt(.8 * .2)


def test_wilson_0_of_10_by_hand():
    # p = 0: centre = half = (z^2/2n)/(1 + z^2/n) -> lo = 0, hi = (z^2/n)/(1 + z^2/n) = .3841459/1.3841459
    est = proportion_ci(0, 10)
    assert est.lo == 0.0
    assert est.hi == pytest.approx(0.3841459 / 1.3841459, abs=1e-6)


def test_wilson_from_per_item_scores():
    # VQA scores [1, .3, .6, 0]: p = 1.9/4 = .475, n = 4 -> same as proportion_ci(1.9, 4)
    est = proportion_ci([1.0, 0.3, 0.6, 0.0])
    ref = proportion_ci(1.9, 4)
    assert est.mean == pytest.approx(0.475) and est.n == 4
    assert (est.lo, est.hi) == pytest.approx((ref.lo, ref.hi))
    z2n = Z_975**2 / 4
    centre = (0.475 + z2n / 2) / (1 + z2n)
    half = Z_975 / (1 + z2n) * math.sqrt(0.475 * 0.525 / 4 + Z_975**2 / 64)
    assert (est.lo, est.hi) == pytest.approx((centre - half, centre + half), abs=1e-6)
    # 0/1 scores give the same interval as the count form
    assert proportion_ci([1] * 8 + [0] * 2) == proportion_ci(8, 10)


def test_wilson_errors():
    with pytest.raises(LeverPlusInputError, match="record 1"):
        proportion_ci([0.5, 30.0])
    with pytest.raises(LeverPlusInputError):
        proportion_ci(11, 10)
    with pytest.raises(LeverPlusInputError):
        proportion_ci(3)
    with pytest.raises(LeverPlusInputError):
        proportion_ci(3, 0)
    with pytest.raises(LeverPlusInputError):
        proportion_ci([1, 0], 2)


# ----------------------------------------------------------------------------------------------------------
# paired_t_test
# ----------------------------------------------------------------------------------------------------------


def test_paired_t_by_hand_and_vs_scipy():
    a, b = [1, 2, 3, 4], [0, 0, 1, 1]
    # d = [1, 2, 2, 3]: mean 2, s = sqrt(2/3) = .8164966, se = .4082483, t = 4.8989795 (df 3)
    # CI = 2 -/+ 3.1824463 * .4082483 = [0.7007717, 3.2992283]
    r = paired_t_test(a, b)
    assert r.delta == 2.0 and r.n == 4 and r.method == "paired_t"
    assert (r.lo, r.hi) == pytest.approx((2 - T_3_975 * math.sqrt(2 / 3) / 2, 2 + T_3_975 * math.sqrt(2 / 3) / 2),
                                         abs=1e-6)
    ref = sps.ttest_rel(a, b)
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-10)
    assert r.p_value == pytest.approx(0.0162766, abs=1e-6)
    ci = ref.confidence_interval(0.95)
    assert (r.lo, r.hi) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert r.significant


def test_paired_t_matches_scipy_on_random_data():
    rng = np.random.default_rng(3)
    a = rng.normal(0.5, 0.2, size=50)
    b = a - rng.normal(0.02, 0.1, size=50)
    r = paired_t_test(a, b, confidence=0.9)
    ref = sps.ttest_rel(a, b)
    ci = ref.confidence_interval(0.9)
    assert r.delta == pytest.approx(float(np.mean(a - b)))
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert (r.lo, r.hi) == pytest.approx((ci.low, ci.high), rel=1e-9)


def test_paired_t_zero_and_constant_differences():
    r = paired_t_test([0.3, 0.6, 1.0], [0.3, 0.6, 1.0])
    assert (r.delta, r.lo, r.hi, r.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert not r.significant
    assert verdict(r) == "no significant difference"
    r = paired_t_test([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])  # every difference is .5
    assert (r.delta, r.lo, r.hi, r.p_value) == (0.5, 0.5, 0.5, 0.0)
    assert verdict(r) == "better"


def test_paired_t_errors_and_single_pair():
    with pytest.raises(LeverPlusInputError, match="length"):
        paired_t_test([1, 2], [1, 2, 3])
    with pytest.raises(LeverPlusInputError):
        paired_t_test([], [])
    r = paired_t_test([1.0], [0.0])
    assert r.delta == 1.0 and math.isnan(r.lo) and math.isnan(r.p_value) and not r.significant


# ----------------------------------------------------------------------------------------------------------
# paired_bootstrap
# ----------------------------------------------------------------------------------------------------------


def test_bootstrap_reproducible_with_seed():
    rng = np.random.default_rng(0)
    a, b = rng.random(60), rng.random(60)
    r1 = paired_bootstrap(a, b, n_boot=2000, seed=7)
    r2 = paired_bootstrap(a, b, n_boot=2000, seed=7)
    r3 = paired_bootstrap(a, b, n_boot=2000, seed=8)
    assert r1 == r2
    assert (r1.lo, r1.hi) != (r3.lo, r3.hi)
    assert r1.delta == r3.delta == pytest.approx(float(np.mean(a - b)))
    assert r1.method == "paired_bootstrap" and r1.n == 60


def test_bootstrap_two_point_by_hand():
    # d = [0, 1]: resampled means are 0 (p=1/4), .5 (1/2), 1 (1/4)
    # -> 2.5% / 97.5% percentiles are 0 and 1; P(mean <= 0) ~ .25, P(mean >= 0) = 1 -> p ~ 2 * .25 = .5
    r = paired_bootstrap([0.0, 1.0], [0.0, 0.0], n_boot=10000, seed=0)
    assert r.delta == 0.5
    assert (r.lo, r.hi) == (0.0, 1.0)
    assert r.p_value == pytest.approx(0.5, abs=0.03)
    assert not r.significant


def test_bootstrap_degenerate_differences():
    r = paired_bootstrap([0.3, 0.6], [0.3, 0.6], n_boot=500)
    assert (r.delta, r.lo, r.hi, r.p_value) == (0.0, 0.0, 0.0, 1.0)
    r = paired_bootstrap([1.0, 1.0, 1.0], [0.0, 0.0, 0.0], n_boot=500)
    assert (r.delta, r.lo, r.hi, r.p_value) == (1.0, 1.0, 1.0, 0.0)
    assert r.significant


def test_bootstrap_ci_covers_the_truth():
    # 40 data sets with true mean difference .1 (sd 1, n 100): the 95% CI should cover .1 in most of them
    # (expected ~38/40; < 33 would be very unlikely for a correct 95% interval).
    rng = np.random.default_rng(11)
    covered = 0
    for rep in range(40):
        d = rng.normal(0.1, 1.0, size=100)
        r = paired_bootstrap(d, np.zeros(100), n_boot=1000, seed=rep)
        covered += r.lo <= 0.1 <= r.hi
    assert covered >= 33


def test_bootstrap_agrees_with_t_interval_for_large_n():
    rng = np.random.default_rng(5)
    a = rng.normal(0.6, 0.3, size=400)
    b = a - rng.normal(0.05, 0.2, size=400)
    boot, t = paired_bootstrap(a, b, n_boot=4000, seed=1), paired_t_test(a, b)
    # both are ~ delta -/+ 1.96 * .2/sqrt(400) = delta -/+ .0196; endpoints agree to a few thousandths
    assert boot.lo == pytest.approx(t.lo, abs=3e-3) and boot.hi == pytest.approx(t.hi, abs=3e-3)
    assert boot.significant and t.significant and verdict(boot) == verdict(t) == "better"


def test_bootstrap_errors():
    with pytest.raises(LeverPlusInputError, match="n_boot"):
        paired_bootstrap([1, 2], [1, 2], n_boot=0)
    with pytest.raises(LeverPlusInputError, match="length"):
        paired_bootstrap([1, 2], [1])


# ----------------------------------------------------------------------------------------------------------
# verdict
# ----------------------------------------------------------------------------------------------------------


def test_verdict_strings():
    up = PairedResult(delta=0.1, lo=0.05, hi=0.15, p_value=0.01, n=100, method="paired_t")
    down = PairedResult(delta=-0.1, lo=-0.15, hi=-0.05, p_value=0.01, n=100, method="paired_t")
    flat = PairedResult(delta=0.02, lo=-0.01, hi=0.05, p_value=0.2, n=100, method="paired_t")
    touching = PairedResult(delta=0.02, lo=0.0, hi=0.04, p_value=0.05, n=100, method="paired_t")
    assert verdict(up) == "better" and verdict(up, better="lower") == "worse"
    assert verdict(down) == "worse" and verdict(down, better="lower") == "better"
    assert verdict(flat) == "no significant difference"
    assert not touching.significant and verdict(touching) == "no significant difference"
    with pytest.raises(LeverPlusInputError, match="better"):
        verdict(up, better="bigger")


def test_estimate_is_frozen():
    est = Estimate(mean=0.5, lo=0.4, hi=0.6, n=10, std=0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        est.mean = 0.7  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------------------
# sign-flip permutation test
# ----------------------------------------------------------------------------------------------------------


def test_sign_flip_exact_three_values_by_hand():
    # d = [1, 2, 3]: the 8 sign patterns give sums +-1 +-2 +-3 = 6, 4, 2, 0, 0, -2, -4, -6.
    # Observed sum 6 is the max: P(T >= 6) = 1/8, P(T <= 6) = 1 -> two-sided p = 2 * 1/8 = 0.25.
    assert sign_flip_test([1.0, 2.0, 3.0]) == pytest.approx(0.25, abs=1e-12)
    assert sign_flip_test([-1.0, -2.0, -3.0]) == pytest.approx(0.25, abs=1e-12)  # symmetric
    # d = [1, 2, -3]: sum 0; P(T >= 0) = 6/8 (6, 4, 2, 0, 0), P(T <= 0) = 5/8 -> p = min(1, 2 * 5/8) = 1
    assert sign_flip_test([1.0, 2.0, -3.0]) == 1.0
    # d = [1, 2, 3, 4] (16 patterns, sums of +-1..4 range -10..10): observed 10 is the unique max -> p = 2/16
    assert sign_flip_test([1.0, 2.0, 3.0, 4.0]) == pytest.approx(0.125, abs=1e-12)
    # d = [3, 2, 1, -1]: observed sum 5. Flipping a subset F gives 5 - 2 * sum(F), which is >= 5 iff sum(F) <= 0:
    # F = {} (0), {-1} (-1), {1, -1} (0) -> P(T >= 5) = 3/16 (and P(T <= 5) = 14/16) -> p = 2 * 3/16 = 0.375
    assert sign_flip_test([3.0, 2.0, 1.0, -1.0]) == pytest.approx(0.375, abs=1e-12)


def test_sign_flip_zeros_and_ties_by_hand():
    # d = [0, 1, 1]: the zero's sign does not matter, so the 8 patterns give sums 2, 0, 0, -2 twice each.
    # observed 2: P(T >= 2) = 2/8 -> p = 2 * 2/8 = 0.5
    assert sign_flip_test([0.0, 1.0, 1.0]) == pytest.approx(0.5, abs=1e-12)
    # all zero: every pattern ties the observed 0 -> p = 1
    assert sign_flip_test([0.0, 0.0, 0.0, 0.0]) == 1.0
    # ties in floating point: 0.1 + 0.2 vs 0.3 must count as a tie (scipy's relative tolerance).
    # d = [0.1, 0.2, 0.3]: sums 0.6, 0.4, 0.2, 0.0 (= 0.3 - 0.1 - 0.2 and -0.3 + 0.1 + 0.2), ... -> max at 0.6 -> .25
    assert sign_flip_test([0.1, 0.2, 0.3]) == pytest.approx(0.25, abs=1e-12)
    # ten equal differences: only the all-plus pattern reaches the observed sum -> p = 2 / 2^10
    assert sign_flip_test([0.5] * 10) == pytest.approx(2 / 1024, abs=1e-15)


def test_sign_flip_exact_matches_full_enumeration():
    rng = np.random.default_rng(2)
    d = np.round(rng.normal(0.3, 1.0, size=9), 1)  # rounding creates ties
    signs = np.array(np.meshgrid(*[[-1, 1]] * 9)).reshape(9, -1).T  # all 512 patterns
    null = signs @ d
    obs = d.sum()
    tol = 1e-9
    p = min(1.0, 2 * min(np.mean(null <= obs + tol), np.mean(null >= obs - tol)))
    assert sign_flip_test(d) == pytest.approx(p, abs=1e-12)


def test_sign_flip_monte_carlo_agrees_with_scipy_and_t():
    rng = np.random.default_rng(4)
    d = rng.normal(0.08, 1.0, size=400)
    p_mc = sign_flip_test(d, n_resamples=20000, seed=1)
    ref = sps.permutation_test((d,), lambda x, axis: np.mean(x, axis=axis), permutation_type="samples",
                               vectorized=True, n_resamples=20000, rng=np.random.default_rng(1), batch=500)
    # both are Monte Carlo estimates of the same p (~0.1): sd ~ sqrt(.1 * .9 / 20000) ~ .002 each
    assert p_mc == pytest.approx(ref.pvalue, abs=0.015)
    assert p_mc == pytest.approx(sps.ttest_1samp(d, 0.0).pvalue, abs=0.02)  # randomisation ~ t for large n
    assert sign_flip_test(d, n_resamples=2000, seed=3) == sign_flip_test(d, n_resamples=2000, seed=3)
    # a huge effect: no resample reaches it, p = (0 + 1) / (R + 1) * 2
    assert sign_flip_test(np.full(50, 1.0) + rng.normal(0, 0.01, 50), n_resamples=999) == pytest.approx(2 / 1000)


def test_sign_flip_is_calibrated_at_small_n():
    # Under H0 (symmetric differences), P(p <= .05) must not exceed .05. With n = 6 the exact test's attainable
    # levels are multiples of 2/64, so P(p <= .05) = P(p <= 2/64) = 2/64 = .03125 exactly (only the two extreme
    # patterns, when all |d| are distinct). Check by simulation: 2000 data sets -> ~62 rejections (sd ~ 8).
    rng = np.random.default_rng(9)
    rejections = sum(sign_flip_test(rng.normal(0, 1, 6)) <= 0.05 for _ in range(2000))
    assert 30 <= rejections <= 100


def test_paired_permutation_test_result():
    a, b = [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]
    r = paired_permutation_test(a, b, n_boot=2000, seed=5)
    boot = paired_bootstrap(a, b, n_boot=2000, seed=5)
    assert (r.delta, r.lo, r.hi, r.n) == (boot.delta, boot.lo, boot.hi, boot.n)  # interval = bootstrap's
    assert r.p_value == pytest.approx(0.125)  # d = [1, 2, 3, 4]: 2/16, see above
    assert r.method == "sign_flip_exact"
    big = paired_permutation_test(np.arange(40.0), np.arange(40.0) - 1.0, n_boot=200, n_resamples=999)
    assert big.method == "sign_flip_mc" and big.p_value == pytest.approx(2 / 1000)
    with pytest.raises(LeverPlusInputError, match="length"):
        paired_permutation_test([1.0, 2.0], [1.0])
    with pytest.raises(LeverPlusInputError, match="max_exact"):
        sign_flip_test([1.0, 2.0], max_exact=30)
    with pytest.raises(LeverPlusInputError, match="n_resamples"):
        sign_flip_test([1.0, 2.0], n_resamples=0)


# ----------------------------------------------------------------------------------------------------------
# equivalence (TOST) and the four-way verdict
# ----------------------------------------------------------------------------------------------------------
# With df = 2 the t distribution has closed forms: F(t) = 1/2 + t / (2 sqrt(2 + t^2)) and, for a = 2p - 1,
# t_p = sqrt(2 a^2 / (1 - a^2)): t_{2,.95} = sqrt(2 * .81 / .19) = 2.9199856, t_{2,.975} = sqrt(2 * .9025 / .0975)
# = 4.3026527. d = [1, 2, 3]: mean 2, sd 1, se = 1/sqrt(3) = .5773503.
T_2_95 = math.sqrt(2 * 0.81 / 0.19)
T_2_975 = math.sqrt(2 * 0.9025 / 0.0975)
SE_123 = 1 / math.sqrt(3)


def _t2_cdf(t):
    return 0.5 + t / (2 * math.sqrt(2 + t * t))


def test_tost_by_hand_df2():
    assert T_2_95 == pytest.approx(sps.t.ppf(0.95, 2), rel=1e-12)  # the closed form is right
    # margin 5: 90% CI = 2 -/+ 2.9199856 * .5773503 = 2 -/+ 1.6858545 = [.3141455, 3.6858545], inside (-5, 5)
    # p_upper = F((2 - 5)/se = -5.1961524) = .5 - 5.1961524 / (2 sqrt 29) = .5 - .4824506 = .0175494
    # p_lower = 1 - F((2 + 5)/se = 12.124356) = .5 - 12.124356 / (2 sqrt 149) = .5 - .4966330 = .0033670
    r = equivalence_test([1.0, 2.0, 3.0], margin=5.0)
    assert (r.delta, r.n, r.margin, r.alpha) == (2.0, 3, 5.0, 0.05)
    assert (r.lo, r.hi) == pytest.approx((2 - T_2_95 * SE_123, 2 + T_2_95 * SE_123), abs=1e-12)
    assert (r.lo, r.hi) == pytest.approx((0.3141455, 3.6858545), abs=1e-7)
    assert r.p_upper == pytest.approx(_t2_cdf(-3 / SE_123), abs=1e-12) == pytest.approx(0.0175494, abs=1e-7)
    assert r.p_lower == pytest.approx(1 - _t2_cdf(7 / SE_123), abs=1e-12) == pytest.approx(0.0033670, abs=1e-7)
    assert r.p_value == r.p_upper and r.equivalent
    # margin 3: hi = 3.686 > 3; p_upper = F(-1.7320508) = .5 - 1.7320508 / (2 sqrt 5) = .1127017 > .05
    r3 = equivalence_test([1.0, 2.0, 3.0], margin=3.0)
    assert r3.p_upper == pytest.approx(0.1127017, abs=1e-7) and not r3.equivalent
    # the summary form gives the same numbers
    assert equivalence_test(mean_ci([1.0, 2.0, 3.0]), margin=5.0) == r


def test_tost_margin_edge_is_strict():
    # the margin at which the 90% CI touches it: m* = 2 + 2.9199856 / sqrt(3) = 3.6858545; there p_upper = .05
    m_star = 2 + T_2_95 * SE_123
    assert equivalence_test([1.0, 2.0, 3.0], m_star).p_upper == pytest.approx(0.05, abs=1e-12)
    assert equivalence_test([1.0, 2.0, 3.0], m_star * (1 + 1e-9)).equivalent
    assert not equivalence_test([1.0, 2.0, 3.0], m_star * (1 - 1e-9)).equivalent
    # the CI form and the TOST p form agree (away from floating-point ties at the edge)
    rng = np.random.default_rng(8)
    for _ in range(200):
        d = rng.normal(rng.normal(0, 0.5), 1.0, size=int(rng.integers(2, 12)))
        r = equivalence_test(d, margin=0.8, alpha=0.1)
        assert r.equivalent == (r.p_value < 0.1)


def test_tost_degenerate_cases():
    r = equivalence_test([0.2], margin=0.5)  # one seed: nothing can be claimed
    assert math.isnan(r.lo) and math.isnan(r.p_value) and not r.equivalent
    r = equivalence_test([0.2, 0.2, 0.2], margin=0.5)  # no spread: [0.2, 0.2] inside (-.5, .5)
    assert (r.lo, r.hi, r.p_lower, r.p_upper) == (0.2, 0.2, 0.0, 0.0) and r.equivalent
    r = equivalence_test([0.5, 0.5], margin=0.5)  # touching the margin exactly is not equivalent
    assert r.p_upper == 1.0 and not r.equivalent
    with pytest.raises(LeverPlusInputError, match="margin"):
        equivalence_test([1.0, 2.0], margin=0.0)
    with pytest.raises(LeverPlusInputError, match="alpha"):
        equivalence_test([1.0, 2.0], margin=1.0, alpha=0.5)


def test_four_way_verdict_rules_by_hand():
    m = 0.5
    assert four_way_verdict((0.1, 0.9), (0.2, 0.8), m) == "better"  # 95% CI above 0
    assert four_way_verdict((0.1, 0.9), (0.2, 0.8), m, better="lower") == "worse"
    assert four_way_verdict((-0.9, -0.1), (-0.8, -0.2), m) == "worse"
    assert four_way_verdict((-0.3, 0.3), (-0.2, 0.2), m) == "equivalent"  # 90% CI inside (-.5, .5)
    assert four_way_verdict((-0.8, 1.2), (-0.6, 1.0), m) == "inconclusive"  # includes 0, not inside
    # a significant but tiny difference is still a difference (rule 2 before rule 3)
    assert four_way_verdict((0.1, 0.3), (0.12, 0.28), m) == "better"
    # 95% CI touching 0 is not a difference
    assert four_way_verdict((0.0, 0.4), (0.05, 0.35), m) == "equivalent"
    assert four_way_verdict((0.0, 0.7), (0.05, 0.6), m) == "inconclusive"


def test_four_way_verdict_margin_edge_and_p_value():
    m = 0.5
    # the 90% CI touching -margin (or +margin) exactly: strict inequality -> not equivalent
    assert four_way_verdict((-0.6, 0.3), (-0.5, 0.2), m) == "inconclusive"
    assert four_way_verdict((-0.3, 0.6), (-0.2, 0.5), m) == "inconclusive"
    assert four_way_verdict((-0.6, 0.3), (-0.4999999, 0.2), m) == "equivalent"
    # the CI excludes 0 but the (calibrated) test does not reject: no difference is claimed
    assert four_way_verdict((0.01, 0.4), (0.05, 0.35), m, p_value=0.06) == "equivalent"
    assert four_way_verdict((0.01, 0.9), (0.05, 0.8), m, p_value=0.06) == "inconclusive"
    assert four_way_verdict((0.01, 0.9), (0.05, 0.8), m, p_value=0.04) == "better"
    assert four_way_verdict((0.01, 0.9), (0.05, 0.8), m, p_value=0.04, alpha=0.01) == "inconclusive"
    assert four_way_verdict((math.nan, math.nan), (math.nan, math.nan), m) == "inconclusive"
    with pytest.raises(LeverPlusInputError, match="lo > hi"):
        four_way_verdict((0.3, 0.1), (0.2, 0.25), m)
    with pytest.raises(LeverPlusInputError, match="better"):
        four_way_verdict((0.1, 0.3), (0.2, 0.25), m, better="more")


def test_paired_verdict_by_hand_df2():
    # d = [1, 2, 3]: 95% CI = 2 -/+ 4.3026527 * .5773503 = 2 -/+ 2.4841377 = [-.4841377, 4.4841377] includes 0.
    # t = 2 / .5773503 = 3.4641016, p = 2 (1 - F(3.4641016)) = 2 (.5 - 3.4641016 / (2 sqrt 14)) = .0741799
    v = paired_verdict([1.0, 2.0, 3.0], margin=5.0)
    assert (v.lo, v.hi) == pytest.approx((2 - T_2_975 * SE_123, 2 + T_2_975 * SE_123), abs=1e-12)
    assert (v.lo, v.hi) == pytest.approx((-0.4841377, 4.4841377), abs=1e-7)
    assert v.p_value == pytest.approx(0.0741799, abs=1e-7)
    assert (v.eq_lo, v.eq_hi) == pytest.approx((0.3141455, 3.6858545), abs=1e-7)  # see test_tost_by_hand_df2
    assert v.verdict == "equivalent" and v.n == 3 and v.alpha == 0.05
    v3 = paired_verdict([1.0, 2.0, 3.0], margin=3.0)
    assert v3.verdict == "inconclusive"
    assert v3.describe() == ("inconclusive after 3 seeds: 95% CI [-0.48, +4.48] includes 0; "
                             "90% CI [+0.31, +3.69] not inside ±3.00")
    # d = [2, 3, 4]: 95% CI = 3 -/+ 2.4841377 = [.5158623, 5.4841377] excludes 0 -> better;
    # p = 2 (.5 - 5.1961524 / (2 sqrt 29)) = .0350988 (as paired_t_test / scipy)
    up = paired_verdict([2.0, 3.0, 4.0], margin=3.0)
    assert up.verdict == "better" and up.p_value == pytest.approx(0.0350988, abs=1e-7)
    assert up.p_value == pytest.approx(paired_t_test([2.0, 3.0, 4.0], [0.0, 0.0, 0.0]).p_value, rel=1e-12)
    assert paired_verdict([2.0, 3.0, 4.0], margin=3.0, better="lower").verdict == "worse"
    assert up.describe(scale=100, unit="pp").startswith("better after 3 seeds: 95% CI [+51.59, +548.41] pp excludes 0")
    # corrected alpha .0125 (4 looks): the 98.75% CI is wider, t_{2,.99375} = sqrt(2 a^2/(1-a^2)), a = .9875
    # -> t = 8.8602, half = 5.1155 -> [-2.12, 8.12] includes 0 -> no longer "better"
    a = 0.9875
    t_corr = math.sqrt(2 * a * a / (1 - a * a))
    corr = paired_verdict([2.0, 3.0, 4.0], margin=3.0, alpha=0.0125)
    assert corr.lo == pytest.approx(3 - t_corr * SE_123, abs=1e-9) and corr.verdict == "inconclusive"
    assert corr.describe().startswith("inconclusive after 3 seeds: 98.75% CI [-2.12, +8.12] includes 0; 97.5% CI")
    one = paired_verdict([0.1], margin=0.5)
    assert one.verdict == "inconclusive"
    assert one.describe() == "inconclusive after 1 seed: too few seeds for an interval"


# ----------------------------------------------------------------------------------------------------------
# power and minimum detectable effect
# ----------------------------------------------------------------------------------------------------------
Z_80 = 0.8416212  # Phi^{-1}(.8)


def _t_power_by_quadrature(d, n, alpha=0.05):
    """Power of the two-sided one-sample t-test at standardized effect d, without the noncentral t: condition on
    V ~ chi2(df): T' = (Z + d sqrt(n)) / sqrt(V/df) > c  <=>  Z > c sqrt(V/df) - d sqrt(n)."""
    from scipy import integrate

    df, ncp = n - 1, d * math.sqrt(n)
    c = sps.t.ppf(1 - alpha / 2, df)

    def f(v):
        s = c * math.sqrt(v / df)
        return (sps.norm.cdf(ncp - s) + sps.norm.cdf(-s - ncp)) * sps.chi2.pdf(v, df)

    return integrate.quad(f, 0, np.inf, epsabs=1e-13, epsrel=1e-12)[0]


def test_mde_z_by_hand():
    # (z_.975 + z_.8) / sqrt(100) = (1.959964 + .841621) / 10 = .2801585
    assert mde_paired(1.0, 100, test="z") == pytest.approx((Z_975 + Z_80) / 10, abs=1e-7)
    assert mde_paired(1.0, 100, test="z") == pytest.approx(0.2801585, abs=1e-7)
    assert mde_paired(0.02, 100, test="z") == pytest.approx(0.02 * 0.2801585, abs=1e-9)  # linear in sd
    # power at that effect: Phi(2.801585 - 1.959964) + Phi(-2.801585 - 1.959964) = .8 + Phi(-4.76155) = .8 + 9.6e-7
    assert power_paired(0.2801585, 1.0, 100, test="z") == pytest.approx(0.8 + 9.6e-7, abs=1e-7)
    assert power_paired(0.0, 1.0, 100, test="z") == pytest.approx(0.05, abs=1e-12)  # no effect: power = alpha


def test_mde_t_textbook_n10_verified_independently():
    # n = 10 paired, alpha .05 two-sided, power .8: d_z = 0.99600 (~0.99-1.00 in power tables; a quoted 0.9940 is
    # not reproduced). Verified two ways that do not use scipy.stats.nct: the chi-square quadrature below gives
    # power .8000000 at d = .9960014, and a 400 000-replicate simulation of t-tests on N(.9960014, 1) samples of
    # size 10 (numpy seed 0) rejected in 80.0008% of them (MC sd .06%).
    d = mde_paired(1.0, 10)
    assert d == pytest.approx(0.9960014, abs=1e-7)
    assert _t_power_by_quadrature(d, 10) == pytest.approx(0.8, abs=1e-8)
    assert _t_power_by_quadrature(0.99, 10) < 0.8 < _t_power_by_quadrature(1.0, 10)


def test_mde_t_inverts_power_and_exceeds_z():
    for n in (2, 3, 5, 10, 30, 200):
        for alpha, power in ((0.05, 0.8), (0.0125, 0.9)):
            m = mde_paired(0.5, n, alpha=alpha, power=power)
            assert power_paired(m, 0.5, n, alpha=alpha) == pytest.approx(power, abs=1e-9)
            assert m > mde_paired(0.5, n, alpha=alpha, power=power, test="z")
    # few seeds cost a lot: n = 3 -> 3.264 sd (t) vs 1.617 sd (z = 2.8015852 / sqrt 3)
    assert mde_paired(1.0, 3) == pytest.approx(3.2640435, abs=1e-6)
    assert mde_paired(1.0, 3, test="z") == pytest.approx(2.8015852 / math.sqrt(3), abs=1e-7)
    # large n: t -> z (n = 1000: .0886791 vs .0885939)
    assert mde_paired(1.0, 1000) == pytest.approx(mde_paired(1.0, 1000, test="z"), rel=2e-3)
    assert power_paired(0.3, 1.0, 10) == power_paired(-0.3, 1.0, 10)  # two-sided: symmetric in the effect


def test_power_edge_cases_and_errors():
    assert mde_paired(0.0, 5) == 0.0
    assert power_paired(0.1, 0.0, 5) == 1.0 and power_paired(0.0, 0.0, 5) == 0.05
    assert power_paired(0.0, 1.0, 5) == pytest.approx(0.05, abs=1e-12)
    with pytest.raises(LeverPlusInputError, match="'n'"):
        mde_paired(1.0, 1)  # a t-test needs 2 seeds
    assert mde_paired(1.0, 1, test="z") == pytest.approx(2.8015852, abs=1e-7)
    with pytest.raises(LeverPlusInputError, match="test"):
        mde_paired(1.0, 5, test="wilcoxon")
    with pytest.raises(LeverPlusInputError, match="power"):
        mde_paired(1.0, 5, power=0.01)
    with pytest.raises(LeverPlusInputError, match="sd"):
        power_paired(0.1, -1.0, 5)


def test_seeds_needed_by_hand():
    # sd 1: mde(9) = 1.0669732 > 1 >= mde(10) = .9960014 -> 10 seeds for a target of 1 sd
    assert seeds_needed(1.0, 1.0) == 10
    assert seeds_needed(0.9960013, 1.0) == 11  # just below mde(10)
    assert seeds_needed(100.0, 1.0) == 2  # the minimum for a t-test
    # brute force agrees on a few targets
    for target in (0.3, 0.5, 2.0):
        brute = next(n for n in range(2, 1000) if mde_paired(1.0, n) <= target)
        assert seeds_needed(target, 1.0) == brute
    # z gives n >= (2.8015852 / .1)^2 = 784.9 -> 785; the t-test needs a couple more
    assert seeds_needed(0.1, 1.0) == next(n for n in range(785, 800) if mde_paired(1.0, n) <= 0.1)
    with pytest.raises(LeverPlusInputError, match="target_mde"):
        seeds_needed(0.0, 1.0)


def test_plan_from_pilot_by_hand():
    # seed-level sds .006 and .008 pool (rms) to sqrt((.006^2 + .008^2)/2) = sqrt(5e-5) = .0070711;
    # 3 seeds: mde = 3.2640435 * .0070711 = .0230803 (2.3 accuracy points).
    # per-query sds .4 and .3 pool to sqrt(.125) = .3535534; 500 queries x 3 seeds = 1500 pairs:
    # mde = 2.8015852 * .3535534 / sqrt(1500) = 2.8015852 * .3535534 / 38.729833 = .0255749
    plan = plan_from_pilot([0.006, 0.008], n_seeds=3, query_sds=[0.4, 0.3], n_queries=500, target_mde=0.005)
    assert plan.seed_sd == pytest.approx(math.sqrt(5e-5)) and plan.query_sd == pytest.approx(math.sqrt(0.125))
    assert plan.mde_seed == pytest.approx(3.2640435 * math.sqrt(5e-5), rel=1e-7)
    assert plan.mde_seed == pytest.approx(0.0230803, abs=1e-7)
    assert plan.mde_query == pytest.approx(0.0255749, abs=1e-7)
    # target .005 = .70711 sd: z says (2.8015852 / .70711)^2 = 15.7 -> 16; the t-test needs 18
    assert plan.seeds_needed == seeds_needed(0.005, math.sqrt(5e-5)) == 18
    assert mde_paired(math.sqrt(5e-5), 17) > 0.005 >= mde_paired(math.sqrt(5e-5), 18)
    worst = plan_from_pilot([0.006, 0.008], n_seeds=3, pool="max")
    assert worst.seed_sd == 0.008 and math.isnan(worst.mde_query) and worst.seeds_needed is None
    assert plan_from_pilot(0.01, n_seeds=5).mde_seed == pytest.approx(0.01 * 1.6819970, rel=1e-6)
    with pytest.raises(LeverPlusInputError, match="n_queries"):
        plan_from_pilot([0.01], n_seeds=3, query_sds=[0.3])
    with pytest.raises(LeverPlusInputError, match="pool"):
        plan_from_pilot([0.01], n_seeds=3, pool="mean")


# ----------------------------------------------------------------------------------------------------------
# adaptive seed allocation
# ----------------------------------------------------------------------------------------------------------
# Schedule (3, 5, 7): K = 3 looks, alpha per look = .05 / 3 = .0166667, so the CIs read at each look are the
# 98.33% (difference) and 96.67% (equivalence) intervals. Margin .005 = 0.50 accuracy points.
A3 = 0.05 / 3


def _mv(lo, hi, eq_lo, eq_hi, n, margin=0.005, alpha=A3):
    """A hand-specified look result; its verdict is read by the rules of four_way_verdict."""
    v = four_way_verdict((lo, hi), (eq_lo, eq_hi), margin, alpha=alpha)
    return MarginVerdict(v, (lo + hi) / 2, lo, hi, eq_lo, eq_hi, math.nan, margin, alpha, n)


def test_look_schedule():
    assert look_schedule(3, 2, 9) == (3, 5, 7, 9)
    assert look_schedule(3, 2, 8) == (3, 5, 7, 8)  # max_seeds is always the last look
    assert look_schedule(4, 4, 4) == (4,)
    with pytest.raises(LeverPlusInputError, match="initial_seeds"):
        look_schedule(1, 2, 9)
    with pytest.raises(LeverPlusInputError, match="max_seeds"):
        look_schedule(5, 2, 3)


def test_allocation_scripted_three_rounds():
    kw = {"margin": 0.005, "initial_seeds": 3, "step": 2, "max_seeds": 7}
    # round 1 (every arm at 3 seeds; 9 of the 16 runs spent, 7 left):
    #   A: CI [.2, 1.2] pp excludes 0 -> better, stop;  B: CI [-.8, 1.2] includes 0, equivalence CI [-.6, 1.0]
    #   not inside +-.5 -> inconclusive, +2;  C: [-1.0, .4] / [-.8, .2] -> inconclusive, +2.  7 - 4 = 3 left.
    r1 = {"A": _mv(0.002, 0.012, 0.003, 0.011, 3), "B": _mv(-0.008, 0.012, -0.006, 0.010, 3),
          "C": _mv(-0.010, 0.004, -0.008, 0.002, 3)}
    p1 = next_allocation(r1, 16, **kw)
    assert p1.schedule == (3, 5, 7) and p1.alpha_per_look == pytest.approx(A3)
    assert {a: (x.verdict, x.add) for a, x in p1.arms.items()} == {
        "A": ("better", 0), "B": ("inconclusive", 2), "C": ("inconclusive", 2)}
    assert p1.budget_left == 3 and p1.baseline_seeds == 5 and not p1.done
    assert p1.arms["B"].reason == ("inconclusive after 3 seeds: 98.33% CI [-0.80, +1.20] pp includes 0; 96.67% CI "
                                   "[-0.60, +1.00] pp not inside ±0.50 pp (look 1 of 3, alpha 0.0167 per look); "
                                   "+2 seeds for look 2")
    assert p1.arms["A"].reason == ("better after 3 seeds: 98.33% CI [+0.20, +1.20] pp excludes 0; "
                                   "stop (look 1 of 3, alpha 0.0167 per look)")
    # round 2 (A 3, B 5, C 5: 13 spent, 3 left): B's equivalence CI [-.2, .3] is inside +-.5 -> equivalent, stop;
    #   C: [-.9, .1] / [-.8, -.1] -> inconclusive, +2 (1 left).
    r2 = {"A": r1["A"], "B": _mv(-0.003, 0.004, -0.002, 0.003, 5), "C": _mv(-0.009, 0.001, -0.008, -0.001, 5)}
    p2 = next_allocation(r2, 16, **kw)
    assert {a: (x.verdict, x.add, x.look) for a, x in p2.arms.items()} == {
        "A": ("better", 0, 1), "B": ("equivalent", 0, 2), "C": ("inconclusive", 2, 2)}
    assert p2.budget_left == 1 and p2.arms["C"].reason.endswith("+2 seeds for look 3")
    # round 3 (C at 7 = max_seeds): still inconclusive -> stop; nothing more is allocated
    r3 = {**r2, "C": _mv(-0.007, 0.0005, -0.0062, -0.0008, 7)}
    p3 = next_allocation(r3, 16, **kw)
    assert p3.arms["C"].verdict == "inconclusive" and p3.arms["C"].add == 0
    assert p3.arms["C"].reason.endswith("at the maximum of 7 seeds, stop (look 3 of 3, alpha 0.0167 per look)")
    assert p3.done and p3.total_add == 0 and p3.budget_left == 1


def test_allocation_budget_and_pending_arms():
    kw = {"margin": 0.005, "initial_seeds": 3, "step": 2, "max_seeds": 7}
    r = {"A": _mv(0.002, 0.012, 0.003, 0.011, 3), "B": _mv(-0.008, 0.012, -0.006, 0.010, 3),
         "C": _mv(-0.010, 0.004, -0.008, 0.002, 3)}
    # budget 11: 9 spent, 2 left -> B (first in input order among the 3-seed arms) +2, C gets nothing
    p = next_allocation(r, 11, **kw)
    assert (p.arms["B"].add, p.arms["C"].add, p.budget_left) == (2, 0, 0)
    assert p.arms["C"].reason.endswith("needs +2 for look 2 but the budget has 0 seed run(s) left")
    # fewest seeds first: a not-started arm D (0 seeds) is served before B and C; an arm with 4 seeds (a failed run
    # between looks) is topped up to 5 with no verdict read. Budget 20 - (3+3+3+0+4 = 13) = 7: D +3, B +2, C +2,
    # E (4 seeds) needs 1 but 0 are left.
    r2 = {**r, "D": [], "E": [0.001, 0.002, 0.0, 0.001]}
    p2 = next_allocation(r2, 20, **kw)
    assert [(a, x.add) for a, x in p2.arms.items()] == [("A", 0), ("B", 2), ("C", 2), ("D", 3), ("E", 0)]
    assert p2.arms["D"].verdict == "pending" and p2.arms["D"].reason == ("not started: first look at 3 seeds; "
                                                                         "+3 seeds to reach 3")
    assert p2.arms["E"].verdict == "pending" and p2.arms["E"].result is None
    assert p2.arms["E"].reason.startswith("4 seeds is not a planned look (3, 5, 7): no verdict read; needs +1")
    p3 = next_allocation(r2, 21, **kw)
    assert p3.arms["E"].add == 1 and p3.arms["E"].reason.endswith("+1 seed to reach 5")


def test_allocation_from_differences_by_hand():
    # A: d = [.010, .011, .012] (mean .011, sd .001). At alpha/3 the CI uses t_{2, 1 - 1/120}: a = 1 - 1/60 =
    # .9833333, t = sqrt(2 a^2 / (1 - a^2)) = sqrt(58.5042) = 7.6488; half = 7.6488 * .001 / sqrt 3 = .0044160
    # -> [.006584, .015416] excludes 0 -> better.  B: d = [.01, -.01, 0]: mean 0, sd .01 -> inconclusive, +2.
    a = 1 - 1 / 60
    half = math.sqrt(2 * a * a / (1 - a * a)) * 0.001 / math.sqrt(3)
    p = next_allocation({"A": [0.010, 0.011, 0.012], "B": [0.01, -0.01, 0.0]}, 10, margin=0.005, max_seeds=7)
    assert p.arms["A"].verdict == "better" and p.arms["A"].add == 0
    assert (p.arms["A"].result.lo, p.arms["A"].result.hi) == pytest.approx((0.011 - half, 0.011 + half), abs=1e-12)
    assert p.arms["A"].reason.startswith("better after 3 seeds: 98.33% CI [+0.66, +1.54] pp excludes 0")
    assert p.arms["B"].verdict == "inconclusive" and p.arms["B"].add == 2 and p.budget_left == 2
    # the direction follows `better`: for a loss, the same differences are "worse"
    assert next_allocation({"A": [0.010, 0.011, 0.012]}, 10, margin=0.005, max_seeds=7,
                           better="lower").arms["A"].verdict == "worse"


def test_allocation_refuses_uncorrected_or_inconsistent_input():
    kw = {"margin": 0.005, "initial_seeds": 3, "step": 2, "max_seeds": 7}
    with pytest.raises(LeverPlusInputError, match="alpha"):  # read at .05, the design allows .0167 per look
        next_allocation({"A": _mv(0.002, 0.012, 0.003, 0.011, 3, alpha=0.05)}, 16, **kw)
    with pytest.raises(LeverPlusInputError, match="margin"):
        next_allocation({"A": _mv(0.002, 0.012, 0.003, 0.011, 3, margin=0.01)}, 16, **kw)
    with pytest.raises(LeverPlusInputError, match="max_seeds"):
        next_allocation({"A": [0.0] * 8}, 16, **kw)
    with pytest.raises(LeverPlusInputError, match="budget"):
        next_allocation({"A": [0.0] * 3}, -1, **kw)


def test_allocation_error_rates_by_simulation():
    # The stated guarantee: with K = 4 looks at alpha/4 each, P(any false better/worse | true delta = 0) <= .05
    # and P(false equivalent | |delta| = margin) <= .05. Simulate 600 sequential sweeps of one arm each
    # (normal seed differences, sd 1, margin .5, schedule 3, 5, 7, 9) and run the allocation rule to its end.
    def run(mean, rng):
        d = list(rng.normal(mean, 1.0, 9))
        n = 3
        while True:
            arm = next_allocation({"x": d[:n]}, 9, margin=0.5).arms["x"]
            if arm.add == 0:
                return arm.verdict
            n += arm.add

    rng = np.random.default_rng(21)
    null = [run(0.0, rng) for _ in range(600)]
    assert sum(v in ("better", "worse") for v in null) <= 0.05 * 600 + 3 * math.sqrt(0.05 * 0.95 * 600)  # <= 46
    at_margin = [run(0.5, rng) for _ in range(600)]
    assert sum(v == "equivalent" for v in at_margin) <= 46


# ----------------------------------------------------------------------------------------------------------
# Benjamini-Hochberg within families
# ----------------------------------------------------------------------------------------------------------


def test_bh_one_family_by_hand():
    # p = [.01, .04, .03, .20], m = 4. Sorted .01, .03, .04, .20 -> m p / rank = .04, .06, .0533, .20;
    # running minimum from the top: .20, .0533, .0533, .04 -> back in input order [.04, .0533, .0533, .20]
    q = bh_by_family([0.01, 0.04, 0.03, 0.20])
    assert q == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.20], abs=1e-12)
    assert list(bh_by_family([0.01, 0.04, 0.03, 0.20], ["x"] * 4)) == list(q)
    # one family is what compare.py's q column computes (scipy's BH over all arm cells)
    ps = np.random.default_rng(1).random(30) ** 3
    assert np.array_equal(bh_by_family(ps), sps.false_discovery_control(ps, method="bh"))


def test_bh_per_family_by_hand():
    # families by shot: shot 1 = {.01, .04}: 2 * .01 / 1 = .02, 2 * .04 / 2 = .04 -> [.02, .04];
    # shot 2 = {.03, .20}: .06, .20 -> [.06, .20]. Smaller families -> smaller q than in one family of 4.
    cells = [{"shot_num": 1, "mode": "hard"}, {"shot_num": 1, "mode": "soft"},
             {"shot_num": 2, "mode": "hard"}, {"shot_num": 2, "mode": "soft"}]
    p = [0.01, 0.04, 0.03, 0.20]
    q = bh_by_family(p, family_labels(cells, "shot_num"))
    assert q == pytest.approx([0.02, 0.04, 0.06, 0.20], abs=1e-12)
    # per reward mode: hard = {.01, .03} -> .02, .03; soft = {.04, .20} -> .08, .20
    assert bh_by_family(p, family_labels(cells, "mode")) == pytest.approx([0.02, 0.08, 0.03, 0.20], abs=1e-12)
    assert family_labels(cells, "all") == [()] * 4
    assert family_labels(cells, ("shot_num", "mode"))[1] == (1, "soft")
    # singleton families: q = p
    assert bh_by_family(p, family_labels(cells, ("shot_num", "mode"))) == pytest.approx(p)


def test_bh_nan_and_errors():
    # NaN is left out: the other three form a family of m = 3. Sorted .01, .03, .04 -> 3 p / rank = .03, .045, .04;
    # running minimum from the top: .04, .04, .03 -> .01 -> .03, .04 -> .04, .03 -> .04
    q = bh_by_family([0.01, math.nan, 0.04, 0.03])
    assert math.isnan(q[1]) and [q[0], q[2], q[3]] == pytest.approx([0.03, 0.04, 0.04], abs=1e-12)
    assert bh_by_family([]).size == 0
    with pytest.raises(LeverPlusInputError, match="outside"):
        bh_by_family([0.5, 1.5])
    with pytest.raises(LeverPlusInputError, match="labels"):
        bh_by_family([0.5, 0.1], ["a"])
    with pytest.raises(LeverPlusInputError, match="shot_num"):
        family_labels([{"mode": "hard"}], "shot_num")
