"""Confidence intervals, paired tests and verdicts for evaluation results and sweep arms (pure numpy/scipy).

Every estimate carries n and a 95% interval by default, so a reported difference can be judged:
``mean_ci`` (Student t), ``proportion_ci`` (Wilson score interval), ``paired_t_test`` and
``paired_bootstrap`` (per-query differences of two systems on the same queries), and ``verdict``.
Calibrated per-query test: ``sign_flip_test`` / ``paired_permutation_test``. Equivalence and the four-way
verdict: ``equivalence_test`` (TOST), ``four_way_verdict``, ``paired_verdict``. Planning: ``power_paired``,
``mde_paired``, ``seeds_needed``, ``plan_from_pilot``. Sequential seeds: ``look_schedule``, ``next_allocation``.
Multiplicity: ``bh_by_family``, ``family_labels``. Formulas and rules: docs/statistics.md.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize
from scipy import stats as sps

from leverplus.errors import LeverPlusInputError


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its confidence interval [lo, hi], sample size and standard deviation."""

    mean: float
    lo: float
    hi: float
    n: int
    std: float


@dataclass(frozen=True)
class PairedResult:
    """Mean difference ``delta = mean(a - b)`` with its confidence interval and two-sided p-value."""

    delta: float
    lo: float
    hi: float
    p_value: float
    n: int
    method: str

    @property
    def significant(self) -> bool:
        """True iff the confidence interval excludes 0 (NaN bounds are never significant)."""
        return bool(self.lo > 0 or self.hi < 0)


def _check_confidence(confidence: float) -> None:
    if not (isinstance(confidence, (int, float)) and 0.0 < confidence < 1.0):
        raise LeverPlusInputError(
            f"confidence must be strictly between 0 and 1, got {confidence!r}",
            field="confidence",
            fix="use e.g. 0.95 for a 95% interval",
        )


def _as_values(values: Sequence[float], field: str, *, min_n: int = 1) -> np.ndarray:
    """1-D float array of finite values with at least ``min_n`` entries, else LeverPlusInputError."""
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as exc:
        raise LeverPlusInputError(
            f"cannot read the values as numbers ({exc})", field=field, fix="pass a flat list of numbers"
        ) from None
    if arr.ndim != 1:
        raise LeverPlusInputError(
            f"expected a flat sequence of numbers, got shape {arr.shape}",
            field=field,
            fix="pass one number per item",
        )
    if arr.size < min_n:
        raise LeverPlusInputError(
            f"need at least {min_n} value(s), got {arr.size}", field=field, fix="evaluate on more items"
        )
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise LeverPlusInputError(
            f"value is {arr[bad[0]]}, not a finite number",
            record=str(int(bad[0])),
            field=field,
            fix="drop or repair items whose score is NaN/inf",
        )
    return arr


def _two_sided_z(confidence: float) -> float:
    return float(sps.norm.ppf(1.0 - (1.0 - confidence) / 2.0))


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Estimate:
    """Mean with a Student-t interval: ``mean ± t_{n-1, 1-α/2} · s / sqrt(n)`` (s: sample std, ddof=1).

    n = 1 gives ``lo = hi = std = nan`` (no spread can be estimated).
    """
    _check_confidence(confidence)
    x = _as_values(values, "values")
    n = int(x.size)
    mean = float(x.mean())
    if n == 1:
        return Estimate(mean=mean, lo=math.nan, hi=math.nan, n=1, std=math.nan)
    std = float(x.std(ddof=1))
    half = float(sps.t.ppf(1.0 - (1.0 - confidence) / 2.0, n - 1)) * std / math.sqrt(n)
    return Estimate(mean=mean, lo=mean - half, hi=mean + half, n=n, std=std)


def proportion_ci(
    values_or_k: Sequence[float] | float,
    n: int | None = None,
    confidence: float = 0.95,
) -> Estimate:
    """Wilson score interval for an accuracy.

    Either ``proportion_ci(k, n)`` with k successes (or a summed soft score) out of n, or
    ``proportion_ci(scores)`` with per-item scores in [0, 1] (e.g. VQA accuracies 0/.3/.6/.9/1): p = their mean.
    With z = Φ⁻¹(1 - α/2):
    ``centre = (p + z²/2n) / (1 + z²/n)``, ``half = z / (1 + z²/n) · sqrt(p(1-p)/n + z²/4n²)``.
    ``std`` is the Bernoulli standard deviation sqrt(p(1-p)).
    """
    _check_confidence(confidence)
    if n is None:
        if np.isscalar(values_or_k):
            raise LeverPlusInputError(
                "got a count without n", field="n", fix="call proportion_ci(k, n) or proportion_ci(per_item_scores)"
            )
        x = _as_values(values_or_k, "values")  # type: ignore[arg-type]
        outside = np.flatnonzero((x < 0) | (x > 1))
        if outside.size:
            raise LeverPlusInputError(
                f"score {x[outside[0]]} is outside [0, 1]",
                record=str(int(outside[0])),
                field="values",
                fix="pass per-item accuracies as fractions in [0, 1]",
            )
        n_items, p = int(x.size), float(x.mean())
    else:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise LeverPlusInputError(f"n must be a positive integer, got {n!r}", field="n", fix="pass the item count")
        if not np.isscalar(values_or_k) or isinstance(values_or_k, (str, bytes, bool)):
            raise LeverPlusInputError(
                f"with n given, the first argument must be a count, got {values_or_k!r}",
                field="k",
                fix="call proportion_ci(k, n) or proportion_ci(per_item_scores) without n",
            )
        k = float(values_or_k)  # type: ignore[arg-type]
        if not (math.isfinite(k) and 0.0 <= k <= n):
            raise LeverPlusInputError(
                f"k = {values_or_k!r} is not in [0, n={n}]", field="k", fix="pass the number of successes out of n"
            )
        n_items, p = int(n), k / n
    z = _two_sided_z(confidence)
    z2n = z * z / n_items
    centre = (p + z2n / 2.0) / (1.0 + z2n)
    half = z / (1.0 + z2n) * math.sqrt(p * (1.0 - p) / n_items + z * z / (4.0 * n_items * n_items))
    return Estimate(mean=p, lo=max(0.0, centre - half), hi=min(1.0, centre + half), n=n_items,
                    std=math.sqrt(p * (1.0 - p)))


def _paired_differences(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    xa, xb = _as_values(a, "a"), _as_values(b, "b")
    if xa.size != xb.size:
        raise LeverPlusInputError(
            f"paired samples differ in length ({xa.size} vs {xb.size})",
            field="a/b",
            fix="score both systems on the same queries, in the same order",
        )
    return xa - xb


def paired_t_test(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedResult:
    """Paired t-test on d = a - b: ``delta = mean(d)``, CI ``delta ± t_{n-1,1-α/2} · sd(d)/sqrt(n)``,
    p from ``t = delta / (sd(d)/sqrt(n))`` with n-1 degrees of freedom (same as scipy.stats.ttest_rel).

    All differences equal: CI [delta, delta] and p = 1 if delta == 0 else 0. n = 1: CI and p are nan.
    """
    _check_confidence(confidence)
    d = _paired_differences(a, b)
    n = int(d.size)
    delta = float(d.mean())
    if n == 1:
        return PairedResult(delta, math.nan, math.nan, math.nan, 1, "paired_t")
    sd = float(d.std(ddof=1))
    if sd == 0.0 or np.all(d == d[0]):
        delta = float(d[0])
        return PairedResult(delta, delta, delta, 1.0 if delta == 0.0 else 0.0, n, "paired_t")
    se = sd / math.sqrt(n)
    half = float(sps.t.ppf(1.0 - (1.0 - confidence) / 2.0, n - 1)) * se
    p = float(2.0 * sps.t.sf(abs(delta / se), n - 1))
    return PairedResult(delta, delta - half, delta + half, min(1.0, p), n, "paired_t")


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    n_boot: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
    *,
    chunk_size: int = 1000,
) -> PairedResult:
    """Paired bootstrap of mean(a - b): resample the per-item differences with replacement ``n_boot`` times.

    ``delta`` is the observed mean difference; [lo, hi] the (α/2, 1-α/2) percentiles of the bootstrap means;
    ``p = min(1, 2 · min(P*(mean ≤ 0), P*(mean ≥ 0)))`` over the bootstrap means, so p < α goes with a CI that
    excludes 0 (resolution 1/n_boot). Deterministic for a given seed (numpy PCG64, drawn in chunks of
    ``chunk_size`` resamples to bound memory).
    """
    _check_confidence(confidence)
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise LeverPlusInputError(f"n_boot must be a positive integer, got {n_boot!r}", field="n_boot",
                                  fix="use e.g. 10000")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise LeverPlusInputError(f"chunk_size must be a positive integer, got {chunk_size!r}",
                                  field="chunk_size", fix="use e.g. 1000")
    d = _paired_differences(a, b)
    n = int(d.size)
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot, dtype=float)
    for start in range(0, n_boot, chunk_size):
        stop = min(n_boot, start + chunk_size)
        idx = rng.integers(0, n, size=(stop - start, n))
        boot[start:stop] = d[idx].mean(axis=1)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(boot, [alpha / 2.0, 1.0 - alpha / 2.0])
    p = min(1.0, 2.0 * min(float(np.mean(boot <= 0.0)), float(np.mean(boot >= 0.0))))
    return PairedResult(float(d.mean()), float(lo), float(hi), p, n, "paired_bootstrap")


def verdict(result: PairedResult, *, better: str = "higher") -> str:
    """Read a paired result of (a vs b) as "better" / "worse" / "no significant difference" for a.

    ``better="higher"`` when a larger metric is better (accuracy), ``"lower"`` when smaller is (loss).
    Significance is the CI excluding 0; its side gives the direction.
    """
    if better not in ("higher", "lower"):
        raise LeverPlusInputError(f"better must be 'higher' or 'lower', got {better!r}", field="better",
                                  fix="say whether a larger metric value is better")
    if not result.significant:
        return "no significant difference"
    a_larger = result.lo > 0
    return "better" if a_larger == (better == "higher") else "worse"


# ----------------------------------------------------------------------------------------------------------
# Calibrated paired test: sign-flip permutation
# ----------------------------------------------------------------------------------------------------------


def _check_pos_int(value: object, field: str, fix: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise LeverPlusInputError(f"{field} must be an integer >= {minimum}, got {value!r}", field=field, fix=fix)
    return int(value)


def _mean_stat(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def _check_sign_flip_args(max_exact: object, n_resamples: object) -> None:
    _check_pos_int(max_exact, "max_exact", "use e.g. 16 (2^16 = 65536 sign patterns)", minimum=0)
    if int(max_exact) > 20:  # type: ignore[call-overload]
        raise LeverPlusInputError(f"max_exact={max_exact} would enumerate 2^{max_exact} sign patterns",
                                  field="max_exact", fix="use at most 20; larger n is tested by Monte Carlo")
    _check_pos_int(n_resamples, "n_resamples", "use e.g. 9999")


def _sign_flip(d: np.ndarray, max_exact: int, n_resamples: int, seed: int) -> tuple[float, bool]:
    """(two-sided p, exact?) of the sign-flip test of mean(d) = 0; see :func:`sign_flip_test`."""
    n = int(d.size)
    if n <= max_exact:
        # scipy's one-sample idiom: permutation_type="samples" with a single sample flips the sign of each
        # observation; n_resamples >= 2^n makes it enumerate all 2^n sign patterns (exact null distribution).
        res = sps.permutation_test((d,), _mean_stat, permutation_type="samples", vectorized=True,
                                   n_resamples=2**n, alternative="two-sided")
        return float(res.pvalue), True
    # Monte Carlo: the same null distribution and p-value convention as scipy.stats.permutation_test
    # (counts with the observed value included, +1/(R+1), relative tie tolerance 100 eps), drawn directly as a
    # +/-1 matrix product, which is ~10x faster than scipy's generic resampler for thousands of pairs.
    rng = np.random.default_rng(seed)
    obs = float(d.mean())
    gamma = abs(obs) * np.finfo(float).eps * 100
    chunk = max(1, min(n_resamples, 4_000_000 // n))
    n_le = n_ge = 0
    for start in range(0, n_resamples, chunk):
        m = min(chunk, n_resamples - start)
        signs = rng.integers(0, 2, size=(m, n), dtype=np.int8) * 2 - 1
        null = (signs @ d) / n
        n_le += int(np.count_nonzero(null <= obs + gamma))
        n_ge += int(np.count_nonzero(null >= obs - gamma))
    p = min(1.0, 2.0 * min(n_le + 1, n_ge + 1) / (n_resamples + 1))
    return float(p), False


def sign_flip_test(
    differences: Sequence[float],
    *,
    max_exact: int = 16,
    n_resamples: int = 9999,
    seed: int = 0,
) -> float:
    """Two-sided p-value of the paired sign-flip permutation test of H0: the differences are symmetric about 0.

    Why: unlike inverting a bootstrap CI, its p-value is calibrated at any n (exactly so when enumerated): under
    H0 every sign pattern of d is equally likely, so the null distribution of mean(d) is that of mean(s · d) over
    s in {-1, +1}^n. Two-sided p = min(1, 2 · min(P(T <= t_obs), P(T >= t_obs))) as scipy.stats.permutation_test
    defines it (for this symmetric null it equals P(|T| >= |t_obs|)). Exact (all 2^n patterns, via
    ``scipy.stats.permutation_test(..., permutation_type="samples")``) when n <= ``max_exact``; otherwise
    ``n_resamples`` random sign patterns from numpy PCG64(``seed``), p = (count + 1) / (n_resamples + 1), which
    is never below its exact value in expectation (a valid p-value). Zero differences are kept: flipping them
    changes nothing, which is the correct conditional test. All differences zero: p = 1.
    """
    d = _as_values(differences, "differences")
    _check_sign_flip_args(max_exact, n_resamples)
    return _sign_flip(d, max_exact, n_resamples, int(seed))[0]


def paired_permutation_test(
    a: Sequence[float],
    b: Sequence[float],
    *,
    n_boot: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
    max_exact: int = 16,
    n_resamples: int = 9999,
    chunk_size: int = 1000,
) -> PairedResult:
    """Paired comparison of mean(a - b): p-value from the sign-flip test, interval from the paired bootstrap.

    ``delta``, ``lo``, ``hi`` are exactly :func:`paired_bootstrap`'s (same ``seed``, ``n_boot``, ``confidence``);
    ``p_value`` is :func:`sign_flip_test` on d = a - b (calibrated, unlike the bootstrap's inverted-CI p).
    ``method`` is ``"sign_flip_exact"`` or ``"sign_flip_mc"``. ``significant`` (and :func:`verdict`) still read the
    CI; use ``p_value < alpha`` for the test. The two can disagree only near the boundary.
    """
    _check_sign_flip_args(max_exact, n_resamples)
    boot = paired_bootstrap(a, b, n_boot=n_boot, seed=seed, confidence=confidence, chunk_size=chunk_size)
    d = _paired_differences(a, b)
    p, exact = _sign_flip(d, max_exact, n_resamples, int(seed))
    return PairedResult(boot.delta, boot.lo, boot.hi, p, boot.n, "sign_flip_exact" if exact else "sign_flip_mc")


# ----------------------------------------------------------------------------------------------------------
# Equivalence (TOST) and the four-way verdict
# ----------------------------------------------------------------------------------------------------------

VERDICTS = ("better", "worse", "equivalent", "inconclusive")


def _check_alpha(alpha: float, *, below: float = 1.0) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0.0 < alpha < below):
        raise LeverPlusInputError(f"alpha must be strictly between 0 and {below:g}, got {alpha!r}", field="alpha",
                                  fix="use e.g. 0.05")


def _check_margin(margin: float) -> float:
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not (math.isfinite(margin) and margin > 0):
        raise LeverPlusInputError(f"margin must be a positive finite number, got {margin!r}", field="margin",
                                  fix="give the smallest difference that matters, in the metric's units "
                                      "(e.g. 0.005 for half an accuracy point)")
    return float(margin)


def _check_better(better: str) -> None:
    if better not in ("higher", "lower"):
        raise LeverPlusInputError(f"better must be 'higher' or 'lower', got {better!r}", field="better",
                                  fix="say whether a larger metric value is better")


def _summary(differences: Sequence[float] | Estimate) -> tuple[float, float, int]:
    """(mean, sd with ddof=1, n) of paired differences given as values or as their :class:`Estimate`."""
    if isinstance(differences, Estimate):
        e = differences
        if isinstance(e.n, bool) or not isinstance(e.n, (int, np.integer)) or e.n < 1 or not math.isfinite(e.mean):
            raise LeverPlusInputError(f"the summary has n={e.n!r}, mean={e.mean!r}", field="differences",
                                      fix="pass mean_ci(differences) or the differences themselves")
        if e.n > 1 and not (math.isfinite(e.std) and e.std >= 0):
            raise LeverPlusInputError(f"the summary's std is {e.std!r}", field="differences",
                                      fix="pass mean_ci(differences) (std with ddof=1)")
        return float(e.mean), float(e.std) if e.n > 1 else math.nan, int(e.n)
    d = _as_values(differences, "differences")
    if d.size > 1 and np.all(d == d[0]):  # exactly constant: no rounding noise in the mean or a tiny sd
        return float(d[0]), 0.0, int(d.size)
    return float(d.mean()), float(d.std(ddof=1)) if d.size > 1 else math.nan, int(d.size)


@dataclass(frozen=True)
class EquivalenceResult:
    """TOST of ``|delta| < margin``: the (1 - 2α) t interval [lo, hi] and the two one-sided p-values.

    ``p_lower`` tests H0: delta <= -margin, ``p_upper`` H0: delta >= +margin; ``p_value = max`` of the two.
    ``equivalent`` iff -margin < lo and hi < margin (strict), which is the same as ``p_value < alpha``.
    """

    delta: float
    lo: float
    hi: float
    margin: float
    p_lower: float
    p_upper: float
    n: int
    alpha: float

    @property
    def p_value(self) -> float:
        return max(self.p_lower, self.p_upper)

    @property
    def equivalent(self) -> bool:
        return bool(-self.margin < self.lo and self.hi < self.margin)


def equivalence_test(differences: Sequence[float] | Estimate, margin: float, alpha: float = 0.05) -> EquivalenceResult:
    """Two one-sided paired t-tests (TOST) of H0: |delta| >= margin against H1: |delta| < margin, level ``alpha``.

    Why: "no significant difference" is not evidence of no effect; equivalence within a margin that matters is
    what lets an arm be dropped. With se = sd/sqrt(n), df = n - 1:
    ``p_lower = P(T_df >= (delta + margin)/se)``, ``p_upper = P(T_df <= (delta - margin)/se)``; rejecting both at
    α is the same as the (1 - 2α) interval ``delta ± t_{df,1-α} · se`` lying strictly inside (-margin, +margin)
    (α = .05: the 90% CI). ``differences`` are per-seed paired differences, or their :func:`mean_ci` Estimate
    (mean, std with ddof=1, n). n = 1: interval and p are nan, never equivalent. sd = 0: the interval is
    [delta, delta] and each p is 0 or 1.
    """
    margin = _check_margin(margin)
    _check_alpha(alpha, below=0.5)
    mean, sd, n = _summary(differences)
    if n < 2:
        return EquivalenceResult(mean, math.nan, math.nan, margin, math.nan, math.nan, n, float(alpha))
    if sd == 0.0:
        return EquivalenceResult(mean, mean, mean, margin, 0.0 if mean > -margin else 1.0,
                                 0.0 if mean < margin else 1.0, n, float(alpha))
    se = sd / math.sqrt(n)
    half = float(sps.t.ppf(1.0 - alpha, n - 1)) * se
    p_lower = float(sps.t.sf((mean + margin) / se, n - 1))
    p_upper = float(sps.t.cdf((mean - margin) / se, n - 1))
    return EquivalenceResult(mean, mean - half, mean + half, margin, p_lower, p_upper, n, float(alpha))


def four_way_verdict(
    ci: tuple[float, float],
    eq_ci: tuple[float, float],
    margin: float,
    *,
    p_value: float | None = None,
    alpha: float = 0.05,
    better: str = "higher",
) -> str:
    """"better" / "worse" / "equivalent" / "inconclusive" for a difference (a - b) against a margin.

    ``ci`` is the two-sided (1 - α) interval of the difference, ``eq_ci`` its (1 - 2α) interval (α = .05: 95% and
    90%); ``p_value``, when given, is a two-sided test of difference = 0 at level ``alpha``. Rules, in order:

    1. any bound NaN -> "inconclusive";
    2. ``ci`` excludes 0 strictly (lo > 0 or hi < 0) and, if given, ``p_value < alpha`` -> "better"/"worse" (by
       side and ``better``); a difference inside the margin but significant is still reported as a difference;
    3. ``-margin < eq_ci[0]`` and ``eq_ci[1] < margin`` (strict: an interval touching ±margin is *not*
       equivalent) -> "equivalent" (TOST at α);
    4. otherwise "inconclusive" (neither a difference nor equivalence is shown; more data may decide).
    """
    margin = _check_margin(margin)
    _check_alpha(alpha)
    _check_better(better)
    lo, hi = float(ci[0]), float(ci[1])
    eq_lo, eq_hi = float(eq_ci[0]), float(eq_ci[1])
    if any(math.isnan(x) for x in (lo, hi, eq_lo, eq_hi)):
        return "inconclusive"
    if lo > hi or eq_lo > eq_hi:
        raise LeverPlusInputError(f"an interval has lo > hi (ci=({lo}, {hi}), eq_ci=({eq_lo}, {eq_hi}))",
                                  field="ci", fix="pass (lo, hi) pairs")
    test_rejects = p_value is None or (math.isfinite(p_value) and p_value < alpha)
    if (lo > 0.0 or hi < 0.0) and test_rejects:
        return "better" if (lo > 0.0) == (better == "higher") else "worse"
    if -margin < eq_lo and eq_hi < margin:
        return "equivalent"
    return "inconclusive"


@dataclass(frozen=True)
class MarginVerdict:
    """A four-way verdict with the numbers it was read from (see :func:`four_way_verdict`).

    ``lo``/``hi``: the (1 - alpha) CI of delta; ``eq_lo``/``eq_hi``: the (1 - 2·alpha) CI; ``p_value``: the
    two-sided paired t-test of delta = 0.
    """

    verdict: str
    delta: float
    lo: float
    hi: float
    eq_lo: float
    eq_hi: float
    p_value: float
    margin: float
    alpha: float
    n: int

    def describe(self, *, scale: float = 1.0, unit: str = "") -> str:
        """One line, e.g. ``inconclusive after 3 seeds: 95% CI [-0.80, +1.20] pp includes 0; 90% CI [-0.50,
        +0.90] pp not inside ±0.50 pp`` (values multiplied by ``scale``; ``unit`` appended)."""
        u = f" {unit}" if unit else ""

        def iv(lo: float, hi: float) -> str:
            return f"[{scale * lo:+.2f}, {scale * hi:+.2f}]{u}"

        c1, c2 = f"{100 * (1 - self.alpha):.4g}% CI", f"{100 * (1 - 2 * self.alpha):.4g}% CI"
        m = f"±{scale * self.margin:.2f}{u}"
        head = f"{self.verdict} after {self.n} seed{'s' if self.n != 1 else ''}"
        if self.n < 2 or math.isnan(self.lo):
            return f"{head}: too few seeds for an interval"
        if self.verdict in ("better", "worse"):
            p = f" (p = {self.p_value:.3g})" if math.isfinite(self.p_value) else ""
            return f"{head}: {c1} {iv(self.lo, self.hi)} excludes 0{p}"
        if self.verdict == "equivalent":
            return f"{head}: {c2} {iv(self.eq_lo, self.eq_hi)} inside {m}"
        return (f"{head}: {c1} {iv(self.lo, self.hi)} includes 0; {c2} {iv(self.eq_lo, self.eq_hi)} "
                f"not inside {m}")


def paired_verdict(
    differences: Sequence[float] | Estimate,
    margin: float,
    *,
    alpha: float = 0.05,
    better: str = "higher",
) -> MarginVerdict:
    """Four-way verdict of the seed-paired t-test: per-seed differences (arm - baseline) against ``margin``.

    The (1 - α) CI and p come from the paired t-test (as :func:`paired_t_test`), the (1 - 2α) CI from
    :func:`equivalence_test`; the verdict is :func:`four_way_verdict` of them. Under the t model, a false
    "better"/"worse" (true delta = 0) has probability <= α and a false "equivalent" (|true delta| >= margin)
    <= α. Pass a corrected α (e.g. α / n_looks) when the verdict is read at several looks.
    """
    margin = _check_margin(margin)
    _check_alpha(alpha, below=0.5)
    _check_better(better)
    mean, sd, n = _summary(differences)
    eq = equivalence_test(Estimate(mean, math.nan, math.nan, n, sd), margin, alpha)
    if n < 2:
        lo = hi = p = math.nan
    elif sd == 0.0:
        lo = hi = mean
        p = 1.0 if mean == 0.0 else 0.0
    else:
        se = sd / math.sqrt(n)
        half = float(sps.t.ppf(1.0 - alpha / 2.0, n - 1)) * se
        lo, hi = mean - half, mean + half
        p = min(1.0, float(2.0 * sps.t.sf(abs(mean / se), n - 1)))
    v = four_way_verdict((lo, hi), (eq.lo, eq.hi), margin, p_value=None, alpha=alpha, better=better)
    return MarginVerdict(v, mean, lo, hi, eq.lo, eq.hi, p, margin, float(alpha), n)


# ----------------------------------------------------------------------------------------------------------
# Power and minimum detectable effect of the paired tests
# ----------------------------------------------------------------------------------------------------------

_TESTS = ("t", "z")


def _check_power_args(sd: float, n: int, alpha: float, test: str) -> tuple[float, int]:
    _check_alpha(alpha)
    if test not in _TESTS:
        raise LeverPlusInputError(f"test must be 't' or 'z', got {test!r}", field="test",
                                  fix="'t' for the seed-level paired t-test, 'z' for the per-query normal test")
    if isinstance(sd, bool) or not isinstance(sd, (int, float, np.floating)) or not (math.isfinite(sd) and sd >= 0):
        raise LeverPlusInputError(f"sd must be a finite number >= 0, got {sd!r}", field="sd",
                                  fix="pass the standard deviation of the paired differences")
    n = _check_pos_int(n, "n", "pass the number of pairs (seeds, or queries)", minimum=2 if test == "t" else 1)
    return float(sd), n


def power_paired(effect: float, sd: float, n: int, alpha: float = 0.05, test: str = "t") -> float:
    """Power of the two-sided paired test at level ``alpha`` when the true mean difference is ``effect``.

    ``test="t"`` (seed-level paired t, exact under normal differences): with df = n - 1, ncp = effect·sqrt(n)/sd
    and c = t_{df,1-α/2}, power = P(T' > c) + P(T' < -c) for T' ~ noncentral t(df, ncp) (both tails).
    ``test="z"`` (per-query test, normal approximation): λ = |effect|·sqrt(n)/sd,
    power = Φ(λ - z_{1-α/2}) + Φ(-λ - z_{1-α/2}). sd = 0: 1 if effect != 0, else α.
    """
    sd, n = _check_power_args(sd, n, alpha, test)
    if not math.isfinite(effect):
        raise LeverPlusInputError(f"effect must be finite, got {effect!r}", field="effect", fix="pass a number")
    if sd == 0.0:
        return 1.0 if effect != 0 else float(alpha)
    ncp = abs(float(effect)) * math.sqrt(n) / sd
    if test == "z":
        z = _two_sided_z(1.0 - alpha)
        return float(sps.norm.cdf(ncp - z) + sps.norm.cdf(-ncp - z))
    df = n - 1
    c = float(sps.t.ppf(1.0 - alpha / 2.0, df))
    # P(T' < -c) is written as sf(c, df, -ncp): scipy's nct.cdf returns NaN far in the lower tail
    return float(sps.nct.sf(c, df, ncp) + sps.nct.sf(c, df, -ncp))


def mde_paired(sd: float, n: int, alpha: float = 0.05, power: float = 0.8, test: str = "t") -> float:
    """Minimum detectable effect: the smallest |mean difference| that the two-sided paired test at level ``alpha``
    detects with probability ``power`` (same units as ``sd``; sd = 1 gives Cohen's d_z).

    ``test="z"``: the normal closed form ``(z_{1-α/2} + z_{power}) · sd / sqrt(n)`` (it neglects the opposite
    rejection tail, whose probability there is Φ(-2·z_{1-α/2} - z_power), 1e-6 at the defaults).
    ``test="t"``: exact for the seed-level paired t-test, the root in δ of ``power_paired(δ, sd, n) = power``
    (noncentral t, brentq to 1e-12 relative); always larger than the z value, much so for few seeds
    (n = 3: 3.26 sd vs 1.62 sd; n = 10: 0.996 sd vs 0.886 sd).
    """
    sd, n = _check_power_args(sd, n, alpha, test)
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not (alpha < power < 1.0):
        raise LeverPlusInputError(f"power must be between alpha={alpha} and 1, got {power!r}", field="power",
                                  fix="use e.g. 0.8")
    z_mde = (_two_sided_z(1.0 - alpha) + float(sps.norm.ppf(power))) / math.sqrt(n)
    if sd == 0.0:
        return 0.0
    if test == "z":
        return z_mde * sd

    def gap(delta: float) -> float:
        return power_paired(delta, 1.0, n, alpha, "t") - power

    hi = 2.0 * z_mde
    while gap(hi) < 0.0:
        hi *= 2.0
    return float(optimize.brentq(gap, 0.0, hi, xtol=1e-14, rtol=1e-12)) * sd


def seeds_needed(
    target_mde: float, sd: float, alpha: float = 0.05, power: float = 0.8, *, max_n: int = 100_000
) -> int:
    """Smallest number of seeds n >= 2 whose seed-level paired t-test has ``mde_paired(sd, n) <= target_mde``."""
    if isinstance(target_mde, bool) or not isinstance(target_mde, (int, float)) or not (
            math.isfinite(target_mde) and target_mde > 0):
        raise LeverPlusInputError(f"target_mde must be a positive number, got {target_mde!r}", field="target_mde",
                                  fix="give the smallest difference the sweep must detect, in the metric's units")
    _check_power_args(sd, 2, alpha, "t")
    if sd == 0.0:
        return 2
    # the z formula is a lower bound for the t MDE, so start at its n and walk up (a few steps)
    z_total = _two_sided_z(1.0 - alpha) + float(sps.norm.ppf(power))
    n = max(2, math.ceil((z_total * sd / target_mde) ** 2))
    while mde_paired(sd, n, alpha, power, "t") > target_mde:
        n += 1 if n < 64 else max(1, n // 64)
        if n > max_n:
            raise LeverPlusInputError(f"more than {max_n} seeds would be needed for MDE {target_mde} at sd {sd}",
                                      field="target_mde", fix="accept a larger MDE or reduce the noise")
    while n > 2 and mde_paired(sd, n - 1, alpha, power, "t") <= target_mde:  # undo an overshooting stride
        n -= 1
    return n


@dataclass(frozen=True)
class PilotPlan:
    """What a design with ``n_seeds`` seeds and ``n_queries`` evaluation queries per seed can detect.

    ``mde_seed``: the seed-level paired t-test's MDE (df = n_seeds - 1, sd ``seed_sd``); ``mde_query``: the
    per-query test's normal-approximation MDE over n_queries · n_seeds pairs (sd ``query_sd``; nan without them);
    ``seeds_needed``: the fewest seeds with ``mde_seed <= target_mde`` (None without a target).
    """

    seed_sd: float
    query_sd: float
    n_seeds: int
    n_queries: int | None
    alpha: float
    power: float
    mde_seed: float
    mde_query: float
    target_mde: float | None
    seeds_needed: int | None


def _pool_sd(sds: Sequence[float] | float, field: str, pool: str) -> float:
    x = _as_values([sds] if np.isscalar(sds) else sds, field)  # type: ignore[list-item]
    if np.any(x < 0):
        raise LeverPlusInputError("a standard deviation is negative", field=field, fix="pass sds >= 0")
    return float(np.sqrt(np.mean(x**2))) if pool == "rms" else float(x.max())


def plan_from_pilot(
    seed_sds: Sequence[float] | float,
    *,
    n_seeds: int,
    query_sds: Sequence[float] | float | None = None,
    n_queries: int | None = None,
    target_mde: float | None = None,
    alpha: float = 0.05,
    power: float = 0.8,
    pool: str = "rms",
) -> PilotPlan:
    """Plan a sweep from a pilot's per-cell spreads: the MDEs of a planned design, and the seeds for a target.

    ``seed_sds``: per (arm, shot) cell, the sd over seeds of Δ = arm - baseline at the same (shot, seed);
    ``query_sds``: per cell, the sd of the per-query paired differences. ``pool="rms"`` pools them as
    sqrt(mean(sd²)) (the pooled sd for cells with equal seed counts), ``"max"`` takes the worst cell
    (conservative). A pilot sd from few seeds is itself noisy, so read the result as an estimate.
    """
    if pool not in ("rms", "max"):
        raise LeverPlusInputError(f"pool must be 'rms' or 'max', got {pool!r}", field="pool",
                                  fix="'rms' for the pooled sd, 'max' for the noisiest cell")
    seed_sd = _pool_sd(seed_sds, "seed_sds", pool)
    mde_seed = mde_paired(seed_sd, n_seeds, alpha, power, "t")
    query_sd, mde_query = math.nan, math.nan
    if query_sds is not None:
        if n_queries is None:
            raise LeverPlusInputError("query_sds given without n_queries", field="n_queries",
                                      fix="pass the number of evaluation queries per seed")
        n_queries = _check_pos_int(n_queries, "n_queries", "pass the number of evaluation queries per seed")
        query_sd = _pool_sd(query_sds, "query_sds", pool)
        mde_query = mde_paired(query_sd, n_queries * n_seeds, alpha, power, "z")
    needed = seeds_needed(target_mde, seed_sd, alpha, power) if target_mde is not None else None
    return PilotPlan(seed_sd, query_sd, int(n_seeds), n_queries, float(alpha), float(power), mde_seed, mde_query,
                     None if target_mde is None else float(target_mde), needed)


# ----------------------------------------------------------------------------------------------------------
# Adaptive seed allocation (group-sequential, Bonferroni over the planned looks)
# ----------------------------------------------------------------------------------------------------------


def look_schedule(initial_seeds: int = 3, step: int = 2, max_seeds: int = 9) -> tuple[int, ...]:
    """The planned looks: seed counts ``initial_seeds, initial_seeds + step, ...`` up to ``max_seeds`` (which is
    always the last look). Verdicts are read only at these counts."""
    initial_seeds = _check_pos_int(initial_seeds, "initial_seeds", "use at least 2 (a t interval needs 2)", minimum=2)
    step = _check_pos_int(step, "step", "use e.g. 2")
    max_seeds = _check_pos_int(max_seeds, "max_seeds", "use at least initial_seeds", minimum=initial_seeds)
    looks = list(range(initial_seeds, max_seeds + 1, step))
    if looks[-1] != max_seeds:
        looks.append(max_seeds)
    return tuple(looks)


@dataclass(frozen=True)
class ArmAllocation:
    """One arm's decision after a round: ``add`` more seeds (0: stop or wait), with the verdict and why.

    ``verdict`` is the four-way verdict read at this look, or ``"pending"`` when ``n_seeds`` is not a planned look
    (not started, or short of one after failed runs): no verdict is read then. ``look`` is the 1-based look index.
    """

    arm: str
    n_seeds: int
    add: int
    verdict: str
    look: int | None
    reason: str
    result: MarginVerdict | None


@dataclass(frozen=True)
class AllocationPlan:
    """The round's allocation: per arm (input order), the schedule, the per-look alpha and the budget left."""

    arms: dict[str, ArmAllocation]
    schedule: tuple[int, ...]
    alpha: float
    alpha_per_look: float
    budget: int
    budget_left: int

    @property
    def total_add(self) -> int:
        return sum(a.add for a in self.arms.values())

    @property
    def done(self) -> bool:
        """No arm gets more seeds: the sequential phase is over (every arm decided, at its maximum, or out of
        budget)."""
        return self.total_add == 0

    @property
    def baseline_seeds(self) -> int:
        """Seeds the baseline needs after this round: arms are paired by (shot, seed) on shared seed numbers
        0..n-1, so the baseline must have as many as the largest arm (its runs are not counted in the budget)."""
        return max((a.n_seeds + a.add for a in self.arms.values()), default=0)


def next_allocation(
    arm_results: Mapping[str, Sequence[float] | MarginVerdict],
    budget: int,
    *,
    margin: float,
    initial_seeds: int = 3,
    step: int = 2,
    max_seeds: int = 9,
    alpha: float = 0.05,
    better: str = "higher",
    scale: float = 100.0,
    unit: str = "pp",
) -> AllocationPlan:
    """Decide which arms get more seeds after a round of a sequential sweep (pure; call it after every round).

    ``arm_results``: per arm (one cell), either its per-seed paired differences Δ = arm - baseline (same shot and
    seed) so far, or a :class:`MarginVerdict` already read at ``alpha_per_look``. ``budget``: the total number of
    arm seed-runs the sweep may spend, the ones already run included (baseline runs not counted).

    Design (group-sequential with a Bonferroni split of α): the looks are :func:`look_schedule`'s K seed counts;
    at each look an arm's verdict is :func:`paired_verdict` at ``alpha_per_look = alpha / K`` (its (1 - α/K) CI
    and (1 - 2α/K) equivalence CI). Rules per arm:

    * not at a planned look (fewer than ``initial_seeds``, or between looks): top up to the next look, no verdict;
    * "better" / "worse" / "equivalent": stop (add 0);
    * "inconclusive" at ``max_seeds``: stop, inconclusive;
    * "inconclusive" below it: add the seeds to the next look, if the budget left covers all of them.

    The budget goes to arms with the fewest seeds first, then in input order; an arm whose increment does not fit
    gets 0 (never a partial increment, so every verdict is read at a planned look). Error rates, per arm, under
    the t model of the seed-level differences: P(some look claims better/worse | Δ = 0) <= K · α/K = α, and
    P(some look claims equivalent | |Δ| >= margin) <= α, by the union bound over the K looks. This holds for any
    stopping or budget decision (stopping early removes looks), and is conservative (a Pocock or O'Brien-Fleming
    boundary would spend α less wastefully, at the cost of the correlation computation). The final report must
    read the verdict at the same ``alpha_per_look``. Across arms it controls each arm's error, not the family's:
    apply :func:`bh_by_family` (or a smaller ``alpha``) for that. Power is not guaranteed: an arm can end
    inconclusive at ``max_seeds``; size ``max_seeds`` with :func:`mde_paired` at ``alpha_per_look``.
    """
    schedule = look_schedule(initial_seeds, step, max_seeds)
    _check_alpha(alpha, below=0.5)
    margin = _check_margin(margin)
    _check_better(better)
    budget = _check_pos_int(budget, "budget", "give the total number of arm seed-runs allowed", minimum=0)
    design = _Design(schedule, alpha / len(schedule), margin, max_seeds, better, scale, unit)
    states = [design.arm_state(arm, res) for arm, res in arm_results.items()]
    left = budget - sum(n for _, n, *_ in states)
    out: dict[str, ArmAllocation] = {}
    wants: list[tuple[int, int, str, int]] = []  # (n, input order, arm, seeds to the next look)
    for i, (arm, n, verdict_, look, v) in enumerate(states):
        if verdict_ in ("pending", "inconclusive") and n < max_seeds:
            nxt = next(s for s in schedule if s > n)
            wants.append((n, i, arm, nxt - n))
        else:
            out[arm] = design.stopped(arm, n, verdict_, look, v)
    for n, i, arm, need in sorted(wants):
        out[arm] = design.topped_up(states[i], need, left)
        if need <= left:
            left -= need
    ordered = {arm: out[arm] for arm, *_ in states}
    return AllocationPlan(ordered, schedule, float(alpha), design.alpha_look, budget, max(left, 0))


_ArmState = tuple  # (arm, n seeds, verdict or "pending", look number or None, MarginVerdict or None)


@dataclass(frozen=True)
class _Design:
    """The sequential design of one :func:`next_allocation` call: looks, per-look alpha, margin, reporting."""

    schedule: tuple
    alpha_look: float
    margin: float
    max_seeds: int
    better: str
    scale: float
    unit: str

    @property
    def plan_text(self) -> str:
        return f"alpha {self.alpha_look:.3g} per look"

    def check_verdict(self, arm: str, res: MarginVerdict) -> None:
        """A verdict passed in must be read at (at most) the per-look alpha, with the sweep's margin."""
        k = len(self.schedule)
        if res.alpha > self.alpha_look * (1 + 1e-9):
            raise LeverPlusInputError(
                f"arm {arm!r}: the verdict was read at alpha {res.alpha:g}, above the {self.alpha_look:g} per look "
                f"of a {k}-look design", record=str(arm), field="alpha",
                fix=f"read it with paired_verdict(..., alpha={self.alpha_look:g}) or pass the differences")
        if not math.isclose(res.margin, self.margin, rel_tol=1e-9):
            raise LeverPlusInputError(f"arm {arm!r}: the verdict used margin {res.margin:g}, not {self.margin:g}",
                                      record=str(arm), field="margin", fix="use one margin for the sweep")
        if res.verdict not in VERDICTS:
            raise LeverPlusInputError(f"arm {arm!r}: unknown verdict {res.verdict!r}", record=str(arm),
                                      field="verdict", fix=f"use one of {VERDICTS}")

    def arm_state(self, arm: str, res: Sequence[float] | MarginVerdict) -> _ArmState:
        """The arm's seeds so far and, at a planned look, its verdict (read here from the differences if needed)."""
        if isinstance(res, MarginVerdict):
            v: MarginVerdict | None = res
            n = int(res.n)
            self.check_verdict(arm, res)
        else:
            n = len(res)
            v = None
        if n > self.max_seeds:
            raise LeverPlusInputError(f"arm {arm!r} has {n} seeds, more than max_seeds={self.max_seeds}",
                                      record=str(arm), field="max_seeds", fix="raise max_seeds to the planned maximum")
        if n not in self.schedule:
            return (arm, n, "pending", None, None)
        if v is None:
            v = paired_verdict(res, self.margin, alpha=self.alpha_look, better=self.better)  # type: ignore[arg-type]
        return (arm, n, v.verdict, self.schedule.index(n) + 1, v)

    def stopped(self, arm: str, n: int, verdict_: str, look: int | None, v: MarginVerdict | None) -> ArmAllocation:
        """An arm that gets no more seeds: decided, or inconclusive at the maximum."""
        k = len(self.schedule)
        text = v.describe(scale=self.scale, unit=self.unit) if v is not None else ""
        tail = f"at the maximum of {self.max_seeds} seeds, stop" if verdict_ == "inconclusive" else "stop"
        return ArmAllocation(arm, n, 0, verdict_, look, f"{text}; {tail} (look {look} of {k}, {self.plan_text})", v)

    def topped_up(self, state: _ArmState, need: int, left: int) -> ArmAllocation:
        """An arm that wants ``need`` seeds to reach its next look: granted when ``left`` covers them all."""
        arm, n, verdict_, look, v = state
        schedule, k = self.schedule, len(self.schedule)
        if verdict_ == "pending":
            head = (f"not started: first look at {schedule[0]} seeds" if n == 0 else
                    f"{n} seed{'s' if n != 1 else ''} is not a planned look {schedule}: no verdict read")
            where = f"to reach {n + need}"
        else:
            assert v is not None
            head = v.describe(scale=self.scale, unit=self.unit) + f" (look {look} of {k}, {self.plan_text})"
            where = f"for look {schedule.index(n + need) + 1}"
        if need <= left:
            return ArmAllocation(arm, n, need, verdict_, look, f"{head}; +{need} seed{'s' if need != 1 else ''} "
                                                               f"{where}", v)
        return ArmAllocation(arm, n, 0, verdict_, look, f"{head}; needs +{need} {where} but the budget has "
                                                        f"{max(left, 0)} seed run(s) left", v)


# ----------------------------------------------------------------------------------------------------------
# Benjamini-Hochberg within families
# ----------------------------------------------------------------------------------------------------------


def bh_by_family(p_values: Sequence[float], families: Sequence[Hashable] | None = None) -> np.ndarray:
    """Benjamini-Hochberg q-values computed separately within each family (same order as ``p_values``).

    Why: the false discovery rate is controlled over the set of tests it is computed on, so the family must be
    chosen (all cells, each shot, each factor level...) and said. Within a family of m finite p-values with ranks
    i (ascending), ``q_(i) = min_{j >= i} min(1, m · p_(j) / j)`` (``scipy.stats.false_discovery_control``,
    method "bh"); rejecting q < α controls the family's FDR at α (independent or positively dependent tests).
    ``families=None`` is one family. NaN p-values get NaN q and do not count in m.
    """
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1:
        raise LeverPlusInputError(f"expected a flat sequence of p-values, got shape {p.shape}", field="p_values",
                                  fix="pass one p-value per test")
    bad = np.flatnonzero(~np.isnan(p) & ((p < 0) | (p > 1)))
    if bad.size:
        raise LeverPlusInputError(f"p-value {p[bad[0]]} is outside [0, 1]", record=str(int(bad[0])),
                                  field="p_values", fix="pass p-values (NaN for a test that could not be run)")
    labels = [None] * p.size if families is None else list(families)
    if len(labels) != p.size:
        raise LeverPlusInputError(f"{p.size} p-values but {len(labels)} family labels", field="families",
                                  fix="give one family label per p-value")
    q = np.full(p.size, math.nan)
    groups: dict[Hashable, list[int]] = {}
    for i, lab in enumerate(labels):
        if not np.isnan(p[i]):
            groups.setdefault(lab, []).append(i)
    for idx in groups.values():
        q[idx] = sps.false_discovery_control(p[idx], method="bh")
    return q


def family_labels(cells: Sequence[Mapping[str, object]], by: str | Sequence[str] = "all") -> list[tuple]:
    """Family label per cell for :func:`bh_by_family`: ``by="all"`` puts every cell in one family; a column name
    (e.g. ``"shot_num"`` for per-shot families) or several (``("shot_num", "params.reward.mode")``) groups the cells
    by the values of those keys (a per-factor family: one family per level of that factor)."""
    if by == "all":
        return [() for _ in cells]
    keys = (by,) if isinstance(by, str) else tuple(by)
    if not keys:
        raise LeverPlusInputError("no family keys given", field="by", fix="use 'all' or name the columns")
    out = []
    for i, c in enumerate(cells):
        missing = [k for k in keys if k not in c]
        if missing:
            raise LeverPlusInputError(f"cell has no {missing[0]!r}", record=str(i), field="by",
                                      fix=f"family keys must be fields of every cell; this one has {sorted(c)}")
        out.append(tuple(c[k] for k in keys))
    return out
