"""Tests for the reviewer-grade columns of leverplus.compare: calibrated per-query p (sign-flip), BH families, the
four-way margin verdict, minimum detectable effects, and the share of queries whose ICD sequence changed (with the
bound it puts on |Δ|). Hand-built runs and per-query tables, as in test_compare.py (no MLflow).

Hand arithmetic: t_{2, 0.975} = 4.3026527 and t_{2, 0.95} = sqrt(0.81·2/0.19) = 2.9199856 (closed form of Student's
t with 2 degrees of freedom, CDF(t) = 1/2 + t / (2 sqrt(2 + t²))).
"""

from __future__ import annotations

import json
import math
import re

import pandas as pd
import pytest
from test_compare import ALIAS, BASE, PQ_ARM, PQ_BASE, A, C, _pq, _rid, per_query_tables, runs_frame

from leverplus.analysis.compare import _parse_per_query, compare_runs, report_markdown, write_report
from leverplus.analysis.policy_shift import changed_fraction, policy_shift
from leverplus.errors import LeverPlusInputError
from leverplus.evaluation.stats import mde_paired, paired_bootstrap, paired_permutation_test

T2_95 = math.sqrt(0.81 * 2 / 0.19)  # t_{2, 0.95}: the TOST (90%) interval with 3 seeds
Z_SUM = 1.959963985 + 0.841621234  # z_{0.975} + z_{0.8}: the z MDE at alpha .05, power .8


def _table(md: str) -> dict:
    """(arm, shot) -> list of the main table's cell texts (escaped '|' restored)."""
    rows = [re.split(r"(?<!\\)\|", line)[1:-1] for line in md.splitlines()
            if line.startswith("| mode=") or line.startswith(f"| {BASE}")]
    rows = [[x.strip().replace("\\|", "|") for x in r] for r in rows if len(r) == 17]
    return {(r[0], r[1]): r for r in rows}


def _header(md: str) -> list:
    line = next(x for x in md.splitlines() if x.startswith("| arm | shot |"))
    return [x.strip() for x in line.split("|")[1:-1]]


# ---------------------------------------------------------------------------------------------- per-query p


def test_per_query_p_is_the_sign_flip_test_and_the_interval_stays_the_bootstrap():
    rep = compare_runs(runs_frame(), per_query_tables(), n_boot=2000, seed=0)
    c = rep.cell(A, 1)
    # pooled differences: three 1s and nine 0s (12 pairs <= 16: exact). Flipping the signs of the three 1s gives
    # mean >= 3/12 only for (+,+,+): P = 1/8, two-sided p = 2/8 = 0.25 (the bootstrap's inverted-CI p is ~0.06)
    assert c.query_p_signflip == pytest.approx(0.25)
    a = PQ_ARM[0] + PQ_ARM[1] + PQ_ARM[2][:4]
    b = PQ_BASE[0] + PQ_BASE[1] + PQ_BASE[2]
    perm = paired_permutation_test(a, b, n_boot=2000, seed=0)
    assert c.query_p_signflip == perm.p_value and perm.method == "sign_flip_exact"
    boot = paired_bootstrap(a, b, n_boot=2000, seed=0)
    assert (c.query_delta.lo, c.query_delta.hi) == (boot.lo, boot.hi)
    assert (c.query_delta.p_value, c.query_p_bootstrap) == (perm.p_value, boot.p_value)
    assert c.query_delta == perm  # the cell's per-query result is exactly paired_permutation_test's
    row = rep.to_frame().query("arm == @A and shot_num == 1").iloc[0]
    assert row["query_delta_p_signflip"] == pytest.approx(0.25) and row["query_delta_p"] == pytest.approx(0.25)
    assert row["query_delta_p_bootstrap"] == boot.p_value
    assert _table(report_markdown(rep))[A, "1"][13] == "0.25"  # the "per-query p (sign-flip)" column
    assert rep.cell(C, 1).query_p_signflip is None  # no per-query rows there


# ---------------------------------------------------------------------------------------------- BH families

# seed-level p by hand (test_compare.py): A1 = C2 = 1 - sqrt(75/77) = 0.0130725, C1 = 1 - 1/sqrt7, A2 = 1
P_SMALL, P_C1 = 1 - math.sqrt(75 / 77), 1 - 1 / math.sqrt(7)


def test_bh_family_all_is_one_family_over_every_arm_cell():
    rep = compare_runs(runs_frame(), n_boot=10)
    # m = 4, sorted p: .0131 .0131 .622 1 -> q = 2·.0131, 2·.0131, 4/3·.622, 1
    assert rep.cell(A, 1).delta_q == pytest.approx(2 * P_SMALL)
    assert rep.cell(C, 1).delta_q == pytest.approx(4 / 3 * P_C1)
    assert rep.cell(A, 2).delta_q == pytest.approx(1.0)
    assert {c.delta_q_family for c in rep.cells if c.arm != BASE} == {"all"}
    assert rep.bh_family == "all"


def test_bh_family_shot_controls_fdr_within_each_shot():
    rep = compare_runs(runs_frame(), n_boot=10, bh_family="shot")
    # shot 1: m = 2, p = .0131 (A1), .622 (C1) -> q = 2·.0131, .622; shot 2: .0131 (C2), 1 (A2) -> 2·.0131, 1
    assert rep.cell(A, 1).delta_q == pytest.approx(2 * P_SMALL)
    assert rep.cell(C, 1).delta_q == pytest.approx(P_C1)  # 4/3·p under "all": the family changes q
    assert rep.cell(C, 2).delta_q == pytest.approx(2 * P_SMALL) and rep.cell(A, 2).delta_q == pytest.approx(1.0)
    assert rep.cell(C, 1).delta_q_family == "shot_num=1" and rep.cell(C, 2).delta_q_family == "shot_num=2"
    assert rep.cell(BASE, 1).delta_q is None  # the baseline is no test
    assert any("Benjamini-Hochberg (FDR 0.05, one family per shot)" in n for n in rep.notes)
    assert "Benjamini-Hochberg within each shot" in report_markdown(rep)
    frame = rep.to_frame()
    assert set(frame.loc[frame["role"] == "arm", "delta_q_family"]) == {"shot_num=1", "shot_num=2"}


def test_bad_options_raise():
    with pytest.raises(LeverPlusInputError, match="bh_family"):
        compare_runs(runs_frame(), n_boot=10, bh_family="factor")
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(LeverPlusInputError, match="equivalence_margin_pp"):
            compare_runs(runs_frame(), n_boot=10, equivalence_margin_pp=bad)


# ---------------------------------------------------------------------------------------------- margin verdict


def test_margin_verdict_at_the_default_half_point():
    rep = compare_runs(runs_frame(), n_boot=10)
    assert rep.equivalence_margin_pp == 0.5
    # A1 d = .05 .04 .06: 95% CI [.025, .075] excludes 0 -> better (as the old verdict)
    assert rep.cell(A, 1).margin_verdict == "better" and rep.cell(C, 2).margin_verdict == "worse"
    # A2 d = 0 0 0: the TOST interval is [0, 0], strictly inside ±.005 -> equivalent (old verdict: no difference)
    assert rep.cell(A, 2).margin_verdict == "equivalent" and rep.cell(A, 2).verdict == "no significant difference"
    # C1 d = -.02 .01 .04: mean .01, sd .03; 95% CI includes 0, 90% CI .01 ± 2.92·.03/sqrt3 not inside ±.005
    c1 = rep.cell(C, 1)
    assert c1.margin_verdict == "inconclusive"
    assert c1.margin.eq_lo == pytest.approx(0.01 - T2_95 * 0.03 / math.sqrt(3))
    assert c1.margin.eq_hi == pytest.approx(0.01 + T2_95 * 0.03 / math.sqrt(3))
    md = _table(report_markdown(rep))
    assert md[C, "1"][10] == "inconclusive" and md[A, "2"][10] == "equivalent"
    assert "margin verdict (±0.5 pp)" in _header(report_markdown(rep))


def test_a_wide_margin_makes_the_noisy_cell_equivalent():
    # C1's 90% CI [-.0406, +.0606] lies inside ±10 pp = ±.10 -> equivalent; inside ±5 pp it does not
    assert compare_runs(runs_frame(), n_boot=10, equivalence_margin_pp=10).cell(C, 1).margin_verdict == "equivalent"
    assert compare_runs(runs_frame(), n_boot=10, equivalence_margin_pp=5).cell(C, 1).margin_verdict == "inconclusive"
    row = compare_runs(runs_frame(), n_boot=10, equivalence_margin_pp=10).to_frame().query(
        "arm == @C and shot_num == 1").iloc[0]
    assert row["margin_verdict"] == "equivalent" and row["equivalence_margin_pp"] == pytest.approx(10.0)
    assert row["margin_eq_lo"] == pytest.approx(0.01 - T2_95 * 0.03 / math.sqrt(3))


def test_margin_verdict_without_enough_seed_pairs():
    rep = compare_runs(runs_frame(drop={(A, 1, 1), (A, 1, 2)}), n_boot=10)
    assert rep.cell(A, 1).margin_verdict == "inconclusive"  # one pair: no interval
    assert rep.cell(A, 1).mde_seed is None  # the t MDE needs 2 pairs
    rep = compare_runs(runs_frame(drop={(BASE, 2, s) for s in range(3)}), n_boot=10)
    assert rep.cell(C, 2).margin_verdict == "no baseline pair" and rep.cell(C, 2).margin is None


# ---------------------------------------------------------------------------------------------- power


def test_mde_columns_seed_t_and_per_query_z():
    rep = compare_runs(runs_frame(), per_query_tables(), n_boot=200)
    # seed level: A1 sd(d) = .01 with 3 seeds -> 3.264 sd (docs/statistics.md) = 3.264 pp; C1 sd .03 -> 9.79 pp
    assert rep.cell(A, 1).mde_seed == pytest.approx(mde_paired(0.01, 3, 0.05, 0.8, "t"))
    assert 100 * rep.cell(A, 1).mde_seed == pytest.approx(3.264, abs=1e-3)
    assert 100 * rep.cell(C, 1).mde_seed == pytest.approx(3 * 3.264, abs=3e-3)
    assert rep.cell(A, 2).mde_seed == 0.0  # d = 0 0 0: no noise, any effect is detected
    # per query: 12 differences, three 1s: sd = sqrt(12/11 · 1/4 · 3/4); z MDE = (z.975 + z.8) · sd / sqrt(12)
    sd = math.sqrt(12 / 11 * 0.25 * 0.75)
    assert rep.cell(A, 1).mde_query == pytest.approx(Z_SUM * sd / math.sqrt(12))
    row = rep.to_frame().query("arm == @A and shot_num == 1").iloc[0]
    assert row["mde80_seed_pp"] == pytest.approx(100 * rep.cell(A, 1).mde_seed)
    assert row["mde80_query_pp"] == pytest.approx(100 * Z_SUM * sd / math.sqrt(12))
    assert math.isnan(rep.to_frame().query("arm == @C and shot_num == 1").iloc[0]["mde80_query_pp"])
    md = _table(report_markdown(rep))
    assert md[A, "1"][11] == f"{100 * rep.cell(A, 1).mde_seed:.2f}" and md[A, "1"][14] == "36.58"


# ---------------------------------------------------------------------------------------------- policy shift


def _with_icds(tables: dict, icds_by_run: dict) -> dict:
    out = {}
    for rid, q in tables.items():
        q = q.copy()
        q["icds"] = icds_by_run.get(rid, [(1, 2)] * len(q))
        out[rid] = q
    return out


def _shift_tables() -> dict:
    """A vs baseline at shot 1; baseline prompts all (1, 2). Arm: seed 0 changes query 0, seed 1 none, seed 2
    reorders queries 1 and 3 ((2, 1): the same examples in another order are another prompt) and answers an
    unmatched query 4."""
    arm = {0: [(5, 2), (1, 2), (1, 2), (1, 2)], 1: [(1, 2)] * 4, 2: [(1, 2), (2, 1), (1, 2), (2, 1), (9, 9)]}
    return _with_icds(per_query_tables(), {_rid(A, 1, s): v for s, v in arm.items()})


def test_changed_fraction_by_hand():
    base, arm = _pq([0, 1, 0, 1]), _pq([1, 1, 0, 1, 1])
    base["icds"] = [(1, 2)] * 4
    arm["icds"] = [(1, 2), (2, 1), (1, 3), (1, 2), (4, 4)]
    assert changed_fraction(arm, base, 1) == (2, 4)  # query 4 has no counterpart: not counted
    assert changed_fraction(arm, base, 2) == (0, 0)  # nothing at shot 2
    assert changed_fraction(arm, base.drop(columns="icds"), 1) is None
    assert policy_shift([(0, "a", "b")], 1, {"a": arm}) is None  # the baseline run has no table


def test_policy_shift_per_cell_mean_over_seeds_and_bound():
    rep = compare_runs(runs_frame(), _shift_tables(), n_boot=200)
    s = rep.cell(A, 1).shift
    # seed 0: 1 of 4 changed, seed 1: 0 of 4, seed 2: 2 of 4 -> mean (.25 + 0 + .5)/3 = .25; |Δ| <= 25 pp
    assert s.fractions == pytest.approx((0.25, 0.0, 0.5)) and s.seeds == (0, 1, 2) and s.n_queries == 12
    assert s.mean_fraction == pytest.approx(0.25) and s.bound == s.mean_fraction
    assert abs(rep.cell(A, 1).delta.delta) <= s.bound  # Δ = +5 pp sits within the bound
    row = rep.to_frame().query("arm == @A and shot_num == 1").iloc[0]
    assert row["changed_frac"] == pytest.approx(0.25) and row["delta_bound_pp"] == pytest.approx(25.0)
    assert row["changed_n_seeds"] == 3
    md = _table(report_markdown(rep))
    assert md[A, "1"][6] == "changed 25.0% of queries, |Δ| ≤ 25.0 pp"  # next to Δ, '|' escaped in the markdown
    assert md[BASE, "1"][6] == "changed 0.0% of queries, |Δ| ≤ 0.0 pp"  # the baseline vs itself
    assert md[C, "1"][6] == "n/a"  # no per-query rows there
    assert not any("exceeds the changed-queries bound" in n for n in rep.notes)
    # the alias row of the CSV carries its canonical arm's share
    rep = compare_runs(runs_frame(), _shift_tables(), n_boot=10, aliases={ALIAS: A})
    alias_row = rep.to_frame().query("arm == @ALIAS and shot_num == 1").iloc[0]
    assert alias_row["changed_frac"] == pytest.approx(0.25)


def test_nothing_changed_reads_as_zero_and_a_violated_bound_is_noted():
    # identical prompts at every seed: the policy did not move, so under a deterministic LVLM Δ must be 0 — but the
    # runs table says Δ = +5 pp: the report must say the bound does not hold there
    tables = _with_icds(per_query_tables(), {})
    rep = compare_runs(runs_frame(), tables, n_boot=10)
    assert rep.cell(A, 1).shift.mean_fraction == 0.0
    assert _table(report_markdown(rep))[A, "1"][6] == "changed 0.0% of queries, |Δ| ≤ 0.0 pp"
    assert any(f"arm {A!r} shot 1: |Δ| = 5.00 pp exceeds the changed-queries bound 0.00 pp" in n for n in rep.notes)


def test_a_tiny_share_is_not_rounded_to_zero():
    base = _pq([1] * 4000)
    arm = _pq([1] * 4000)
    base["icds"] = [(1, 2)] * 4000
    arm["icds"] = [(1, 3)] + [(1, 2)] * 3999  # 1 in 4000 = 0.025%
    df = runs_frame()
    tables = {_rid(BASE, 1, 0): base, _rid(A, 1, 0): arm}
    rep = compare_runs(df, tables, n_boot=10)
    assert _table(report_markdown(rep))[A, "1"][6] == "changed 0.025% of queries, |Δ| ≤ 0.025 pp"


# ---------------------------------------------------------------------------------------------- loading, files


def test_per_query_loader_keeps_icds(tmp_path):
    path = tmp_path / "per_query.jsonl"
    row = {"kind": "downstream", "method": "selector", "split": "test", "query_index": 0, "shot_num": 2, "acc": 1.0,
           "icds": [4, 7]}
    old = {**row, "query_index": 1}
    del old["icds"]
    path.write_text(json.dumps(row) + "\n" + json.dumps(old) + "\n")
    q = _parse_per_query(path, "r1", "test", "selector")
    assert q["icds"].tolist() == [(4, 7), None]
    path.write_text(json.dumps({**row, "icds": [4, "x"]}) + "\n")
    with pytest.raises(LeverPlusInputError) as e:
        _parse_per_query(path, "r1", "test", "selector")
    assert (e.value.record, e.value.field) == ("line 1", "icds")


def test_report_files_carry_the_new_columns(tmp_path):
    rep = compare_runs(runs_frame(), _shift_tables(), n_boot=50, aliases={ALIAS: A})
    write_report(rep, tmp_path)
    csv = pd.read_csv(tmp_path / "comparison.csv", keep_default_na=False)
    new = {"query_delta_p_signflip", "margin_verdict", "equivalence_margin_pp", "margin_eq_lo", "margin_eq_hi",
           "mde80_seed_pp", "mde80_query_pp", "changed_frac", "changed_n_seeds", "delta_bound_pp", "delta_q_family"}
    assert new <= set(csv.columns)
    row = csv[(csv["arm"] == A) & (csv["shot_num"] == 1)].iloc[0]
    assert row["margin_verdict"] == "better" and float(row["delta_bound_pp"]) == pytest.approx(25.0)
    assert float(row["delta"]) == pytest.approx(0.05)  # the existing numbers are unchanged
    md = (tmp_path / "comparison.md").read_text()
    assert _header(md)[6] == "policy moved" and "per-query p (sign-flip)" in _header(md)
    js = json.loads((tmp_path / "comparison.json").read_text())
    assert js["equivalence_margin_pp"] == 0.5 and js["bh_family"] == "all"
