"""Evaluation harness: offline ranking metrics, downstream selection/baselines, CIs, paired comparisons."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from leverplus.config.schema import EvalConfig
from leverplus.data.eval_queries import EvalQuerySet
from leverplus.data.groups import Group
from leverplus.evaluation.downstream import (
    DEFAULT_BOOTSTRAP_SAMPLES,
    downstream_eval,
    evaluate_splits,
    paired_comparison,
    select_icds,
)
from leverplus.evaluation.ranking import _ndcg, _spearman, offline_metrics


class RewardOracle(torch.nn.Module):
    """Scores each member by a fixed per-member score table (stands in for a policy's log-probs)."""

    def __init__(self, table):
        super().__init__()
        self.table = table  # query_id -> tensor[G]

    def sequence_log_probs(self, query_emb, cand_emb, labels, cand_mask=None):
        out = torch.full(labels.shape[:2], -1e9)
        for b in range(labels.shape[0]):
            qid = int(query_emb[b, 0])
            out[b, : len(self.table[qid])] = self.table[qid]
        return out


def groups_and_emb():
    emb = torch.zeros(10, 2)
    emb[:, 0] = torch.arange(10).float()  # row q carries its own id in column 0
    g1 = Group(0, 2, [5, 6, 7], torch.tensor([[0, 1], [1, 2], [0, 2]]), torch.tensor([2.0, 0.0, 1.3]),
               torch.zeros(3), torch.tensor([1.0, 0.0, 0.3]), [0, 1, 2])
    g2 = Group(1, 2, [5, 6, 7], torch.tensor([[2, 1], [1, 0]]), torch.tensor([0.0, 1.6]), torch.zeros(2),
               torch.tensor([0.0, 0.6]), [0, 1])
    return emb, [g1, g2]


def test_oracle_policy_gets_the_oracle_score():
    emb, groups = groups_and_emb()
    model = RewardOracle({0: torch.tensor([2.0, 0.0, 1.3]), 1: torch.tensor([0.0, 1.6])})
    summary, rows = offline_metrics(model, groups, emb)
    assert summary["top1_reward"] == pytest.approx(summary["oracle_reward"]) == pytest.approx((2.0 + 1.6) / 2)
    assert summary["top1_acc"] == pytest.approx((1.0 + 0.6) / 2)
    assert summary["mean_acc"] == pytest.approx(((1.0 + 0.0 + 0.3) / 3 + 0.3) / 2)
    assert summary["ndcg"] == pytest.approx(1.0) and summary["spearman"] == pytest.approx(1.0)
    assert [r["top1_index"] for r in rows] == [0, 1]


def test_worst_policy_and_hand_computed_ndcg():
    emb, groups = groups_and_emb()
    model = RewardOracle({0: torch.tensor([0.0, 2.0, 1.0]), 1: torch.tensor([1.0, 0.0])})  # ranks worst first
    summary, _ = offline_metrics(model, groups, emb)
    assert summary["top1_reward"] == pytest.approx(0.0)
    # group 1: order by score = members [1, 2, 0], gains (r - min) = [0, 1.3, 2.0]
    #   DCG = 0/log2(2) + 1.3/log2(3) + 2.0/log2(4) = 0.8202 + 1.0 = 1.8202
    #   IDCG = 2.0/1 + 1.3/log2(3) + 0 = 2.8202  -> 0.6454
    # group 2: order [0, 1], gains [0, 1.6]: DCG = 1.6/log2(3) = 1.0095, IDCG = 1.6 -> 0.6309
    assert summary["ndcg"] == pytest.approx((1.8202 / 2.8202 + 1.0095 / 1.6) / 2, abs=1e-3)
    assert summary["spearman"] == pytest.approx(-1.0)


def test_ndcg_and_spearman_undefined_cases():
    import numpy as np

    assert math.isnan(_ndcg(np.array([1.0, 2.0]), np.array([0.0, 0.0])))
    assert math.isnan(_spearman(np.array([1.0, 2.0]), np.array([3.0, 3.0])))


class FixedScorer:
    """Correct iff the last ICD is even (so selection matters and the truth is known)."""

    def answer(self, split, q, icds):
        return "yes" if icds and icds[-1] % 2 == 0 else "no"

    def gt_answers(self, split, q):
        return ["yes"] * 10


def qset(n=200, pool=8, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    pools = [torch.randperm(50, generator=g)[:pool].tolist() for _ in range(n)]
    return EvalQuerySet("test", list(range(n)), torch.randn(n, d, generator=g), pools)


def test_similarity_orders_most_similar_last_and_random_is_seeded():
    emb = torch.eye(4)
    qs = EvalQuerySet("test", [0], torch.tensor([[1.0, 0.5, 0.0, 0.0]]), [[3, 1, 0, 2]])
    # cosine with the query: item0 0.894, item1 0.447, others 0 -> top-2 [0, 1], most similar last -> [1, 0]
    assert select_icds("similarity", qs, emb, 2) == [[1, 0]]
    a = select_icds("random", qset(), torch.randn(50, 4), 2, seed=1)
    assert a == select_icds("random", qset(), torch.randn(50, 4), 2, seed=1)
    assert all(len(set(s)) == 2 and set(s) <= set(p) for s, p in zip(a, qset().pools))
    assert select_icds("zero_shot", qs, emb, 2) == [[]]
    with pytest.raises(ValueError, match="valid: selector"):
        select_icds("oracle", qs, emb, 2)


class RandomPolicy(torch.nn.Module):
    def greedy(self, query_emb, cand_emb, shot_num, cand_mask=None):
        g = torch.Generator().manual_seed(123)
        scores = torch.rand(cand_emb.shape[:2], generator=g).masked_fill(~cand_mask, -1)
        return torch.topk(scores, shot_num, dim=1).indices


def test_random_selector_matches_random_baseline_within_ci_and_pairing():
    qs = qset(n=400)
    emb = torch.randn(50, 4)
    summ, rows = downstream_eval(FixedScorer(), qs, emb, 2, ["selector", "random"], model=RandomPolicy())
    # truth: half of the ids are even -> accuracy 0.5 for any random choice
    for m in ("selector", "random"):
        assert summ[m]["n"] == 400 and summ[m]["ci_lo"] < 0.5 < summ[m]["ci_hi"]
    assert summ["selector"]["ci_lo"] < summ["random"]["acc"] < summ["selector"]["ci_hi"]
    res = paired_comparison(rows["selector"], rows["random"], n_boot=500)
    assert res.lo < 0 < res.hi and res.n == 400


def test_spearman_hand_computed_with_ties_and_equal_to_scipy():
    import numpy as np

    # a = [1, 2, 2, 3] -> ranks [1, 2.5, 2.5, 4]; b = [10, 30, 20, 40] -> ranks [1, 3, 2, 4]
    # centred: [-1.5, 0, 0, 1.5] and [-1.5, 0.5, -0.5, 1.5]; rho = 4.5 / sqrt(4.5 * 5) = 0.948683
    assert _spearman(np.array([1.0, 2.0, 2.0, 3.0]), np.array([10.0, 30.0, 20.0, 40.0])) == pytest.approx(0.948683, abs=1e-6)
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 15))
        a, b = rng.integers(0, 4, n).astype(float), rng.normal(size=n).round(1)
        want = spearmanr(a, b).statistic if np.ptp(a) and np.ptp(b) else float("nan")
        got = _spearman(a, b)
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-12)


def test_vectorised_ranking_stats_equal_the_per_group_definitions():
    """ranking_stats on a padded batch (ties in scores and rewards, groups of 1..7) equals _ndcg / _spearman /
    first-argmax computed group by group."""
    import numpy as np

    from leverplus.evaluation.ranking import OFFLINE_KEYS, ranking_stats

    rng = np.random.default_rng(0)
    B, G = 60, 7
    sizes = rng.integers(1, G + 1, size=B)
    mask = np.arange(G)[None, :] < sizes[:, None]
    scores = np.round(rng.normal(size=(B, G)), 1)  # rounding makes ties
    rewards = rng.integers(0, 3, size=(B, G)).astype(float) * 0.5
    acc = rng.random((B, G))
    scores[~mask], rewards[~mask], acc[~mask] = 99.0, 99.0, 99.0  # padding must never leak in
    st = ranking_stats(scores, rewards, acc, mask)
    for i in range(B):
        n = sizes[i]
        s, r, a = scores[i, :n], rewards[i, :n], acc[i, :n]
        top, best = int(np.argmax(s)), int(np.argmax(r))
        want = {"top1_reward": r[top], "top1_acc": a[top], "oracle_reward": r[best], "oracle_acc": a.max(),
                "mean_reward": r.mean(), "mean_acc": a.mean(), "ndcg": _ndcg(s, r - r.min()), "spearman": _spearman(s, r)}
        assert int(st["top1_index"][i]) == top
        for k in OFFLINE_KEYS:
            if math.isnan(want[k]):
                assert math.isnan(st[k][i]), (i, k)
            else:
                assert st[k][i] == pytest.approx(want[k], abs=1e-12), (i, k)


class CaseScorer:
    """Answers "Yes" to every query; the annotators wrote "yes" ten times."""

    def answer(self, split, q, icds):
        return "Yes"

    def gt_answers(self, split, q):
        return ["yes"] * 10


def test_downstream_accuracy_uses_the_requested_normalisation():
    # ten identical GTs: official (vqaEval.py a013f00) normalises nothing -> "Yes" != "yes" -> 0;
    # lever_plus normalises both -> "yes" == "yes" for all 10 -> 1
    qs = qset(n=5)
    emb = torch.randn(50, 4)
    summ, rows = downstream_eval(CaseScorer(), qs, emb, 2, ["random"])
    assert summ["random"]["acc"] == 0.0 and {r["acc"] for r in rows["random"]} == {0.0}
    summ, _ = downstream_eval(CaseScorer(), qs, emb, 2, ["random"], normalization="lever_plus")
    assert summ["random"]["acc"] == 1.0


def test_vqa_normalization_is_a_config_enum_and_part_of_the_run_key():
    from hydra.errors import ConfigCompositionException
    from paths import compose_cfg

    from leverplus.config.identity import run_key, to_container

    default = to_container(compose_cfg([]))
    assert default["eval"]["vqa_normalization"] == default["data"]["sim"]["vqa_normalization"] == "official"
    keys = {run_key(default, "fp")}
    for override in ("eval.vqa_normalization=lever_plus", "data.sim.vqa_normalization=lever_plus"):
        keys.add(run_key(to_container(compose_cfg([override])), "fp"))
    assert len(keys) == 3  # each option changes the run key
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["eval.vqa_normalization=lavis"])


def test_evaluate_splits_paired_comparisons_use_eval_bootstrap_samples():
    assert EvalConfig().bootstrap_samples == DEFAULT_BOOTSTRAP_SAMPLES  # the hard-coded value it replaces
    qs, emb = qset(n=120), torch.randn(50, 4)
    cfg = OmegaConf.merge(OmegaConf.structured(EvalConfig), {"downstream_splits": ["test"], "baselines": ["random"],
                                                             "bootstrap_samples": 37})
    out = evaluate_splits(RandomPolicy(), FixedScorer(), {"test": qs}, emb, [2], cfg, seed=3, data_key="t")
    res = out.comparisons["test/shot2/selector_vs_random"]
    _, rows = downstream_eval(FixedScorer(), qs, emb, 2, ["selector", "random"], model=RandomPolicy(), seed=3)
    assert res == paired_comparison(rows["selector"], rows["random"], n_boot=37, seed=3)
    assert res != paired_comparison(rows["selector"], rows["random"], seed=3)  # 2000 resamples: another CI
    assert set(out.comparisons) == {"test/shot2/selector_vs_random"}
    assert out.metrics["test/downstream_acc"] == out.metrics["test/downstream/shot2/selector_acc"]
