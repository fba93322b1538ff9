"""AblationSweeper: a Hydra sweeper (registered through the ``hydra.plugins`` entry point in pyproject.toml) for reward ablations against a baseline arm.

It expands ``factors`` (a cartesian grid of arms) plus one ``baseline`` arm, crosses every arm with the
``paired_by`` factors (shot_num, seed) so each arm has a baseline partner, and launches the jobs through whatever
Hydra launcher is configured (basic, joblib, submitit). Before launching it

* composes every job's config and drops jobs whose *canonical* config (knobs a reward mode ignores removed, see
  ``leverplus.tracking.canonical_config``) equals an earlier job's: those arms are aliases and run once;
* optionally loads the data once per data config and aliases arms whose training consumes bit-identical reward
  tensors on it (e.g. ``separated`` ≡ ``hard_plus_soft_v2`` for binary correctness; see
  ``_alias_identical_rewards``);
* tags every job with its sweep, arm and role, and turns on ``tracking.skip_finished`` so a re-run completes only
  the jobs that have no FINISHED MLflow run (idempotent, resumable); a skipped job is recorded under the new parent
  run as a pointer to the run that trained it (``leverplus.tracking.record_reused_run``).

Command-line overrides of a factor's key replace that factor's list (``seed=0`` restricts the seeds,
``reward.mode=hard_only,soft_only`` picks two modes); compound factors (e.g. ``weights``) are overridden with
``hydra.sweeper.factors.weights=[...]``. Other sweep overrides become extra factors of the arms."""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from leverplus.env import PARENT_RUN_ID_VAR, SWEEP_FAILED_JOBS_VAR, TRACKING_URI_VAR
from leverplus.training.consumed import hash_consumed_rewards

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


ConfigStore.instance().store(
    group="hydra/sweeper", name="ablation", node=AblationSweeperConf, provider="leverplus", replace=True
)


def fmt(value: Any) -> str:
    """A Python value as a Hydra override value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def _short(key: str) -> str:
    return {"reward.mode": "mode", "rce.use_raw_reward": "raw", "data.shot_nums": "shot"}.get(key, key.split(".")[-1])


@dataclass
class Job:
    arm: str
    role: str
    overrides: List[str]  # without the tracking tags
    pair: Tuple[str, ...]


class AblationSweeper(Sweeper):
    def __init__(self, sweep_name: str, factors, paired_by, baseline, baseline_label, arm_overrides,
                 alias_identical_rewards: bool, max_batch_size: Optional[int], fail_fast: bool,
                 dry_run: bool = False) -> None:
        super().__init__()
        self.sweep_name = sweep_name
        self.factors = {k: list(v) for k, v in (OmegaConf.to_container(factors) if isinstance(factors, DictConfig) else dict(factors)).items()}
        self.paired_by = list(paired_by)
        self.baseline = OmegaConf.to_container(baseline) if isinstance(baseline, DictConfig) else baseline
        self.baseline_label = baseline_label
        self.arm_overrides = dict(OmegaConf.to_container(arm_overrides)) if isinstance(arm_overrides, DictConfig) else dict(arm_overrides or {})
        self.alias_identical_rewards = alias_identical_rewards
        self.max_batch_size = max_batch_size
        self.fail_fast = fail_fast
        self.dry_run = dry_run
        self.aliases: Dict[str, str] = {}

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # ------------------------------------------------------------------ grid
    def _factor_items(self, name: str, values: Sequence[Any]) -> List[List[Tuple[str, str]]]:
        """Each value of a factor as a list of (key, override value) pairs."""
        out = []
        for v in values:
            if isinstance(v, dict):
                out.append([(k, fmt(x)) for k, x in v.items()])
            else:
                out.append([(name, v if isinstance(v, str) and name in self._cli_strings else fmt(v))])
        return out

    def expand(self, arguments: Sequence[str]) -> Tuple[List[Job], List[str]]:
        """(jobs, fixed overrides) from the factors and the command-line arguments."""
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        factors = {k: list(v) for k, v in self.factors.items()}
        self._cli_strings = set()
        fixed: List[str] = []
        extra: Dict[str, List[str]] = {}
        for ov in parser.parse_overrides(list(arguments)):
            key = ov.get_key_element()
            bare = key.lstrip("+~")
            values = list(ov.sweep_string_iterator()) if ov.is_sweep_override() else [ov.get_value_element_as_str()]
            parsed = list(ov.sweep_iterator()) if ov.is_sweep_override() else [ov.value()]
            values = [fmt(p) if isinstance(p, bool) else v for v, p in zip(values, parsed)]  # "False" -> "false"
            if bare in factors or bare in self.paired_by:
                factors[bare] = values
                self._cli_strings.add(bare)
            elif ov.is_sweep_override():
                extra[key] = values
                self._cli_strings.add(key)
            else:
                fixed.append(f"{key}={values[0]}")
        factors.update(extra)
        paired = [k for k in self.paired_by if k in factors]
        arm_names = [k for k in factors if k not in paired]
        pair_items = [self._factor_items(k, factors[k]) for k in paired]
        arm_items = [self._factor_items(k, factors[k]) for k in arm_names]
        jobs: List[Job] = []
        for pair in itertools.product(*pair_items):
            pair_ov = [f"{k}={v}" for item in pair for k, v in item]
            pair_key = tuple(pair_ov)
            if self.baseline is not None:
                base_ov = [f"{k}={fmt(v)}" for k, v in self.baseline.items()]
                jobs.append(Job(self.baseline_label, "baseline", pair_ov + base_ov, pair_key))
            for combo in itertools.product(*arm_items):
                pairs = [kv for item in combo for kv in item]
                label = "|".join(f"{_short(k)}={v}" for k, v in pairs) or "arm"
                arm_ov = [f"{k}={v}" for k, v in pairs] + [f"{k}={fmt(v)}" for k, v in self.arm_overrides.items()]
                jobs.append(Job(label, "arm", pair_ov + arm_ov, pair_key))
        return jobs, fixed

    # ------------------------------------------------------------------ de-duplication
    def _compose(self, overrides: List[str]) -> DictConfig:
        return self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))

    def _fast_composer(self, fixed: List[str], probe: List[str]):
        """A function overrides -> job config (without ``hydra``) that composes the base once and applies plain
        ``key=value`` overrides to a copy (a full Hydra compose costs ~0.3 s, the grid has ~150 jobs). Overrides it
        cannot apply (config groups, ``+``/``~``, dict-valued nodes) fall back to a full compose. Checked against a
        full compose on ``probe``; on any difference every job is composed in full."""
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        base = _plain_cfg(self._compose(fixed))

        def full(overrides: List[str]) -> DictConfig:
            return _plain_cfg(self._compose(fixed + overrides))

        def fast(overrides: List[str]) -> DictConfig:
            cfg = copy.deepcopy(base)
            for ov in parser.parse_overrides(list(overrides)):
                key = ov.get_key_element()
                node = OmegaConf.select(cfg, key, default=_MISSING) if "/" not in key and "@" not in key else _MISSING
                if (ov.is_add() or ov.is_delete() or ov.is_force_add() or ov.is_sweep_override() or node is _MISSING
                        or isinstance(node, DictConfig) or key.startswith("hydra")):
                    return full(overrides)
                OmegaConf.update(cfg, key, ov.value(), merge=False)
            return cfg

        try:
            ok = OmegaConf.to_container(fast(probe)) == OmegaConf.to_container(full(probe))
        except Exception as e:  # noqa: BLE001 - any problem -> the always-correct path
            log.warning(f"fast compose unavailable ({type(e).__name__}: {e}); composing every job in full")
            ok = False
        log.info(f"[{self.sweep_name}] composing jobs: {'base once + value overrides' if ok else 'in full'}")
        return fast if ok else full

    def dedupe(self, jobs: List[Job], fixed: List[str]) -> List[Job]:
        from leverplus.config.identity import canonical_config
        from leverplus.utils import stable_hash

        seen: Dict[str, Job] = {}
        unique: List[Job] = []
        composed: Dict[int, Tuple[DictConfig, Dict[str, Any]]] = {}
        compose = self._fast_composer(fixed, jobs[-1].overrides) if jobs else None
        for job in jobs:
            cfg = compose(job.overrides)
            plain = _plain(cfg)
            key = stable_hash(canonical_config(plain))
            if key in seen:
                if job.arm != seen[key].arm:
                    self.aliases.setdefault(job.arm, seen[key].arm)
                continue
            seen[key] = job
            composed[id(job)] = (cfg, plain)
            unique.append(job)
        if self.alias_identical_rewards:
            unique = self._alias_identical_rewards(unique, composed)
        return unique

    def _alias_identical_rewards(self, jobs: List[Job], composed: Dict[int, Tuple[DictConfig, Dict[str, Any]]]
                                 ) -> List[Job]:
        """Arms whose configs differ only in the reward section and whose training consumes identical tensors.

        What a run consumes from its rewards: RCE the raw or the group-normalised rewards (``rce.use_raw_reward``),
        GRPO the normalised or raw ones (``grpo.reward_source``), checkpoint selection the validation rewards up to a
        positive scale (argmax over epochs of a mean reward), plus which queries and candidates survive the filters.
        When all of that is bit-identical the two runs are the same computation; e.g. ``separated`` ≡
        ``hard_plus_soft_v2`` for binary correctness, and with normalised rewards (1, 0.5) ≡ (2, 1) for
        ``hard_plus_soft``, since z-scores ignore a positive power-of-two scale exactly. Only metrics in reward
        units differ (the alias reports the canonical run's).
        """
        import hashlib

        import torch

        from leverplus.config.identity import canonical_config
        from leverplus.data.loading import prepare_groups
        from leverplus.pipeline import load_data
        from leverplus.utils import stable_hash

        data_cache: Dict[str, Any] = {}
        group_cache: Dict[str, Any] = {}
        seen: Dict[str, Job] = {}
        keep: List[Job] = []
        for job in jobs:
            cfg, plain = composed[id(job)]
            c = canonical_config(plain)
            c.pop("reward", None)
            rest = stable_hash(c)
            data_key = stable_hash({"data": c.get("data"), "model": c.get("model")})
            groups_key = stable_hash({"data_key": data_key, "reward": plain["reward"]})
            try:
                if data_key not in data_cache:
                    data_cache[data_key] = load_data(cfg)
                if groups_key not in group_cache:
                    group_cache[groups_key] = prepare_groups(cfg, data_cache[data_key], with_sft=False)
                groups = group_cache[groups_key]
            except Exception as e:  # let the job itself fail with its clear error
                log.warning(f"cannot check rewards of arm {job.arm}: {e}")
                keep.append(job)
                continue
            h = hashlib.sha256(rest.encode())
            hash_consumed_rewards(h, groups.train, cfg)
            if groups.val:
                # a mean reward is picked by its argmax (scale-free); the val RCE loss is not scale-free
                scale_free = str(cfg.eval.select_metric) not in ("val/loss", "val/offline/rce_loss")
                scale = (max(float(g.rewards_raw.abs().max()) for g in groups.val) or 1.0) if scale_free else 1.0
                for g in groups.val:
                    h.update(str((g.query_id, g.shot_num)).encode())
                    h.update(g.labels.numpy().tobytes())
                    h.update((g.rewards_raw / torch.tensor(scale, dtype=g.rewards_raw.dtype)).numpy().tobytes())
            sig = h.hexdigest()
            if sig in seen:
                if job.arm != seen[sig].arm:
                    self.aliases.setdefault(job.arm, seen[sig].arm)
                continue
            seen[sig] = job
            keep.append(job)
        return keep

    # ------------------------------------------------------------------ run
    def sweep(self, arguments: List[str]) -> Any:
        from pathlib import Path

        jobs, fixed = self.expand(arguments)
        n_total = len(jobs)
        jobs = self.dedupe(jobs, fixed)
        log.info(
            f"[{self.sweep_name}] {n_total} jobs in the grid, {len(jobs)} distinct; "
            f"{len(self.aliases)} arm(s) are aliases: {self.aliases}"
        )
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        (sweep_dir / "aliases.json").write_text(json.dumps(self.aliases, indent=2))
        _log_aliases(self.aliases)

        batches: List[List[str]] = []
        for job in jobs:
            tags = [
                f"tracking.sweep={self.sweep_name}",
                f"tracking.arm='{job.arm}'",
                f"tracking.role={job.role}",
                "tracking.skip_finished=true",
            ]
            batches.append(fixed + job.overrides + tags)
        if self.dry_run:
            for i, b in enumerate(batches):
                print(f"job {i}: {' '.join(b)}")
            print(f"[{self.sweep_name}] dry run: {n_total} jobs in the grid, {len(batches)} distinct, "
                  f"{len(self.aliases)} aliases")
            return []
        size = self.max_batch_size or len(batches) or 1
        returns, failed, idx = [], 0, 0
        for start in range(0, len(batches), size):
            batch = batches[start : start + size]  # (no validate_batch_is_legal: dedupe composed every job already)
            results = self.launcher.launch(batch, initial_job_idx=idx)
            idx += len(batch)
            for r in results:
                try:
                    _ = r.return_value
                except Exception as e:  # a failed job is FAILED in MLflow; the sweep goes on
                    failed += 1
                    log.error(f"[{self.sweep_name}] job failed: {type(e).__name__}: {e}")
                    if self.fail_fast:
                        raise
            returns.append(results)
        os.environ[SWEEP_FAILED_JOBS_VAR] = str(failed)
        log.info(f"[{self.sweep_name}] done: {len(batches)} jobs launched, {failed} failed")
        return returns

_MISSING = object()


def _plain_cfg(cfg: DictConfig) -> DictConfig:
    """The job config without the ``hydra`` node, still a (typed) DictConfig."""
    out = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
    OmegaConf.set_struct(out, True)
    return out


def _plain(cfg: DictConfig) -> Dict[str, Any]:
    """The job config without the ``hydra`` node (which holds per-job values not known before launch), as plain data."""
    from leverplus.config.identity import to_container

    return to_container(_plain_cfg(cfg))


def _log_aliases(aliases: Dict[str, str]) -> None:
    parent = os.environ.get(PARENT_RUN_ID_VAR)
    uri = os.environ.get(TRACKING_URI_VAR)
    if not parent or not uri:
        return
    import mlflow

    from leverplus.tracking.store import with_retries

    client = mlflow.MlflowClient(tracking_uri=uri)
    with_retries(lambda: client.log_text(parent, json.dumps(aliases, indent=2), "aliases.json"))

