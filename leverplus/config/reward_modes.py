"""The reward modes, declared once: for each mode, the ``reward.*`` config fields and the candidate fields it reads.

Why the table lives in config and not beside the formulas: config sits below data in the layering, and three
consumers need it without the formulas: the ``reward.mode`` enum (config/schema.py is built from the keys), the
run-key canonicalisation (config/identity.py drops the ``reward.*`` knobs a mode does not read) and the sweep
comparison (analysis/compare.py). The formulas live in leverplus/data/rewards.py and register against this table:
``register_reward`` refuses a name that is not declared here and a function whose keyword arguments differ from
``reads`` (plus ``info`` when ``takes_info``), so the table cannot drift from the code it describes.

Adding a mode: one entry here, one ``@register_reward`` function in rewards.py (reference#reward-modes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class RewardModeSpec:
    """What one reward mode reads."""

    reads: Tuple[str, ...]  # RewardConfig fields the formula uses; the other mode knobs are ignored (and dropped)
    candidate_fields: Tuple[str, ...]  # pointer_candidates fields the formula reads (reference#formats-rl-json)
    needs_infoscores: bool = False  # needs a per-candidate ``info`` (group-scaled InfoScore, from the beam JSON)
    # the candidate field min-max scaled within the group and passed as ``info`` (group_info_scores in rewards.py)
    info_field: Optional[str] = None
    #: candidate fields the formula reads but defines a value for when absent (not required per candidate)
    optional_fields: Tuple[str, ...] = ()


_HS = ("hard_weight", "soft_weight")
_H_S = ("vqa_correct", "vqa_acc_score")
_H_P = ("vqa_correct", "vqa_gt_prob")

REWARD_MODE_SPECS: Dict[str, RewardModeSpec] = {
    "hard_plus_soft": RewardModeSpec(_HS, _H_S),
    "hard_plus_soft_v2": RewardModeSpec(_HS, _H_S),
    "separated": RewardModeSpec(_HS, _H_S),
    "hard_only": RewardModeSpec(("hard_weight",), ("vqa_correct",)),
    "soft_only": RewardModeSpec(("soft_weight",), ("vqa_acc_score",)),
    "hard01_plus_gtprob": RewardModeSpec(_HS, _H_P),
    "hard01_plus_gtprob_separated": RewardModeSpec(_HS, _H_P),
    "hard_plus_gtprob_plus_rel": RewardModeSpec(_HS + ("rel_weight",), _H_P + ("vqa_rel_score",)),
    "legacy": RewardModeSpec(("reward_alpha", "reward_beta", "correctness_mode", "use_logprob"),
                             _H_S + ("logprob_score", "beam_score"),  # each has a documented "absent" value
                             optional_fields=_H_S + ("logprob_score", "beam_score")),
    "hybrid": RewardModeSpec(_HS + ("info_weight",), _H_S + ("info_score",), info_field="info_score"),
    "hybrid_legacy": RewardModeSpec(_HS + ("info_weight",), _H_S, needs_infoscores=True),
}

#: every mode-specific ``reward.*`` knob (the union of ``reads``, in declaration order); ``clip`` and
#: ``diversity_weight`` apply to every mode and are not among them
REWARD_KNOBS: Tuple[str, ...] = tuple(dict.fromkeys(f for spec in REWARD_MODE_SPECS.values() for f in spec.reads))


def _name(mode: object) -> str:
    """The mode's name, from a string or a ``RewardMode`` member (whose ``str()`` is ``RewardMode.x``)."""
    return str(getattr(mode, "value", mode))


def fields_read(mode: str) -> Tuple[str, ...]:
    """The ``reward.*`` knobs ``mode`` reads; all of them for an undeclared mode (nothing is assumed ignored)."""
    spec = REWARD_MODE_SPECS.get(_name(mode))
    return REWARD_KNOBS if spec is None else spec.reads


def needs_infoscores(mode: str) -> bool:
    """Whether ``mode`` needs the beam JSON's InfoScores (a per-candidate ``info``, see ``hybrid_info_values``)."""
    spec = REWARD_MODE_SPECS.get(_name(mode))
    return spec is not None and spec.needs_infoscores


def info_field(mode: str) -> Optional[str]:
    """The candidate field ``mode`` scales within each group into its ``info`` term, or None."""
    spec = REWARD_MODE_SPECS.get(_name(mode))
    return None if spec is None else spec.info_field


def takes_info(mode: str) -> bool:
    """Whether ``mode``'s formula takes a group-scaled ``info`` term (from the beam JSON or a candidate field)."""
    return needs_infoscores(mode) or info_field(mode) is not None
