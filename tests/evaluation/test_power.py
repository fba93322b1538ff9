"""Pre-sweep power (leverplus.sweeps.power): the MDEs a planned sweep can resolve, from a pilot's comparison.csv
or the embedded world's default spreads, checked against hand-computed values."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
from test_compare import runs_frame

from leverplus.analysis.compare import compare_runs, write_report
from leverplus.errors import LeverPlusInputError
from leverplus.sweeps.power import (
    DEFAULT_QUERY_SD,
    DEFAULT_SEED_SD,
    default_spreads,
    plan_sweep,
    planned_seeds,
    power_lines,
    read_pilot,
)

Z_SUM = 1.959963985 + 0.841621234  # z_.975 + z_.8
T_MDE_N3 = 3.2640435  # seed-level t MDE in sd units at n = 3 (tests/evaluation/test_stats.py)


def test_mde_for_a_known_variance_by_hand():
    # defaults: seed sd .64 pp, per-query sd .28; 3 seeds x 60 queries
    plan = plan_sweep(default_spreads(), n_seeds=3, n_queries=60, target_pp=0.5)
    assert plan.mde_seed == pytest.approx(T_MDE_N3 * DEFAULT_SEED_SD, rel=1e-6)  # 2.09 pp
    # per-query z MDE: (z_.975 + z_.8) · .28 / sqrt(180) = 2.8015852 · .28 / 13.416408 = .0584686
    assert plan.mde_query == pytest.approx(Z_SUM * DEFAULT_QUERY_SD / math.sqrt(180), rel=1e-7)
    assert plan.mde_query == pytest.approx(0.0584686, abs=1e-6)
    # seeds for 0.5 pp at sd .64 pp: the z lower bound is (2.8016 · .64 / .5)^2 = 12.86 -> the t answer is 15
    assert plan.seeds_needed == 15
    text = "\n".join(power_lines(plan, "defaults", 3))
    assert "seed-level paired t, 3 seeds: MDE 2.09 pp" in text
    assert "per-query test, 60 queries x 3 seeds: MDE 5.85 pp" in text
    assert "to detect 0.50 pp at the seed level: 15 seeds (3 planned: NOT enough)" in text


def test_pilot_spreads_are_the_pilot_cells_sds(tmp_path):
    # arm cells of test_compare's runs: seed-paired deltas A1 [.05 .04 .06] (sd .01), A2 [0 0 0] (sd 0),
    # C1 [-.02 .01 .04] (sd .03), C2 [-.05 -.06 -.04] (sd .01)
    write_report(compare_runs(runs_frame(), n_boot=20), tmp_path)
    spreads = read_pilot(tmp_path / "comparison.csv")
    assert sorted(spreads.seed_sds) == pytest.approx([0.0, 0.01, 0.01, 0.03], abs=1e-9)
    assert spreads.query_sds == [] and spreads.queries_per_seed is None
    plan = plan_sweep(spreads, n_seeds=3, n_queries=None, target_pp=1.0)
    rms = math.sqrt((0.01**2 + 0.03**2 + 0.01**2) / 4)  # .016583
    assert plan.seed_sd == pytest.approx(rms, rel=1e-9)
    assert plan.mde_seed == pytest.approx(T_MDE_N3 * rms, rel=1e-6)
    assert math.isnan(plan.mde_query)
    assert any("number of evaluation queries unknown" in line for line in power_lines(plan, spreads.source, 3))


def test_pilot_errors_name_the_file(tmp_path):
    with pytest.raises(LeverPlusInputError, match="no pilot comparison"):
        read_pilot(tmp_path / "nope.csv")
    bad = tmp_path / "comparison.csv"
    bad.write_text("arm,role\nx,arm\n")
    with pytest.raises(LeverPlusInputError) as e:
        read_pilot(bad)
    assert e.value.field == "delta_n" and str(bad) in str(e.value)


def test_planned_seeds_counts_distinct_seed_overrides():
    pairs = [("data.shot_nums=[2]", "seed=0"), ("data.shot_nums=[2]", "seed=1"), ("data.shot_nums=[1]", "seed=1")]
    assert planned_seeds(pairs) == 2
    plan = plan_sweep(default_spreads(), n_seeds=1, n_queries=10, target_pp=0.5)
    assert plan.n_seeds == 2  # one seed has no seed-level test: the plan is shown for 2
    assert "no seed-level test is possible" in power_lines(plan, "x", 1)[1]
