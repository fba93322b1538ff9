"""Pre-sweep power: the minimum detectable effects of a planned ablation sweep, printed by its dry run.

Why: a sweep of 3 seeds cannot resolve a 0.5 pp difference, and a user should learn that before spending the GPU
hours. The spreads come from a pilot sweep's ``comparison.csv`` (``hydra.sweeper.pilot=path``) or, without one,
from the embedded world's defaults below; the formulas are :func:`leverplus.evaluation.stats.plan_from_pilot`
(docs/statistics.md §4).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from leverplus.errors import LeverPlusInputError
from leverplus.evaluation.stats import PilotPlan, mde_paired, plan_from_pilot
from leverplus.utils import enum_value

#: Seed-level sd of Δ accuracy (arm − baseline at the same shot and seed) on the embedded world: the
#: ``skip_fallback`` sweep, default training, 5 seeds (docs/benchmarks.md: 95% CI ±0.79 pp -> sd = 0.79·√5/2.776).
DEFAULT_SEED_SD: float = 0.0064
#: Per-query sd of the paired accuracy differences there (per-query CI ±0.54 pp over 10,000 query-seed pairs).
DEFAULT_QUERY_SD: float = 0.28
#: Power of the printed minimum detectable effects.
PLAN_POWER: float = 0.8


@dataclass(frozen=True)
class PilotSpreads:
    """Per-cell spreads read from a pilot comparison: seed-level sd of Δ, per-query sd, queries per seed."""

    seed_sds: list[float]
    query_sds: list[float]
    queries_per_seed: float | None
    source: str


def _pilot_alpha(csv: Path) -> float:
    """α of the pilot's report (1 − confidence in the comparison.json beside the csv; 0.05 without one)."""
    js = csv.with_name("comparison.json")
    if js.is_file():
        try:
            return 1.0 - float(json.loads(js.read_text()).get("confidence", 0.95))
        except (ValueError, TypeError, AttributeError):
            pass
    return 0.05


def read_pilot(path: str | Path) -> PilotSpreads:
    """The arm cells' spreads of a pilot ``comparison.csv`` (baseline rows and aliases left out), recovered from
    its MDE columns: sd = mde80_seed_pp / mde_paired(1, delta_n) and sd = mde80_query_pp / mde_paired(1,
    query_delta_n, test="z") at the pilot's α (which makes them exactly the sds the pilot measured)."""
    csv = Path(path)
    if not csv.is_file():
        raise LeverPlusInputError(f"no pilot comparison at {csv}", file=str(csv), field="hydra.sweeper.pilot",
                                  fix="pass the comparison.csv of a finished pilot sweep, or drop the override")
    df = pd.read_csv(csv, keep_default_na=False, na_values=[""])
    need = ("role", "delta_n", "mde80_seed_pp")
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise LeverPlusInputError(f"the pilot comparison lacks column {missing[0]!r}", file=str(csv),
                                  field=missing[0], fix="re-run python -m leverplus.compare on the pilot sweep")
    alpha = _pilot_alpha(csv)
    arms = df[(df["role"].astype(str) != "baseline")]
    if "alias_of" in arms.columns:
        arms = arms[arms["alias_of"].fillna("").astype(str) == ""]
    seed_sds, query_sds, per_seed = [], [], []
    for _, r in arms.iterrows():
        n = int(r["delta_n"]) if pd.notna(r["delta_n"]) else 0
        mde = float(r["mde80_seed_pp"]) if pd.notna(r["mde80_seed_pp"]) else math.nan
        if n >= 2 and math.isfinite(mde):
            seed_sds.append(mde / 100.0 / mde_paired(1.0, n, alpha, PLAN_POWER, "t"))
        nq = int(r["query_delta_n"]) if "query_delta_n" in r and pd.notna(r["query_delta_n"]) else 0
        mq = float(r["mde80_query_pp"]) if "mde80_query_pp" in r and pd.notna(r["mde80_query_pp"]) else math.nan
        if nq >= 2 and math.isfinite(mq):
            query_sds.append(mq / 100.0 / mde_paired(1.0, nq, alpha, PLAN_POWER, "z"))
            if n >= 1:
                per_seed.append(nq / n)
    if not seed_sds:
        raise LeverPlusInputError("the pilot comparison has no arm cell with >= 2 seed pairs", file=str(csv),
                                  field="delta_n", fix="run the pilot with at least 2 seeds")
    return PilotSpreads(seed_sds, query_sds, float(np.mean(per_seed)) if per_seed else None, f"pilot {csv}")


def default_spreads() -> PilotSpreads:
    """The embedded world's spreads (see :data:`DEFAULT_SEED_SD`, :data:`DEFAULT_QUERY_SD`)."""
    return PilotSpreads([DEFAULT_SEED_SD], [DEFAULT_QUERY_SD], None,
                        f"embedded-world defaults (seed sd {100 * DEFAULT_SEED_SD:.2f} pp, per-query sd "
                        f"{DEFAULT_QUERY_SD:.2f})")


def plan_sweep(spreads: PilotSpreads, n_seeds: int, n_queries: int | None, target_pp: float,
               alpha: float = 0.05) -> PilotPlan:
    """The planned design's MDEs (:func:`plan_from_pilot`, spreads pooled as the rms over cells) and the seeds needed
    for ``target_pp``. ``n_queries`` falls back to the pilot's queries per seed."""
    nq = n_queries if n_queries is not None else (
        None if spreads.queries_per_seed is None else max(1, round(spreads.queries_per_seed)))
    return plan_from_pilot(spreads.seed_sds, n_seeds=max(int(n_seeds), 2),
                           query_sds=spreads.query_sds if (spreads.query_sds and nq) else None,
                           n_queries=nq if spreads.query_sds else None, target_mde=target_pp / 100.0,
                           alpha=alpha, power=PLAN_POWER)


def power_lines(plan: PilotPlan, source: str, n_seeds: int) -> list[str]:
    """The dry run's power report, one line each."""
    pp = 100.0
    lines = [f"power at {PLAN_POWER:.0%}, two-sided alpha {plan.alpha:g}, spreads from {source}:"]
    if n_seeds < 2:
        lines.append(f"  {n_seeds} seed: no seed-level test is possible (it needs >= 2 seeds); "
                     f"the MDE below is for 2 seeds")
    lines.append(f"  seed-level paired t, {plan.n_seeds} seeds: MDE {pp * plan.mde_seed:.2f} pp "
                 f"(seed sd {pp * plan.seed_sd:.2f} pp)")
    if math.isfinite(plan.mde_query):
        lines.append(f"  per-query test, {plan.n_queries} queries x {plan.n_seeds} seeds: MDE "
                     f"{pp * plan.mde_query:.2f} pp (per-query sd {plan.query_sd:.3f}; ignores seed-to-seed noise)")
    else:
        lines.append("  per-query test: number of evaluation queries unknown (set hydra.sweeper.power_n_queries)")
    if plan.target_mde is not None and plan.seeds_needed is not None:
        verdict = "enough" if plan.mde_seed <= plan.target_mde else "NOT enough"
        lines.append(f"  to detect {pp * plan.target_mde:.2f} pp at the seed level: {plan.seeds_needed} seeds "
                     f"({plan.n_seeds} planned: {verdict})")
    return lines


def planned_seeds(pairs: Sequence[Sequence[str]], seed_key: str = "seed") -> int:
    """Distinct seeds among the jobs' pair overrides (``seed=3``)."""
    return len({p for pair in pairs for p in pair if p.split("=", 1)[0] == seed_key})


def planned_queries(cfg) -> int | None:
    """Evaluation (test) queries per run of a composed job config: the simulated world's ``num_test`` capped by
    ``eval.max_queries``; None when it cannot be known before loading the data (file-based data, uncapped)."""
    cap = cfg.eval.get("max_queries") if "eval" in cfg else None
    n = None
    if enum_value(cfg.data.get("source")) == "sim" and "sim" in cfg.data:
        n = int(cfg.data.sim.num_test)
    if cap is not None:
        n = int(cap) if n is None else min(n, int(cap))
    return n
