"""Which jobs of a grid are the same computation, so they run once (the others are reported as aliases).

Two levels: equal *canonical* configs (knobs a reward mode ignores removed, ``leverplus.config.identity``), then,
optionally, bit-identical consumed rewards on the loaded data (``leverplus.pipeline.reward_signature``).
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Dict, List

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from leverplus.config.identity import canonical_config, to_container
from leverplus.config.validation import check_known_keys
from leverplus.pipeline import reward_signature
from leverplus.sweeps.grid import Job
from leverplus.utils import stable_hash

log = logging.getLogger(__name__)

Composer = Callable[[List[str]], DictConfig]  # overrides -> job config without ``hydra``

_MISSING = object()


def plain_cfg(cfg: DictConfig) -> DictConfig:
    """The job config without the ``hydra`` node (per-job values not known before launch), still a typed
    DictConfig."""
    out = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
    OmegaConf.set_struct(out, True)
    return out


def fast_composer(load: Callable[[List[str]], DictConfig], parser: OverridesParser, fixed: List[str],
                  probe: List[str], sweep_name: str) -> Composer:
    """A function overrides -> job config (without ``hydra``) that composes the base once and applies plain
    ``key=value`` overrides to a copy (a full Hydra compose, ``load``, costs ~0.3 s; the grid has ~150 jobs).
    Overrides it cannot apply (config groups, ``+``/``~``, dict-valued nodes) fall back to a full compose. Checked
    against a full compose on ``probe``; on any difference every job is composed in full."""
    base = plain_cfg(load(fixed))

    def full(overrides: List[str]) -> DictConfig:
        return plain_cfg(load(fixed + overrides))

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
    log.info(f"[{sweep_name}] composing jobs: {'base once + value overrides' if ok else 'in full'}")
    return fast if ok else full


def _first_of_each(jobs: List[Job], keys: List[Any], aliases: Dict[str, str]) -> List[int]:
    """Indices of the first job of each key; a later job of another arm becomes an alias of the first's arm."""
    seen: Dict[Any, Job] = {}
    keep: List[int] = []
    for i, (job, key) in enumerate(zip(jobs, keys)):
        if key is not None and key in seen:
            if job.arm != seen[key].arm:
                aliases.setdefault(job.arm, seen[key].arm)
            continue
        if key is not None:
            seen[key] = job
        keep.append(i)
    return keep


def _signature(job: Job, cfg: DictConfig, memo: Dict[str, Any]) -> Any:
    """The job's reward signature, or None (the job is kept) when its inputs cannot be loaded: the job itself
    then fails with its clear error."""
    try:
        return reward_signature(cfg, memo)
    except Exception as e:  # noqa: BLE001
        log.warning(f"cannot check rewards of arm {job.arm}: {e}")
        return None


def dedupe(jobs: List[Job], compose: Composer, alias_identical_rewards: bool, aliases: Dict[str, str]) -> List[Job]:
    """The distinct jobs, in grid order; ``aliases`` gets arm -> the arm whose run stands for it."""
    cfgs = [compose(job.overrides) for job in jobs]
    for cfg in cfgs:  # a bad value or an unknown key fails the whole sweep now, before any job trains
        check_known_keys(cfg)
    keep = _first_of_each(jobs, [stable_hash(canonical_config(to_container(c))) for c in cfgs], aliases)
    jobs, cfgs = [jobs[i] for i in keep], [cfgs[i] for i in keep]
    if alias_identical_rewards:
        memo: Dict[str, Any] = {}
        keep = _first_of_each(jobs, [_signature(j, c, memo) for j, c in zip(jobs, cfgs)], aliases)
        jobs = [jobs[i] for i in keep]
    return jobs
