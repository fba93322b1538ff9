"""Range checks the type system cannot express, run before any work; each failure names the field and the fix."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from typing import Any

import torch
from omegaconf import DictConfig

from leverplus.config.schema import TrainConfig
from leverplus.errors import LeverPlusInputError
from leverplus.utils import DEVICE_PATTERN

#: the model-free baselines of the downstream evaluation (``eval.baselines``)
KNOWN_BASELINES = ("zero_shot", "random", "similarity")
#: the splits that have evaluation queries (``eval.downstream_splits``, ``eval.baseline_splits``)
EVAL_SPLITS = ("val", "test")
#: the per-epoch validation metrics checkpoint selection can read (``eval.select_metric``): what
#: ``evaluation.ranking.validation_metrics`` produces (a test keeps the two lists equal)
SELECT_METRICS = ("val/loss", *(f"val/offline/{k}" for k in (
    "top1_reward", "top1_acc", "oracle_reward", "oracle_acc", "mean_reward", "mean_acc", "ndcg", "spearman",
    "rce_loss", "n_queries")))


def validate_config(cfg: Any, schema: type = TrainConfig) -> None:
    """Range checks the type system cannot express; raises LeverPlusInputError naming the field and the fix.

    The checks run section by section (keys, training phases, GRPO, data, model, reward, eval); the first failure
    raises."""
    check_known_keys(cfg, schema)
    _check_phases(cfg)
    _check_grpo(cfg.grpo)
    _check_data(cfg.data)
    _check_model(cfg.model)
    _check_reward_and_eval(cfg.reward, cfg.eval)
    _check_run(cfg)


def check_known_keys(cfg: Any, schema: type = TrainConfig, prefix: str = "") -> None:
    """Refuse keys the schema does not declare, even when added with ``+`` (Hydra lets ``+grpo.lrr=1e-5`` through,
    and a typo would then be logged, ignored and left out of the run key). Only the free-form maps (``Dict`` fields
    such as ``data.files.rl_json`` and ``tracking.extra_tags``) take any key."""
    if not isinstance(cfg, DictConfig):
        return
    hints = typing.get_type_hints(schema)
    declared = {f.name: hints[f.name] for f in dataclasses.fields(schema)}
    for key in cfg.keys():
        name = f"{prefix}{key}"
        if key not in declared:
            close = difflib.get_close_matches(str(key), list(declared), n=1)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            raise LeverPlusInputError(
                f"unknown config key {name!r} (a '+' override adds keys the schema does not know; it would be "
                f"ignored); valid keys here: {', '.join(sorted(declared))}", field=name,
                fix=f"{hint}drop the '+' and use an existing key")
        kind = declared[key]
        if dataclasses.is_dataclass(kind):
            check_known_keys(cfg[key], kind, f"{name}.")


def _need(ok: bool, name: str, problem: str, fix: str) -> None:
    if not ok:
        raise LeverPlusInputError(problem, field=name, fix=fix)


def _check_phases(cfg: Any) -> None:
    for phase in ("sft", "rce", "grpo"):
        c = cfg[phase]
        _need(math.isfinite(c.lr) and c.lr > 0, f"{phase}.lr", f"learning rate must be a finite number > 0, got {c.lr}",
              f"e.g. {phase}.lr=1e-4")
        _need(c.epochs >= 0, f"{phase}.epochs", f"must be >= 0, got {c.epochs}", "0 skips the phase")
        _need(c.weight_decay >= 0, f"{phase}.weight_decay", f"must be >= 0, got {c.weight_decay}", "e.g. 0.01")
        _need(c.grad_clip > 0, f"{phase}.grad_clip", f"must be > 0, got {c.grad_clip}", "e.g. 1.0")
        _need(0 <= c.warmup_ratio < 1, f"{phase}.warmup_ratio", f"must be in [0, 1), got {c.warmup_ratio}",
              "e.g. 0.1")
    for name in ("temp_start", "temp_end"):
        value = cfg.rce[name]
        _need(math.isfinite(value) and value > 0, f"rce.{name}", f"RCE temperatures must be finite and > 0, got {value}",
              "e.g. rce.temp_start=2.0 rce.temp_end=0.5")


def _check_grpo(g: Any) -> None:
    _need(g.clip_epsilon > 0, "grpo.clip_epsilon", f"must be > 0, got {g.clip_epsilon}", "e.g. 0.2")
    _need(g.kl_beta >= 0, "grpo.kl_beta", f"must be >= 0, got {g.kl_beta}", "e.g. 0.1")
    _need(0 < g.beta_min <= g.beta_max, "grpo.beta_min", "need 0 < beta_min <= beta_max", "e.g. 0.001 and 10")
    _need(g.kl_factor > 1, "grpo.kl_factor", f"must be > 1, got {g.kl_factor}", "e.g. 1.5")
    _need(g.adv_std_floor > 0, "grpo.adv_std_floor", f"must be > 0, got {g.adv_std_floor}", "e.g. 0.1")
    _need(all(len(x) == 2 for x in g.top_k_schedule), "grpo.top_k_schedule", "entries must be [num_epochs, k]",
          "e.g. [[1,3],[-1,5]]")


def _check_data(d: Any) -> None:
    _need(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}", "e.g. 32")
    _need(len(d.shot_nums) > 0 and all(s >= 1 for s in d.shot_nums), "data.shot_nums", "must list shot counts >= 1",
          "e.g. [2]")
    _need(d.max_pool_size >= 1, "data.max_pool_size", f"must be >= 1, got {d.max_pool_size}", "e.g. 64")
    _need(0.0 <= d.positive_ratio_min <= d.positive_ratio_max <= 1.0, "data.positive_ratio_min",
          f"needs 0 <= positive_ratio_min <= positive_ratio_max <= 1, got [{d.positive_ratio_min}, "
          f"{d.positive_ratio_max}]", "e.g. data.positive_ratio_min=0.4 data.positive_ratio_max=0.6")
    check_augment(d.augment, "data.augment")
    _need(d.split_file is not None or 0.0 < d.train_fraction < 1.0, "data.train_fraction",
          f"must be in (0, 1), got {d.train_fraction}", "e.g. data.train_fraction=0.8")


def check_augment(a: Any, prefix: str) -> None:
    """Diversity-augmentation settings: ``data.augment``, and ``augment`` of ``python -m leverplus.datagen.augment``."""
    _need(a.target_levels >= 2, f"{prefix}.target_levels", f"must be >= 2, got {a.target_levels}",
          "2 = at least two reward levels per query (the reference)")
    _need(a.max_tries >= 1, f"{prefix}.max_tries", f"must be >= 1, got {a.max_tries}", "e.g. 4")
    _need(a.candidates_per_try >= 1, f"{prefix}.candidates_per_try", f"must be >= 1, got {a.candidates_per_try}",
          "e.g. 4")
    _need(math.isfinite(a.temperature) and a.temperature > 0, f"{prefix}.temperature",
          f"must be a finite number > 0, got {a.temperature}", "e.g. 0.1 (larger = closer to uniform over the pool)")


def _check_model(m: Any) -> None:
    _need(m.hidden_dim >= 1 and m.num_heads >= 1 and m.hidden_dim % m.num_heads == 0, "model.num_heads",
          "hidden_dim must be a positive multiple of num_heads", "e.g. hidden_dim=256 num_heads=1")
    _need(0 <= m.dropout < 1 and 0 <= m.attn_dropout < 1, "model.dropout", "dropouts must be in [0, 1)", "e.g. 0.5")
    _need(m.temperature > 0, "model.temperature", f"must be > 0, got {m.temperature}", "e.g. 0.1")


def _check_reward_and_eval(r: Any, e: Any) -> None:
    _need(r.clip > 0, "reward.clip", f"must be > 0, got {r.clip}", "e.g. 5.0")
    _need(0 <= r.info_weight <= 1, "reward.info_weight", f"must be in [0, 1], got {r.info_weight}", "e.g. 0.5")
    _need(e.select_mode in ("max", "min"), "eval.select_mode", f"got {e.select_mode!r}", "max or min")
    _need(e.select_metric in SELECT_METRICS, "eval.select_metric",
          f"{e.select_metric!r} is not a validation metric, so no epoch would ever be selected",
          f"e.g. eval.select_metric=val/offline/top1_reward; choose from {', '.join(SELECT_METRICS)}")
    bad = [b for b in e.baselines if b not in KNOWN_BASELINES]
    _need(not bad, "eval.baselines", f"unknown baselines {bad}", f"choose from {', '.join(KNOWN_BASELINES)}")
    for key in ("downstream_splits", "baseline_splits"):
        bad = [x for x in e[key] if x not in EVAL_SPLITS]
        _need(not bad, f"eval.{key}", f"unknown splits {bad}", f"choose from {', '.join(EVAL_SPLITS)}")
    _need(len(e.shot_nums) > 0 and all(int(s) >= 1 for s in e.shot_nums), "eval.shot_nums",
          f"must list shot counts >= 1, got {list(e.shot_nums)}", "e.g. eval.shot_nums=[1,2,3,4]")


def _check_run(cfg: Any) -> None:
    """Root fields, and an objective the run will actually produce (checked now, not after training)."""
    _need(cfg.num_threads >= 0, "num_threads", f"must be >= 0, got {cfg.num_threads}", "0 keeps torch's default")
    check_device(str(cfg.device))
    downstream_objective = "/downstream" in str(cfg.objective)
    _need(not downstream_objective or cfg.eval.downstream, "objective",
          f"{cfg.objective} needs the downstream evaluation, but eval.downstream=false",
          "set eval.downstream=true, or objective=val/offline/top1_acc")


def check_device(device: str, name: str = "device") -> None:
    """``device`` is auto, cpu, cuda or cuda:N, and a CUDA device asked for by name exists."""
    _need(re.fullmatch(DEVICE_PATTERN, device) is not None, name, f"unknown device {device!r}",
          f"{name}=auto (cuda when present), {name}=cpu, {name}=cuda or {name}=cuda:0")
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        _need(index < count, name, f"{device} requested but this machine has {count} CUDA device(s)",
              f"{name}=auto or {name}=cpu")
