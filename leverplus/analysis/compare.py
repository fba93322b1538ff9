"""Compare a reward-ablation sweep against its RCE-only baseline: ``python -m leverplus.compare --sweep NAME``.

Pipeline: :func:`load_sweep_runs` (MLflow -> one row per run and shot) and :func:`load_per_query` (per-query test
accuracies) -> :func:`compare_runs` (pure statistics, no MLflow) -> :func:`report_markdown` / :func:`write_report`.
:func:`compare_sweep` does all of it and logs the files to the sweep's parent run.

Statistics, per (arm, shot):

* objective and accuracy: mean with a Student-t 95% CI over seeds;
* Δ accuracy vs the baseline: each arm run is paired with the baseline run of the same (shot_num, seed); paired
  t-test over those seed pairs (this is the verdict: it carries the training randomness). Missing baseline pairs are
  listed, never silently dropped;
* per-query Δ: paired bootstrap of per-query accuracies pooled over the paired seeds, pairs matched by
  (seed, query_index) (a finer view of the same delta; it ignores seed-to-seed variance, so it is reported beside the
  verdict, not as it);
* reviewer-grade columns (docs/statistics.md §7): the calibrated per-query p (sign-flip test of the same pairs; the
  bootstrap keeps the interval), BH q within a chosen family (``bh_family``), a four-way margin verdict of the
  seed-level differences (``equivalence_margin_pp``), the MDEs at 80% power, and the share of queries whose ICD
  sequence changed vs the baseline (:mod:`leverplus.analysis.policy_shift`) with the bound it puts on |Δ|;
* main effects: for each factor, the mean of the cell deltas (one cell = one (arm, shot)) at each level, i.e. the
  marginal mean over the other factors; baseline cells and aliases are not counted.

Aliases (arms not run because they are equivalent to another arm, from the parent run's ``aliases.json``) share the
canonical arm's numbers, are marked as such and are counted once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import mlflow
import numpy as np
import pandas as pd

from leverplus.analysis.plots import ForestRow, HeatFacet, colour_limit, delta_heatmap, forest_plot
from leverplus.analysis.policy_shift import ICDS_COL, PolicyShift, policy_shift
from leverplus.config.schema import EvalConfig
from leverplus.data.formats.io import atomic_write_json, atomic_write_text
from leverplus.errors import LeverPlusInputError
from leverplus.evaluation.policy_kl import KL_METRIC
from leverplus.evaluation.stats import (
    Estimate,
    MarginVerdict,
    PairedResult,
    bh_by_family,
    family_labels,
    mde_paired,
    mean_ci,
    paired_bootstrap,
    paired_t_test,
    paired_verdict,
    sign_flip_test,
    verdict,
)
from leverplus.tracking.run import final_view
from leverplus.tracking.store import resolve_tracking_uri, with_retries
from leverplus.utils import launch_dir

# Runs-table columns of config fields: MLflow params are the resolved config flattened to dotted keys.
MODE_COL = "params.reward.mode"
HARD_WEIGHT_COL = "params.reward.hard_weight"
SOFT_WEIGHT_COL = "params.reward.soft_weight"
RAW_COL = "params.rce.use_raw_reward"
#: per-query bootstrap resamples unless told otherwise: the config's eval.bootstrap_samples default (one source)
DEFAULT_N_BOOT: int = EvalConfig().bootstrap_samples
WEIGHTS_COL = "weights"  # derived: "hw×sw" from the two weight params
DEFAULT_FACTORS = (MODE_COL, WEIGHTS_COL, RAW_COL, "shot_num")
NO_DIFFERENCE = "no significant difference"
NO_PAIR = "no baseline pair"
#: default equivalence margin of the four-way verdict, in accuracy points (pp); --equivalence-margin-pp changes it
DEFAULT_EQUIVALENCE_MARGIN_PP: float = 0.5
#: power at which the minimum detectable effect columns are computed (the conventional 80%)
MDE_POWER: float = 0.8
#: Benjamini-Hochberg families: "all" = one family of every arm cell (the report's original behaviour), "shot" =
#: one family per shot_num
BH_FAMILIES = ("all", "shot")
PP = 100.0  # accuracy units -> percentage points
#: runs-table column of the run metric KL(π_arm ‖ π_sft) of the first pointer step on validation groups (nats)
KL_COL = "kl_from_sft"
#: pooled per-query pairs up to which the sign-flip p is exact (sign_flip_test's max_exact default)
SIGN_FLIP_MAX_EXACT = 16


# ------------------------------------------------------------------------------------------------ report types


@dataclass(frozen=True)
class ArmSummary:
    """Everything measured for one (arm, shot) cell; ``delta`` is paired over seeds, ``query_delta`` over queries."""

    arm: str
    shot_num: int
    role: str
    levels: Dict[str, str]  # factor column -> this arm's value (plus reward mode / weights when known)
    seeds: Tuple[int, ...]
    objective: Optional[Estimate]
    acc: Estimate
    delta: Optional[PairedResult]  # paired t-test of acc, arm - baseline, over seeds
    objective_delta: Optional[PairedResult]  # same for the objective
    query_delta: Optional[PairedResult]  # paired bootstrap of per-query acc, pooled over seeds
    query_seeds: Tuple[int, ...]  # seeds whose per-query rows entered query_delta
    n_unmatched_queries: int  # per-query rows present on one side only (not in query_delta)
    verdict: str  # from the seed-paired t-test; "no baseline pair" when there is none
    query_verdict: Optional[str]
    missing_baseline_seeds: Tuple[int, ...]  # arm runs with no baseline run of the same (shot, seed)
    missing_arm_seeds: Tuple[int, ...]  # baseline seeds this arm has no run for
    aliases: Tuple[str, ...] = ()  # arm labels not run because they are equivalent to this arm
    delta_q: Optional[float] = None  # Benjamini-Hochberg q of the seed-level p within the cell's BH family
    delta_q_family: str = ""  # that family: "all" or "shot_num=S"
    query_p_signflip: Optional[float] = None  # calibrated sign-flip p of the pooled per-query differences
    query_p_bootstrap: Optional[float] = None  # the bootstrap's inverted-CI p of the same pairs (not calibrated)
    query_q: Optional[float] = None  # Benjamini-Hochberg q of the per-query sign-flip p within the BH family
    margin: Optional[MarginVerdict] = None  # four-way verdict of the seed-paired differences against the margin
    mde_seed: Optional[float] = None  # seed-level paired t MDE at MDE_POWER (accuracy units)
    mde_query: Optional[float] = None  # per-query z MDE at MDE_POWER over the pooled pairs (accuracy units)
    shift: Optional[PolicyShift] = None  # share of queries whose ICD sequence differs from the baseline's
    kl_from_sft: Optional[Estimate] = None  # mean over the cell's seeds of the runs' KL(π ‖ π_sft), first step

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)

    @property
    def margin_verdict(self) -> str:
        """better / worse / equivalent / inconclusive (see :func:`paired_verdict`); "no baseline pair" without one."""
        return self.margin.verdict if self.margin is not None else NO_PAIR


@dataclass(frozen=True)
class MainEffect:
    """Mean of the cell deltas (arm - baseline) over all cells where ``factor == level``."""

    factor: str
    level: str
    mean_delta: float
    n_cells: int


@dataclass
class ComparisonReport:
    metric: str
    objective: str
    baseline_arm: str
    cells: List[ArmSummary]  # baseline cells first, then arms sorted by label, shots ascending
    main_effects: List[MainEffect]
    aliases: Dict[str, str]  # alias arm label -> canonical arm label
    missing_baseline: List[Tuple[str, int, int]]  # (arm, shot_num, seed) without a baseline run
    factors: Tuple[str, ...]
    confidence: float
    n_boot: int
    notes: List[str] = field(default_factory=list)
    bh_family: str = "all"  # see BH_FAMILIES
    equivalence_margin_pp: float = DEFAULT_EQUIVALENCE_MARGIN_PP
    # adaptive sweeps (leverplus.sweeps.adaptive): the sequential design and, per arm cell, its seeds, its verdict
    # at alpha / K and why it got that many seeds (empty for a fixed-seed sweep)
    allocation_design: Dict[str, object] = field(default_factory=dict)
    seed_allocation: List[Dict[str, object]] = field(default_factory=list)

    def cell(self, arm: str, shot_num: int) -> ArmSummary:
        """The cell of ``arm`` (or of the arm it is an alias of) at ``shot_num``."""
        label = self.aliases.get(arm, arm)
        for c in self.cells:
            if c.arm == label and c.shot_num == int(shot_num):
                return c
        raise KeyError(f"no cell for arm {arm!r}, shot {shot_num}")

    def to_frame(self) -> pd.DataFrame:
        """One row per (arm, shot), plus one per (alias, shot) carrying the canonical numbers and ``alias_of``."""
        rows = []
        for c in self.cells:
            rows.append(_cell_row(c, c.arm, ""))
            rows += [_cell_row(c, alias, c.arm) for alias in c.aliases]
        if self.seed_allocation:
            by = {(str(a["arm"]), int(a["shot_num"])): a for a in self.seed_allocation}
            for r in rows:
                a = by.get((r["alias_of"] or r["arm"], int(r["shot_num"])), {})
                r.update({"adaptive_n_seeds": a.get("n_seeds", math.nan), "adaptive_verdict": a.get("verdict", ""),
                          "adaptive_reason": a.get("reason", "")})
        return pd.DataFrame(rows)

    def main_effects_frame(self) -> pd.DataFrame:
        cols = ["factor", "level", "mean_delta", "n_cells"]
        return pd.DataFrame([asdict(m) for m in self.main_effects], columns=cols)


def _est(prefix: str, e: Optional[Estimate]) -> Dict[str, float]:
    if e is None:
        return {f"{prefix}_mean": math.nan, f"{prefix}_lo": math.nan, f"{prefix}_hi": math.nan}
    return {f"{prefix}_mean": e.mean, f"{prefix}_lo": e.lo, f"{prefix}_hi": e.hi}


def _paired(prefix: str, r: Optional[PairedResult]) -> Dict[str, float]:
    if r is None:
        return {prefix: math.nan, f"{prefix}_lo": math.nan, f"{prefix}_hi": math.nan, f"{prefix}_p": math.nan,
                f"{prefix}_n": 0}
    return {prefix: r.delta, f"{prefix}_lo": r.lo, f"{prefix}_hi": r.hi, f"{prefix}_p": r.p_value, f"{prefix}_n": r.n}


def _opt(x: Optional[float], scale: float = 1.0) -> float:
    return math.nan if x is None else scale * x


def _new_columns(c: ArmSummary) -> Dict[str, object]:
    """The columns added for reviewer-grade verdicts: calibrated per-query p, four-way verdict, MDEs, policy shift."""
    m = c.margin
    return {
        "query_delta_p_signflip": _opt(c.query_p_signflip),
        "query_delta_p_bootstrap": _opt(c.query_p_bootstrap),
        "query_delta_q": _opt(c.query_q),
        "margin_verdict": c.margin_verdict,
        "equivalence_margin_pp": math.nan if m is None else PP * m.margin,
        "margin_eq_lo": math.nan if m is None else m.eq_lo,
        "margin_eq_hi": math.nan if m is None else m.eq_hi,
        "mde80_seed_pp": _opt(c.mde_seed, PP),
        "mde80_query_pp": _opt(c.mde_query, PP),
        "kl_from_sft": math.nan if c.kl_from_sft is None else c.kl_from_sft.mean,
        "changed_frac": math.nan if c.shift is None else c.shift.mean_fraction,
        "changed_n_seeds": 0 if c.shift is None else len(c.shift.seeds),
        "delta_bound_pp": math.nan if c.shift is None else PP * c.shift.bound,
    }


def _cell_row(c: ArmSummary, label: str, alias_of: str) -> Dict[str, object]:
    return {
        "arm": label,
        "alias_of": alias_of,
        "role": c.role,
        "shot_num": c.shot_num,
        **c.levels,
        "n_seeds": c.n_seeds,
        "seeds": " ".join(map(str, c.seeds)),
        **_est("objective", c.objective),
        **_est("acc", c.acc),
        "acc_std": c.acc.std,
        **_paired("delta", c.delta),
        "delta_q": math.nan if c.delta_q is None else c.delta_q,
        "verdict": c.verdict,
        **_paired("objective_delta", c.objective_delta),
        **_paired("query_delta", c.query_delta),
        "query_verdict": c.query_verdict or "",
        "n_unmatched_queries": c.n_unmatched_queries,
        "missing_baseline_seeds": " ".join(map(str, c.missing_baseline_seeds)),
        "missing_arm_seeds": " ".join(map(str, c.missing_arm_seeds)),
        "delta_q_family": c.delta_q_family,
        **_new_columns(c),
    }


# ------------------------------------------------------------------------------------------------ pure comparison


def _level_key(v: str):
    """Sort levels numerically when they are numbers, else alphabetically (numbers first)."""
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


def _fmt_level(v) -> str:
    if isinstance(v, float) and math.isnan(v):
        return ""
    return str(v)


def add_weights_column(df: pd.DataFrame) -> pd.DataFrame:
    """Copy of ``df`` with ``weights = "hw×sw"`` built from the hard/soft weight params (when both are there)."""
    out = df.copy()
    if HARD_WEIGHT_COL in out.columns and SOFT_WEIGHT_COL in out.columns:
        pairs = zip(out[HARD_WEIGHT_COL], out[SOFT_WEIGHT_COL])
        out[WEIGHTS_COL] = [f"{_fmt_level(h)}×{_fmt_level(s)}" for h, s in pairs]
    return out


def _require_columns(df: pd.DataFrame, cols: Iterable[str]) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise LeverPlusInputError(
            f"the runs table lacks column(s) {missing}; it has {sorted(df.columns)[:20]}",
            field=missing[0],
            fix="build it with load_sweep_runs, or add the columns (arm, role, shot_num, seed and the metric)",
        )


def _run_name(row) -> str:
    return str(row.get("run_id", f"arm={row['arm']} shot={row['shot_num']} seed={row['seed']}"))


def _query_pairs(
    arm_run: str, base_run: str, shot: int, per_query: Mapping[str, pd.DataFrame]
) -> Optional[Tuple[np.ndarray, np.ndarray, int]]:
    """(arm accs, baseline accs, n unmatched) over the queries both runs answered at ``shot``, by query_index."""
    if arm_run not in per_query or base_run not in per_query:
        return None
    sides = []
    for run in (arm_run, base_run):
        q = per_query[run]
        _require_columns(q, ("query_index", "acc"))
        if "shot_num" in q.columns:
            q = q[q["shot_num"].astype(int) == shot]
        if q["query_index"].duplicated().any():
            dup = int(q.loc[q["query_index"].duplicated(), "query_index"].iloc[0])
            raise LeverPlusInputError(
                f"query_index {dup} appears twice at shot {shot}", file=f"run {run}: per_query.jsonl",
                record=str(dup), field="query_index", fix="keep one test selector row per (shot_num, query_index)",
            )
        sides.append(q.set_index(q["query_index"].astype(int))["acc"].astype(float))
    a, b = sides
    common = a.index.intersection(b.index).sort_values()
    unmatched = len(a.index.symmetric_difference(b.index))
    return a.loc[common].to_numpy(), b.loc[common].to_numpy(), unmatched


def compare_runs(
    df: pd.DataFrame,
    per_query: Optional[Mapping[str, pd.DataFrame]] = None,
    *,
    factors: Sequence[str] = DEFAULT_FACTORS,
    baseline_role: str = "baseline",
    metric: str = "acc",
    objective: str = "objective",
    aliases: Optional[Mapping[str, str]] = None,
    better: str = "higher",
    confidence: float = 0.95,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    bh_family: str = "all",
    equivalence_margin_pp: float = DEFAULT_EQUIVALENCE_MARGIN_PP,
) -> ComparisonReport:
    """Compare every (arm, shot) with the baseline runs of the same (shot_num, seed). Pure: no MLflow, no files.

    ``df``: one row per run and shot (columns arm, role, shot_num, seed, ``metric``, optionally ``objective``,
    run_id and factor columns; see :func:`load_sweep_runs`). ``per_query``: run_id -> DataFrame(query_index, acc
    [, shot_num]) of test selector rows; None skips the per-query bootstrap. ``factors``: columns for the main
    effects (``"weights"`` is derived from the hard/soft weight params; factors absent from ``df`` are skipped and
    noted). ``aliases``: alias arm label -> canonical label. The bootstrap pools seeds in ascending order and
    queries by ascending query_index, resampled with ``seed`` (deterministic); the sign-flip p of the same pairs
    uses ``seed`` too. ``bh_family``: "all" (one BH family of all arm cells) or "shot" (one per shot_num).
    ``equivalence_margin_pp``: the margin of the four-way verdict, in accuracy points. Per-query tables with an
    ``icds`` column also give the share of queries whose ICD sequence changed vs the baseline (:mod:`policy_shift`).
    """
    _check_options(bh_family, equivalence_margin_pp)
    df = _checked_runs(df, metric)
    baseline_arm, base_by = _baseline(df, baseline_role)
    notes = [f"factor {f!r} is not in the runs table: no main effect for it" for f in factors if f not in df.columns]
    present = [f for f in factors if f in df.columns]
    level_cols = _level_columns(present, df)
    aliases = _checked_aliases(aliases, set(df["arm"].astype(str)), notes)
    ctx = _CellContext(base_by=base_by, per_query=per_query, metric=metric,
                       objective=objective if objective in df.columns else None, better=better,
                       confidence=confidence, n_boot=n_boot, seed=seed, notes=notes,
                       margin=equivalence_margin_pp / PP)
    order = sorted(df["arm"].astype(str).unique(), key=lambda a: (a != baseline_arm, a))
    cells = [cell for arm in order for cell in _arm_cells(df, arm, level_cols, aliases, ctx)]

    cells, n_tests, n_sig, n_sig_q = _with_fdr(cells, baseline_arm, confidence, bh_family)
    cells = _with_query_fdr(cells, baseline_arm, bh_family)
    if n_tests > 1:
        within = "" if bh_family == "all" else ", one family per shot"
        notes.append(f"multiple comparisons: {n_sig} of {n_tests} arm cells have p < {1 - confidence:.2g}; after "
                     f"Benjamini-Hochberg (FDR {1 - confidence:.2g}{within}) {n_sig_q} remain (column q). With many "
                     "cells, read a lone 'better'/'worse' with a large q as a likely false discovery.")
    notes += _bound_violations(cells)
    main_effects = _main_effects([c for c in cells if c.arm != baseline_arm], present)
    return ComparisonReport(
        metric=metric, objective=objective, baseline_arm=baseline_arm, cells=cells, main_effects=main_effects,
        aliases=dict(sorted(aliases.items())), missing_baseline=ctx.missing_baseline, factors=tuple(present),
        confidence=confidence, n_boot=n_boot, notes=list(dict.fromkeys(notes)), bh_family=bh_family,
        equivalence_margin_pp=float(equivalence_margin_pp),
    )


def _check_options(bh_family: str, equivalence_margin_pp: float) -> None:
    if bh_family not in BH_FAMILIES:
        raise LeverPlusInputError(f"bh_family must be one of {BH_FAMILIES}, got {bh_family!r}", field="bh_family",
                                  fix="'all' for one family of every arm cell, 'shot' for one family per shot")
    ok = isinstance(equivalence_margin_pp, (int, float)) and not isinstance(equivalence_margin_pp, bool)
    if not (ok and math.isfinite(equivalence_margin_pp) and equivalence_margin_pp > 0):
        raise LeverPlusInputError(f"equivalence_margin_pp must be a positive number, got {equivalence_margin_pp!r}",
                                  field="equivalence_margin_pp",
                                  fix="give the smallest accuracy difference that matters, in points (e.g. 0.5)")


#: slack for float rounding when checking |Δ| against the changed-queries bound
_BOUND_TOL = 1e-9


def _bound_violations(cells: Sequence[ArmSummary]) -> List[str]:
    """Notes for cells whose |Δ| exceeds the changed-queries bound: the LVLM was not deterministic, or the run
    metric was computed on other queries than the per-query rows (the bound then does not hold)."""
    out = []
    for c in cells:
        if c.shift is None or c.delta is None or len(c.shift.seeds) != c.delta.n:
            continue  # the bound covers the seed-level Δ only when every paired seed has its ICD sequences
        if abs(c.delta.delta) > c.shift.bound + _BOUND_TOL:
            out.append(f"arm {c.arm!r} shot {c.shot_num}: |Δ| = {PP * abs(c.delta.delta):.2f} pp exceeds the "
                       f"changed-queries bound {PP * c.shift.bound:.2f} pp: the LVLM is not deterministic or the "
                       "accuracy was measured on other queries; read the bound as void there")
    return out


def _level_columns(present: Sequence[str], df: pd.DataFrame) -> List[str]:
    """The columns whose values label a cell: the factors present plus the reward mode and weights (not shot_num)."""
    cols = list(dict.fromkeys(list(present) + [c for c in (MODE_COL, WEIGHTS_COL) if c in df.columns]))
    return [c for c in cols if c != "shot_num"]


def _checked_runs(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """``df`` with the weights column, int shot/seed, after checking the metric is finite and runs are unique."""
    _require_columns(df, ("arm", "role", "shot_num", "seed", metric))
    if df.empty:
        raise LeverPlusInputError("the runs table is empty", fix="check the sweep name / experiment / statuses")
    df = add_weights_column(df).reset_index(drop=True)
    df["shot_num"] = df["shot_num"].astype(int)
    df["seed"] = df["seed"].astype(int)
    for _, row in df.iterrows():
        try:
            ok = math.isfinite(float(row[metric]))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise LeverPlusInputError(
                f"{metric} is {row[metric]!r}, not a finite number", record=_run_name(row), field=metric,
                fix="re-run it with test downstream evaluation on (eval.downstream=true, 'test' in "
                "eval.downstream_splits), or drop the run",
            )
    dup = df[df.duplicated(["arm", "shot_num", "seed"], keep=False)]
    if not dup.empty:
        r = dup.iloc[0]
        ids = list(dup[(dup["arm"] == r["arm"]) & (dup["shot_num"] == r["shot_num"]) & (dup["seed"] == r["seed"])]
                   .get("run_id", pd.Series(dtype=str)))
        raise LeverPlusInputError(
            f"several runs for arm {r['arm']!r}, shot {r['shot_num']}, seed {r['seed']} (runs {ids})",
            record=_run_name(r), field="arm/shot_num/seed",
            fix="compare one sweep invocation (--parent-run-id ID), or delete the stale runs",
        )
    return df


def _baseline(df: pd.DataFrame, baseline_role: str) -> Tuple[str, Dict[Tuple[int, int], pd.Series]]:
    """The one baseline arm's label and its runs by (shot_num, seed)."""
    base = df[df["role"] == baseline_role]
    if base.empty:
        raise LeverPlusInputError(
            f"no baseline runs (role={baseline_role!r}) among {len(df)} runs", field="role",
            fix="run the baseline arm (e.g. conf/experiment/rce_only) in the same sweep, tagged role=baseline",
        )
    base_labels = sorted(base["arm"].astype(str).unique())
    if len(base_labels) > 1:
        raise LeverPlusInputError(
            f"several baseline arms {base_labels}", field="role",
            fix="tag exactly one arm role=baseline, or pass baseline_role matching one arm",
        )
    return base_labels[0], {(int(r["shot_num"]), int(r["seed"])): r for _, r in base.iterrows()}


def _checked_aliases(aliases: Optional[Mapping[str, str]], arms_run: set, notes: List[str]) -> Dict[str, str]:
    """The aliases to report: an alias that was run itself is dropped; one whose canonical arm has no runs is noted."""
    out = {str(k): str(v) for k, v in (aliases or {}).items()}
    for alias, canon in list(out.items()):
        if alias in arms_run:
            notes.append(f"alias {alias!r} -> {canon!r} was run itself: its own runs are used, the alias is ignored")
            del out[alias]
        elif canon not in arms_run:
            notes.append(f"alias {alias!r} -> {canon!r}: the canonical arm has no runs, so neither has a result")
    return out


@dataclass
class _CellContext:
    """What every cell's summary shares: the baseline runs, the statistics settings and the report's notes."""

    base_by: Dict[Tuple[int, int], pd.Series]  # baseline run by (shot_num, seed)
    per_query: Optional[Mapping[str, pd.DataFrame]]
    metric: str
    objective: Optional[str]  # None when the runs table has no objective column
    better: str
    confidence: float
    n_boot: int
    seed: int
    notes: List[str]  # appended to, in order
    margin: float = DEFAULT_EQUIVALENCE_MARGIN_PP / PP  # equivalence margin, accuracy units
    missing_baseline: List[Tuple[str, int, int]] = field(default_factory=list)  # appended to, in order

    @property
    def alpha(self) -> float:
        return 1.0 - self.confidence


def _arm_cells(df: pd.DataFrame, arm: str, level_cols: Sequence[str], aliases: Mapping[str, str],
               ctx: _CellContext) -> List[ArmSummary]:
    """The cells of one arm, one per shot (ascending); its levels are the values of ``level_cols`` over its runs."""
    arm_rows = df[df["arm"].astype(str) == arm]
    roles = sorted(arm_rows["role"].astype(str).unique())
    if len(roles) > 1:
        raise LeverPlusInputError(f"arm {arm!r} has runs with roles {roles}", record=arm, field="role",
                                  fix="give every run of an arm the same role tag")
    levels: Dict[str, str] = {}
    for col in level_cols:
        vals = sorted({_fmt_level(v) for v in arm_rows[col]}, key=_level_key)
        if len(vals) > 1:
            ctx.notes.append(f"arm {arm!r}: {col} differs between its runs ({vals})")
        levels[col] = ",".join(vals)
    its_aliases = tuple(sorted(a for a, c in aliases.items() if c == arm))
    return [_summarise_cell(arm, int(shot), roles[0], levels,
                            arm_rows[arm_rows["shot_num"] == shot].sort_values("seed"), its_aliases, ctx)
            for shot in sorted(arm_rows["shot_num"].unique())]


def _with_fdr(cells: List[ArmSummary], baseline_arm: str, confidence: float, bh_family: str = "all"):
    """Attach Benjamini-Hochberg q-values (:func:`bh_by_family`, i.e. ``scipy.stats.false_discovery_control``
    within each family) to the seed-level tests of the arm cells (the baseline and cells without a finite p are left
    out). ``bh_family``: "all" = one family, "shot" = one per shot_num. Returns (cells, tests, p-significant,
    q-significant)."""
    idx = [i for i, c in enumerate(cells) if c.arm != baseline_arm and c.delta is not None
           and math.isfinite(c.delta.p_value)]
    if not idx:
        return cells, 0, 0, 0
    ps = np.array([cells[i].delta.p_value for i in idx])
    by = "all" if bh_family == "all" else "shot_num"
    families = family_labels([{"shot_num": cells[i].shot_num} for i in idx], by)
    qs = bh_by_family(ps, families)
    out = list(cells)
    for i, q, fam in zip(idx, qs, families):
        label = "all" if bh_family == "all" else f"shot_num={fam[0]}"
        out[i] = replace(cells[i], delta_q=float(q), delta_q_family=label)
    alpha = 1 - confidence
    return out, len(idx), int((ps < alpha).sum()), int((qs < alpha).sum())


def _with_query_fdr(cells: List[ArmSummary], baseline_arm: str, bh_family: str) -> List[ArmSummary]:
    """Attach BH q-values of the per-query sign-flip p-values (``query_q``), within the same families as the
    seed-level q (arm cells with a finite per-query p only)."""
    idx = [i for i, c in enumerate(cells) if c.arm != baseline_arm and c.query_p_signflip is not None
           and math.isfinite(c.query_p_signflip)]
    if not idx:
        return cells
    by = "all" if bh_family == "all" else "shot_num"
    families = family_labels([{"shot_num": cells[i].shot_num} for i in idx], by)
    qs = bh_by_family([cells[i].query_p_signflip for i in idx], families)
    out = list(cells)
    for i, q in zip(idx, qs):
        out[i] = replace(cells[i], query_q=float(q))
    return out


def _finite_estimate(values: np.ndarray, confidence: float) -> Optional[Estimate]:
    values = values[np.isfinite(values)]
    return mean_ci(values, confidence) if values.size else None


def _summarise_cell(arm: str, shot: int, role: str, levels: Mapping[str, str], rows: pd.DataFrame,
                    aliases: Tuple[str, ...], ctx: _CellContext) -> ArmSummary:
    """One (arm, shot): accuracy and objective over its seeds, and its deltas against the seed-paired baseline."""
    metric, objective, confidence = ctx.metric, ctx.objective, ctx.confidence
    seeds = tuple(int(s) for s in rows["seed"])
    acc = mean_ci(rows[metric].astype(float).to_numpy(), confidence)
    obj = _finite_estimate(pd.to_numeric(rows[objective], errors="coerce").to_numpy(float), confidence) \
        if objective else None
    kl = _finite_estimate(pd.to_numeric(rows[KL_COL], errors="coerce").to_numpy(float), confidence) \
        if KL_COL in rows.columns else None

    paired, missing_base, missing_arm = _seed_pairs(rows, shot, seeds, ctx.base_by)
    ctx.missing_baseline.extend((arm, shot, s) for s in missing_base)

    delta = obj_delta = margin = mde_seed = None
    query = _QueryView()
    if paired:
        xs, ys = [float(a[metric]) for a, _ in paired], [float(b[metric]) for _, b in paired]
        delta = paired_t_test(xs, ys, confidence)
        margin, mde_seed = _seed_margin_and_mde(np.subtract(xs, ys), ctx)
        obj_delta = _objective_delta(paired, objective, confidence) if objective else None
        query = _query_delta_if_possible(arm, shot, paired, "run_id" in rows.columns, ctx)
    qd = query.result
    return ArmSummary(
        arm=arm, shot_num=shot, role=role, levels=dict(levels), seeds=seeds, objective=obj, acc=acc, delta=delta,
        objective_delta=obj_delta, query_delta=qd, query_seeds=query.seeds, n_unmatched_queries=query.unmatched,
        verdict=verdict(delta, better=ctx.better) if delta is not None else NO_PAIR,
        query_verdict=_calibrated_verdict(qd, ctx) if qd is not None else None,
        missing_baseline_seeds=missing_base, missing_arm_seeds=missing_arm, aliases=aliases,
        query_p_signflip=query.p_signflip, query_p_bootstrap=query.p_bootstrap, margin=margin, kl_from_sft=kl, mde_seed=mde_seed, mde_query=query.mde, shift=query.shift,
    )


def _calibrated_verdict(r: PairedResult, ctx: _CellContext) -> str:
    """The per-query verdict: "better"/"worse" only when the bootstrap CI excludes 0 *and* the calibrated sign-flip
    p (``r.p_value``) is below α; else "no significant difference" (a claim must pass both procedures)."""
    if r.significant and math.isfinite(r.p_value) and r.p_value < ctx.alpha:
        return verdict(r, better=ctx.better)
    return NO_DIFFERENCE


def _sd(d: np.ndarray) -> float:
    """Sample sd (ddof=1) of paired differences; exactly 0 when they are all equal (no rounding noise)."""
    return 0.0 if np.all(d == d[0]) else float(d.std(ddof=1))


def _seed_margin_and_mde(d: np.ndarray, ctx: _CellContext) -> Tuple[MarginVerdict, Optional[float]]:
    """Four-way verdict of the seed-paired differences ``d`` against the margin (paired t CI + TOST at
    α = 1 - confidence), and the seed-level paired t MDE at MDE_POWER (None with fewer than 2 seed pairs)."""
    margin = paired_verdict(d, ctx.margin, alpha=ctx.alpha, better=ctx.better)
    mde = mde_paired(_sd(d), int(d.size), ctx.alpha, MDE_POWER, "t") if d.size >= 2 else None
    return margin, mde


@dataclass(frozen=True)
class _QueryView:
    """The per-query side of a cell: bootstrap Δ (CI), its calibrated sign-flip p, the z MDE, the policy shift."""

    result: Optional[PairedResult] = None  # bootstrap interval with the sign-flip p (paired_permutation_test)
    seeds: Tuple[int, ...] = ()
    unmatched: int = 0
    p_signflip: Optional[float] = None
    p_bootstrap: Optional[float] = None  # the bootstrap's inverted-CI p, kept for reference
    mde: Optional[float] = None
    shift: Optional[PolicyShift] = None


def _seed_pairs(rows: pd.DataFrame, shot: int, seeds: Tuple[int, ...], base_by: Mapping[Tuple[int, int], pd.Series]):
    """(arm run, baseline run) pairs by seed at ``shot``; the arm's seeds without a baseline run; the baseline's seeds
    without an arm run."""
    paired = [(r, base_by[(shot, int(r["seed"]))]) for _, r in rows.iterrows() if (shot, int(r["seed"])) in base_by]
    missing_base = tuple(s for s in seeds if (shot, s) not in base_by)
    missing_arm = tuple(sorted(s for (sh, s) in base_by if sh == shot and s not in seeds))
    return paired, missing_base, missing_arm


def _query_delta_if_possible(arm: str, shot: int, paired: Sequence[Tuple[pd.Series, pd.Series]], has_run_ids: bool,
                             ctx: _CellContext) -> _QueryView:
    """:func:`_query_delta` and the policy shift when there are per-query tables and run ids to find them by."""
    if ctx.per_query is None:
        return _QueryView()
    if not has_run_ids:
        ctx.notes.append("the runs table has no run_id column: per-query bootstrap skipped")
        return _QueryView()
    view = _query_delta(arm, shot, paired, ctx)
    pairs = [(int(a["seed"]), str(a["run_id"]), str(b["run_id"])) for a, b in paired]
    return replace(view, shift=policy_shift(pairs, shot, ctx.per_query))


def _objective_delta(paired: Sequence[Tuple[pd.Series, pd.Series]], objective: str,
                     confidence: float) -> Optional[PairedResult]:
    """Paired t-test of the objective over the seed pairs where both sides have a finite value (None: no pair)."""
    objs = [(float(a[objective]), float(b[objective])) for a, b in paired]
    objs = [(x, y) for x, y in objs if math.isfinite(x) and math.isfinite(y)]
    return paired_t_test([x for x, _ in objs], [y for _, y in objs], confidence) if objs else None


def _query_delta(arm: str, shot: int, paired: Sequence[Tuple[pd.Series, pd.Series]],
                 ctx: _CellContext) -> _QueryView:
    """Paired bootstrap of the per-query accuracies pooled over the seed pairs (ascending seed; the interval), the
    sign-flip p of the same pairs (the test, as :func:`paired_permutation_test`) and their z MDE, with the seeds used
    and the per-query rows without a counterpart. Seeds lacking per-query rows and unmatched rows are noted."""
    xs, ys, used, lacking = [], [], [], []
    unmatched = 0
    for a, b in paired:
        got = _query_pairs(str(a["run_id"]), str(b["run_id"]), shot, ctx.per_query or {})
        if got is None:
            lacking.append(str(int(a["seed"])))
            continue
        x, y, n_un = got
        unmatched += n_un
        if x.size:
            xs.append(x)
            ys.append(y)
            used.append(int(a["seed"]))
    if lacking:
        ctx.notes.append(f"arm {arm!r} shot {shot}: no per-query rows (arm or baseline run) for seed(s) "
                         f"{', '.join(lacking)}, left out of the per-query bootstrap")
    view = _QueryView(seeds=tuple(used), unmatched=unmatched)
    if xs:
        x, y = np.concatenate(xs), np.concatenate(ys)
        d = x - y
        boot = paired_bootstrap(x, y, n_boot=ctx.n_boot, seed=ctx.seed, confidence=ctx.confidence)
        p = sign_flip_test(d, max_exact=SIGN_FLIP_MAX_EXACT, seed=ctx.seed)  # = paired_permutation_test(x, y, ...) without a second bootstrap
        method = "sign_flip_exact" if d.size <= SIGN_FLIP_MAX_EXACT else "sign_flip_mc"
        view = replace(
            view,
            result=replace(boot, p_value=p, method=method),
            p_signflip=p,
            p_bootstrap=boot.p_value,
            mde=mde_paired(_sd(d), int(d.size), ctx.alpha, MDE_POWER, "z") if d.size >= 2 else None,
        )
    if unmatched:
        ctx.notes.append(f"arm {arm!r} shot {shot}: {unmatched} per-query row(s) without a counterpart "
                         "in the paired run were left out of the per-query bootstrap")
    return view


def _main_effects(cells: Sequence[ArmSummary], factors: Sequence[str]) -> List[MainEffect]:
    out = []
    measured = [c for c in cells if c.delta is not None]
    for f in factors:
        groups: Dict[str, List[float]] = {}
        for c in measured:
            level = str(c.shot_num) if f == "shot_num" else c.levels.get(f, "")
            groups.setdefault(level, []).append(c.delta.delta)
        for level in sorted(groups, key=_level_key):
            vals = groups[level]
            out.append(MainEffect(f, level, float(np.mean(vals)), len(vals)))
    return out


# ------------------------------------------------------------------------------------------------ output


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.2f}"


def _ci_pct(lo: float, hi: float, signed: bool = True) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "[n/a]"
    return f"[{100 * lo:+.2f}, {100 * hi:+.2f}]" if signed else f"[{100 * lo:.2f}, {100 * hi:.2f}]"


def _p(p: float) -> str:
    return "n/a" if not math.isfinite(p) else (f"{p:.3g}" if p >= 1e-3 else f"{p:.1e}")


def _md(text) -> str:
    """Escape a value for a markdown table cell (arm labels contain '|')."""
    return str(text).replace("|", "\\|")


def report_markdown(report: ComparisonReport) -> str:
    """Markdown for the terminal and comparison.md: one row per (arm, shot); accuracies and deltas in points (×100).

    The verdict column reads "better" / "worse" / "no significant difference" from the seed-paired CI of Δacc; the
    margin verdict adds "equivalent" / "inconclusive" against the equivalence margin.
    """
    conf = f"{round(100 * report.confidence)}%"
    margin = f"±{report.equivalence_margin_pp:g} pp"
    family = "all arm cells" if report.bh_family == "all" else "each shot"
    lines = [
        f"## {report.metric} vs baseline `{report.baseline_arm}` (paired by shot_num and seed)",
        "",
        f"Δ = arm − baseline. Verdict: paired t-test over seeds, {conf} CI; 'no significant difference' whenever "
        f"that CI contains 0. Per-query: paired bootstrap ({report.n_boot} resamples) over queries pooled across "
        "seeds (ignores seed-to-seed variance).",
        "",
        f"Margin verdict ({margin}): the seed-level paired t-test ({conf} CI) and TOST "
        f"({round(100 * (1 - 2 * (1 - report.confidence)))}% CI) give better / worse / equivalent / inconclusive. "
        f"q: Benjamini-Hochberg within {family}. Per-query p: sign-flip permutation test (calibrated; the CI stays "
        f"the bootstrap's; the per-query verdict needs both). MDE: smallest |Δ| detected with {MDE_POWER:.0%} power (seed: paired t over the seeds; "
        "per-query: z over the pooled queries). Policy moved: share of test queries whose selected ICD sequence "
        "differs from the baseline's (same shot and seed), mean over seeds; under a deterministic LVLM it bounds "
        "|Δ|; KL: KL(π_arm ‖ π_sft) of the first pointer step on validation queries, mean over seeds (nats).",
        "",
        f"| arm | shot | n | {report.objective} (mean) | {report.metric} (%) [{conf} CI] "
        f"| Δ{report.metric} (pp) [{conf} CI] | policy moved | p | q (BH) | verdict | margin verdict ({margin}) "
        f"| MDE@{MDE_POWER:.0%} seed (pp) | per-query Δ (pp) [{conf} CI] | per-query p (sign-flip) "
        f"| MDE@{MDE_POWER:.0%} per-query (pp) | per-query verdict | notes |",
        "|" + "---|" * N_MARKDOWN_COLUMNS,
    ]
    lines += [_markdown_row(c, report.baseline_arm) for c in report.cells]
    lines += _markdown_sections(report)
    return "\n".join(lines) + "\n"


#: columns of the markdown table (one per entry of the header above)
N_MARKDOWN_COLUMNS = 17


def _pct_short(x: float) -> str:
    """A share in percent, one decimal, but never rounded to 0 when it is not 0 (two significant digits then)."""
    v = PP * x
    return f"{v:.2g}" if 0 < v < 0.05 else f"{v:.1f}"


def _shift_text(c: ArmSummary) -> str:
    """'changed 3.1% of queries, |Δ| ≤ 3.1 pp; KL 0.012' (KL(π ‖ π_sft) of the first step, mean over seeds; each
    part n/a without its data)."""
    kl = "" if c.kl_from_sft is None else f"KL {c.kl_from_sft.mean:.3g}"
    if c.shift is None:
        return kl or "n/a"
    share = _pct_short(c.shift.mean_fraction)
    return f"changed {share}% of queries, |Δ| ≤ {share} pp" + (f"; {kl}" if kl else "")


def _pp(x: Optional[float]) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{PP * x:.2f}"


def _markdown_row(c: ArmSummary, baseline_arm: str) -> str:
    """The table row of one cell."""
    obj = "n/a" if c.objective is None else f"{c.objective.mean:.4f}"
    acc = f"{_pct(c.acc.mean)} {_ci_pct(c.acc.lo, c.acc.hi, signed=False)}"
    if c.delta is None:
        d, p = "n/a", "n/a"
    else:
        d, p = f"{100 * c.delta.delta:+.2f} {_ci_pct(c.delta.lo, c.delta.hi)}", _p(c.delta.p_value)
    q = "n/a" if c.query_delta is None else \
        f"{100 * c.query_delta.delta:+.2f} {_ci_pct(c.query_delta.lo, c.query_delta.hi)} (n={c.query_delta.n})"
    verdict_text = c.verdict if c.delta is None or c.delta.n > 1 or c.verdict != NO_DIFFERENCE \
        else f"{NO_DIFFERENCE} (1 seed)"
    fdr = "n/a" if c.delta_q is None else _p(c.delta_q)
    qp = "n/a" if c.query_p_signflip is None else _p(c.query_p_signflip)
    return (f"| {_md(c.arm)} | {c.shot_num} | {c.n_seeds} | {obj} | {acc} | {d} | {_md(_shift_text(c))} | {p} | {fdr} "
            f"| {verdict_text} | {c.margin_verdict} | {_pp(c.mde_seed)} | {q} | {qp} | {_pp(c.mde_query)} "
            f"| {c.query_verdict or 'n/a'} | {_md('; '.join(_cell_notes(c, baseline_arm)))} |")


def _cell_notes(c: ArmSummary, baseline_arm: str) -> List[str]:
    """The notes column of one cell: baseline, single seed pair, missing pairs, aliases."""
    note = []
    if c.arm == baseline_arm:
        note.append("baseline (vs itself)")
    if c.delta is not None and c.delta.n == 1:
        note.append("1 seed pair: no CI")
    if c.missing_baseline_seeds:
        note.append(f"no baseline for seed(s) {', '.join(map(str, c.missing_baseline_seeds))}")
    if c.missing_arm_seeds:
        note.append(f"no run for seed(s) {', '.join(map(str, c.missing_arm_seeds))}")
    if c.aliases:
        note.append(f"aliases: {', '.join(c.aliases)}")
    return note


def _markdown_sections(report: ComparisonReport) -> List[str]:
    """The lines after the table: main effects, aliases, missing baseline pairs, notes (each only when any)."""
    lines: List[str] = []
    if report.main_effects:
        lines += ["", f"### Main effects (mean Δ{report.metric} over the cells at each level, other factors averaged)",
                  "", "| factor | level | mean Δ (pp) | cells |", "|---|---|---|---|"]
        lines += [f"| {_md(m.factor)} | {_md(m.level)} | {100 * m.mean_delta:+.2f} | {m.n_cells} |"
                  for m in report.main_effects]
    if report.aliases:
        lines += ["", "### Aliases (not run: equivalent to the canonical arm; same numbers, counted once)", "",
                  "| alias | canonical arm |", "|---|---|"]
        lines += [f"| {_md(a)} | {_md(c)} |" for a, c in report.aliases.items()]
    if report.missing_baseline:
        lines += ["", "### Missing baseline pairs (left out of Δ)", ""]
        lines += [f"- arm {a}, shot {s}, seed {sd}" for a, s, sd in report.missing_baseline]
    if report.seed_allocation:
        d = report.allocation_design
        lines += ["", f"### Adaptive seeds (looks at {d.get('looks')} seeds, alpha {d.get('alpha_per_look', 0):.3g} per "
                  f"look = {d.get('alpha')} / {len(d.get('looks') or []) or 1}, margin ±{d.get('margin_pp')} pp; "
                  "read these verdicts, not the fixed-alpha ones, for a sequential sweep)", "",
                  "| arm | shot | seeds | verdict at alpha/K | why |", "|---|---|---|---|---|"]
        lines += [f"| {_md(a['arm'])} | {a['shot_num']} | {a['n_seeds']} | {a['verdict']} | {_md(a['reason'])} |"
                  for a in report.seed_allocation]
    if report.notes:
        lines += ["", "### Notes", ""] + [f"- {n}" for n in report.notes]
    return lines


def _alias_levels(label: str) -> Dict[str, str]:
    """The reward mode, weights and raw flag named in an arm label ("mode=...|hard_weight=...|raw=...")."""
    kv = dict(part.split("=", 1) for part in label.split("|") if "=" in part)
    out = {MODE_COL: kv["mode"]} if "mode" in kv else {}
    if "hard_weight" in kv and "soft_weight" in kv:
        out[WEIGHTS_COL] = f"{kv['hard_weight']}×{kv['soft_weight']}"
    if "raw" in kv:
        out[RAW_COL] = kv["raw"]
    return out


def _significant(c: ArmSummary, alpha: float) -> bool:
    return c.delta_q is not None and math.isfinite(c.delta_q) and c.delta_q < alpha


def _heatmap_grid(cells: Sequence[ArmSummary], alpha: float = 0.05):
    """Rows = reward modes, cols = weight pairs, one facet per rce.use_raw_reward level; each entry the mean Δ (pp)
    of the measured cells there (averaged only when other factors vary), "aliased" where only aliases sit, "n/a"
    where nothing does. Returns (facets, rows, cols, most arms averaged into one entry)."""
    measured: Dict[Tuple[str, str, str], List[ArmSummary]] = {}
    aliased: set = set()

    def raw_of(levels: Mapping[str, Any], default: Any = "") -> str:
        # one spelling per level: MLflow params read back "True"/"False", arm labels say "true"/"false"
        return str(levels.get(RAW_COL, default)).strip().lower()

    for c in cells:
        measured.setdefault((raw_of(c.levels), c.levels[MODE_COL], c.levels[WEIGHTS_COL]), []).append(c)
        for a in c.aliases:
            lv = _alias_levels(a)
            if MODE_COL in lv and WEIGHTS_COL in lv:
                aliased.add((raw_of(lv, c.levels.get(RAW_COL, "")), lv[MODE_COL], lv[WEIGHTS_COL]))
    keys = set(measured) | aliased
    rows = sorted({k[1] for k in keys})
    cols = sorted({k[2] for k in keys}, key=lambda w: tuple(_level_key(x) for x in w.split("×")))
    raws = sorted({k[0] for k in keys}, key=lambda r: (r != "true", r))
    facets = []
    for raw in raws:
        vals = np.full((len(rows), len(cols)), np.nan)
        status = np.full((len(rows), len(cols)), "n/a", dtype=object)
        sig = np.zeros((len(rows), len(cols)), dtype=bool)
        for i, r in enumerate(rows):
            for j, col in enumerate(cols):
                here = measured.get((raw, r, col), [])
                if here:
                    vals[i, j] = PP * float(np.mean([c.delta.delta for c in here]))
                    status[i, j] = ""
                    sig[i, j] = all(_significant(c, alpha) for c in here)
                elif (raw, r, col) in aliased:
                    status[i, j] = "aliased"
        name = {"true": "raw reward (rce.use_raw_reward=true)",
                "false": "normalised reward (rce.use_raw_reward=false)"}.get(raw, f"rce.use_raw_reward={raw}" if raw
                                                                              else "all arms")
        facets.append(HeatFacet(name, vals, status, sig))
    return facets, rows, cols, max((len(v) for v in measured.values()), default=0)


def write_report(report: ComparisonReport, out_dir) -> List[Path]:
    """Write comparison.md, comparison.csv, main_effects.csv, comparison.json, delta_heatmap_shot{S}.png (Δacc in pp
    by reward mode × weight pair, faceted by rce.use_raw_reward, one per shot) and delta_forest_shot{S}.png (Δacc
    with CIs, one row per arm, one per shot)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arms = [c for c in report.cells if c.arm != report.baseline_arm and c.delta is not None]
    figures = _write_heatmaps(report, arms, out) + _write_forests(report, out)  # may add a note: before the .md
    md = out / "comparison.md"
    atomic_write_text(md, report_markdown(report))
    csv = out / "comparison.csv"
    report.to_frame().to_csv(csv, index=False)
    me = out / "main_effects.csv"
    report.main_effects_frame().to_csv(me, index=False)
    js = out / "comparison.json"
    atomic_write_json(js, asdict(report), indent=2, allow_nan=True)
    return [md, csv, me, js, *figures]


def _write_heatmaps(report: ComparisonReport, arms: Sequence[ArmSummary], out: Path) -> List[Path]:
    """One Δ heatmap (reward mode × weight pair, faceted by rce.use_raw_reward) per shot; a note instead when the
    runs lack those columns. The colour scale is shared by all shots (:func:`colour_limit`)."""
    if arms and all(MODE_COL in c.levels and WEIGHTS_COL in c.levels for c in arms):
        alpha = 1.0 - report.confidence
        mdes = [PP * c.mde_seed for c in arms if c.mde_seed is not None and math.isfinite(c.mde_seed)]
        limit = colour_limit([PP * c.delta.delta for c in arms], margin_pp=report.equivalence_margin_pp,
                             mde_pp=float(np.median(mdes)) if mdes else None)
        paths = []
        for shot in sorted({c.shot_num for c in arms}):
            facets, rows, cols, most = _heatmap_grid([c for c in arms if c.shot_num == shot], alpha)
            averaged = f"; entries average up to {most} arms" if most > 1 else ""
            paths.append(delta_heatmap(
                facets, rows, cols, out / f"delta_heatmap_shot{shot}.png",
                title=f"Δ{report.metric} vs {report.baseline_arm}, shot {shot} (pp; * = BH q < {alpha:g}{averaged})",
                cbar_label=f"Δ{report.metric} (pp, mean over seeds; scale ±{limit:.1f})", limit=limit))
        return paths
    if arms:
        report.notes.append(f"no delta heatmap: the runs lack {MODE_COL} or the weight params")
    return []


def _write_forests(report: ComparisonReport, out: Path) -> List[Path]:
    """One forest plot of Δ (pp) with CIs per shot, every non-baseline cell a row (none when there is none)."""
    alpha = 1.0 - report.confidence
    conf = f"{round(100 * report.confidence)}%"
    cells = [c for c in report.cells if c.arm != report.baseline_arm]
    paths: List[Path] = []
    for shot in sorted({c.shot_num for c in cells}):
        rows = [ForestRow(c.arm, PP * c.delta.delta if c.delta else math.nan,
                          PP * c.delta.lo if c.delta else math.nan, PP * c.delta.hi if c.delta else math.nan,
                          _significant(c, alpha),
                          f"+{len(c.aliases)} alias{'es' if len(c.aliases) > 1 else ''}" if c.aliases else "")
                for c in cells if c.shot_num == shot]
        paths += forest_plot(rows, out / f"delta_forest_shot{shot}.png",
                             title=f"Δ{report.metric} vs {report.baseline_arm}, shot {shot} ({conf} CI over seeds)",
                             xlabel=f"Δ{report.metric} (percentage points)", margin_pp=report.equivalence_margin_pp,
                             alpha=alpha)
    return paths


# ------------------------------------------------------------------------------------------------ MLflow loading


@contextlib.contextmanager
def _quiet_downloads() -> Iterator[None]:
    """Silence MLflow's per-file download progress bars (unless the user set the variable)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    if key in os.environ:
        yield
        return
    os.environ[key] = "false"
    try:
        yield
    finally:
        os.environ.pop(key, None)


def _client(tracking_uri: str):
    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def _experiment_ids(client, experiment: Optional[str]) -> List[str]:
    if experiment:
        exp = with_retries(lambda: client.get_experiment_by_name(experiment))
        if exp is None:
            names = [e.name for e in with_retries(lambda: client.search_experiments())]
            raise LeverPlusInputError(f"no experiment named {experiment!r} (found {names})", field="experiment",
                                      fix="pass one of the names found, or leave it out to search all experiments")
        return [exp.experiment_id]
    ids, token = [], None
    while True:
        page = with_retries(partial(client.search_experiments, page_token=token))
        ids += [e.experiment_id for e in page]
        token = page.token
        if not token:
            return ids


def _search(client, exp_ids: List[str], filter_string: str) -> list:
    if not exp_ids:
        return []
    runs, token = [], None
    while True:
        page = with_retries(partial(client.search_runs, exp_ids, filter_string=filter_string, max_results=1000,
                                    order_by=["attributes.start_time DESC"], page_token=token))
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _check_name(sweep: str) -> None:
    if not sweep or "'" in sweep:
        raise LeverPlusInputError(f"sweep name {sweep!r} is empty or contains a quote", field="sweep",
                                  fix="use the name the sweep config sets in tracking.sweep")


def _parse_int_tag(run, key: str) -> List[int]:
    raw = run.data.tags.get(key)
    try:
        vals = [int(x) for x in str(raw).split(",") if x.strip()]
    except ValueError:
        vals = []
    if raw is None or not vals:
        raise LeverPlusInputError(
            f"tag {key!r} is {raw!r}, not an integer (or comma-separated integers)", record=f"run {run.info.run_id}",
            field=f"tags.{key}", fix="runs of a sweep are tagged by leverplus.train; set the tag or delete the run",
        )
    return vals


def load_sweep_runs(
    tracking_uri: str,
    sweep: str,
    experiment: Optional[str] = None,
    parent_run_id: Optional[str] = None,
    statuses: Sequence[str] = ("FINISHED",),
    *,
    metric_key: str = "test/downstream_acc",
    shot_metric_key: str = "test/downstream/shot{shot}/selector_acc",
    objective_key: str = "objective",
) -> pd.DataFrame:
    """Runs tagged ``sweep=NAME`` (parent runs excluded; only children of ``parent_run_id`` when given) with a status in
    ``statuses``, newest first; of several runs sharing a run_key only the newest is kept.

    One row per run, or one per shot for a run trained on several shots (tag ``shot_num`` "1,2"): then ``acc`` is
    that shot's ``shot_metric_key`` and ``objective`` the run's (shared) objective. Columns: run_id (the run that
    trained: for a job skipped as already FINISHED, its ``reused_run_id``), tracking_run_id (the child run itself),
    arm, role, shot_num (int), seed (int), run_key, parent_run_id, status, start_time, objective, acc, params.*.
    """
    _check_name(sweep)
    client = _client(tracking_uri)
    runs = _search(client, _experiment_ids(client, experiment), f"tags.sweep = '{sweep}'")
    wanted = set(statuses)
    rows: List[dict] = []
    seen_keys: set = set()
    for run in runs:  # newest first
        if _wanted_run(run, wanted, parent_run_id, seen_keys):
            rows += _run_rows(run, metric_key, shot_metric_key, objective_key)
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=RUN_COLUMNS)
    params = sorted(c for c in df.columns if c not in RUN_COLUMNS)
    return df[RUN_COLUMNS + params].reset_index(drop=True)


#: the columns of :func:`load_sweep_runs` before the params
RUN_COLUMNS = ["run_id", "tracking_run_id", "arm", "role", "shot_num", "seed", "run_key", "parent_run_id", "status",
               "start_time", "objective", "acc", "kl_from_sft"]


def _wanted_run(run, wanted: set, parent_run_id: Optional[str], seen_keys: set) -> bool:
    """A child run with a wanted status (under ``parent_run_id`` when given) whose run_key was not seen yet (runs come
    newest first, so the newest of a key wins); records its key in ``seen_keys``."""
    tags = run.data.tags
    if tags.get("role") == "parent" or run.info.status not in wanted:
        return False
    if parent_run_id and tags.get("mlflow.parentRunId") != parent_run_id:
        return False
    key = tags.get("run_key")
    if key:
        if key in seen_keys:
            return False
        seen_keys.add(key)
    return True


def _run_rows(run, metric_key: str, shot_metric_key: str, objective_key: str) -> List[dict]:
    """The rows of one run: one per shot it was trained on (see :func:`load_sweep_runs`)."""
    tags = run.data.tags
    for tag in ("arm", "role"):
        if not tags.get(tag):
            raise LeverPlusInputError(f"tag {tag!r} is missing", record=f"run {run.info.run_id}",
                                      field=f"tags.{tag}", fix="set tracking.arm / tracking.role for sweep runs")
    shots = _parse_int_tag(run, "shot_num")
    seed = _parse_int_tag(run, "seed")[0]
    metrics = final_view(run.data.metrics)  # end-of-run values, not a per-epoch series' last point
    rows = []
    for shot in shots:
        name = metric_key if len(shots) == 1 else shot_metric_key.format(shot=shot)
        rows.append({
            # a job skipped as already FINISHED is a child run tagged reused_run_id: its numbers (and per-query
            # artifacts) are those of the run that trained, so that run is the row's run_id
            "run_id": tags.get("reused_run_id") or run.info.run_id, "tracking_run_id": run.info.run_id,
            "arm": tags["arm"], "role": tags["role"], "shot_num": shot, "seed": seed,
            "run_key": tags.get("run_key") or "", "parent_run_id": tags.get("mlflow.parentRunId", ""),
            "status": run.info.status, "start_time": run.info.start_time,
            "objective": metrics.get(objective_key, math.nan), "acc": metrics.get(name, math.nan),
            KL_COL: metrics.get(KL_METRIC, math.nan),
            **{f"params.{k}": v for k, v in run.data.params.items()},
            SHOT_ACCS_COL: _shot_accs(metrics, metric_key),
        })
    return rows


#: column of :func:`load_sweep_runs`: {eval shot: accuracy} of the run (``eval.shot_nums``), for the S1-S4 table
SHOT_ACCS_COL = "shot_accs"


def _shot_accs(metrics: Mapping[str, float], metric_key: str) -> Dict[int, float]:
    """``<metric_key>_shot<k>`` of the run for every evaluated shot k."""
    prefix = f"{metric_key}_shot"
    return {int(k[len(prefix):]): float(v) for k, v in metrics.items()
            if k.startswith(prefix) and k[len(prefix):].isdigit()}


def shot_accuracy_markdown(df: pd.DataFrame, metric: str = "test/downstream_acc") -> str:
    """The S1-S4 table: one row per (arm, trained shot), the mean accuracy over its seeds at each evaluated shot
    (one trained model evaluated at every shot of ``eval.shot_nums``); empty when no run logged per-shot accuracies."""
    if df.empty or SHOT_ACCS_COL not in df.columns:
        return ""
    shots = sorted({k for d in df[SHOT_ACCS_COL] if isinstance(d, dict) for k in d})
    if not shots:
        return ""
    lines = [f"### {metric} (%) at each evaluated shot (mean over seeds)", "",
             "| arm | trained shot | seeds | " + " | ".join(f"S{k}" for k in shots) + " |",
             "|" + "---|" * (3 + len(shots))]
    for (arm, trained), g in df.groupby(["arm", "shot_num"], sort=True):
        cells = []
        for k in shots:
            vals = [d[k] for d in g[SHOT_ACCS_COL] if isinstance(d, dict) and k in d]
            cells.append(f"{PP * float(np.mean(vals)):.2f}" if vals else "n/a")
        lines.append(f"| {_md(arm)} | {trained} | {g['seed'].nunique()} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _parse_per_query(path: Path, run_id: str, split: str, method: str) -> pd.DataFrame:
    where = f"run {run_id}: per_query.jsonl"
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            # rows of other methods (baselines: most of the file) cannot match: skip them before parsing (6x faster)
            if method not in line or not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise LeverPlusInputError(f"malformed JSON ({e.msg})", file=where, record=f"line {lineno}",
                                          fix="regenerate the artifact") from None
            if not (isinstance(r, dict) and r.get("kind") == "downstream" and r.get("method") == method
                    and r.get("split") == split):
                continue
            out.append(_per_query_row(r, where, lineno))
    return pd.DataFrame(out, columns=["shot_num", "query_index", "acc", ICDS_COL])


def _per_query_icds(r: dict, where: str, lineno: int) -> Optional[Tuple[int, ...]]:
    """The row's selected ICD indices (prompt order) as a tuple, None when the row has none (older artifacts)."""
    icds = r.get(ICDS_COL)
    if icds is None:
        return None
    if not isinstance(icds, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in icds):
        raise LeverPlusInputError(f"icds is {icds!r}, not a list of integers", file=where, record=f"line {lineno}",
                                  field=ICDS_COL, fix="regenerate the artifact")
    return tuple(icds)


def _per_query_row(r: dict, where: str, lineno: int) -> Tuple[int, int, float, Optional[Tuple[int, ...]]]:
    """(shot_num, query_index, acc, icds) of one downstream row, after checking their types and acc's range."""
    for key in ("query_index", "shot_num"):
        if isinstance(r.get(key), bool) or not isinstance(r.get(key), int):
            raise LeverPlusInputError(f"{key} is {r.get(key)!r}, not an integer", file=where,
                                      record=f"line {lineno}", field=key, fix="regenerate the artifact")
    acc = r.get("acc")
    if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not (0.0 <= acc <= 1.0):
        raise LeverPlusInputError(f"acc is {acc!r}, not a number in [0, 1]", file=where,
                                  record=f"line {lineno}", field="acc", fix="regenerate the artifact")
    return r["shot_num"], r["query_index"], float(acc), _per_query_icds(r, where, lineno)


def load_per_query(
    tracking_uri: str, run_ids: Iterable[str], *, artifact: str = "per_query.jsonl", split: str = "test",
    method: str = "selector",
) -> Dict[str, pd.DataFrame]:
    """run_id -> DataFrame(shot_num, query_index, acc, icds) of the downstream ``split`` rows of ``method`` (icds: the
    selected ICD indices as a tuple, None in rows without them).

    Runs without the artifact are left out of the dict (the comparison notes them).
    """
    client = _client(tracking_uri)
    out: Dict[str, pd.DataFrame] = {}
    with tempfile.TemporaryDirectory() as tmp, _quiet_downloads():
        for run_id in dict.fromkeys(run_ids):
            names = {f.path for f in with_retries(partial(client.list_artifacts, run_id))}
            if artifact not in names:
                continue
            dst = Path(tmp) / run_id
            dst.mkdir()
            local = with_retries(partial(client.download_artifacts, run_id, artifact, str(dst)))
            out[run_id] = _parse_per_query(Path(local), run_id, split, method)
    return out


def _parent_runs(client, exp_ids: List[str], sweep: str) -> list:
    return _search(client, exp_ids, f"tags.sweep = '{sweep}' and tags.role = 'parent'")  # newest first


def load_aliases(tracking_uri: str, parent_run_ids: Sequence[str], *, artifact: str = "aliases.json") -> Dict[str, str]:
    """Union of the ``aliases.json`` artifacts of the given parent runs (earlier ids in the list win)."""
    client = _client(tracking_uri)
    merged: Dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp, _quiet_downloads():
        for run_id in reversed(list(parent_run_ids)):
            if artifact not in {f.path for f in with_retries(partial(client.list_artifacts, run_id))}:
                continue
            dst = Path(tmp) / run_id
            dst.mkdir()
            local = with_retries(partial(client.download_artifacts, run_id, artifact, str(dst)))
            try:
                data = json.loads(Path(local).read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise LeverPlusInputError(f"malformed JSON ({e.msg})", file=f"run {run_id}: {artifact}",
                                          fix="rewrite it as {\"alias arm\": \"canonical arm\"}") from None
            if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in data.items()):
                raise LeverPlusInputError("must map alias arm labels (strings) to canonical labels (strings)",
                                          file=f"run {run_id}: {artifact}",
                                          fix="rewrite it as {\"alias\": \"canonical\"}")
            merged.update(data)
    return merged


def load_allocation(tracking_uri: str, parent_run_ids: Sequence[str], *, artifact: str = "adaptive.json") -> dict:
    """The adaptive sweep's record (design and per-cell seeds, verdict and reason) of the first parent run that has
    one; {} for a fixed-seed sweep."""
    client = _client(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp, _quiet_downloads():
        for run_id in parent_run_ids:
            if artifact not in {f.path for f in with_retries(partial(client.list_artifacts, run_id))}:
                continue
            local = with_retries(partial(client.download_artifacts, run_id, artifact, tmp))
            try:
                data = json.loads(Path(local).read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise LeverPlusInputError(f"malformed JSON ({e.msg})", file=f"run {run_id}: {artifact}",
                                          fix="re-run the adaptive sweep, or delete the artifact") from None
            if not isinstance(data, dict) or not isinstance(data.get("cells", []), list):
                raise LeverPlusInputError("expected {\"design\": {...}, \"cells\": [...]}",
                                          file=f"run {run_id}: {artifact}", fix="re-run the adaptive sweep")
            return data
    return {}


def _known_sweeps(client, exp_ids: List[str], limit: int = 1000) -> List[str]:
    if not exp_ids:
        return []
    runs = with_retries(lambda: client.search_runs(exp_ids, max_results=limit))
    return sorted({r.data.tags["sweep"] for r in runs if r.data.tags.get("sweep")})


def compare_sweep(
    sweep: str,
    tracking_uri: Optional[str] = None,
    experiment: Optional[str] = None,
    parent_run_id: Optional[str] = None,
    out_dir=None,
    log_to_parent: bool = True,
    *,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    factors: Sequence[str] = DEFAULT_FACTORS,
    bh_family: str = "all",
    equivalence_margin_pp: float = DEFAULT_EQUIVALENCE_MARGIN_PP,
) -> ComparisonReport:
    """Load the sweep's runs, compare them, write the report (default ``<launch dir>/outputs/compare/<sweep>``), print
    the markdown, and log the files under ``comparison/`` of the parent run (``parent_run_id``, else the newest run
    tagged sweep=NAME, role=parent). Aliases come from that parent's aliases.json (all parents' when none is given).
    ``n_boot``: per-query bootstrap resamples (the sweep callback passes ``eval.bootstrap_samples``); ``bh_family`` and
    ``equivalence_margin_pp`` as in :func:`compare_runs`."""
    _check_name(sweep)
    uri = resolve_tracking_uri(tracking_uri)
    client = _client(uri)
    exp_ids = _experiment_ids(client, experiment)
    df = load_sweep_runs(uri, sweep, experiment=experiment, parent_run_id=parent_run_id)
    if df.empty:
        raise _no_runs_error(client, exp_ids, sweep, uri, experiment, parent_run_id)
    parents = [parent_run_id] if parent_run_id else [r.info.run_id for r in _parent_runs(client, exp_ids, sweep)]
    aliases = load_aliases(uri, parents)
    per_query = load_per_query(uri, df["run_id"].unique())
    report = compare_runs(df, per_query, factors=factors, aliases=aliases, n_boot=n_boot, seed=seed,
                          bh_family=bh_family, equivalence_margin_pp=equivalence_margin_pp)
    record = load_allocation(uri, parents[:1])
    if record:
        report.allocation_design = dict(record.get("design", {}))
        report.seed_allocation = list(record.get("cells", []))
    out = Path(out_dir) if out_dir is not None else launch_dir() / "outputs" / "compare" / sweep
    paths = write_report(report, out)
    shots_md = shot_accuracy_markdown(df)
    if shots_md:
        paths.append(out / "shot_accuracy.md")
        atomic_write_text(paths[-1], shots_md)
    print(report_markdown(report))
    print(shots_md)
    print(f"[leverplus] comparison written to {out}")
    if log_to_parent:
        _log_to_parent(client, parents, paths, sweep)
    return report


def _no_runs_error(client, exp_ids: List[str], sweep: str, uri: str, experiment: Optional[str],
                   parent_run_id: Optional[str]) -> LeverPlusInputError:
    """The error for a sweep without FINISHED runs, naming the sweeps that are there."""
    known = _known_sweeps(client, exp_ids)
    return LeverPlusInputError(
        f"no FINISHED runs tagged sweep={sweep!r}"
        + (f" under parent run {parent_run_id}" if parent_run_id else "")
        + f" in {uri}" + (f", experiment {experiment!r}" if experiment else ""),
        field="sweep",
        fix=(f"sweeps found there: {', '.join(known)}" if known else "no sweep runs found there at all")
        + "; check --sweep / --tracking-uri / --experiment (or MLFLOW_TRACKING_URI)",
    )


def _log_to_parent(client, parents: Sequence[str], paths: Sequence[Path], sweep: str) -> None:
    """Log the report files under ``comparison/`` of the newest parent run (a warning when there is none)."""
    if not parents:
        print(f"[leverplus] no parent run tagged sweep={sweep!r}, role=parent: files not logged to MLflow",
              file=sys.stderr)
        return
    for p in paths:
        with_retries(partial(client.log_artifact, parents[0], str(p), "comparison"))
    print(f"[leverplus] logged to MLflow run {parents[0]} (artifacts/comparison)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m leverplus.compare",
                                 description="Compare a reward-ablation sweep against its baseline arm.")
    ap.add_argument("--sweep", required=True, help="value of the runs' `sweep` tag")
    ap.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db")
    ap.add_argument("--experiment", default=None, help="experiment name (default: search all)")
    ap.add_argument("--parent-run-id", default=None, help="compare only the children of this sweep invocation")
    ap.add_argument("--out", default=None, help="output folder (default: outputs/compare/<sweep>)")
    ap.add_argument("--no-log", action="store_true", help="do not log the report to the parent run")
    ap.add_argument("--n-boot", type=int, default=DEFAULT_N_BOOT,
                    help=f"per-query bootstrap resamples (default: eval.bootstrap_samples' default, {DEFAULT_N_BOOT})")
    ap.add_argument("--bh-family", choices=BH_FAMILIES, default="all",
                    help="Benjamini-Hochberg family of the q column: all arm cells (default) or each shot")
    ap.add_argument("--equivalence-margin-pp", type=float, default=DEFAULT_EQUIVALENCE_MARGIN_PP,
                    help="margin of the better/worse/equivalent/inconclusive verdict, in accuracy points "
                         f"(default {DEFAULT_EQUIVALENCE_MARGIN_PP})")
    args = ap.parse_args(argv)
    try:
        compare_sweep(args.sweep, args.tracking_uri, args.experiment, args.parent_run_id, args.out,
                      log_to_parent=not args.no_log, n_boot=args.n_boot, bh_family=args.bh_family,
                      equivalence_margin_pp=args.equivalence_margin_pp)
    except LeverPlusInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
