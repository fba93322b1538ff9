"""Downstream evaluation: a selector picks ICDs for every evaluation query from an explicit pool (the query's own
candidate pool, or the whole train pool), a scorer (the LVLM) answers, and the VQA accuracy is computed. Baselines
run through the same harness: zero-shot, random ICDs, similarity top-k. Every accuracy comes with n and a 95%
confidence interval, and per-query results are kept so that comparisons can be paired.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import torch

from leverplus.data.eval_queries import EvalQuerySet
from leverplus.errors import LeverPlusInputError
from leverplus.evaluation.stats import PairedResult, mean_ci, paired_bootstrap
from leverplus.evaluation.vqa_metric import vqa_accuracy
from leverplus.model.pointer import module_device
from leverplus.utils import enum_value

# ---------------------------------------------------------------------------------------------- downstream


class Scorer(Protocol):
    """Answers a VQA query given ordered ICDs (global train ids). ``split`` is "train", "val" or "test"."""

    def answer(self, split: str, query_index: int, icd_ids: Sequence[int]) -> str: ...

    def gt_answers(self, split: str, query_index: int) -> List[str]: ...


BASELINES = ("zero_shot", "random", "similarity")
#: resamples of a paired comparison when none is given: the default of ``eval.bootstrap_samples``
DEFAULT_BOOTSTRAP_SAMPLES = 2000


def _pools(qset: EvalQuerySet, pool_mode: str, num_items: int) -> List[List[int]]:
    if pool_mode == "query_pool":
        return qset.pools
    if pool_mode == "train_pool":
        everything = list(range(num_items))
        if qset.split == "train":  # a train query is never its own ICD
            return [[i for i in everything if i != q] for q in qset.query_index]
        return [everything] * len(qset)
    raise ValueError(f"unknown eval pool {pool_mode!r}; valid: query_pool, train_pool")


def _random_icds(pools: List[List[int]], shot_num: int, seed: int) -> List[List[int]]:
    """S items of each pool, drawn in query order from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return [[pool[j] for j in torch.randperm(len(pool), generator=gen)[:shot_num].tolist()] for pool in pools]


def _padded(chunk: List[List[int]], dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[B, K_max]`` pool ids padded with 0, and the mask of real entries."""
    idx = torch.nn.utils.rnn.pad_sequence([torch.as_tensor(p, dtype=dtype) for p in chunk], batch_first=True)
    valid = torch.arange(idx.shape[1])[None, :] < torch.tensor([len(p) for p in chunk])[:, None]
    return idx, valid


def _similarity_icds(pools: List[List[int]], qset: EvalQuerySet, embeddings: torch.Tensor, shot_num: int,
                     batch_size: int) -> List[List[int]]:
    """The S most similar pool items (cosine), the most similar last; padded batches, one matmul per chunk."""
    q = torch.nn.functional.normalize(qset.query_emb.float(), dim=-1)
    e = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    out = []
    for start in range(0, len(pools), batch_size):
        chunk = pools[start : start + batch_size]
        idx, valid = _padded(chunk)
        sims = torch.einsum("bkd,bd->bk", torch.nn.functional.embedding(idx, e),
                            q[start : start + len(chunk)]).masked_fill(~valid, -2.0)
        top = torch.topk(sims, shot_num, dim=1).indices  # most similar first (stable across ties by index)
        out.extend([[pool[j] for j in reversed(row)] for pool, row in zip(chunk, top.tolist())])
    return out


def _selector_icds(pools: List[List[int]], qset: EvalQuerySet, embeddings: torch.Tensor, shot_num: int, model,
                   batch_size: int) -> List[List[int]]:
    """The policy's greedy decode over each pool, in padded batches, on the policy's device."""
    if model is None:
        raise ValueError("method 'selector' needs a model")
    device = module_device(model)
    # a PointerSelector projects every item once (ItemTable) and gathers rows; any other policy gets padded
    # pool embeddings through greedy(query_emb, cand_emb, shot_num, cand_mask)
    table = model.item_table(embeddings.to(device)) if hasattr(model, "item_table") else None
    out = []
    for start in range(0, len(pools), batch_size):
        chunk = pools[start : start + batch_size]
        idx, mask = _padded(chunk, torch.long)
        q = qset.query_emb[start : start + len(chunk)]
        if table is not None:
            picks = model.greedy_indexed(q.to(device), idx.to(device), shot_num, table, mask.to(device))
        else:
            cand = torch.nn.functional.embedding(idx, embeddings) * mask[..., None].to(embeddings.dtype)
            picks = model.greedy(q.to(device), cand.to(device), shot_num, mask.to(device))
        out.extend([[pool[j] for j in row] for pool, row in zip(chunk, picks.tolist())])
    return out


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
        return _random_icds(pools, shot_num, seed)
    if method == "similarity":
        return _similarity_icds(pools, qset, embeddings, shot_num, batch_size)
    if method == "selector":
        return _selector_icds(pools, qset, embeddings, shot_num, model, batch_size)
    raise ValueError(f"unknown selection method {method!r}; valid: selector, {', '.join(BASELINES)}")


def score_selections(scorer: Scorer, qset: EvalQuerySet, selections: Sequence[Sequence[int]], *,
                     normalization: str = "official") -> List[dict]:
    """Ask the scorer for each query's answer and compute the VQA accuracy (per-query rows);
    ``normalization`` as in ``vqa_metric.vqa_accuracy``."""
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


def paired_comparison(rows_a: Sequence[dict], rows_b: Sequence[dict], n_boot: int = DEFAULT_BOOTSTRAP_SAMPLES,
                      seed: int = 0) -> PairedResult:
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
        ci = f"[{100 * s['ci_lo']:.2f}, {100 * s['ci_hi']:.2f}]"
        lines.append(f"| {method} | {100 * s['acc']:.2f} | {ci} | {int(s['n'])} |")
    return "\n".join(lines)


@dataclass
class DownstreamResult:
    """Metrics (``<split>/downstream/shot<k>/<method>_<stat>`` and ``<split>/downstream_acc``), per-query rows,
    one printable table per (split, shot), and the paired comparisons ``<split>/shot<k>/selector_vs_<baseline>``
    (selector minus baseline over the same queries, ``eval.bootstrap_samples`` resamples; reporting only, not in
    ``metrics``)."""

    metrics: Dict[str, float] = field(default_factory=dict)
    per_query: List[dict] = field(default_factory=list)
    tables: List[str] = field(default_factory=list)
    comparisons: Dict[str, PairedResult] = field(default_factory=dict)


#: model-free baselines, per process: (data fingerprint, split, n, shot, method, pool, seed) -> (summary, rows)
_BASELINE_MEMO: Dict[tuple, tuple] = {}


def _baseline(scorer: Scorer, qset: EvalQuerySet, embeddings: torch.Tensor, shot: int, method: str, pool_mode: str,
              seed: int, data_key: str, normalization: str) -> tuple:
    """A model-free baseline's evaluation, computed once per process and data (every arm of a sweep shares it)."""
    key = (data_key, qset.split, len(qset), shot, method, pool_mode, seed, normalization)
    if key not in _BASELINE_MEMO:
        _BASELINE_MEMO[key] = downstream_eval(scorer, qset, embeddings, shot, [method], pool_mode=pool_mode, seed=seed,
                                              normalization=normalization)
    return _BASELINE_MEMO[key]


def _evaluate_shot(out: DownstreamResult, model, scorer: Scorer, split: str, qset: EvalQuerySet,
                   embeddings: torch.Tensor, shot: int, eval_cfg, baselines: Sequence[str], *, seed: int,
                   data_key: str) -> float:
    """One (split, shot): the selector and ``baselines`` evaluated into ``out``; returns the selector's accuracy."""
    pool_mode, norm = enum_value(eval_cfg.pool), enum_value(eval_cfg.vqa_normalization)
    summ, rows = downstream_eval(scorer, qset, embeddings, shot, ["selector"], model=model,
                                 pool_mode=pool_mode, seed=seed, normalization=norm)
    for method in baselines:
        b_summ, b_rows = _baseline(scorer, qset, embeddings, shot, method, pool_mode, seed, data_key, norm)
        summ.update(b_summ)
        rows.update({m: [dict(r) for r in rr] for m, rr in b_rows.items()})
        out.comparisons[f"{split}/shot{shot}/selector_vs_{method}"] = paired_comparison(
            rows["selector"], rows[method], n_boot=int(eval_cfg.bootstrap_samples), seed=seed)
    for method, s in summ.items():
        out.metrics.update({f"{split}/downstream/shot{shot}/{method}_{k}": v for k, v in s.items()})
    for method_rows in rows.values():
        out.per_query += [{"kind": "downstream", **r} for r in method_rows]
    out.tables.append(format_table(summ, title=f"{split} downstream, shot {shot}"))
    return summ["selector"]["acc"]


def evaluate_splits(model, scorer: Scorer, eval_sets: Dict[str, EvalQuerySet], embeddings: torch.Tensor,
                    shots: Sequence[int], eval_cfg, *, seed: int, data_key: str,
                    headline_shots: Optional[Sequence[int]] = None) -> DownstreamResult:
    """The downstream evaluation loop: for every split in ``eval.downstream_splits`` and every shot, the selector's
    ICDs answered by ``scorer`` and scored with the VQA metric, next to the configured baselines.

    ``<split>/downstream_acc_shot<k>`` is the selector's accuracy at shot k, ``<split>/downstream_acc`` the mean over
    ``headline_shots`` (default: every shot; a run passes the shots it was trained on)."""
    out = DownstreamResult()
    for split in eval_cfg.downstream_splits:
        qset = eval_sets.get(split)
        if qset is None:
            raise LeverPlusInputError(f"no evaluation queries for split {split!r}", field="eval.downstream_splits")
        if eval_cfg.max_queries:
            qset = qset.head(int(eval_cfg.max_queries))
        baselines = eval_cfg.baselines if split in eval_cfg.baseline_splits else []
        accs = {shot: _evaluate_shot(out, model, scorer, split, qset, embeddings, shot, eval_cfg, baselines,
                                     seed=seed, data_key=data_key) for shot in shots}
        out.metrics.update({f"{split}/downstream_acc_shot{shot}": acc for shot, acc in accs.items()})
        sel_accs = [accs[shot] for shot in (shots if headline_shots is None else headline_shots)]
        out.metrics[f"{split}/downstream_acc"] = sum(sel_accs) / len(sel_accs)
    return out
