"""Training phases SFT -> RCE -> GRPO on padded multi-query batches.

The trainer owns optimisers, schedules, checkpoints and metric emission; the losses are pure functions in
``leverplus.training.losses`` and the model is ``leverplus.model.PointerSelector``. Metrics go to a tiny logger interface
(MLflow is one implementation, a list in memory another), named the TRL way: ``rce/loss``, ``grpo/kl``,
``grpo/clip_ratio``, ``grpo/frac_reward_zero_std``, ``val/...``."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Protocol, Tuple

import torch
from torch.optim.lr_scheduler import LRScheduler

from leverplus.data.batching import Batch, PaddedGroups, check_groups, collate, iterate_batches, num_batches
from leverplus.data.groups import Group
from leverplus.model.checkpoint import save_pointer_checkpoint
from leverplus.model.pointer import ItemTable, PointerSelector, inputs_checked, module_device
from leverplus.training.losses import (
    GRPOEpochStats,
    grpo_loss,
    rank_advantages,
    rce_loss,
    top1_member,
    top_k_members,
)
from leverplus.training.optim import clip_gradients, make_adamw
from leverplus.training.schedules import (
    AdaptiveKLController,
    AdaptivePolicyTemperature,
    grpo_top_k,
    make_lr_scheduler,
    rce_temperature,
)
from leverplus.utils import enum_value, plain_config, progress, resolve_device

log = logging.getLogger(__name__)

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


#: Phase seed = seed * PHASE_SEED_STRIDE + <phase>.seed_offset: the stride keeps the phase seeds of different run
#: seeds apart (offsets 1-3 < 10).
PHASE_SEED_STRIDE = 10
#: Queries per batch when computing the GRPO "old" log-probs (eval mode, no gradient): memory only, not results.
OLD_LOGP_BATCH_SIZE = 64


def _check_finite(loss: torch.Tensor, where: str) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"non-finite loss ({loss.item()}) at {where}; lower the learning rate or check the rewards")


def optimizer_step(opt: torch.optim.Optimizer, sched: LRScheduler, loss: torch.Tensor, grad_clip: float,
                   where: str) -> float:
    """The one optimiser step of every phase: fail on a non-finite loss, zero_grad, backward, clip the gradient
    norm of the optimised parameters to ``grad_clip``, step, step the lr schedule. Returns the loss value."""
    _check_finite(loss, where)
    opt.zero_grad()
    loss.backward()
    clip_gradients(opt, grad_clip)
    opt.step()
    sched.step()
    return loss.item()


def member_log_probs(
    model: PointerSelector,
    b: Batch,
    labels: Optional[torch.Tensor] = None,
    *,
    policy_temperature: float = 1.0,
    smoothed: bool = False,
    table: Optional[ItemTable] = None,
    per_member_dropout: bool = False,
) -> torch.Tensor:
    """``log π(a_i | q, C)`` ``[B, G]`` of the members ``labels`` (default: every member of ``b``): the one
    batch -> log-probs path of SFT, RCE and GRPO.

    ``smoothed`` (SFT, RCE): ``−sequence_nll``, the reference's cross-entropy terms (the model's label smoothing,
    logits clamped at -100); without smoothing this is the log-prob. ``table`` (the GRPO "old" policy): eval mode on
    pools gathered from the item table. Otherwise (GRPO): the train-mode log-prob at ``policy_temperature``.
    ``per_member_dropout`` (``model.per_member_dropout``): in train mode each member draws its own dropout mask.
    """
    labels = b.labels if labels is None else labels
    if (smoothed or table is not None) and policy_temperature != 1.0:
        raise ValueError("policy_temperature applies to the plain train-mode log-prob only")
    if table is not None:
        return model.sequence_log_probs_indexed(b.query_emb, b.pool_idx, labels, table, b.cand_mask)
    if smoothed:
        return -model.sequence_nll(b.query_emb, b.cand_emb, labels, b.cand_mask, per_member_dropout=per_member_dropout)
    return model.sequence_log_probs(b.query_emb, b.cand_emb, labels, b.cand_mask, policy_temperature=policy_temperature,
                                    per_member_dropout=per_member_dropout)


@torch.no_grad()
def sequence_log_probs_by_query(
    model: PointerSelector, groups: List[Group], embeddings: torch.Tensor, batch_size: int = OLD_LOGP_BATCH_SIZE
) -> Dict[int, torch.Tensor]:
    """Eval-mode log-probs of every member of every group: the GRPO "old" policy. Computed on the model's device,
    returned on the CPU (batches are collated there)."""
    device = module_device(model)
    table = model.item_table(embeddings.to(device))
    out: Dict[int, torch.Tensor] = {}
    for chunk in iterate_batches(groups, batch_size, shuffle=False):
        lp = member_log_probs(model, collate(chunk, embeddings).to(device), table=table).cpu()
        for i, g in enumerate(chunk):
            out[g.query_id] = lp[i, : g.size].clone()
    return out


def param_counts(model: PointerSelector) -> Dict[str, int]:
    """Trainable and total parameter counts."""
    return {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total": sum(p.numel() for p in model.parameters())}


def top1_step_scale(cfg, b: Batch) -> float:
    """The factor on the top-1-only RCE loss: 1 (``sum`` over the S pointer steps) or 1/S (``mean``, the reference's
    plain CE); 1 without ``use_top1_only``."""
    if cfg.use_top1_only and enum_value(cfg.top1_step_reduction) == "mean":
        return 1.0 / b.labels.shape[2]
    return 1.0


def rce_targets(cfg, b: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
    """The rewards and member mask the RCE loss sees (raw or normalised; only the top-1 member with use_top1_only)."""
    rewards = b.rewards_raw if cfg.use_raw_reward else b.rewards
    mask = b.member_mask
    if cfg.use_top1_only:
        top = top1_member(rewards, mask=mask, compat_index0=cfg.top1_compat_index0)
        mask = torch.zeros_like(mask).scatter_(1, top[:, None], True)
    return rewards, mask


def grpo_controllers(cfg) -> Tuple[AdaptiveKLController, AdaptivePolicyTemperature]:
    """The adaptive KL β and the (optional) adaptive policy temperature of the ``grpo`` config."""
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
        init=cfg.policy_temperature_init,
        target_min=cfg.kl_target_min,
        target_max=cfg.kl_target_max,
        factor=cfg.policy_temperature_factor,
        t_min=cfg.policy_temperature_min,
        t_max=cfg.policy_temperature_max,
        enabled=cfg.adaptive_temperature,
    )
    return kl_ctl, temp_ctl


def top_k_schedule(raw) -> List[Tuple[Optional[int], Optional[int]]]:
    """``grpo.top_k_schedule`` ([[num_epochs, k], ...], -1 = open / all) as ``grpo_top_k`` stages (None = open / all)."""
    return [(None if e < 0 else int(e), None if k < 0 else int(k)) for e, k in (tuple(x) for x in raw)]


def epoch_line(phase: str, epoch: int, epochs: int, metrics: Dict[str, float], val_metric: Optional[str]) -> str:
    """The console line of one finished epoch: phase, epoch k/N, loss, KL and β for GRPO, the validation metric."""
    parts = [f"{phase.upper()} epoch {epoch + 1}/{epochs}"]
    for key, label in ((f"{phase}/loss", "loss"), ("grpo/kl", "KL"), ("grpo/beta", "beta"), (val_metric, None)):
        if key and key in metrics:
            parts.append(f"{label or key} {metrics[key]:.4f}")
    return "  ".join(parts)


class Trainer:
    """Runs the phases on prepared groups. ``cfg`` is the full TrainConfig (DictConfig or dataclass).

    The model and its batches live on ``cfg.device`` (resolved: ``auto`` is CUDA when present); batches are collated
    on the CPU from the CPU embedding table and moved there, and the data order comes from a CPU generator, so it is
    the same on every device. Checkpoints hold CPU tensors."""

    def __init__(
        self,
        cfg,
        embeddings: torch.Tensor,
        train_groups: List[Group],
        val_groups: List[Group],
        output_dir: Path,
        logger: Optional[MetricLogger] = None,
        say: Callable[[str], None] = log.info,
        start_step: int = 0,
        *,
        validate: Optional[Callable[[PointerSelector], Dict[str, float]]] = None,
    ) -> None:
        """``validate(model)`` returns the per-epoch validation metrics (``val/...``) that checkpoint selection
        reads; the run passes the offline ranking of the held-out groups (``evaluation.ranking``)."""
        self.cfg = cfg
        self._validate = validate
        # validated once here, so the phases train with the model's per-batch input checks off
        check_groups(train_groups, embeddings, "train")
        check_groups(val_groups, embeddings, "val")
        self.embeddings = embeddings
        self.train_groups = train_groups
        self.val_groups = val_groups
        self.output_dir = Path(output_dir)
        self.memory = MemoryLogger()
        self.logger = FanoutLogger(self.memory, logger)
        self.say = say
        self.device = resolve_device(str(getattr(cfg, "device", None) or "cpu"))
        self.generator = torch.Generator()  # the data order: on the CPU whatever the device
        self.epoch_counter = start_step  # global epoch index across phases (the MLflow step)
        self.checkpoints: List[Path] = []
        self.best: Dict[str, float] = {}
        self.best_state: Optional[dict] = None
        self.best_checkpoint: Optional[Path] = None
        self.last_val: Dict[str, float] = {}
        self.kl_beta: Optional[float] = None

    # ------------------------------------------------------------------ helpers
    def _start_phase(self, phase: str) -> None:
        """Reseed shuffling and dropout per phase (``seed * PHASE_SEED_STRIDE + <phase>.seed_offset``), so a phase's
        result does not depend on whether the phases before it ran or came from a cache."""
        seed = int(self.cfg.seed) * PHASE_SEED_STRIDE + int(getattr(self.cfg, phase).seed_offset)
        self.generator.manual_seed(seed)
        torch.manual_seed(seed)

    def _table(self, groups: List[Group], old_log_probs: Optional[Dict[int, torch.Tensor]] = None) -> PaddedGroups:
        """A phase's groups padded once on the CPU; ``_batch`` gathers each step's rows from it."""
        return PaddedGroups(groups, self.embeddings, old_log_probs)

    def _batch(self, table: PaddedGroups, chunk: List[Group]) -> Batch:
        """One padded batch (``collate``'s result, gathered from the phase's table), moved to the trainer's device."""
        return table(chunk).to(self.device)

    def _batches(self, groups: List[Group], batch_size: int, desc: str):
        """One shuffled epoch over ``groups`` (the phase generator), behind a progress bar."""
        return progress(
            iterate_batches(groups, batch_size, shuffle=True, generator=self.generator),
            enabled=self.cfg.progress,
            desc=desc,
            total=num_batches(groups, batch_size),
        )

    def _optimizer(self, model, phase_cfg, steps: int):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_adamw(params, enum_value(self.cfg.optimizer_impl), lr=phase_cfg.lr,
                         weight_decay=phase_cfg.weight_decay)
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
        self.say(epoch_line(phase, epoch, int(getattr(self.cfg, phase).epochs), {**train_metrics, **val},
                            self.cfg.eval.select_metric))
        self.logger.log_metrics({**train_metrics, **val}, step=self.epoch_counter)
        if self.cfg.checkpoint_every_epoch:
            path = self.output_dir / "checkpoints" / f"{phase}_epoch{epoch + 1}.pt"
            save_pointer_checkpoint(
                path, model, phase=phase, epoch=epoch + 1, kl_beta=self.kl_beta, metrics={**train_metrics, **val}
            )
            self.checkpoints.append(path)
        metric = self.cfg.eval.select_metric
        last = enum_value(self.cfg.eval.select) == "last"  # every epoch replaces the previous one
        if select and (last or metric in val):
            value = val.get(metric)
            better = (
                last
                or not self.best
                or (self.cfg.eval.select_mode == "max" and value > self.best[metric])
                or (self.cfg.eval.select_mode == "min" and value < self.best[metric])
            )
            if better:
                self.best = {"epoch": epoch + 1, "phase": phase, "global_epoch": self.epoch_counter}
                if value is not None:
                    self.best[metric] = value
                self.best_state = copy.deepcopy(model.state_dict())
                self.best_checkpoint = self.output_dir / "checkpoints" / "best.pt"
                save_pointer_checkpoint(
                    self.best_checkpoint, model, phase=phase, epoch=epoch + 1, kl_beta=self.kl_beta, metrics=val
                )
        self.epoch_counter += 1

    # ------------------------------------------------------------------ SFT
    def run_sft(self, model: PointerSelector, sft_groups: List[Group]) -> None:
        """Cross-entropy on the InfoScore beams (every beam of a query is a target, equally weighted)."""
        cfg = plain_config(self.cfg.sft)
        if cfg.epochs <= 0 or not sft_groups:
            return
        check_groups(sft_groups, self.embeddings, "sft")
        model.to(self.device)
        opt, sched = self._optimizer(model, cfg, cfg.epochs * num_batches(sft_groups, cfg.batch_size))
        self._start_phase("sft")
        table = self._table(sft_groups)
        model.train()
        with inputs_checked(model):  # the SFT groups were checked above
            for epoch in range(cfg.epochs):
                total, n = 0.0, 0
                bar = self._batches(sft_groups, cfg.batch_size, f"SFT epoch {epoch + 1}/{cfg.epochs}")
                for chunk in bar:
                    b = self._batch(table, chunk)
                    nll = -member_log_probs(model, b, smoothed=True)
                    w = b.member_mask.float() / b.member_mask.sum(1, keepdim=True).clamp(min=1)
                    loss = optimizer_step(opt, sched, (nll * w).sum(1).mean(), cfg.grad_clip, f"SFT epoch {epoch + 1}")
                    total, n = total + loss * len(chunk), n + len(chunk)
                    bar.set_postfix(loss=f"{loss:.4f}")
                self.logger.log_metrics({"sft/loss": total / max(n, 1)}, step=self.epoch_counter)
                self.say(epoch_line("sft", epoch, int(cfg.epochs), {"sft/loss": total / max(n, 1)}, None))
                self.epoch_counter += 1

    # ------------------------------------------------------------------ RCE
    def run_rce(self, model: PointerSelector, select: bool) -> None:
        """Reward-weighted cross-entropy with the τ schedule (reference#rce-loss, reference#temperature-schedule)."""
        cfg, bs = plain_config(self.cfg.rce), self.cfg.data.batch_size
        per_member_dropout = bool(self.cfg.model.per_member_dropout)
        total_steps = cfg.epochs * num_batches(self.train_groups, bs)
        if cfg.epochs <= 0:
            return
        opt, sched = self._optimizer(model, cfg, total_steps)
        self._start_phase("rce")
        table = self._table(self.train_groups)
        step = 0
        with inputs_checked(model):  # the data were checked once, in __init__
            for epoch in range(cfg.epochs):
                model.train()
                total, n, tau = 0.0, 0, cfg.temp_end
                bar = self._batches(self.train_groups, bs, f"RCE epoch {epoch + 1}/{cfg.epochs}")
                for chunk in bar:
                    b = self._batch(table, chunk)
                    tau = rce_temperature(step, total_steps, cfg.temp_start, cfg.temp_end)
                    rewards, mask = rce_targets(cfg, b)
                    log_probs = member_log_probs(model, b, smoothed=True, per_member_dropout=per_member_dropout)
                    scale = top1_step_scale(cfg, b)
                    if scale != 1.0:
                        log_probs = log_probs * scale
                    out = rce_loss(log_probs, rewards, temperature=tau, mask=mask, use_rank=cfg.use_rank_weights)
                    loss = optimizer_step(opt, sched, out["loss"], cfg.grad_clip, f"RCE epoch {epoch + 1} step {step}")
                    step += 1
                    total, n = total + loss * len(chunk), n + len(chunk)
                    bar.set_postfix(loss=f"{loss:.4f}", tau=f"{tau:.2f}")
                metrics = {"rce/loss": total / max(n, 1), "rce/tau": tau, "rce/lr": sched.get_last_lr()[0]}
                self._end_epoch(model, "rce", epoch, metrics, select)

    # ------------------------------------------------------------------ GRPO
    def freeze_backbone(self, model: PointerSelector) -> Dict[str, int]:
        for name, p in model.named_parameters():
            if any(part in name for part in BACKBONE_PARTS):
                p.requires_grad_(False)
        counts = param_counts(model)
        trainable, total = counts["trainable"], counts["total"]
        self.say(f"GRPO: backbone frozen; trainable {trainable:,} / {total:,} parameters ({100 * trainable / total:.1f}%)")
        return counts

    @staticmethod
    def _grpo_loss(model: PointerSelector, b: Batch, cfg, k: Optional[int], beta: float, policy_temperature: float,
                   per_member_dropout: bool):
        """The GRPO loss of one batch on each query's top-k members; also their rewards and validity ``[B, k]``.
        ``cfg``: the ``grpo`` config as a plain object (``plain_config``)."""
        rewards = b.rewards if enum_value(cfg.reward_source) == "normalized" else b.rewards_raw
        idx, sel_mask = top_k_members(rewards, mask=b.member_mask, k=k)
        labels = torch.gather(b.labels, 1, idx[..., None].expand(-1, -1, b.labels.shape[2]))
        r = torch.gather(rewards, 1, idx)
        old = torch.gather(b.old_log_probs, 1, idx)
        new = member_log_probs(model, b, labels, policy_temperature=policy_temperature,
                               per_member_dropout=per_member_dropout)
        adv = rank_advantages(r, mask=sel_mask) if enum_value(cfg.advantage) == "rank" else None
        out = grpo_loss(new, old, r, clip_epsilon=cfg.clip_epsilon, kl_beta=beta, mask=sel_mask,
                        std_floor=cfg.adv_std_floor, adv_clip=cfg.adv_clip, use_ppo_clip_only=cfg.use_ppo_clip_only,
                        advantages=adv)
        return out, r, sel_mask

    def run_grpo(self, model: PointerSelector, old_log_probs: Dict[int, torch.Tensor], select: bool) -> Dict[str, int]:
        """PPO-clip + k3 KL on the curriculum top-k members, adaptive β after every step (reference#grpo-epoch)."""
        cfg, bs = plain_config(self.cfg.grpo), self.cfg.data.batch_size
        per_member_dropout = bool(self.cfg.model.per_member_dropout)
        counts = self.freeze_backbone(model) if cfg.freeze_backbone else param_counts(model)
        opt, sched = self._optimizer(model, cfg, cfg.epochs * num_batches(self.train_groups, bs))  # fresh, as the reference
        kl_ctl, temp_ctl = grpo_controllers(cfg)
        self.kl_controller = kl_ctl
        per_query = enum_value(cfg.kl_update) == "per_query"
        schedule = top_k_schedule(cfg.top_k_schedule)
        self._start_phase("grpo")
        table = self._table(self.train_groups, old_log_probs)
        step = 0
        with inputs_checked(model):  # the data were checked once, in __init__
            for epoch in range(cfg.epochs):
                model.train()
                k = grpo_top_k(epoch, schedule)
                stats = GRPOEpochStats()
                bar = self._batches(self.train_groups, bs, f"GRPO epoch {epoch + 1}/{cfg.epochs}")
                for chunk in bar:
                    b = self._batch(table, chunk)
                    out, r, sel_mask = self._grpo_loss(model, b, cfg, k, kl_ctl.beta, temp_ctl.temperature,
                                                      per_member_dropout)
                    loss = optimizer_step(opt, sched, out["loss"], cfg.grad_clip, f"GRPO epoch {epoch + 1} step {step}")
                    step += 1
                    kl_value = float(out["kl"].detach())
                    if per_query:  # the reference's cadence: one β update per query, on that query's KL
                        for kl_q in out["per_query_kl"].tolist():
                            kl_ctl.update(kl_q)
                    else:
                        kl_ctl.update(kl_value)  # after every optimiser step
                    temp_ctl.update(kl_value)
                    stats.add(out, r, sel_mask, b.rewards_raw, b.member_mask)
                    bar.set_postfix(loss=f"{loss:.4f}", kl=f"{kl_value:.4f}", beta=f"{kl_ctl.beta:.3f}")
                self.kl_beta = kl_ctl.beta
                metrics = {f"grpo/{key}": value for key, value in stats.summary().items()}
                metrics.update({"grpo/beta": kl_ctl.beta, "grpo/top_k": float(k if k is not None else -1),
                                "grpo/lr": sched.get_last_lr()[0], "grpo/policy_temperature": temp_ctl.temperature})
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
        model.to(self.device)
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

        counts = param_counts(model)
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

