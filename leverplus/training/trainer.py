"""Training phases SFT -> RCE -> GRPO on padded multi-query batches.

The trainer owns optimisers, schedules, checkpoints and metric emission; the losses are pure functions in
``leverplus.losses`` and the model is ``leverplus.model.PointerSelector``. Metrics go to a tiny logger interface
(MLflow is one implementation, a list in memory another), named the TRL way: ``rce/loss``, ``grpo/kl``,
``grpo/clip_ratio``, ``grpo/frac_reward_zero_std``, ``val/...``."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Protocol

import torch

from leverplus.data.batching import collate, iterate_batches, num_batches
from leverplus.data.groups import Group
from leverplus.model.checkpoint import save_pointer_checkpoint
from leverplus.model.pointer import PointerSelector
from leverplus.training.losses import grpo_loss, rce_loss, top1_member, top_k_members
from leverplus.training.schedules import (
    AdaptiveKLController,
    AdaptivePolicyTemperature,
    grpo_top_k,
    make_lr_scheduler,
    rce_temperature,
)
from leverplus.utils import enum_value, progress

BACKBONE_PARTS = ("input_proj", "query_proj", "cand_proj")


class MetricLogger(Protocol):
    def log_metrics(self, metrics: Dict[str, float], step: int) -> None: ...


class MemoryLogger:
    """Keeps every logged metric in memory (tests, summaries, plots)."""

    def __init__(self) -> None:
        self.history: List[tuple] = []  # (step, name, value)

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.history.append((step, k, float(v)))

    def series(self, name: str) -> List[tuple]:
        return [(s, v) for s, k, v in self.history if k == name]


class FanoutLogger:
    def __init__(self, *loggers: Optional[MetricLogger]) -> None:
        self.loggers = [lg for lg in loggers if lg is not None]

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log_metrics(metrics, step)


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN/inf: the run fails loudly (MLflow FAILED, Optuna trial FAILED)."""


@dataclass
class TrainResult:
    model: PointerSelector  # the best model of the selection scope (or the last when nothing was selected)
    best: Dict[str, float] = field(default_factory=dict)  # {"epoch", "phase", metric: value}
    last_val: Dict[str, float] = field(default_factory=dict)
    checkpoints: List[Path] = field(default_factory=list)
    best_checkpoint: Optional[Path] = None
    timings: Dict[str, float] = field(default_factory=dict)
    kl_beta: Optional[float] = None
    param_counts: Dict[str, int] = field(default_factory=dict)
    history: List[tuple] = field(default_factory=list)  # (epoch step, metric, value)


def _check_finite(loss: torch.Tensor, where: str) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"non-finite loss ({loss.item()}) at {where}; lower the learning rate or check the rewards")


@torch.no_grad()
def sequence_log_probs_by_query(
    model: PointerSelector, groups: List[Group], embeddings: torch.Tensor, batch_size: int = 64
) -> Dict[int, torch.Tensor]:
    """Eval-mode log-probs of every member of every group: the GRPO "old" policy."""
    table = model.item_table(embeddings)
    out: Dict[int, torch.Tensor] = {}
    for chunk in iterate_batches(groups, batch_size, shuffle=False):
        b = collate(chunk, embeddings)
        lp = model.sequence_log_probs_indexed(b.query_emb, b.pool_idx, b.labels, table, b.cand_mask)
        for i, g in enumerate(chunk):
            out[g.query_id] = lp[i, : g.size].clone()
    return out


class Trainer:
    """Runs the phases on prepared groups. ``cfg`` is the full TrainConfig (DictConfig or dataclass)."""

    def __init__(
        self,
        cfg,
        embeddings: torch.Tensor,
        train_groups: List[Group],
        val_groups: List[Group],
        output_dir: Path,
        logger: Optional[MetricLogger] = None,
        say: Callable[[str], None] = print,
        start_step: int = 0,
        *,
        validate: Optional[Callable[[PointerSelector], Dict[str, float]]] = None,
    ) -> None:
        """``validate(model)`` returns the per-epoch validation metrics (``val/...``) that checkpoint selection
        reads; the run passes the offline ranking of the held-out groups (``evaluation.ranking``)."""
        self.cfg = cfg
        self._validate = validate
        self.embeddings = embeddings
        self.train_groups = train_groups
        self.val_groups = val_groups
        self.output_dir = Path(output_dir)
        self.memory = MemoryLogger()
        self.logger = FanoutLogger(self.memory, logger)
        self.say = say
        self.generator = torch.Generator()
        self.epoch_counter = start_step  # global epoch index across phases (the MLflow step)
        self.checkpoints: List[Path] = []
        self.best: Dict[str, float] = {}
        self.best_state: Optional[dict] = None
        self.best_checkpoint: Optional[Path] = None
        self.last_val: Dict[str, float] = {}
        self.kl_beta: Optional[float] = None

    # ------------------------------------------------------------------ helpers
    _PHASE_IDS = {"sft": 1, "rce": 2, "grpo": 3}

    def _start_phase(self, phase: str) -> None:
        """Reseed shuffling and dropout per phase, so a phase's result does not depend on whether the phases
        before it ran or came from a cache."""
        seed = int(self.cfg.seed) * 10 + self._PHASE_IDS[phase]
        self.generator.manual_seed(seed)
        torch.manual_seed(seed)

    def _progress(self, it, **kw):
        return progress(it, enabled=self.cfg.progress, **kw)

    def _optimizer(self, model, phase_cfg, steps: int):
        params = [p for p in model.parameters() if p.requires_grad]
        # foreach: one fused kernel per step instead of a Python loop over the 11 tensors (matters at batch size 1)
        opt = torch.optim.AdamW(params, lr=phase_cfg.lr, weight_decay=phase_cfg.weight_decay, foreach=True)
        sched = make_lr_scheduler(opt, steps, enum_value(phase_cfg.lr_schedule), phase_cfg.warmup_ratio)
        return opt, sched

    def validate(self, model: PointerSelector) -> Dict[str, float]:
        """The validation metrics of the current model (empty without val groups or a ``validate`` function)."""
        if not self.val_groups or self._validate is None:
            return {}
        return self._validate(model)

    def _end_epoch(self, model, phase: str, epoch: int, train_metrics: Dict[str, float], select: bool) -> None:
        val = self.validate(model)
        self.last_val = val
        self.logger.log_metrics({**train_metrics, **val}, step=self.epoch_counter)
        if self.cfg.checkpoint_every_epoch:
            path = self.output_dir / "checkpoints" / f"{phase}_epoch{epoch + 1}.pt"
            save_pointer_checkpoint(
                path, model, phase=phase, epoch=epoch, kl_beta=self.kl_beta, metrics={**train_metrics, **val}
            )
            self.checkpoints.append(path)
        metric = self.cfg.eval.select_metric
        if select and metric in val:
            value = val[metric]
            better = (
                not self.best
                or (self.cfg.eval.select_mode == "max" and value > self.best[metric])
                or (self.cfg.eval.select_mode == "min" and value < self.best[metric])
            )
            if better:
                self.best = {"epoch": epoch + 1, "phase": phase, "global_epoch": self.epoch_counter, metric: value}
                self.best_state = copy.deepcopy(model.state_dict())
                self.best_checkpoint = self.output_dir / "checkpoints" / "best.pt"
                save_pointer_checkpoint(
                    self.best_checkpoint, model, phase=phase, epoch=epoch, kl_beta=self.kl_beta, metrics=val
                )
        self.epoch_counter += 1

    # ------------------------------------------------------------------ SFT
    def run_sft(self, model: PointerSelector, sft_groups: List[Group]) -> None:
        """Cross-entropy on the InfoScore beams (every beam of a query is a target, equally weighted)."""
        cfg = self.cfg.sft
        if cfg.epochs <= 0 or not sft_groups:
            return
        steps = cfg.epochs * num_batches(sft_groups, cfg.batch_size)
        opt, sched = self._optimizer(model, cfg, steps)
        self._start_phase("sft")
        model.train()
        for epoch in range(cfg.epochs):
            total, n = 0.0, 0
            bar = self._progress(
                iterate_batches(sft_groups, cfg.batch_size, shuffle=True, generator=self.generator),
                desc=f"SFT epoch {epoch + 1}/{cfg.epochs}",
                total=num_batches(sft_groups, cfg.batch_size),
            )
            for chunk in bar:
                b = collate(chunk, self.embeddings)
                nll = model.sequence_nll(b.query_emb, b.cand_emb, b.labels, b.cand_mask)
                w = b.member_mask.float() / b.member_mask.sum(1, keepdim=True).clamp(min=1)
                loss = (nll * w).sum(1).mean()
                _check_finite(loss, f"SFT epoch {epoch + 1}")
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
                total += loss.item() * len(chunk)
                n += len(chunk)
                bar.set_postfix(loss=f"{loss.item():.4f}")
            self.logger.log_metrics({"sft/loss": total / max(n, 1)}, step=self.epoch_counter)
            self.epoch_counter += 1

    # ------------------------------------------------------------------ RCE
    def run_rce(self, model: PointerSelector, select: bool) -> None:
        cfg = self.cfg.rce
        bs = self.cfg.data.batch_size
        per_epoch = num_batches(self.train_groups, bs)
        total_steps = cfg.epochs * per_epoch
        if cfg.epochs <= 0:
            return
        opt, sched = self._optimizer(model, cfg, total_steps)
        self._start_phase("rce")
        step = 0
        for epoch in range(cfg.epochs):
            model.train()
            total, n, tau = 0.0, 0, cfg.temp_end
            bar = self._progress(
                iterate_batches(self.train_groups, bs, shuffle=True, generator=self.generator),
                desc=f"RCE epoch {epoch + 1}/{cfg.epochs}",
                total=per_epoch,
            )
            for chunk in bar:
                b = collate(chunk, self.embeddings)
                tau = rce_temperature(step, total_steps, cfg.temp_start, cfg.temp_end)
                rewards = b.rewards_raw if cfg.use_raw_reward else b.rewards
                mask = b.member_mask
                if cfg.use_top1_only:
                    top = top1_member(rewards, mask, compat_index0=cfg.top1_compat_index0)
                    mask = torch.zeros_like(mask).scatter_(1, top[:, None], True)
                log_probs = -model.sequence_nll(b.query_emb, b.cand_emb, b.labels, b.cand_mask)
                out = rce_loss(log_probs, rewards, tau, mask, use_rank=cfg.use_rank_weights)
                loss = out["loss"]
                _check_finite(loss, f"RCE epoch {epoch + 1} step {step}")
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
                step += 1
                total += loss.item() * len(chunk)
                n += len(chunk)
                bar.set_postfix(loss=f"{loss.item():.4f}", tau=f"{tau:.2f}")
            self._end_epoch(
                model,
                "rce",
                epoch,
                {"rce/loss": total / max(n, 1), "rce/tau": tau, "rce/lr": sched.get_last_lr()[0]},
                select,
            )

    # ------------------------------------------------------------------ GRPO
    def freeze_backbone(self, model: PointerSelector) -> Dict[str, int]:
        for name, p in model.named_parameters():
            if any(part in name for part in BACKBONE_PARTS):
                p.requires_grad_(False)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        self.say(f"GRPO: backbone frozen; trainable {trainable:,} / {total:,} parameters ({100 * trainable / total:.1f}%)")
        return {"trainable": trainable, "total": total}

    def run_grpo(self, model: PointerSelector, old_log_probs: Dict[int, torch.Tensor], select: bool) -> Dict[str, int]:
        cfg = self.cfg.grpo
        counts = {"trainable": sum(p.numel() for p in model.parameters()), "total": sum(p.numel() for p in model.parameters())}
        if cfg.freeze_backbone:
            counts = self.freeze_backbone(model)
        bs = self.cfg.data.batch_size
        per_epoch = num_batches(self.train_groups, bs)
        opt, sched = self._optimizer(model, cfg, cfg.epochs * per_epoch)  # fresh optimiser, as the reference
        kl_ctl = AdaptiveKLController(
            beta=cfg.kl_beta,
            target_min=cfg.kl_target_min,
            target_max=cfg.kl_target_max,
            factor=cfg.kl_factor,
            beta_min=cfg.beta_min,
            beta_max=cfg.beta_max,
            enabled=cfg.adaptive_kl,
        )
        temp_ctl = AdaptivePolicyTemperature(
            target_min=cfg.kl_target_min, target_max=cfg.kl_target_max, enabled=cfg.adaptive_temperature
        )
        schedule = [
            (None if e < 0 else int(e), None if k < 0 else int(k)) for e, k in (tuple(x) for x in cfg.top_k_schedule)
        ]
        self._start_phase("grpo")
        keys = ["loss", "ppo_loss", "kl_loss", "kl", "mean_ratio", "clip_ratio", "adv_mean", "adv_std"]
        step = 0
        for epoch in range(cfg.epochs):
            model.train()
            k = grpo_top_k(epoch, schedule)
            sums = {key: 0.0 for key in keys}
            zero_std, reward_sum, reward_sq, n_members, n = 0, 0.0, 0.0, 0, 0
            bar = self._progress(
                iterate_batches(self.train_groups, bs, shuffle=True, generator=self.generator),
                desc=f"GRPO epoch {epoch + 1}/{cfg.epochs}",
                total=per_epoch,
            )
            for chunk in bar:
                b = collate(chunk, self.embeddings, old_log_probs)
                rewards = b.rewards if enum_value(cfg.reward_source) == "normalized" else b.rewards_raw
                idx, sel_mask = top_k_members(rewards, b.member_mask, k)
                labels = torch.gather(b.labels, 1, idx[..., None].expand(-1, -1, b.labels.shape[2]))
                r = torch.gather(rewards, 1, idx)
                old = torch.gather(b.old_log_probs, 1, idx)
                new = model.sequence_log_probs(
                    b.query_emb, b.cand_emb, labels, b.cand_mask, policy_temperature=temp_ctl.temperature
                )
                out = grpo_loss(
                    new,
                    old,
                    r,
                    cfg.clip_epsilon,
                    kl_ctl.beta,
                    sel_mask,
                    std_floor=cfg.adv_std_floor,
                    adv_clip=cfg.adv_clip,
                    use_ppo_clip_only=cfg.use_ppo_clip_only,
                )
                loss = out["loss"]
                _check_finite(loss, f"GRPO epoch {epoch + 1} step {step}")
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
                opt.step()
                sched.step()
                step += 1
                kl_value = float(out["kl"].detach())
                kl_ctl.update(kl_value)  # after every optimiser step (reference: every query)
                temp_ctl.update(kl_value)
                for key in keys:
                    sums[key] += float(out[key].detach()) * len(chunk)
                # frac_reward_zero_std over the selected members, per group (TRL's metric), vectorised
                with torch.no_grad():
                    sel = sel_mask.float()
                    cnt = sel.sum(1)
                    mean = (r * sel).sum(1) / cnt.clamp(min=1)
                    spread = (((r - mean[:, None]) * sel) ** 2).sum(1)
                    zero_std += int(((cnt < 2) | (spread <= 1e-12 * (cnt - 1).clamp(min=1))).sum())  # std <= 1e-6
                    raw = b.rewards_raw * b.member_mask
                    reward_sum += float(raw.sum())
                    reward_sq += float((raw**2).sum())
                    n_members += int(b.member_mask.sum())
                n += len(chunk)
                bar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{kl_value:.4f}", beta=f"{kl_ctl.beta:.3f}")
            self.kl_beta = kl_ctl.beta
            mean_r = reward_sum / max(n_members, 1)
            metrics = {f"grpo/{key}": sums[key] / max(n, 1) for key in keys}
            metrics.update(
                {
                    "grpo/beta": kl_ctl.beta,
                    "grpo/top_k": float(k if k is not None else -1),
                    "grpo/frac_reward_zero_std": zero_std / max(n, 1),
                    "grpo/reward_mean": mean_r,
                    "grpo/reward_std": math.sqrt(max(reward_sq / max(n_members, 1) - mean_r**2, 0.0)),
                    "grpo/lr": sched.get_last_lr()[0],
                    "grpo/policy_temperature": temp_ctl.temperature,
                }
            )
            self._end_epoch(model, "grpo", epoch, metrics, select)
        return counts

    # ------------------------------------------------------------------ all phases
    def fit(
        self,
        model: PointerSelector,
        *,
        sft_groups: Optional[List[Group]] = None,
        post_rce_state: Optional[dict] = None,
    ) -> TrainResult:
        """SFT (only when sft_groups are given) -> RCE -> GRPO (when grpo.epochs > 0).

        ``post_rce_state``: a cached post-RCE state dict (same data, model, reward, RCE config and seed); the RCE phase
        is then skipped and GRPO starts from it. ``model`` must hold the pre-RCE (SFT) weights either way, because the
        GRPO "old" log-probs come from them by default.
        """
        timings: Dict[str, float] = {}
        t0 = time.perf_counter()
        if sft_groups:
            self.run_sft(model, sft_groups)
        timings["sft_s"] = time.perf_counter() - t0

        grpo_on = self.cfg.grpo.epochs > 0
        old_source = enum_value(self.cfg.grpo.old_logp_source)
        old_log_probs = None
        if grpo_on and old_source == "sft":
            old_log_probs = sequence_log_probs_by_query(model, self.train_groups, self.embeddings)

        t0 = time.perf_counter()
        if post_rce_state is not None:
            model.load_state_dict(post_rce_state)
            self.say("RCE phase reused from the cache.")
        else:
            self.run_rce(model, select=not grpo_on)
        self.post_rce_state = copy.deepcopy(model.state_dict())
        timings["rce_s"] = time.perf_counter() - t0

        counts = {"trainable": sum(p.numel() for p in model.parameters()), "total": sum(p.numel() for p in model.parameters())}
        t0 = time.perf_counter()
        if grpo_on:
            if old_log_probs is None:
                old_log_probs = sequence_log_probs_by_query(model, self.train_groups, self.embeddings)
            counts = self.run_grpo(model, old_log_probs, select=True)
        else:
            self.say("GRPO skipped (grpo.epochs=0): this is an RCE-only run.")
        timings["grpo_s"] = time.perf_counter() - t0

        if self.best_state is not None:
            model.load_state_dict(self.best_state)
        model.eval()
        return TrainResult(
            model=model,
            best=self.best,
            last_val=self.last_val,
            checkpoints=list(self.checkpoints),
            best_checkpoint=self.best_checkpoint,
            timings=timings,
            kl_beta=self.kl_beta,
            param_counts=counts,
            history=list(self.memory.history),
        )

