"""The AdamW of every phase and its gradient clip.

On the CPU torch's multi-tensor ("foreach") AdamW runs each of its operations once per parameter tensor and
passes over the weights about seven times; the fused kernel makes one pass per tensor (``optimizer_impl``).
Keeping every parameter in one flat buffer (one fused call and a one-norm clip per step) was measured too: 3% more
queries/s at batch size 1 over ``fused``, paid back in part by a slower backward (gradients accumulate into the
buffer instead of being handed over), so it is not offered.
"""

from __future__ import annotations

from typing import Iterable

import torch


def clip_gradients(opt: torch.optim.Optimizer, grad_clip: float) -> None:
    """Clip the total gradient norm of ``opt``'s parameters to ``grad_clip``, as ``clip_grad_norm_`` (the same
    coefficient ``grad_clip / (norm + 1e-6)`` and arithmetic) but rescaling only when the norm exceeds the clip: the
    multiply by a coefficient clamped to 1 is a no-op, and at batch size 1 a tenth of the step."""
    params = [p for group in opt.param_groups for p in group["params"]]
    total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if grad_clip / (total + 1e-6) < 1:
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, total)


def make_adamw(params: Iterable[torch.nn.Parameter], impl: str, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the kernel ``impl`` (``config.schema.OptimizerImpl``): ``foreach`` (multi-tensor) or ``fused``
    (one fused kernel per tensor)."""
    params = list(params)
    if impl == "foreach":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
    if impl == "fused":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    raise ValueError(f"unknown optimizer_impl {impl!r}; choose foreach or fused")
