"""Tests for leverplus.compare: paired deltas vs the baseline, per-query bootstrap, main effects, aliases, report
files, and loading/logging against a real MLflow sqlite store.

Hand arithmetic uses the closed form of Student's t with 2 degrees of freedom:
    CDF(t) = 1/2 + t / (2 sqrt(2 + t²))  =>  two-sided p = 1 - |t| / sqrt(2 + t²)
    t_{2, 0.975}: t / sqrt(2 + t²) = 0.95  =>  t² = 0.9025·2 / 0.0975 = 18.51282  =>  t = 4.3026527
"""

from __future__ import annotations

import json
import math
import re

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from scipy import stats as sps

from leverplus.analysis.compare import (
    DEFAULT_N_BOOT,
    _parse_per_query,
    compare_runs,
    compare_sweep,
    load_per_query,
    load_sweep_runs,
    main,
    report_markdown,
    write_report,
)
from leverplus.config.schema import EvalConfig
from leverplus.errors import LeverPlusInputError
from leverplus.evaluation.stats import paired_bootstrap

T2 = math.sqrt(0.9025 * 2 / 0.0975)  # 4.3026527, t_{2, 0.975}
BASE = "rce_only"
A = "mode=hard_only|w=1x1|raw=false"
C = "mode=hard_plus_soft|w=1x1|raw=true"
ALIAS = "mode=hard_only|w=2x2|raw=false"

# acc[(arm, shot)] = per-seed accuracies for seeds 0, 1, 2
ACC = {
    (BASE, 1): [0.50, 0.52, 0.54], (BASE, 2): [0.60, 0.62, 0.58],
    (A, 1): [0.55, 0.56, 0.60], (A, 2): [0.60, 0.62, 0.58],  # A shot 2 == baseline: delta exactly 0
    (C, 1): [0.48, 0.53, 0.58], (C, 2): [0.55, 0.56, 0.54],
}
# objective: acc - 0.1, except A and the baseline at shot 1 (hand-checked below)
OBJ = {(A, 1): [0.40, 0.42, 0.44], (BASE, 1): [0.41, 0.41, 0.41]}
PARAMS = {
    BASE: {"params.reward.mode": "hard_plus_soft", "params.reward.hard_weight": "1",
           "params.reward.soft_weight": "1", "params.rce.use_raw_reward": "false"},
    A: {"params.reward.mode": "hard_only", "params.reward.hard_weight": "1",
        "params.reward.soft_weight": "1", "params.rce.use_raw_reward": "false"},
    C: {"params.reward.mode": "hard_plus_soft", "params.reward.hard_weight": "1",
        "params.reward.soft_weight": "1", "params.rce.use_raw_reward": "true"},
}


def _rid(arm: str, shot: int, seed: int) -> str:
    return f"{arm}/{shot}/{seed}"


def runs_frame(drop=()) -> pd.DataFrame:
    rows = []
    for (arm, shot), accs in ACC.items():
        for seed, acc in enumerate(accs):
            if (arm, shot, seed) in drop:
                continue
            obj = OBJ.get((arm, shot), [a - 0.1 for a in accs])[seed]
            rows.append({"run_id": _rid(arm, shot, seed), "arm": arm, "role": "baseline" if arm == BASE else "arm",
                         "shot_num": shot, "seed": seed, "objective": obj, "acc": acc, **PARAMS[arm]})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def report():
    return compare_runs(runs_frame(), aliases={ALIAS: A}, n_boot=200)


# ---------------------------------------------------------------------------------------------- compare_runs


def test_arm_means_and_ci_by_hand(report):
    # A shot 1: acc 0.55 0.56 0.60 -> mean 0.57; deviations -.02 -.01 .03 -> s² = .0014/2 = .0007,
    # se = sqrt(.0007/3) = 0.0152753, half = 4.3026527 * 0.0152753 = 0.0657244
    c = report.cell(A, 1)
    assert c.n_seeds == 3 and c.seeds == (0, 1, 2)
    assert c.acc.mean == pytest.approx(0.57)
    half = T2 * math.sqrt(0.0007 / 3)
    assert c.acc.lo == pytest.approx(0.57 - half) and c.acc.hi == pytest.approx(0.57 + half)
    # objective 0.40 0.42 0.44: mean 0.42, s = 0.02, half = 4.3026527 * 0.02/sqrt(3) = 0.0496828
    assert c.objective.mean == pytest.approx(0.42)
    assert c.objective.hi - c.objective.mean == pytest.approx(T2 * 0.02 / math.sqrt(3))


def test_paired_deltas_t_ci_and_p_by_hand(report):
    # A shot 1: d = .05 .04 .06 -> mean .05, sd .01, se .01/sqrt3; t = 5·sqrt3 = 8.660254, t² = 75
    #   CI .05 ± 4.3026527·.01/sqrt3 = [.0251586, .0748414];  p = 1 - sqrt(75/77) = 0.0130725 -> "better"
    a1 = report.cell(A, 1)
    assert a1.delta.delta == pytest.approx(0.05) and a1.delta.n == 3
    assert a1.delta.lo == pytest.approx(0.05 - T2 * 0.01 / math.sqrt(3))
    assert a1.delta.hi == pytest.approx(0.05 + T2 * 0.01 / math.sqrt(3))
    assert a1.delta.p_value == pytest.approx(1 - math.sqrt(75 / 77))
    assert a1.delta.p_value == pytest.approx(sps.ttest_rel(ACC[A, 1], ACC[BASE, 1]).pvalue)
    assert a1.verdict == "better"
    # C shot 1: d = -.02 .01 .04 -> mean .01, sd .03, t = .01/(.03/sqrt3) = 1/sqrt3, t² = 1/3
    #   CI .01 ± 4.3026527·.03/sqrt3 = [-.0645242, .0845242] contains 0;  p = 1 - 1/sqrt7 = 0.6220355
    c1 = report.cell(C, 1)
    assert c1.delta.delta == pytest.approx(0.01)
    assert c1.delta.lo == pytest.approx(0.01 - T2 * 0.03 / math.sqrt(3))
    assert c1.delta.p_value == pytest.approx(1 - 1 / math.sqrt(7))
    assert c1.delta.p_value == pytest.approx(sps.ttest_rel(ACC[C, 1], ACC[BASE, 1]).pvalue)
    assert c1.verdict == "no significant difference"
    # C shot 2: d = -.05 -.06 -.04 -> mean -.05, sd .01, CI [-.0748414, -.0251586], p = 0.0130725 -> "worse"
    c2 = report.cell(C, 2)
    assert c2.delta.delta == pytest.approx(-0.05)
    assert c2.delta.hi == pytest.approx(-0.05 + T2 * 0.01 / math.sqrt(3))
    assert c2.delta.p_value == pytest.approx(1 - math.sqrt(75 / 77))
    assert c2.verdict == "worse"
    # objective delta A shot 1: .40-.41, .42-.41, .44-.41 = -.01 .01 .03: mean .01, sd .02, t = sqrt3/2, t² = .75
    #   p = 1 - sqrt(.75/2.75) = 0.4777670
    assert a1.objective_delta.delta == pytest.approx(0.01)
    assert a1.objective_delta.p_value == pytest.approx(1 - math.sqrt(0.75 / 2.75))


def test_equal_arm_and_baseline_vs_itself_give_zero_and_no_difference(report):
    # A shot 2 has exactly the baseline's accuracies: d = 0 0 0 -> delta 0, CI [0, 0], p = 1
    for cell in (report.cell(A, 2), report.cell(BASE, 1), report.cell(BASE, 2)):
        assert cell.delta.delta == 0.0 and cell.delta.lo == 0.0 and cell.delta.hi == 0.0
        assert cell.delta.p_value == 1.0
        assert cell.verdict == "no significant difference"
    assert report.baseline_arm == BASE
    assert [(c.arm, c.shot_num) for c in report.cells][:2] == [(BASE, 1), (BASE, 2)]  # baseline listed first


def test_main_effects_are_marginal_means_of_cell_deltas(report):
    # cell deltas: A1 .05, A2 0, C1 .01, C2 -.05 (baseline cells excluded)
    eff = {(m.factor, m.level): (m.mean_delta, m.n_cells) for m in report.main_effects}
    assert eff["params.reward.mode", "hard_only"] == pytest.approx((0.025, 2))  # (.05 + 0)/2
    assert eff["params.reward.mode", "hard_plus_soft"] == pytest.approx((-0.02, 2))  # (.01 - .05)/2
    assert eff["weights", "1×1"] == pytest.approx((0.0025, 4))  # (.05 + 0 + .01 - .05)/4
    assert eff["params.rce.use_raw_reward", "false"] == pytest.approx((0.025, 2))
    assert eff["params.rce.use_raw_reward", "true"] == pytest.approx((-0.02, 2))
    assert eff["shot_num", "1"] == pytest.approx((0.03, 2))  # (.05 + .01)/2
    assert eff["shot_num", "2"] == pytest.approx((-0.025, 2))  # (0 - .05)/2
    assert len(report.main_effects) == 7  # the alias adds no cell: counted once


def test_aliases_share_the_canonical_numbers_and_are_marked(report):
    assert report.aliases == {ALIAS: A}
    assert report.cell(A, 1).aliases == (ALIAS,)
    assert report.cell(ALIAS, 1) is report.cell(A, 1)
    frame = report.to_frame()
    alias_rows = frame[frame["arm"] == ALIAS]
    assert list(alias_rows["alias_of"]) == [A, A]
    assert list(alias_rows["delta"]) == pytest.approx([0.05, 0.0])
    md = report_markdown(report)
    esc = lambda label: label.replace("|", "\\|")  # noqa: E731
    assert "### Aliases" in md and f"| {esc(ALIAS)} | {esc(A)} |" in md


def test_alias_to_an_arm_without_runs_is_noted():
    rep = compare_runs(runs_frame(), aliases={"x": "never_run"}, n_boot=10)
    assert any("never_run" in n for n in rep.notes)


def test_missing_baseline_pair_is_reported_not_dropped():
    rep = compare_runs(runs_frame(drop={(BASE, 1, 2)}), n_boot=10)
    a1 = rep.cell(A, 1)
    # only seeds 0, 1 pair: d = .05 .04 -> mean .045
    assert a1.delta.n == 2 and a1.delta.delta == pytest.approx(0.045)
    assert a1.missing_baseline_seeds == (2,) and a1.n_seeds == 3
    assert (A, 1, 2) in rep.missing_baseline and (C, 1, 2) in rep.missing_baseline
    assert "no baseline for seed(s) 2" in report_markdown(rep)


def test_missing_arm_seed_and_single_pair():
    rep = compare_runs(runs_frame(drop={(A, 1, 1), (A, 1, 2)}), n_boot=10)
    a1 = rep.cell(A, 1)
    assert a1.missing_arm_seeds == (1, 2)
    assert a1.delta.n == 1 and math.isnan(a1.delta.lo)  # one pair: no CI
    assert a1.verdict == "no significant difference"


def test_bad_tables_raise():
    with pytest.raises(LeverPlusInputError, match="no baseline runs"):
        compare_runs(runs_frame().query("role != 'baseline'"))
    df = runs_frame()
    with pytest.raises(LeverPlusInputError, match="several runs for arm"):
        compare_runs(pd.concat([df, df.iloc[[3]]]))
    df.loc[4, "acc"] = float("nan")
    with pytest.raises(LeverPlusInputError, match="not a finite number"):
        compare_runs(df)
    with pytest.raises(LeverPlusInputError, match="lacks column"):
        compare_runs(runs_frame().drop(columns="seed"))


def test_missing_factor_is_skipped_with_a_note():
    rep = compare_runs(runs_frame(), factors=("params.nope", "shot_num"), n_boot=10)
    assert {m.factor for m in rep.main_effects} == {"shot_num"}
    assert any("params.nope" in n for n in rep.notes)


# ---------------------------------------------------------------------------------------------- per-query bootstrap

# A vs baseline at shot 1, queries 0..3 per seed (seed 2: the arm also answered query 4, which has no pair)
PQ_BASE = {0: [0, 1, 0, 1], 1: [1, 0, 0, 1], 2: [0, 0, 1, 1]}
PQ_ARM = {0: [1, 1, 0, 1], 1: [1, 1, 0, 1], 2: [0, 1, 1, 1, 1]}


def _pq(accs, shot=1) -> pd.DataFrame:
    return pd.DataFrame({"shot_num": shot, "query_index": list(range(len(accs))), "acc": [float(a) for a in accs]})


def per_query_tables():
    pq = {_rid(BASE, 1, s): _pq(v) for s, v in PQ_BASE.items()}
    pq.update({_rid(A, 1, s): _pq(v) for s, v in PQ_ARM.items()})
    return pq


def test_per_query_bootstrap_pools_seeds_matched_by_query():
    rep = compare_runs(runs_frame(), per_query_tables(), n_boot=2000, seed=0)
    q = rep.cell(A, 1).query_delta
    # differences: seed 0 [1,0,0,0], seed 1 [0,1,0,0], seed 2 [0,1,0,0] (query 4 unmatched) -> 3 ones in 12 = 0.25
    assert q.n == 12 and q.delta == pytest.approx(0.25)
    assert rep.cell(A, 1).n_unmatched_queries == 1 and rep.cell(A, 1).query_seeds == (0, 1, 2)
    # the bootstrap mean is Binomial(12, 1/4)/12: P(mean <= 0) = (3/4)^12 = 0.0317 -> p ≈ 2·0.0317 = 0.0634;
    # P(X <= 0) = 0.0317 > 0.025 -> lo = 0;  P(X <= 5) = 0.946 < 0.975 <= P(X <= 6) = 0.986 -> hi = 6/12
    # the p is the calibrated sign-flip test's (exact: 2 · 1/8), the bootstrap's inverted-CI p is kept apart
    assert q.p_value == pytest.approx(0.25) and q.method == "sign_flip_exact"
    assert rep.cell(A, 1).query_p_bootstrap == pytest.approx(2 * 0.75**12, abs=0.02)
    assert q.lo == 0.0 and q.hi == 0.5
    assert rep.cell(A, 1).query_verdict == "no significant difference"
    # exactly stats.paired_bootstrap on the pooled pairs in (seed, query_index) order
    a = [1, 1, 0, 1] + [1, 1, 0, 1] + [0, 1, 1, 1]
    b = PQ_BASE[0] + PQ_BASE[1] + PQ_BASE[2]
    ref = paired_bootstrap(a, b, n_boot=2000, seed=0)
    assert (q.lo, q.hi, rep.cell(A, 1).query_p_bootstrap) == (ref.lo, ref.hi, ref.p_value)
    # cells without per-query rows get none, and say so
    assert rep.cell(C, 1).query_delta is None
    assert any(f"arm {C!r} shot 1: no per-query rows" in n and "seed(s) 0, 1, 2" in n for n in rep.notes)
    assert any("1 per-query row(s) without a counterpart" in n for n in rep.notes)


def test_per_query_bootstrap_constant_difference_is_significant():
    # every query: arm 1, baseline 0.5 -> every difference .5 -> all bootstrap means .5 -> CI [.5, .5], p = 0
    pq = {_rid(BASE, 2, s): _pq([0.5] * 3, shot=2) for s in range(3)}
    pq.update({_rid(C, 2, s): _pq([1.0] * 3, shot=2) for s in range(3)})
    rep = compare_runs(runs_frame(), pq, n_boot=100)
    q = rep.cell(C, 2).query_delta
    # sign-flip p, exact: only the all-plus (and all-minus) pattern of 9 reaches |mean| = .5 -> 2/2^9 = 1/256
    assert (q.delta, q.lo, q.hi, q.p_value, q.n) == (0.5, 0.5, 0.5, 1 / 256, 9)
    assert rep.cell(C, 2).query_p_bootstrap == 0.0
    assert rep.cell(C, 2).query_verdict == "better"


def test_per_query_duplicate_index_raises():
    pq = per_query_tables()
    pq[_rid(A, 1, 0)] = pd.DataFrame({"shot_num": 1, "query_index": [0, 0], "acc": [1.0, 0.0]})
    with pytest.raises(LeverPlusInputError, match="query_index 0 appears twice"):
        compare_runs(runs_frame(), pq, n_boot=10)


def test_compare_runs_is_deterministic():
    r1 = compare_runs(runs_frame(), per_query_tables(), n_boot=300, seed=3)
    r2 = compare_runs(runs_frame(), per_query_tables(), n_boot=300, seed=3)
    assert r1.to_frame().equals(r2.to_frame())


# ---------------------------------------------------------------------------------------------- output


def test_markdown_verdicts(report):
    md = report_markdown(report)
    # arm labels contain '|', escaped as '\|' so the table keeps its columns
    table = [re.split(r"(?<!\\)\|", line)[1:-1] for line in md.splitlines()
             if line.startswith("| mode=") or line.startswith(f"| {BASE}")]
    table = [cells for cells in table if len(cells) == 17]  # the main table (not the alias table)
    assert len(table) == 6
    rows = {(cells[0].strip().replace("\\|", "|"), cells[1].strip()): "|".join(cells) + "|" for cells in table}
    assert "| better |" in rows[A, "1"]
    assert "| no significant difference |" in rows[A, "2"]
    assert "| no significant difference |" in rows[C, "1"]
    assert "| worse |" in rows[C, "2"]
    assert "+5.00 [+2.52, +7.48]" in rows[A, "1"]  # delta .05 and CI [.0251586, .0748414] in points
    assert "baseline (vs itself)" in rows[BASE, "1"]
    assert "### Main effects" in md


def test_write_report_files(report, tmp_path):
    paths = write_report(report, tmp_path / "out")
    names = {p.name for p in paths}
    assert {"comparison.md", "comparison.csv", "main_effects.csv", "comparison.json", "delta_heatmap_shot1.png",
            "delta_heatmap_shot2.png", "delta_forest_shot1.png", "delta_forest_shot2.png"} <= names
    for p in paths:
        assert p.exists() and p.stat().st_size > 0
    csv = pd.read_csv(tmp_path / "out" / "comparison.csv", keep_default_na=False)
    row = csv[(csv["arm"] == A) & (csv["shot_num"] == 1)].iloc[0]
    assert float(row["delta"]) == pytest.approx(0.05)
    assert float(row["delta_lo"]) == pytest.approx(0.05 - T2 * 0.01 / math.sqrt(3))
    assert float(row["delta_p"]) == pytest.approx(1 - math.sqrt(75 / 77))
    assert float(row["acc_mean"]) == pytest.approx(0.57) and int(row["n_seeds"]) == 3
    assert row["verdict"] == "better" and row["weights"] == "1×1"
    assert len(csv) == 6 + 2  # 3 arms × 2 shots + the alias at 2 shots
    me = pd.read_csv(tmp_path / "out" / "main_effects.csv", dtype=str)
    assert float(me[(me.factor == "shot_num") & (me.level == "1")]["mean_delta"].iloc[0]) == pytest.approx(0.03)
    js = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert js["baseline_arm"] == BASE and len(js["cells"]) == 6


# ---------------------------------------------------------------------------------------------- MLflow store


def _per_query_lines(shot: int, accs, method="selector", split="test"):
    rows = [{"kind": "offline", "query_index": 0, "top1_reward": 0.3}]
    for qi, acc in enumerate(accs):
        rows.append({"kind": "downstream", "method": method, "split": split, "query_index": qi, "shot_num": shot,
                     "acc": acc})
        rows.append({"kind": "downstream", "method": "random", "split": split, "query_index": qi, "shot_num": shot,
                     "acc": 0.0})
        rows.append({"kind": "downstream", "method": method, "split": "val", "query_index": qi, "shot_num": shot,
                     "acc": 0.0})
    return "\n".join(json.dumps(r) for r in rows) + "\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """sqlite store: sweep s1 (baseline + arm A, shot 2, seeds 0/1; a stale duplicate run_key; a FAILED run; an
    unrelated sweep), sweep multi (runs trained on shots 1 and 2 together)."""

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("leverplus-sim", artifact_location=(root / "artifacts").as_uri())
    t0 = 1_700_000_000_000
    clock = iter(range(t0, t0 + 10_000_000, 1000))

    def new_run(tags, params=None, metrics=None, status="FINISHED", per_query=None):
        run = client.create_run(exp, start_time=next(clock), tags={k: str(v) for k, v in tags.items()})
        rid = run.info.run_id
        client.log_batch(rid, metrics=[Metric(k, v, t0, 0) for k, v in (metrics or {}).items()],
                         params=[Param(k, v) for k, v in (params or {}).items()])
        if per_query is not None:
            client.log_text(rid, per_query, "per_query.jsonl")
        client.set_terminated(rid, status)
        return rid

    parent = new_run({"sweep": "s1", "role": "parent"})
    client.log_text(parent, json.dumps({ALIAS: A}), "aliases.json")
    ids = {}
    key = {BASE: "kB", A: "kA"}
    # stale duplicate of (A, seed 0): same run_key, older, acc 0.9 -> must be replaced by the newer run
    new_run({"sweep": "s1", "arm": A, "role": "arm", "shot_num": 2, "seed": 0, "run_key": "kA0",
             "mlflow.parentRunId": parent}, {"reward.mode": "hard_only"}, {"objective": 0.1,
                                                                            "test/downstream_acc": 0.9})
    accs = {(BASE, 0): [0, 1, 0, 1], (BASE, 1): [1, 0, 1, 1], (A, 0): [1, 1, 0, 1], (A, 1): [1, 1, 1, 1]}
    for (arm, seed), pq in accs.items():
        role = "baseline" if arm == BASE else "arm"
        ids[arm, seed] = new_run(
            {"sweep": "s1", "arm": arm, "role": role, "shot_num": 2, "seed": seed, "run_key": f"{key[arm]}{seed}",
             "mlflow.parentRunId": parent},
            {"reward.mode": PARAMS[arm]["params.reward.mode"], "reward.hard_weight": "1", "reward.soft_weight": "1",
             "rce.use_raw_reward": "false", "grpo.epochs": "0"},
            {"objective": 0.5 + 0.01 * seed, "test/downstream_acc": float(np.mean(pq))},
            per_query=_per_query_lines(2, pq),
        )
    new_run({"sweep": "s1", "arm": A, "role": "arm", "shot_num": 2, "seed": 2, "run_key": "kA2",
             "mlflow.parentRunId": parent}, metrics={"test/downstream_acc": 0.0}, status="FAILED")
    new_run({"sweep": "other", "arm": A, "role": "arm", "shot_num": 2, "seed": 0, "run_key": "zz"},
            metrics={"test/downstream_acc": 0.1})
    for arm, accs12 in ((BASE, (0.4, 0.6)), (A, (0.5, 0.8))):
        new_run({"sweep": "multi", "arm": arm, "role": "baseline" if arm == BASE else "arm", "shot_num": "1,2",
                 "seed": 0, "run_key": f"m{key[arm]}"},
                metrics={"objective": 0.3, "test/downstream_acc": float(np.mean(accs12)),
                         "test/downstream/shot1/selector_acc": accs12[0],
                         "test/downstream/shot2/selector_acc": accs12[1]})
    return {"uri": uri, "client": client, "parent": parent, "ids": ids}


def test_load_sweep_runs_filters_dedupes_and_parses(store):
    df = load_sweep_runs(store["uri"], "s1")
    assert len(df) == 4  # 4 newest FINISHED runs; stale duplicate, FAILED run, parent and other sweep excluded
    assert set(df["run_id"]) == set(store["ids"].values())
    a0 = df[(df["arm"] == A) & (df["seed"] == 0)].iloc[0]
    assert a0["acc"] == pytest.approx(0.75) and a0["shot_num"] == 2 and a0["role"] == "arm"
    assert df["shot_num"].dtype.kind == "i" and df["seed"].dtype.kind == "i"
    assert a0["params.reward.mode"] == "hard_only" and a0["parent_run_id"] == store["parent"]
    assert len(load_sweep_runs(store["uri"], "s1", statuses=("FINISHED", "FAILED"))) == 5
    assert len(load_sweep_runs(store["uri"], "s1", parent_run_id="nope")) == 0
    assert len(load_sweep_runs(store["uri"], "s1", experiment="leverplus-sim")) == 4


def test_load_sweep_runs_expands_multi_shot_runs(store):
    df = load_sweep_runs(store["uri"], "multi").sort_values(["arm", "shot_num"])
    assert list(zip(df["arm"], df["shot_num"], df["acc"])) == [(A, 1, 0.5), (A, 2, 0.8), (BASE, 1, 0.4),
                                                                (BASE, 2, 0.6)]
    rep = compare_runs(df, n_boot=10)
    assert rep.cell(A, 1).delta.delta == pytest.approx(0.1) and rep.cell(A, 2).delta.delta == pytest.approx(0.2)


def test_load_per_query_keeps_test_selector_rows(store):
    rid = store["ids"][A, 0]
    pq = load_per_query(store["uri"], [rid])
    assert list(pq[rid]["query_index"]) == [0, 1, 2, 3]
    assert list(pq[rid]["acc"]) == [1.0, 1.0, 0.0, 1.0] and set(pq[rid]["shot_num"]) == {2}


def test_compare_sweep_end_to_end_logs_to_parent(store, tmp_path, capsys):
    rep = compare_sweep("s1", store["uri"], out_dir=tmp_path / "cmp", n_boot=200)
    # seed 0: A .75 vs base .5; seed 1: A 1.0 vs base .75 -> d = .25 .25 -> delta .25, CI [.25, .25] -> "better"
    a2 = rep.cell(A, 2)
    assert a2.delta.delta == pytest.approx(0.25) and a2.delta.lo == pytest.approx(0.25)
    assert a2.verdict == "better"
    # per-query diffs: seed 0 [1,0,0,0], seed 1 [0,1,0,0] -> 2/8 = .25
    assert a2.query_delta.n == 8 and a2.query_delta.delta == pytest.approx(0.25)
    assert rep.aliases == {ALIAS: A}  # from the parent's aliases.json
    assert "| better |" in capsys.readouterr().out
    logged = {f.path for f in store["client"].list_artifacts(store["parent"], "comparison")}
    assert {"comparison/comparison.md", "comparison/comparison.csv", "comparison/delta_forest_shot2.png",
            "comparison/delta_heatmap_shot2.png"} <= logged
    assert (tmp_path / "cmp" / "comparison.csv").stat().st_size > 0


def test_main_clear_error_when_no_runs(store, tmp_path, capsys):
    rc = main(["--sweep", "nope", "--tracking-uri", store["uri"], "--out", str(tmp_path), "--no-log"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "no FINISHED runs tagged sweep='nope'" in err and "multi, other, s1" in err


def test_main_writes_report_without_logging(store, tmp_path, capsys):
    before = {f.path for f in store["client"].list_artifacts(store["parent"])}
    rc = main(["--sweep", "s1", "--tracking-uri", store["uri"], "--parent-run-id", store["parent"],
               "--out", str(tmp_path), "--no-log", "--n-boot", "50"])
    assert rc == 0 and (tmp_path / "comparison.md").stat().st_size > 0
    assert "| better |" in capsys.readouterr().out
    assert {f.path for f in store["client"].list_artifacts(store["parent"])} == before  # --no-log
    assert "paired bootstrap (50 resamples)" in (tmp_path / "comparison.md").read_text()


def test_main_resamples_as_many_times_as_the_config_default(store, tmp_path, capsys):
    """Without --n-boot the CLI uses eval.bootstrap_samples' default (2000, as the reference)."""
    assert DEFAULT_N_BOOT == EvalConfig().bootstrap_samples == 2000
    rc = main(["--sweep", "s1", "--tracking-uri", store["uri"], "--parent-run-id", store["parent"],
               "--out", str(tmp_path), "--no-log"])
    assert rc == 0 and "paired bootstrap (2000 resamples)" in (tmp_path / "comparison.md").read_text()


def test_per_query_artifact_errors_name_run_line_and_field(tmp_path):
    path = tmp_path / "per_query.jsonl"
    good = {"kind": "downstream", "method": "selector", "split": "test", "query_index": 0, "shot_num": 2, "acc": 1.0}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "query_index": 1, "acc": 1.5}) + "\n")
    with pytest.raises(LeverPlusInputError) as e:
        _parse_per_query(path, "r1", "test", "selector")
    assert (e.value.file, e.value.record, e.value.field) == ("run r1: per_query.jsonl", "line 2", "acc")
    path.write_text(json.dumps(good) + '\n{"method": "selector", oops\n')
    with pytest.raises(LeverPlusInputError, match="malformed JSON"):
        _parse_per_query(path, "r1", "test", "selector")
    # a line that cannot be a row of the wanted method is skipped unparsed (the baselines are most of the file)
    path.write_text(json.dumps(good) + '\n{"method": "random", oops\n')
    assert _parse_per_query(path, "r1", "test", "selector")["acc"].tolist() == [1.0]


def _bh_by_hand(ps):
    """Benjamini-Hochberg: sort ascending, q_(i) = min over j >= i of m/j * p_(j), capped at 1."""
    m = len(ps)
    order = sorted(range(m), key=lambda i: ps[i])
    q, running = [0.0] * m, 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, ps[i] * m / rank)
        q[i] = running
    return q


def test_fdr_q_values_over_arm_cells(report):
    assert _bh_by_hand([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.04, 0.04])  # the hand formula itself
    arm_cells = [c for c in report.cells if c.arm != report.baseline_arm and c.delta is not None
                 and math.isfinite(c.delta.p_value)]
    assert len(arm_cells) >= 2
    want = _bh_by_hand([c.delta.p_value for c in arm_cells])
    assert [c.delta_q for c in arm_cells] == pytest.approx(want)
    assert all(c.delta_q >= c.delta.p_value for c in arm_cells)
    assert report.cell(BASE, 1).delta_q is None  # the baseline is not a test
    n_sig = sum(c.delta.p_value < 0.05 for c in arm_cells)
    n_sig_q = sum(q < 0.05 for q in want)
    assert any(f"{n_sig} of {len(arm_cells)} arm cells have p < 0.05" in n and f"{n_sig_q} remain" in n
               for n in report.notes)
    assert "| q (BH) |" in report_markdown(report)


def test_main_passes_bh_family_and_equivalence_margin(store, tmp_path, capsys):
    rc = main(["--sweep", "s1", "--tracking-uri", store["uri"], "--parent-run-id", store["parent"],
               "--out", str(tmp_path), "--no-log", "--n-boot", "50", "--bh-family", "shot",
               "--equivalence-margin-pp", "1.5"])
    assert rc == 0
    md = (tmp_path / "comparison.md").read_text()
    assert "margin verdict (±1.5 pp)" in md and "Benjamini-Hochberg within each shot" in md
    csv = pd.read_csv(tmp_path / "comparison.csv", keep_default_na=False)
    row = csv[(csv["arm"] == A) & (csv["shot_num"] == 2)].iloc[0]
    # d = .25 .25 (constant): CI [.25, .25] excludes 0 -> better; one arm cell -> q = p = 0 in family shot_num=2
    assert row["margin_verdict"] == "better" and float(row["equivalence_margin_pp"]) == pytest.approx(1.5)
    assert row["delta_q_family"] == "shot_num=2"
    with pytest.raises(SystemExit):
        main(["--sweep", "s1", "--bh-family", "factor"])
    assert "invalid choice: 'factor'" in capsys.readouterr().err
