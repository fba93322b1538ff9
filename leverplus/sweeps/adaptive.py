"""Adaptive seeds for an ablation sweep: only arms whose verdict is still open get more seeds, up to a budget.

Every arm starts on a few seeds (``hydra.sweeper.adaptive.enabled=true``).

The rule is :func:`leverplus.evaluation.stats.next_allocation` (group-sequential looks at planned seed counts, the
four-way verdict at α/K per look, Bonferroni over the K looks; error rates in docs/statistics.md §5). This module
runs the rounds: launch the round's jobs, read the test accuracies of the sweep's runs back from MLflow, pair each
arm cell with the baseline at the same (shot, seed), ask the rule, repeat. The decisions (seeds per cell, verdict at
α/K and why) go to ``adaptive.json`` in the sweep dir and on the MLflow parent run, where the comparison reads them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from leverplus.analysis.compare import load_sweep_runs
from leverplus.data.formats.io import atomic_write_json
from leverplus.env import PARENT_RUN_ID_VAR, TRACKING_URI_VAR
from leverplus.errors import LeverPlusInputError
from leverplus.evaluation.stats import AllocationPlan, next_allocation
from leverplus.sweeps.grid import Job
from leverplus.tracking.store import with_retries

log = logging.getLogger(__name__)

ARTIFACT = "adaptive.json"


@dataclass
class AdaptiveConf:
    """``hydra.sweeper.adaptive``: the sequential design (docs/statistics.md §5)."""

    enabled: bool = False
    initial_seeds: int = 3  # seeds every arm starts on (the first look)
    step: int = 2  # seeds added per look to an arm still inconclusive
    max_seeds: int = 9  # the last look
    budget: int | None = None  # total arm-cell seed-runs (baseline not counted); None = cells x max_seeds
    margin_pp: float = 0.5  # equivalence margin of the four-way verdict, accuracy points
    alpha: float = 0.05  # per-arm error rate, split as alpha / K over the K looks
    seed_key: str = "seed"


Cell = tuple[str, int]  # (arm label, shot_num)


def _seed_of(job: Job, seed_key: str) -> int:
    for p in job.pair:
        k, _, v = p.partition("=")
        if k == seed_key:
            return int(v)
    raise LeverPlusInputError(f"job of arm {job.arm!r} has no {seed_key}= override", record=job.arm,
                              field="hydra.sweeper.paired_by", fix=f"pair the sweep by {seed_key}")


def _shots_of(job: Job) -> tuple[int, ...]:
    for p in job.overrides:
        k, _, v = p.partition("=")
        if k == "data.shot_nums":
            return tuple(int(x) for x in v.strip("[]").split(",") if x.strip())
    return ()


def _pair_key(job: Job, seed_key: str) -> tuple[str, ...]:
    return tuple(p for p in job.pair if p.partition("=")[0] != seed_key)


def cell_differences(runs: pd.DataFrame, cells: Sequence[Cell], metric: str = "acc") -> dict[Cell, list[float]]:
    """Per arm cell, the paired differences arm − baseline at the same (shot, seed), in ascending seed order."""
    out: dict[Cell, list[float]] = {c: [] for c in cells}
    if runs.empty:
        return out
    base = runs[runs["role"] == "baseline"]
    base_by = {(int(r["shot_num"]), int(r["seed"])): float(r[metric]) for _, r in base.iterrows()}
    arms = runs[runs["role"] != "baseline"].sort_values("seed")
    for _, r in arms.iterrows():
        cell = (str(r["arm"]), int(r["shot_num"]))
        key = (int(r["shot_num"]), int(r["seed"]))
        if cell in out and key in base_by and np.isfinite(float(r[metric])):
            out[cell].append(float(r[metric]) - base_by[key])
    return out


@dataclass
class AdaptiveRun:
    """The state of an adaptive sweep: the seed numbers launched per (arm, pair) and the plans so far."""

    conf: AdaptiveConf
    jobs: list[Job]  # every distinct job, over seeds 0..max_seeds-1
    launched: set = field(default_factory=set)  # indices into jobs
    plans: list[AllocationPlan] = field(default_factory=list)

    def cells(self) -> list[Cell]:
        return list(dict.fromkeys((j.arm, s) for j in self.jobs if j.role != "baseline" for s in _shots_of(j)))

    def seeds_wanted(self, plan: AllocationPlan, have: Mapping[Cell, int]) -> dict[Cell, int]:
        """Per cell, the number of paired seeds it should have after this round."""
        return {cell: have.get(cell, 0) + a.add for cell, a in zip(self._cell_keys(plan), plan.arms.values())}

    @staticmethod
    def _cell_keys(plan: AllocationPlan) -> list[Cell]:
        return [tuple(json.loads(k)) for k in plan.arms]  # type: ignore[misc]

    def round_jobs(self, wanted: Mapping[Cell, int]) -> list[int]:
        """Indices of the not yet launched jobs this round needs: an arm job at seed s when one of its cells wants
        more than s seeds (seeds are 0, 1, 2, ... in order), and the baseline job of each pair up to the largest
        seed count of its arms."""
        key = self.conf.seed_key
        need: dict[tuple[str, ...], int] = {}  # pair without seed -> baseline seeds needed
        idx = []
        for i, j in enumerate(self.jobs):
            if j.role == "baseline":
                continue
            n = max((wanted.get((j.arm, s), 0) for s in _shots_of(j)), default=0)
            pk = _pair_key(j, key)
            need[pk] = max(need.get(pk, 0), n)
            if _seed_of(j, key) < n and i not in self.launched:
                idx.append(i)
        for i, j in enumerate(self.jobs):
            if j.role == "baseline" and _seed_of(j, key) < need.get(_pair_key(j, key), 0) and i not in self.launched:
                idx.append(i)
        return sorted(idx)

    def plan(self, diffs: Mapping[Cell, list[float]]) -> AllocationPlan:
        c = self.conf
        cells = self.cells()
        budget = c.budget if c.budget is not None else len(cells) * c.max_seeds
        results = {json.dumps([arm, shot]): diffs.get((arm, shot), []) for arm, shot in cells}
        return next_allocation(results, budget, margin=c.margin_pp / 100.0, initial_seeds=c.initial_seeds,
                               step=c.step, max_seeds=c.max_seeds, alpha=c.alpha)


def allocation_record(run: AdaptiveRun) -> dict:
    """The JSON record of the sweep's sequential decisions: the design, and per cell its seeds, verdict and why."""
    c = run.conf
    last = run.plans[-1] if run.plans else None
    cells = []
    if last is not None:
        for key, a in last.arms.items():
            arm, shot = json.loads(key)
            cells.append({"arm": arm, "shot_num": int(shot), "n_seeds": a.n_seeds, "verdict": a.verdict,
                          "look": a.look, "reason": a.reason})
    return {
        "design": {"initial_seeds": c.initial_seeds, "step": c.step, "max_seeds": c.max_seeds,
                   "looks": list(last.schedule) if last else [], "alpha": c.alpha,
                   "alpha_per_look": last.alpha_per_look if last else None, "margin_pp": c.margin_pp,
                   "budget": last.budget if last else None, "budget_left": last.budget_left if last else None,
                   "rule": "group-sequential, Bonferroni over the looks (docs/statistics.md §5)"},
        "rounds": [{"round": i, "add": {k: a.add for k, a in p.arms.items() if a.add}} for i, p in enumerate(run.plans)],
        "cells": cells,
    }


def _check_conf(c: AdaptiveConf) -> None:
    if os.environ.get(TRACKING_URI_VAR) is None or os.environ.get(PARENT_RUN_ID_VAR) is None:
        raise LeverPlusInputError("the adaptive mode reads each round's results from MLflow, but no sweep parent run "
                                  "is open", field="hydra.sweeper.adaptive.enabled",
                                  fix="keep tracking.enabled=true and the sweep callback (sweep_base: ablation), or "
                                      "set hydra.sweeper.adaptive.enabled=false")


def run_adaptive(
    run: AdaptiveRun,
    launch: Callable[[list[Job]], object],
    sweep_name: str,
    sweep_dir: Path,
    read_runs: Callable[[], pd.DataFrame] | None = None,
) -> list[object]:
    """Rounds until the rule stops: plan, launch the round's jobs (``launch`` takes a list of jobs), read back."""
    if read_runs is None:
        _check_conf(run.conf)
        uri, parent = os.environ[TRACKING_URI_VAR], os.environ[PARENT_RUN_ID_VAR]

        def read_runs() -> pd.DataFrame:
            return load_sweep_runs(uri, sweep_name, parent_run_id=parent)
    returns: list[object] = []
    diffs: dict[Cell, list[float]] = {c: [] for c in run.cells()}
    while True:
        plan = run.plan(diffs)
        run.plans.append(plan)
        have = {cell: len(d) for cell, d in diffs.items()}
        idx = run.round_jobs(run.seeds_wanted(plan, have))
        for a in plan.arms.values():
            log.info(f"[{sweep_name}] adaptive round {len(run.plans) - 1}: {a.arm}: {a.reason}")
        if plan.done or not idx:
            break
        run.launched.update(idx)
        returns.append(launch([run.jobs[i] for i in idx]))
        diffs = cell_differences(read_runs(), run.cells())
    write_record(run, sweep_dir)
    return returns


def write_record(run: AdaptiveRun, sweep_dir: Path) -> None:
    """adaptive.json in the sweep dir, and on the MLflow parent run when there is one."""
    record = allocation_record(run)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(sweep_dir / ARTIFACT, record, indent=2)
    parent, uri = os.environ.get(PARENT_RUN_ID_VAR), os.environ.get(TRACKING_URI_VAR)
    if parent and uri:
        client = mlflow.MlflowClient(tracking_uri=uri)
        with_retries(lambda: client.log_text(parent, json.dumps(record, indent=2), ARTIFACT))
