"""The reference preset and the switches it sets, at config level: what ``+preset=reference`` changes (exactly the
documented fields), defaults that keep today's behaviour, and ``eval.select_metric`` checked before any work."""

import pytest
import torch
from paths import REPO, compose_cfg

from leverplus.config.identity import canonical_config, to_container
from leverplus.config.validation import SELECT_METRICS, validate_config
from leverplus.data.groups import Group
from leverplus.errors import LeverPlusInputError
from leverplus.evaluation.ranking import validation_metrics
from leverplus.model.build import build_model

#: what the preset sets (dotted path -> value); docs/preset.md has one table row per entry
PRESET = {
    "data.batch_size": 1,
    "model.per_member_dropout": True,
    "rce.lr_schedule": "constant",
    "rce.top1_compat_index0": True,
    "rce.top1_step_reduction": "mean",
    "grpo.lr_schedule": "constant",
    "grpo.kl_update": "per_query",
    "eval.select": "last",
    "eval.vqa_normalization": "lever_plus",
    "optimizer_impl": "fused",
}


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_the_preset_changes_exactly_the_documented_fields():
    default, preset = _flat(to_container(compose_cfg([]))), _flat(to_container(compose_cfg(["+preset=reference"])))
    changed = {k: preset[k] for k in preset if preset[k] != default.get(k)}
    assert changed == PRESET
    doc = (REPO / "docs" / "preset.md").read_text()
    assert all(f"`{path}`" in doc for path in PRESET)


def test_the_new_switches_default_to_the_previous_behaviour():
    cfg = compose_cfg([])
    assert cfg.model.per_member_dropout is False and cfg.eval.select.value == "metric"
    assert cfg.grpo.kl_update.value == "per_step" and cfg.grpo.advantage.value == "zscore"
    assert cfg.rce.top1_step_reduction.value == "sum"


def test_top1_step_reduction_is_out_of_the_run_key_unless_top1_only():
    a, b = (to_container(compose_cfg([f"rce.top1_step_reduction={v}"])) for v in ("sum", "mean"))
    assert canonical_config(a) == canonical_config(b)
    a, b = (to_container(compose_cfg(["rce.use_top1_only=true", f"rce.top1_step_reduction={v}"])) for v in ("sum", "mean"))
    assert canonical_config(a) != canonical_config(b)


def test_a_select_metric_that_is_never_produced_fails_before_any_work():
    with pytest.raises(LeverPlusInputError) as info:
        validate_config(compose_cfg(["eval.select_metric=val/offline/top1_rewrd"]))
    assert info.value.field == "eval.select_metric" and "val/offline/top1_reward" in info.value.fix
    assert all(name in info.value.fix for name in SELECT_METRICS)  # the valid names are listed
    for name in SELECT_METRICS:
        validate_config(compose_cfg([f"eval.select_metric={name}"]))


def test_the_select_metrics_are_what_validation_produces():
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(20, 8, generator=g), dim=-1)
    labels = torch.tensor([[0, 1], [2, 3], [1, 3]])
    raw = torch.tensor([1.0, 0.0, 0.5])
    groups = [Group(0, 2, list(range(1, 6)), labels, raw, raw, raw.gt(0).float(), [0, 1, 2])]
    cfg = compose_cfg(["model.hidden_dim=8"])
    produced = validation_metrics(build_model(cfg.model, 8), groups, emb)
    assert set(produced) == set(SELECT_METRICS)
