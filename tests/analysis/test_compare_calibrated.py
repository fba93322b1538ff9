"""The per-query p-value of leverplus.compare is the calibrated sign-flip test: it feeds the per-query verdict and the
per-query Benjamini-Hochberg column; the bootstrap keeps the interval. Hand-built runs as in test_compare.py."""

from __future__ import annotations

import pandas as pd
import pytest
from test_compare import BASE, A, C, _pq, _rid, per_query_tables, runs_frame

from leverplus.analysis.compare import compare_runs


def _constant_c2(n_per_seed: int = 1):
    """Shot 2: arm C answers 1.0 and the baseline 0.5 on every query -> every per-query difference is +0.5."""
    pq = {_rid(BASE, 2, s): _pq([0.5] * n_per_seed, shot=2) for s in range(3)}
    pq.update({_rid(C, 2, s): _pq([1.0] * n_per_seed, shot=2) for s in range(3)})
    return pq


def test_bootstrap_ci_excluding_zero_is_not_enough_for_a_per_query_difference():
    # 3 pooled differences, all +0.5: every bootstrap mean is .5 (CI [.5, .5] excludes 0, inverted-CI p = 0) but
    # the exact sign-flip p is 2 · (1/2)^3 = 0.25: with 3 queries no test at 5% can reject -> no difference
    rep = compare_runs(runs_frame(), _constant_c2(1), n_boot=200)
    c = rep.cell(C, 2)
    assert (c.query_delta.lo, c.query_delta.hi) == (0.5, 0.5) and c.query_p_bootstrap == 0.0
    assert c.query_delta.p_value == pytest.approx(0.25)
    assert c.query_verdict == "no significant difference"


def test_both_procedures_agreeing_give_a_per_query_difference():
    # 3 seeds x 2 queries = 6 differences of +0.5: sign-flip p = 2/2^6 = 1/32 < .05 and the CI excludes 0
    rep = compare_runs(runs_frame(), _constant_c2(2), n_boot=200)
    c = rep.cell(C, 2)
    assert c.query_delta.p_value == pytest.approx(1 / 32) and c.query_verdict == "better"


def test_per_query_bh_q_is_computed_from_the_sign_flip_p_within_the_family():
    pq = {**per_query_tables(), **_constant_c2(3)}
    rep = compare_runs(runs_frame(), pq, n_boot=200)
    # per-query p: A shot 1 = 0.25 (test_compare_verdicts), C shot 2 = 2/2^9 = 1/256. One family, m = 2:
    # q(1/256) = 2 · (1/256) / 1 = 1/128; q(.25) = min(1, 2 · .25 / 2) = .25
    assert rep.cell(C, 2).query_q == pytest.approx(1 / 128)
    assert rep.cell(A, 1).query_q == pytest.approx(0.25)
    assert rep.cell(C, 1).query_q is None and rep.cell(BASE, 1).query_q is None
    # per shot: each family has one test, q = p
    rep = compare_runs(runs_frame(), pq, n_boot=200, bh_family="shot")
    assert rep.cell(C, 2).query_q == pytest.approx(1 / 256) and rep.cell(A, 1).query_q == pytest.approx(0.25)
    frame = rep.to_frame()
    row = frame[(frame["arm"] == C) & (frame["shot_num"] == 2)].iloc[0]
    assert row["query_delta_q"] == pytest.approx(1 / 256) and row["query_delta_p"] == pytest.approx(1 / 256)
    assert row["query_delta_p_bootstrap"] == 0.0
    assert pd.isna(frame[(frame["arm"] == C) & (frame["shot_num"] == 1)].iloc[0]["query_delta_q"])
