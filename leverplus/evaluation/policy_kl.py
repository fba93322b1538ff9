"""How far post-training moved the policy from SFT: KL(π_arm ‖ π_sft) of the first pointer step on validation groups.

Why: an ablation whose arms all barely leave the SFT selector cannot show a reward effect however many seeds it
has; a KL near 0 says "nothing moved", a large one with Δ accuracy ≈ 0 says "moved, but no better". The first step
(which candidate is put first, given the query and its pool) is a full distribution the pointer computes exactly in
one forward pass; the whole-sequence KL would need a sum over K!/(K−S)! sequences or a sampled estimate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from leverplus.data.batching import collate, iterate_batches
from leverplus.data.groups import Group
from leverplus.model.pointer import eval_mode, module_device

#: the run metric: mean over validation groups of KL(π ‖ π_sft) of the first pointer step, in nats
KL_METRIC = "val/kl_from_sft"


def first_step_log_probs(model, groups: Sequence[Group], embeddings: torch.Tensor,
                         batch_size: int = 64) -> list[torch.Tensor]:
    """Per group (in ``iterate_batches`` order, the same for the same groups), log π(first candidate | query, pool) over its pool ``[K]`` (eval mode, no gradient).
    The model runs on its own device; the log-probs come back on the CPU."""
    device = module_device(model)
    out: list[torch.Tensor] = []
    with eval_mode(model), torch.no_grad():
        for chunk in iterate_batches(list(groups), batch_size, shuffle=False):
            b = collate(chunk, embeddings).to(device)
            logits, _ = model(b.query_emb, b.cand_emb, shot_num=1, cand_mask=b.cand_mask)
            logp = torch.log_softmax(logits[:, 0, :].double(), dim=-1).cpu()
            out += [logp[i, : len(g.pool_ids)].clone() for i, g in enumerate(chunk)]
    return out


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> float:
    """KL(p ‖ q) = Σ_c p(c) (log p(c) − log q(c)) over one pool, in nats; entries with p(c) = 0 contribute 0."""
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    return float(terms.sum().clamp(min=0.0))


def mean_kl(logps: Sequence[torch.Tensor], ref_logps: Sequence[torch.Tensor]) -> float:
    """Mean over groups of KL(π ‖ π_ref) of the first step (NaN without groups)."""
    if len(logps) != len(ref_logps):
        raise ValueError(f"{len(logps)} groups vs {len(ref_logps)} reference groups")
    if not logps:
        return float("nan")
    return float(sum(kl_divergence(p, q) for p, q in zip(logps, ref_logps)) / len(logps))
