"""The ablation grid: factors and command-line overrides -> one job per (pair, arm), plus the baseline arm.

``paired_by`` factors (shot_num, seed) form the pairs; every other factor is crossed into arms, and each pair gets
one baseline job, so every arm has a baseline partner. A command-line override of a factor's key replaces that
factor's values; other sweep overrides become extra arm factors; plain overrides are applied to every job.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from hydra.core.override_parser.types import Override

#: config key -> its short name in arm labels (any other key: its last dotted part)
SHORT_NAMES = {"reward.mode": "mode", "rce.use_raw_reward": "raw", "data.shot_nums": "shot"}


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
    return SHORT_NAMES.get(key, key.split(".")[-1])


@dataclass
class Job:
    arm: str
    role: str
    overrides: List[str]  # without the tracking tags
    pair: Tuple[str, ...]


@dataclass(frozen=True)
class GridSpec:
    """The sweeper's grid settings (``hydra.sweeper.*``)."""

    factors: Mapping[str, List[Any]]
    paired_by: Sequence[str]
    baseline: Optional[Mapping[str, Any]]
    baseline_label: str
    arm_overrides: Mapping[str, Any]


@dataclass
class _Parsed:
    factors: Dict[str, List[Any]]
    cli_strings: Set[str]  # factors whose values came from the command line, already override strings
    fixed: List[str]


def _override_values(ov: Override) -> List[str]:
    """An override's value(s) as override strings; booleans lower-case ("False" -> "false")."""
    sweep = ov.is_sweep_override()
    values = list(ov.sweep_string_iterator()) if sweep else [ov.get_value_element_as_str()]
    parsed = list(ov.sweep_iterator()) if sweep else [ov.value()]
    return [fmt(p) if isinstance(p, bool) else v for v, p in zip(values, parsed)]


def _parse(spec: GridSpec, overrides: Sequence[Override]) -> _Parsed:
    """Split the command-line overrides into factor replacements, extra factors and fixed overrides."""
    factors = {k: list(v) for k, v in spec.factors.items()}
    cli: Set[str] = set()
    fixed: List[str] = []
    extra: Dict[str, List[str]] = {}
    for ov in overrides:
        key = ov.get_key_element()
        bare = key.lstrip("+~")
        values = _override_values(ov)
        if bare in factors or bare in spec.paired_by:
            factors[bare] = values
            cli.add(bare)
        elif ov.is_sweep_override():
            extra[key] = values
            cli.add(key)
        else:
            fixed.append(f"{key}={values[0]}")
    factors.update(extra)
    return _Parsed(factors, cli, fixed)


def _factor_items(name: str, values: Sequence[Any], cli_strings: Set[str]) -> List[List[Tuple[str, str]]]:
    """Each value of a factor as a list of (key, override value) pairs."""
    out = []
    for v in values:
        if isinstance(v, dict):
            out.append([(k, fmt(x)) for k, x in v.items()])
        else:
            out.append([(name, v if isinstance(v, str) and name in cli_strings else fmt(v))])
    return out


def _arm_job(pair_ov: List[str], pair_key: Tuple[str, ...], combo: Sequence[List[Tuple[str, str]]],
             common_ov: List[str]) -> Job:
    """One arm's job: its label names the factor values (short keys)."""
    pairs = [kv for item in combo for kv in item]
    label = "|".join(f"{_short(k)}={v}" for k, v in pairs) or "arm"
    return Job(label, "arm", pair_ov + [f"{k}={v}" for k, v in pairs] + common_ov, pair_key)


def expand(spec: GridSpec, overrides: Sequence[Override]) -> Tuple[List[Job], List[str]]:
    """(jobs, fixed overrides) from the grid settings and the parsed command-line overrides."""
    p = _parse(spec, overrides)
    paired = [k for k in spec.paired_by if k in p.factors]
    pair_items = [_factor_items(k, p.factors[k], p.cli_strings) for k in paired]
    arm_items = [_factor_items(k, p.factors[k], p.cli_strings) for k in p.factors if k not in paired]
    base_ov = None if spec.baseline is None else [f"{k}={fmt(v)}" for k, v in spec.baseline.items()]
    common_ov = [f"{k}={fmt(v)}" for k, v in spec.arm_overrides.items()]
    jobs: List[Job] = []
    for pair in itertools.product(*pair_items):
        pair_ov = [f"{k}={v}" for item in pair for k, v in item]
        if base_ov is not None:
            jobs.append(Job(spec.baseline_label, "baseline", pair_ov + base_ov, tuple(pair_ov)))
        jobs += [_arm_job(pair_ov, tuple(pair_ov), combo, common_ov) for combo in itertools.product(*arm_items)]
    return jobs, p.fixed
