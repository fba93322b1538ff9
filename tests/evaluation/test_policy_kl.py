"""KL(π_arm ‖ π_sft) of the first pointer step (leverplus.evaluation.policy_kl) on hand-computed pools, and its
place in the comparison next to Δ and the changed-queries share."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
from test_compare import A, runs_frame

from leverplus.analysis.compare import compare_runs, report_markdown
from leverplus.data.groups import Group
from leverplus.evaluation.policy_kl import first_step_log_probs, kl_divergence, mean_kl


def test_kl_by_hand():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3) = 0.1438410
    p, q = torch.tensor([0.5, 0.5], dtype=torch.float64).log(), torch.tensor([0.25, 0.75], dtype=torch.float64).log()
    assert kl_divergence(p, q) == pytest.approx(0.5 * math.log(4 / 3), abs=1e-12)
    assert kl_divergence(p, p) == 0.0
    # a candidate with p = 0 (masked) contributes nothing, even where q is 0 too
    z = torch.tensor([0.0, 1.0], dtype=torch.float64).log()
    assert kl_divergence(z, z) == 0.0
    assert kl_divergence(z, p) == pytest.approx(math.log(2), abs=1e-12)  # 1 · ln(1 / (1/2))
    assert mean_kl([p, z], [q, p]) == pytest.approx((0.5 * math.log(4 / 3) + math.log(2)) / 2, abs=1e-12)
    assert math.isnan(mean_kl([], []))


class FixedPointer(torch.nn.Module):
    """A policy whose first-step logits are the first embedding coordinate of each candidate (masked: -inf)."""

    def forward(self, query_emb, cand_emb, labels=None, *, shot_num=None, cand_mask=None, policy_temperature=1.0):
        logits = cand_emb[..., 0].clone()
        logits[~cand_mask] = -math.inf
        return logits.unsqueeze(1).expand(-1, shot_num, -1), None


def _group(qid: int, pool):
    return Group(query_id=qid, shot_num=1, pool_ids=list(pool), labels=torch.zeros(1, 1, dtype=torch.long),
                 rewards_raw=torch.zeros(1), rewards=torch.zeros(1), acc=torch.zeros(1), candidate_index=[0])


def test_first_step_distribution_of_each_pool():
    emb = torch.tensor([[0.0, 0.0], [math.log(3), 0.0], [0.0, 0.0], [5.0, 0.0]])
    groups = [_group(0, [0, 1]), _group(1, [2, 3, 0])]  # pools of different sizes share a padded batch
    lp = first_step_log_probs(FixedPointer(), groups, emb)
    assert [x.shape[0] for x in lp] == [2, 3]
    assert lp[0].exp().tolist() == pytest.approx([0.25, 0.75])  # softmax(0, ln 3)
    e5 = math.exp(5)
    assert lp[1].exp().tolist() == pytest.approx([1 / (e5 + 2), e5 / (e5 + 2), 1 / (e5 + 2)])
    assert mean_kl(lp, lp) == 0.0


def test_comparison_shows_kl_next_to_delta():
    df = runs_frame()
    df["kl_from_sft"] = [0.01 * (i % 3) for i in range(len(df))]  # per seed: 0, .01, .02
    rep = compare_runs(df, n_boot=20)
    c = rep.cell(A, 1)
    assert c.kl_from_sft.mean == pytest.approx(0.01) and c.kl_from_sft.n == 3
    row = rep.to_frame().query("arm == @A and shot_num == 1").iloc[0]
    assert row["kl_from_sft"] == pytest.approx(0.01)
    line = next(x for x in report_markdown(rep).splitlines() if x.startswith("| " + A.replace("|", "\\|") + " | 1 "))
    assert "KL 0.01" in line
    # runs tables without the column (older runs) still compare
    assert compare_runs(runs_frame(), n_boot=20).cell(A, 1).kl_from_sft is None
