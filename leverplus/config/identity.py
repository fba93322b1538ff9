"""Run identity: the canonical config and the run key.

Run key: hash of the canonical config (fields that do not change results dropped; weights a reward mode ignores
dropped; GRPO knobs dropped when GRPO does not run...), the data fingerprint and the code version. Sweeps skip
keys that already have a FINISHED run, and arms with equal keys are aliases.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Mapping

from leverplus.utils import code_version, stable_hash

# Which reward knobs each mode reads (everything else is ignored by that mode and dropped from the run key).
REWARD_MODE_FIELDS: Dict[str, tuple] = {
    "hard_plus_soft": ("hard_weight", "soft_weight"),
    "hard_plus_soft_v2": ("hard_weight", "soft_weight"),
    "separated": ("hard_weight", "soft_weight"),
    "hard_only": ("hard_weight",),
    "soft_only": ("soft_weight",),
    "hard01_plus_gtprob": ("hard_weight", "soft_weight"),
    "hard01_plus_gtprob_separated": ("hard_weight", "soft_weight"),
    "hard_plus_gtprob_plus_rel": ("hard_weight", "soft_weight", "rel_weight"),
    "legacy": ("reward_alpha", "reward_beta", "correctness_mode", "use_logprob"),
    "hybrid": ("hard_weight", "soft_weight", "info_weight"),
}
REWARD_KNOBS = ("hard_weight", "soft_weight", "rel_weight", "reward_alpha", "reward_beta", "correctness_mode",
                "use_logprob", "info_weight")
# Fields that never change results.
COSMETIC = ("tracking", "progress", "output_dir", "num_threads", "objective", "device", "checkpoint_every_epoch",
             "plot_curves", "tune_malloc")


def canonical_config(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The parts of a resolved config that decide results, with ignored knobs removed (for run keys)."""
    c = copy.deepcopy(dict(cfg))
    for key in COSMETIC:
        c.pop(key, None)
    reward = dict(c.get("reward", {}))
    used = REWARD_MODE_FIELDS.get(str(reward.get("mode")), REWARD_KNOBS)
    for knob in REWARD_KNOBS:
        if knob not in used:
            reward.pop(knob, None)
    c["reward"] = reward
    if int(c.get("grpo", {}).get("epochs", 0)) <= 0:
        c["grpo"] = {"epochs": 0}
    rce = dict(c.get("rce", {}))
    if not rce.get("use_top1_only", False):
        rce.pop("top1_compat_index0", None)
    c["rce"] = rce
    data = dict(c.get("data", {}))
    if data.get("source") == "sim":
        data.pop("files", None)
    else:
        data.pop("sim", None)
        if (data.get("files") or {}).get("sft_checkpoint"):
            c.pop("sft", None)
    c["data"] = data
    c.get("eval", {}).pop("bootstrap_samples", None)
    return c


def run_key(cfg: Mapping[str, Any], data_fingerprint: str) -> str:
    return stable_hash({"config": canonical_config(cfg), "data": data_fingerprint, "code": code_version()})


def to_container(cfg: Any) -> Dict[str, Any]:
    """Resolved plain-dict view of a config (enums as their string values)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]

