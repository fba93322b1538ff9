"""Evaluation: offline ranking of held-out RL groups, and downstream VQA accuracy of selected ICDs.

Offline: the policy ranks each query's stored candidates by sequence log-prob; we report the reward and VQA accuracy
of its top-ranked candidate next to the oracle (best candidate) and the group mean, plus NDCG and Spearman.

Downstream: a selector picks ICDs for every evaluation query from an explicit pool (the query's own candidate pool,
or the whole train pool), a scorer (the simulated LVLM; later a real LVLM) answers, and the official VQA accuracy
is computed. Baselines run through the same harness: zero-shot, random ICDs, similarity top-k. Every accuracy comes
with n and a 95% confidence interval, and per-query results are kept so that comparisons can be paired.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch

from leverplus.dataset import Group, collate, iterate_batches
from leverplus.losses import rce_loss
from leverplus.metrics import vqa_accuracy
from leverplus.model import eval_mode
from leverplus.stats import mean_ci, paired_bootstrap

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
    groups whose rewards are all equal; Spearman skips groups with one distinct reward.
    """
    # a PointerSelector projects every item once (ItemTable); any other policy only needs sequence_log_probs
    table = model.item_table(embeddings) if hasattr(model, "item_table") else None
    rows: List[dict] = []
    per_key: Dict[str, List[np.ndarray]] = {k: [] for k in OFFLINE_KEYS}
    loss_sum, n = 0.0, 0
    with eval_mode(model):
        for chunk in iterate_batches(list(groups), batch_size, shuffle=False):
            b = collate(chunk, embeddings)
            if table is not None:
                lp = model.sequence_log_probs_indexed(b.query_emb, b.pool_idx, b.labels, table, b.cand_mask)
            else:
                lp = model.sequence_log_probs(b.query_emb, b.cand_emb, b.labels, b.cand_mask)
            loss_sum += float(rce_loss(lp, b.rewards_raw, 1.0, b.member_mask)["loss"]) * len(chunk)
            n += len(chunk)
            st = ranking_stats(lp.double().numpy(), b.rewards_raw.double().numpy(), b.acc.double().numpy(),
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


# ---------------------------------------------------------------------------------------------- downstream


class Scorer(Protocol):
    """Answers a VQA query given ordered ICDs (global train ids). ``split`` is "train", "val" or "test"."""

    def answer(self, split: str, query_index: int, icd_ids: Sequence[int]) -> str: ...

    def gt_answers(self, split: str, query_index: int) -> List[str]: ...


@dataclass
class EvalQuerySet:
    """Evaluation queries of one split with their candidate pools (global train ids)."""

    split: str
    query_index: List[int]
    query_emb: torch.Tensor  # [M, d]
    pools: List[List[int]]

    def __len__(self) -> int:
        return len(self.query_index)


BASELINES = ("zero_shot", "random", "similarity")


def _pools(qset: EvalQuerySet, pool_mode: str, num_items: int) -> List[List[int]]:
    if pool_mode == "query_pool":
        return qset.pools
    if pool_mode == "train_pool":
        everything = list(range(num_items))
        if qset.split == "train":  # a train query is never its own ICD
            return [[i for i in everything if i != q] for q in qset.query_index]
        return [everything] * len(qset)
    raise ValueError(f"unknown eval pool {pool_mode!r}; valid: query_pool, train_pool")


@torch.no_grad()
def select_icds(
    method: str,
    qset: EvalQuerySet,
    embeddings: torch.Tensor,
    shot_num: int,
    *,
    model=None,
    pool_mode: str = "query_pool",
    seed: int = 0,
    batch_size: int = 64,
) -> List[List[int]]:
    """ICDs (global ids, prompt order) for every query of ``qset``, chosen by ``method``.

    selector: the policy's greedy decode (never repeats); zero_shot: none; random: S items of the pool drawn with a
    seeded generator; similarity: the S pool items with the highest cosine to the query, ordered so that the most
    similar is last, next to the query (the reference's MMTopK with reversed_order=True).
    """
    pools = _pools(qset, pool_mode, embeddings.shape[0])
    if method == "zero_shot":
        return [[] for _ in pools]
    if method == "random":
        gen = torch.Generator().manual_seed(seed)
        return [[pool[j] for j in torch.randperm(len(pool), generator=gen)[:shot_num].tolist()] for pool in pools]
    if method == "similarity":
        q = torch.nn.functional.normalize(qset.query_emb.float(), dim=-1)
        e = torch.nn.functional.normalize(embeddings.float(), dim=-1)
        out = []
        for start in range(0, len(pools), batch_size):  # padded batches: one matmul per chunk
            chunk = pools[start : start + batch_size]
            idx = torch.nn.utils.rnn.pad_sequence([torch.as_tensor(p) for p in chunk], batch_first=True)
            valid = torch.arange(idx.shape[1])[None, :] < torch.tensor([len(p) for p in chunk])[:, None]
            sims = torch.einsum("bkd,bd->bk", torch.nn.functional.embedding(idx, e), q[start : start + len(chunk)]).masked_fill(~valid, -2.0)
            top = torch.topk(sims, shot_num, dim=1).indices  # most similar first (stable across ties by index)
            out.extend([[pool[j] for j in reversed(row)] for pool, row in zip(chunk, top.tolist())])
        return out
    if method == "selector":
        if model is None:
            raise ValueError("method 'selector' needs a model")
        # a PointerSelector projects every item once (ItemTable) and gathers rows; any other policy gets padded
        # pool embeddings through greedy(query_emb, cand_emb, shot_num, cand_mask)
        table = model.item_table(embeddings) if hasattr(model, "item_table") else None
        out = []
        for start in range(0, len(pools), batch_size):
            chunk = pools[start : start + batch_size]
            idx = torch.nn.utils.rnn.pad_sequence([torch.as_tensor(p, dtype=torch.long) for p in chunk],
                                                  batch_first=True)
            mask = torch.arange(idx.shape[1])[None, :] < torch.tensor([len(p) for p in chunk])[:, None]
            q = qset.query_emb[start : start + len(chunk)]
            if table is not None:
                picks = model.greedy_indexed(q, idx, shot_num, table, mask)
            else:
                cand = torch.nn.functional.embedding(idx, embeddings) * mask[..., None].to(embeddings.dtype)
                picks = model.greedy(q, cand, shot_num, mask)
            out.extend([[pool[j] for j in row] for pool, row in zip(chunk, picks.tolist())])
        return out
    raise ValueError(f"unknown selection method {method!r}; valid: selector, {', '.join(BASELINES)}")


def score_selections(scorer: Scorer, qset: EvalQuerySet, selections: Sequence[Sequence[int]], *,
                     normalization: str = "official") -> List[dict]:
    """Ask the scorer for each query's answer and compute the VQA accuracy (per-query rows);
    ``normalization`` as in ``metrics.vqa_accuracy``."""
    rows = []
    if hasattr(scorer, "answer_batch"):  # vectorised scorers (the simulated LVLM) answer a whole split at once
        preds = scorer.answer_batch(qset.split, list(qset.query_index), [list(s) for s in selections])
    else:
        preds = [scorer.answer(qset.split, q, list(s)) for q, s in zip(qset.query_index, selections)]
    for qidx, icds, pred in zip(qset.query_index, selections, preds):
        acc = vqa_accuracy(pred, scorer.gt_answers(qset.split, qidx), normalization=normalization)
        rows.append({"split": qset.split, "query_index": qidx, "icds": list(icds), "prediction": pred, "acc": acc})
    return rows


def summarize(rows: Sequence[dict]) -> Dict[str, float]:
    est = mean_ci([r["acc"] for r in rows])
    return {"acc": est.mean, "ci_lo": est.lo, "ci_hi": est.hi, "n": float(est.n)}


def downstream_eval(
    scorer: Scorer,
    qset: EvalQuerySet,
    embeddings: torch.Tensor,
    shot_num: int,
    methods: Sequence[str],
    *,
    model=None,
    pool_mode: str = "query_pool",
    seed: int = 0,
    normalization: str = "official",
) -> Tuple[Dict[str, Dict[str, float]], Dict[str, List[dict]]]:
    """Run every method through the same harness. Returns ({method: summary}, {method: per-query rows})."""
    summaries, per_query = {}, {}
    for method in methods:
        sel = select_icds(method, qset, embeddings, shot_num, model=model, pool_mode=pool_mode, seed=seed)
        rows = score_selections(scorer, qset, sel, normalization=normalization)
        for r in rows:
            r["method"], r["shot_num"] = method, shot_num
        per_query[method] = rows
        summaries[method] = summarize(rows)
    return summaries, per_query


def paired_comparison(rows_a: Sequence[dict], rows_b: Sequence[dict], n_boot: int = 2000, seed: int = 0):
    """Paired bootstrap of the accuracy difference a − b over the same queries (matched by query_index)."""
    b_by_q = {r["query_index"]: r["acc"] for r in rows_b}
    pairs = [(r["acc"], b_by_q[r["query_index"]]) for r in rows_a if r["query_index"] in b_by_q]
    a, b = zip(*pairs) if pairs else ((), ())
    return paired_bootstrap(list(a), list(b), n_boot=n_boot, seed=seed)


def format_table(summaries: Dict[str, Dict[str, float]], title: Optional[str] = None) -> str:
    """Markdown table: method | acc | 95% CI | n."""
    lines = [f"**{title}**", ""] if title else []
    lines += ["| method | VQA acc | 95% CI | n |", "|---|---|---|---|"]
    for method, s in summaries.items():
        lines.append(f"| {method} | {100 * s['acc']:.2f} | [{100 * s['ci_lo']:.2f}, {100 * s['ci_hi']:.2f}] | {int(s['n'])} |")
    return "\n".join(lines)
