"""Plain multiruns (Hydra's basic sweeper, e.g. ``-m grpo.lr=1e-5,1e-4``) as sweeps: a name, arms and a baseline.

The swept keys other than the pairing keys (``seed``, ``data.shot_nums``) name a job's arm (``grpo.lr=1e-05``); the
arm of every key's first value is the baseline the comparison measures the others against. The sweep's name is
``multirun-<date>-<time>`` of its sweep folder unless ``tracking.sweep`` names it.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import List, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser

#: swept keys that pair an arm's runs with the baseline's (as the ablation sweeper's default ``paired_by``)
PAIRED_KEYS = ("seed", "data.shot_nums")
#: the arm of a multirun that sweeps only pairing keys
DEFAULT_ARM = "default"


@dataclass(frozen=True)
class PlainSweep:
    n_jobs: int
    arm_keys: List[str]
    baseline_arm: str


def _key(override: str) -> str:
    return override.split("=", 1)[0]


def arm_label(job_overrides: Sequence[str], arm_keys: Sequence[str]) -> str:
    """A job's arm: its overrides of the arm keys, in the order given, joined by ``|``."""
    wanted = set(arm_keys)
    parts = [o.lstrip("+~") for o in job_overrides if _key(o) in wanted]
    return "|".join(parts) or DEFAULT_ARM


def plain_sweep(overrides: Sequence[str]) -> PlainSweep:
    """Job count, arm keys and baseline arm of a basic-sweeper multirun over ``overrides`` (command line and
    ``hydra.sweeper.params``), enumerated as Hydra's basic sweeper does (cartesian product in override order)."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    lists, arm_keys = [], []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override() and o.is_discrete_sweep():
            lists.append([f"{key}={v}" for v in o.sweep_string_iterator()])
            if key.lstrip("+~") not in PAIRED_KEYS:
                arm_keys.append(key)
        else:
            lists.append([f"{key}={o.get_value_element_as_str()}"])
    jobs = list(itertools.product(*lists))
    first = list(jobs[0]) if jobs else []
    return PlainSweep(n_jobs=len(jobs), arm_keys=arm_keys, baseline_arm=arm_label(first, arm_keys))


def plain_sweep_name(sweep_dir: str) -> str:
    """``multirun-<date>-<time>`` from the sweep folder's last two parts (Hydra's default ``.../<date>/<time>``)."""
    tail = "-".join(PurePath(str(sweep_dir)).parts[-2:])
    return "multirun-" + re.sub(r"[^A-Za-z0-9_.-]", "_", tail)
