"""Run identity: the canonical config and the run key.

Run key: hash of the canonical config (fields that do not change results dropped; weights a reward mode ignores
dropped; GRPO knobs dropped when GRPO does not run...; the device kind kept only when it is not the CPU), the data
fingerprint and the code version. Sweeps skip keys that already have a FINISHED run, and arms with equal keys are
aliases.

Both lists come from their single source: the cosmetic fields are the schema fields marked
``metadata=COSMETIC`` (config/schema.py), the knobs each reward mode reads are REWARD_MODE_SPECS
(config/reward_modes.py).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Dict, Mapping, Tuple

from omegaconf import OmegaConf

from leverplus.config.reward_modes import REWARD_KNOBS, fields_read
from leverplus.config.schema import TrainConfig
from leverplus.utils import code_version, device_kind, stable_hash


def cosmetic_fields(schema: type = TrainConfig, prefix: str = "") -> Tuple[str, ...]:
    """Dotted paths of the fields marked ``metadata=COSMETIC`` in ``schema`` and its nested dataclasses."""
    out = []
    for f in dataclasses.fields(schema):
        path = f"{prefix}{f.name}"
        if f.metadata.get("cosmetic"):
            out.append(path)
        elif dataclasses.is_dataclass(f.default_factory):  # a nested section (annotations are strings here)
            out += cosmetic_fields(f.default_factory, f"{path}.")  # type: ignore[arg-type]
    return tuple(out)


#: fields that never change results, derived from the schema's field metadata
COSMETIC: Tuple[str, ...] = cosmetic_fields()


def drop_path(c: Dict[str, Any], path: str) -> None:
    """Remove the dotted ``path`` from the nested dict ``c`` (in place; nothing happens where it is absent)."""
    *parents, leaf = path.split(".")
    for key in parents:
        c = c.get(key)  # type: ignore[assignment]
        if not isinstance(c, dict):
            return
    c.pop(leaf, None)


def _reward_knobs_read(reward: Mapping[str, Any]) -> Dict[str, Any]:
    """``reward`` without the mode knobs its ``mode`` does not read."""
    used = fields_read(str(reward.get("mode")))
    return {k: v for k, v in reward.items() if k in used or k not in REWARD_KNOBS}


def _canonical_data(c: Dict[str, Any]) -> None:
    """Keep only the data source in use; drop the SFT settings when an SFT checkpoint replaces SFT, and the
    augmentation settings when the data is not augmented."""
    data = dict(c.get("data", {}))
    if not data.get("diversity_augment"):
        data.pop("diversity_augment", None)
        data.pop("augment", None)
    if data.get("source") == "sim":
        data.pop("files", None)
    else:
        data.pop("sim", None)
        if (data.get("files") or {}).get("sft_checkpoint"):
            c.pop("sft", None)
    c["data"] = data


def canonical_config(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The parts of a resolved config that decide results, with ignored knobs removed (for run keys)."""
    c = copy.deepcopy(dict(cfg))
    for path in COSMETIC:
        drop_path(c, path)
    kind = device_kind(str(cfg.get("device") or "cpu"))
    if kind != "cpu":  # a CUDA run's numbers differ from a CPU run's in the last bits; CPU keys stay as they were
        c["device"] = kind
    c["reward"] = _reward_knobs_read(c.get("reward", {}))
    if int(c.get("grpo", {}).get("epochs", 0)) <= 0:
        c["grpo"] = {"epochs": 0}
    rce = dict(c.get("rce", {}))
    if not rce.get("use_top1_only", False):
        rce.pop("top1_compat_index0", None)
        rce.pop("top1_step_reduction", None)
    c["rce"] = rce
    _canonical_data(c)
    return c


def run_key(cfg: Mapping[str, Any], data_fingerprint: str) -> str:
    return stable_hash({"config": canonical_config(cfg), "data": data_fingerprint, "code": code_version()})


def to_container(cfg: Any) -> Dict[str, Any]:
    """Resolved plain-dict view of a config (enums as their string values)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]
