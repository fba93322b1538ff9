"""Offline ranking of held-out RL groups: the policy ranks each query's stored candidates by sequence log-prob;
we report the reward and VQA accuracy of its top-ranked candidate next to the oracle (best candidate) and the group
mean, plus NDCG and Spearman. It is also the trainer's per-epoch validation.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from leverplus.data.batching import collate, iterate_batches
from leverplus.data.groups import Group
from leverplus.model.pointer import eval_mode, module_device
from leverplus.training.losses import rce_loss

# ---------------------------------------------------------------------------------------------- offline


def _ndcg(scores: np.ndarray, gains: np.ndarray) -> float:
    """NDCG of one group: members ranked by ``scores`` (ties in index order), gains as given."""
    order = np.argsort(-scores, kind="stable")
    discounts = 1.0 / np.log2(np.arange(2, len(gains) + 2))
    dcg = float((gains[order] * discounts).sum())
    idcg = float((np.sort(gains)[::-1] * discounts).sum())
    return dcg / idcg if idcg > 0 else float("nan")


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank (scipy.stats.rankdata's "average")."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho = Pearson correlation of the average ranks (equals scipy.stats.spearmanr)."""
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra * ra).sum() * (rb * rb).sum()))


def _masked_average_ranks(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Row-wise :func:`_average_ranks` over the entries where ``mask`` is True (``[B, G]``; padding gets 0).
    Pairwise counts: rank_i = #{j: x_j < x_i} + (#{j: x_j = x_i} + 1) / 2 over valid j; G is small (≤ ~64)."""
    m = mask[:, None, :]
    less = ((x[:, None, :] < x[:, :, None]) & m).sum(-1)
    equal = ((x[:, None, :] == x[:, :, None]) & m).sum(-1)
    return np.where(mask, less + (equal + 1) / 2.0, 0.0)


def ranking_stats(scores: np.ndarray, rewards: np.ndarray, acc: np.ndarray, mask: np.ndarray) -> Dict[str, np.ndarray]:
    """Per-group offline ranking statistics for a padded batch, vectorised (float64 ``[B, G]`` inputs, ``mask``
    True on real members). Same definitions as the per-group :func:`_ndcg` / :func:`_spearman`: top-1 is the first
    argmax of the scores, NDCG gains are reward − group min, Spearman is NaN for a group with one distinct score or
    reward. Returns arrays of length B."""
    n = mask.sum(1)
    neg_inf = np.where(mask, 0.0, -np.inf)
    top = np.argmax(scores + neg_inf, axis=1)
    best = np.argmax(rewards + neg_inf, axis=1)
    rows = np.arange(len(n))
    r_min = np.where(mask, rewards, np.inf).min(1)
    r_max = np.where(mask, rewards, -np.inf).max(1)
    s_min = np.where(mask, scores, np.inf).min(1)
    s_max = np.where(mask, scores, -np.inf).max(1)
    # NDCG: padding sorts last (score +inf in the ascending sort of -score) and carries gain 0
    gains = np.where(mask, rewards - r_min[:, None], 0.0)
    order = np.argsort(np.where(mask, -scores, np.inf), axis=1, kind="stable")
    discounts = 1.0 / np.log2(np.arange(2, scores.shape[1] + 2))
    dcg = (np.take_along_axis(gains, order, 1) * discounts).sum(1)
    idcg = (-np.sort(-gains, axis=1) * discounts).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ndcg = np.where(idcg > 0, dcg / np.where(idcg > 0, idcg, 1.0), np.nan)
        ra, rb = _masked_average_ranks(scores, mask), _masked_average_ranks(rewards, mask)
        nn_ = np.maximum(n, 1)[:, None]
        ra = np.where(mask, ra - ra.sum(1, keepdims=True) / nn_, 0.0)
        rb = np.where(mask, rb - rb.sum(1, keepdims=True) / nn_, 0.0)
        rho = (ra * rb).sum(1) / np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    rho = np.where((n < 2) | (s_max - s_min == 0) | (r_max - r_min == 0), np.nan, rho)
    acc_valid = np.where(mask, acc, 0.0)
    return {
        "top1_index": top,
        "top1_reward": rewards[rows, top],
        "top1_acc": acc[rows, top],
        "oracle_reward": rewards[rows, best],
        "oracle_acc": np.where(mask, acc, -np.inf).max(1),
        "mean_reward": np.where(mask, rewards, 0.0).sum(1) / np.maximum(n, 1),
        "mean_acc": acc_valid.sum(1) / np.maximum(n, 1),
        "ndcg": ndcg,
        "spearman": rho,
    }


OFFLINE_KEYS = ("top1_reward", "top1_acc", "oracle_reward", "oracle_acc", "mean_reward", "mean_acc", "ndcg", "spearman")


@torch.no_grad()
def offline_metrics(
    model, groups: Sequence[Group], embeddings: torch.Tensor, batch_size: int = 64, *, with_rows: bool = True
) -> Tuple[Dict[str, float], List[dict]]:
    """Rank every group's members by the policy (eval mode). Returns (summary, per-query rows; empty unless
    ``with_rows``).

    Summary keys: top1_reward, top1_acc, oracle_reward, oracle_acc, mean_reward, mean_acc, ndcg, spearman, rce_loss
    (the reference's val loss: RCE on raw rewards at τ=1), n_queries. NDCG uses gains = reward − group min and skips
    groups whose rewards are all equal; Spearman skips groups with one distinct reward. The policy runs on its own
    device (batches are collated on the CPU and moved there); the statistics are computed on the CPU.
    """
    device = module_device(model)
    # a PointerSelector projects every item once (ItemTable); any other policy only needs sequence_log_probs
    table = model.item_table(embeddings.to(device)) if hasattr(model, "item_table") else None
    rows: List[dict] = []
    per_key: Dict[str, List[np.ndarray]] = {k: [] for k in OFFLINE_KEYS}
    loss_sum, n = 0.0, 0
    with eval_mode(model):
        for chunk in iterate_batches(list(groups), batch_size, shuffle=False):
            b = collate(chunk, embeddings)
            on = b.to(device)
            if table is not None:
                lp = model.sequence_log_probs_indexed(on.query_emb, on.pool_idx, on.labels, table, on.cand_mask)
            else:
                lp = model.sequence_log_probs(on.query_emb, on.cand_emb, on.labels, on.cand_mask)
            loss_sum += float(rce_loss(lp, on.rewards_raw, temperature=1.0, mask=on.member_mask)["loss"]) * len(chunk)
            n += len(chunk)
            st = ranking_stats(lp.double().cpu().numpy(), b.rewards_raw.double().numpy(), b.acc.double().numpy(),
                               b.member_mask.numpy())
            for k in OFFLINE_KEYS:
                per_key[k].append(st[k])
            if with_rows:
                for i, g in enumerate(chunk):
                    rows.append({"query_id": g.query_id, "shot_num": g.shot_num,
                                 "top1_index": g.candidate_index[int(st["top1_index"][i])],
                                 **{k: float(st[k][i]) for k in OFFLINE_KEYS}})
    summary: Dict[str, float] = {"n_queries": float(n), "rce_loss": loss_sum / max(n, 1)}
    for key in OFFLINE_KEYS:
        vals = np.concatenate(per_key[key]) if per_key[key] else np.zeros(0)
        vals = vals[~np.isnan(vals)]
        summary[key] = float(vals.mean()) if len(vals) else float("nan")
    return summary, rows


def validation_metrics(model, groups: Sequence[Group], embeddings: torch.Tensor) -> Dict[str, float]:
    """Per-epoch validation: ``val/loss`` (the reference's: RCE on raw rewards at τ=1) and the offline ranking
    metrics as ``val/offline/<name>``. What checkpoint selection (``eval.select_metric``) reads."""
    if not groups:
        return {}
    metrics, _ = offline_metrics(model, groups, embeddings, with_rows=False)
    out = {f"val/offline/{k}": v for k, v in metrics.items()}
    out["val/loss"] = metrics["rce_loss"]
    return out
