"""AblationSweeper: a Hydra sweeper (registered through the ``hydra.plugins`` entry point in pyproject.toml) for reward ablations against a baseline arm.

It expands ``factors`` (a cartesian grid of arms) plus one ``baseline`` arm, crosses every arm with the
``paired_by`` factors (shot_num, seed) so each arm has a baseline partner, and launches the jobs through whatever
Hydra launcher is configured (basic, joblib, submitit). Before launching it

* composes every job's config and drops jobs whose *canonical* config (knobs a reward mode ignores removed, see
  ``leverplus.config.identity.canonical_config``) equals an earlier job's: those arms are aliases and run once;
* optionally loads the data once per data config and aliases arms whose training consumes bit-identical reward
  tensors on it (e.g. ``separated`` ≡ ``hard_plus_soft_v2`` for binary correctness; see
  ``leverplus.pipeline.reward_signature``);
* tags every job with its sweep, arm and role, and turns on ``tracking.skip_finished`` so a re-run completes only
  the jobs that have no FINISHED MLflow run (idempotent, resumable); a skipped job is recorded under the new parent
  run as a pointer to the run that trained it (``leverplus.tracking.run.record_reused_run``).

Command-line overrides of a factor's key replace that factor's list (``seed=0`` restricts the seeds,
``reward.mode=hard_only,soft_only`` picks two modes); compound factors (e.g. ``weights``) are overridden with
``hydra.sweeper.factors.weights=[...]``. Other sweep overrides become extra factors of the arms.

This module is the Hydra plugin only (config, registration, the Sweeper facade); the grid is ``grid``, the
de-duplication ``dedupe``, the launching ``launch``."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from leverplus.env import SWEEP_FAILED_JOBS_VAR
from leverplus.sweeps.adaptive import AdaptiveConf, AdaptiveRun, run_adaptive
from leverplus.sweeps.dedupe import dedupe, fast_composer
from leverplus.sweeps.grid import GridSpec, Job, expand
from leverplus.sweeps.launch import job_overrides, launch_all, print_dry_run, record_aliases
from leverplus.sweeps.power import default_spreads, plan_sweep, planned_queries, planned_seeds, power_lines, read_pilot

log = logging.getLogger(__name__)


@dataclass
class AblationSweeperConf:
    _target_: str = "leverplus.sweeps.ablation.AblationSweeper"
    sweep_name: str = "sweep"
    # name -> list of values. A name that is a config key ("reward.mode") takes plain values; any other name
    # ("weights") takes dicts {config key: value}.
    factors: Dict[str, Any] = field(default_factory=dict)
    paired_by: List[str] = field(default_factory=lambda: ["data.shot_nums", "seed"])
    baseline: Optional[Dict[str, Any]] = None  # overrides of the baseline arm; None = no baseline arm
    baseline_label: str = "baseline"
    arm_overrides: Dict[str, Any] = field(default_factory=dict)  # applied to every non-baseline arm
    alias_identical_rewards: bool = True
    max_batch_size: Optional[int] = None
    fail_fast: bool = False
    dry_run: bool = False  # print the distinct jobs and the aliases, launch nothing
    # pre-sweep power (printed by the dry run): a pilot sweep's comparison.csv for the spreads (None: the embedded
    # world's defaults, leverplus.sweeps.power), the effect to plan for (pp), and the evaluation queries per run when
    # the config cannot tell (file-based data)
    pilot: Optional[str] = None
    power_target_pp: float = 0.5
    power_n_queries: Optional[int] = None
    # adaptive seeds: start every arm on a few seeds, add seeds only where the verdict is open (leverplus.sweeps.adaptive)
    adaptive: AdaptiveConf = field(default_factory=AdaptiveConf)


ConfigStore.instance().store(
    group="hydra/sweeper", name="ablation", node=AblationSweeperConf, provider="leverplus", replace=True
)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node) if isinstance(node, DictConfig) else node


class AblationSweeper(Sweeper):
    def __init__(self, sweep_name: str, factors, paired_by, baseline, baseline_label, arm_overrides,
                 alias_identical_rewards: bool, max_batch_size: Optional[int], fail_fast: bool,
                 dry_run: bool = False, pilot: Optional[str] = None, power_target_pp: float = 0.5,
                 power_n_queries: Optional[int] = None, adaptive: Any = None) -> None:
        super().__init__()
        self.sweep_name = sweep_name
        self.grid = GridSpec(factors={k: list(v) for k, v in dict(_plain(factors)).items()},
                             paired_by=list(paired_by), baseline=_plain(baseline), baseline_label=baseline_label,
                             arm_overrides=dict(_plain(arm_overrides) or {}))
        self.alias_identical_rewards = alias_identical_rewards
        self.max_batch_size = max_batch_size
        self.fail_fast = fail_fast
        self.dry_run = dry_run
        self.pilot = pilot
        self.power_target_pp = float(power_target_pp)
        self.power_n_queries = power_n_queries
        self.adaptive = AdaptiveConf(**(_plain(adaptive) or {}))
        self.aliases: Dict[str, str] = {}

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def _parser(self) -> OverridesParser:
        return OverridesParser.create(config_loader=self.hydra_context.config_loader)

    def _load(self, overrides: List[str]) -> DictConfig:
        """A full Hydra compose of one job's config."""
        return self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))

    def expand(self, arguments: List[str]) -> Tuple[List[Job], List[str]]:
        """(jobs, fixed overrides) from the factors and the command-line arguments."""
        return expand(self.grid, self._parser().parse_overrides(list(arguments)))

    def dedupe(self, jobs: List[Job], fixed: List[str]) -> List[Job]:
        """The distinct jobs; the others are recorded in ``self.aliases``."""
        if not jobs:
            return []
        compose = fast_composer(self._load, self._parser(), fixed, jobs[-1].overrides, self.sweep_name)
        return dedupe(jobs, compose, self.alias_identical_rewards, self.aliases)

    def print_power(self, jobs: List[Job], fixed: List[str], alpha: float = 0.05) -> None:
        """The planned design's minimum detectable effects (:mod:`leverplus.sweeps.power`)."""
        if not jobs:
            return
        spreads = read_pilot(self.pilot) if self.pilot else default_spreads()
        n_seeds = planned_seeds([j.pair for j in jobs])
        n_queries = self.power_n_queries
        if n_queries is None:
            n_queries = planned_queries(self._load(fixed + jobs[-1].overrides))
        plan = plan_sweep(spreads, n_seeds, n_queries, self.power_target_pp, alpha)
        print("\n".join([f"[{self.sweep_name}] " + line if i == 0 else line
                         for i, line in enumerate(power_lines(plan, spreads.source, n_seeds))]))

    def _launch_jobs(self, fixed: List[str], jobs: List[Job]) -> List[Any]:
        """One adaptive round through the launcher; the failed-job count accumulates over the rounds."""
        before = int(os.environ.get(SWEEP_FAILED_JOBS_VAR, "0") or 0)
        out = launch_all(self.launcher, self.sweep_name, job_overrides(self.sweep_name, fixed, jobs),
                         self.max_batch_size, self.fail_fast)
        os.environ[SWEEP_FAILED_JOBS_VAR] = str(before + int(os.environ.get(SWEEP_FAILED_JOBS_VAR, "0") or 0))
        return out

    def sweep_adaptive(self, arguments: List[str]) -> Any:
        """The adaptive mode: the grid over seeds 0..max_seeds-1, launched round by round as the rule asks."""
        a = self.adaptive
        seeds = ",".join(str(s) for s in range(a.max_seeds))
        jobs, fixed = self.expand(list(arguments) + [f"{a.seed_key}={seeds}"])
        n_total = len(jobs)
        jobs = self.dedupe(jobs, fixed)
        record_aliases(self.config, self.aliases)
        state = AdaptiveRun(a, jobs)
        if self.dry_run:
            plan = state.plan({})
            print(f"[{self.sweep_name}] adaptive dry run: {n_total} jobs over seeds 0..{a.max_seeds - 1}, "
                  f"{len(jobs)} distinct; looks at {list(plan.schedule)} seeds, alpha {plan.alpha_per_look:.3g} per "
                  f"look, budget {plan.budget} arm seed-runs; round 0 launches "
                  f"{len(state.round_jobs(state.seeds_wanted(plan, {})))} jobs")
            self.print_power(jobs, fixed, plan.alpha_per_look)  # at the last look, alpha / K
            return []
        os.environ[SWEEP_FAILED_JOBS_VAR] = "0"
        return run_adaptive(state, lambda js: self._launch_jobs(fixed, js), self.sweep_name,
                            Path(self.config.hydra.sweep.dir))

    def sweep(self, arguments: List[str]) -> Any:
        if self.adaptive.enabled:
            return self.sweep_adaptive(arguments)
        jobs, fixed = self.expand(arguments)
        n_total = len(jobs)
        jobs = self.dedupe(jobs, fixed)
        log.info(f"[{self.sweep_name}] {n_total} jobs in the grid, {len(jobs)} distinct; "
                 f"{len(self.aliases)} arm(s) are aliases: {self.aliases}")
        record_aliases(self.config, self.aliases)
        batches = job_overrides(self.sweep_name, fixed, jobs)
        if self.dry_run:
            print_dry_run(self.sweep_name, batches, n_total, len(self.aliases))
            self.print_power(jobs, fixed)
            return []
        return launch_all(self.launcher, self.sweep_name, batches, self.max_batch_size, self.fail_fast)
