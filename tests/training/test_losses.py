"""RCE loss (reference#rce-loss), group advantages, k3 KL and GRPO loss (reference#grpo-loss), top-k / top-1 member selection.

Expected values are computed by hand in the comments.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leverplus.errors import LeverPlusInputError
from leverplus.training.losses import (
    GRPO_LOSS_KEYS,
    GRPOEpochStats,
    ascending_rank_scores,
    count_zero_std_groups,
    group_advantages,
    grpo_loss,
    kl_k3,
    rce_loss,
    top1_member,
    top_k_members,
)

NAN = float("nan")

# ---------------------------------------------------------------------------------------------------
# RCE
# ---------------------------------------------------------------------------------------------------


def test_rce_by_hand_tau_one():
    # r = [1,0,2], τ = 1: softmax = [e, 1, e²]/(e + 1 + e²) = [2.718282, 1, 7.389056]/11.107338
    #   w = [0.244728, 0.090031, 0.665241]
    # loss = Σ w·(−logp) = 0.244728·1 + 0.090031·2 + 0.665241·0.5 = 0.244728 + 0.180061 + 0.332620 = 0.757410
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    out = rce_loss(logp, torch.tensor([[1.0, 0.0, 2.0]]), temperature=1.0)
    assert out["loss"].item() == pytest.approx(0.757410, abs=1e-6)
    assert torch.allclose(out["weights"], torch.tensor([[0.244728, 0.090031, 0.665241]]), atol=1e-6)
    assert out["per_query"].shape == (1,)
    # d loss / d logp_i = −w_i (weights are constants)
    out["loss"].backward()
    assert torch.allclose(logp.grad, -out["weights"], atol=1e-7)


def test_rce_by_hand_tau_two_and_rank_path():
    # τ = 2: softmax([0.5, 0, 1]) = [1.648721, 1, 2.718282]/5.367003 = [0.307196, 0.186324, 0.506480]
    # loss = 0.307196·1 + 0.186324·2 + 0.506480·0.5 = 0.307196 + 0.372648 + 0.253240 = 0.933084
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    assert rce_loss(logp, torch.tensor([[1.0, 0.0, 2.0]]), temperature=2.0)["loss"].item() == pytest.approx(0.933084, abs=1e-6)
    # rank path, τ = 1: r = [10, 0, 20] -> ascending ranks [1, 0, 2] -> ρ = rank/2 = [0.5, 0, 1]
    # -> the same weights as above -> 0.933084 (only the order of the rewards matters)
    out = rce_loss(logp, torch.tensor([[10.0, 0.0, 20.0]]), temperature=1.0, use_rank=True)
    assert out["loss"].item() == pytest.approx(0.933084, abs=1e-6)


def test_rank_scores_ties_masks_and_single_member():
    # ties broken stably: the earlier of two equal rewards gets the lower rank -> ρ = [0, 1]
    assert ascending_rank_scores(torch.tensor([[1.0, 1.0]])).tolist() == [[0.0, 1.0]]
    # masked member ignored: valid [3, 1] (idx 0, 2) -> ranks [1, 0] over n=2 -> ρ = [1, 0, 0(pad)]
    rho = ascending_rank_scores(torch.tensor([[3.0, NAN, 1.0]]), mask=torch.tensor([[True, False, True]]))
    assert rho.tolist() == [[1.0, 0.0, 0.0]]
    # G = 1 on the rank path: weight 1, loss = −logp = 0.7
    out = rce_loss(torch.tensor([[-0.7]]), torch.tensor([[5.0]]), temperature=1.0, use_rank=True)
    assert out["weights"].tolist() == [[1.0]] and out["loss"].item() == pytest.approx(0.7)


def test_rce_empty_rows_are_left_out_of_the_mean():
    # row 0 = the τ=1 hand case (0.757410), row 1 has no valid member -> loss = 0.757410 / 1
    logp = torch.tensor([[-1.0, -2.0, -0.5], [NAN, NAN, NAN]])
    r = torch.tensor([[1.0, 0.0, 2.0], [NAN, NAN, NAN]])
    mask = torch.tensor([[True, True, True], [False, False, False]])
    out = rce_loss(logp, r, temperature=1.0, mask=mask)
    assert out["loss"].item() == pytest.approx(0.757410, abs=1e-6)
    assert out["per_query"][1].item() == 0.0 and out["weights"][1].tolist() == [0.0, 0.0, 0.0]


def test_rce_errors():
    with pytest.raises(LeverPlusInputError, match="temperature"):
        rce_loss(torch.zeros(1, 2), torch.zeros(1, 2), temperature=0.0)
    with pytest.raises(LeverPlusInputError, match="does not match"):
        rce_loss(torch.zeros(1, 2), torch.zeros(1, 3), temperature=1.0)
    with pytest.raises(LeverPlusInputError, match="valid"):
        rce_loss(torch.zeros(1, 2), torch.tensor([[0.0, NAN]]), temperature=1.0)
    with pytest.raises(LeverPlusInputError, match="bool"):
        rce_loss(torch.zeros(1, 2), torch.zeros(1, 2), temperature=1.0, mask=torch.ones(1, 2))


groups_st = st.lists(
    st.lists(st.tuples(st.floats(-3, 3), st.floats(-8, 0)), min_size=1, max_size=5),  # (reward, logp) members
    min_size=1, max_size=4)


def _padded(groups, g_max, junk):
    """Pack groups into [B, g_max] tensors; padding = junk values; padding also placed *before* each group."""
    b = len(groups)
    r = torch.full((b, g_max), junk, dtype=torch.float64)
    lp = torch.full((b, g_max), junk, dtype=torch.float64)
    mask = torch.zeros(b, g_max, dtype=torch.bool)
    for q, members in enumerate(groups):
        start = g_max - len(members)  # valid members at the end, junk in front
        for i, (ri, li) in enumerate(members):
            r[q, start + i], lp[q, start + i], mask[q, start + i] = ri, li, True
    return r, lp, mask


@settings(max_examples=50, deadline=None)
@given(groups=groups_st, extra=st.integers(1, 3), junk=st.sampled_from([NAN, 1e6, -1e6, 0.0]),
       use_rank=st.booleans(), tau=st.floats(0.1, 3))
def test_rce_mask_invariance_and_batched_equals_per_query(groups, extra, junk, use_rank, tau):
    g_max = max(len(m) for m in groups)
    r0, lp0, m0 = _padded(groups, g_max, 0.0)
    r1, lp1, m1 = _padded(groups, g_max + extra, junk)
    lp0.requires_grad_(True)
    lp1.requires_grad_(True)
    a = rce_loss(lp0, r0, temperature=tau, mask=m0, use_rank=use_rank)
    b = rce_loss(lp1, r1, temperature=tau, mask=m1, use_rank=use_rank)
    assert torch.allclose(a["loss"], b["loss"], atol=1e-10)
    assert torch.allclose(a["per_query"], b["per_query"], atol=1e-10)
    assert torch.allclose(a["weights"][m0], b["weights"][m1], atol=1e-12)
    assert (b["weights"][~m1] == 0).all()
    a["loss"].backward()
    b["loss"].backward()
    assert torch.isfinite(lp1.grad).all() and (lp1.grad[~m1] == 0).all()
    assert torch.allclose(lp0.grad[m0], lp1.grad[m1], atol=1e-12)
    # batched loss == mean of the B = 1 losses
    singles = [rce_loss(torch.tensor([[li for _, li in m]], dtype=torch.float64),
                        torch.tensor([[ri for ri, _ in m]], dtype=torch.float64), temperature=tau,
                        use_rank=use_rank)["loss"]
               for m in groups]
    assert a["loss"].item() == pytest.approx(sum(s.item() for s in singles) / len(singles), abs=1e-10)


# ---------------------------------------------------------------------------------------------------
# Group advantages and k3 KL
# ---------------------------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    # r = [1,0,2]: mean 1, dev [0,−1,1], unbiased var = (0+1+1)/2 = 1 -> A = [0, −1, 1]
    assert group_advantages(torch.tensor([[1.0, 0.0, 2.0]])).tolist() == [[0.0, -1.0, 1.0]]
    # std floor: r = [0.5, 0.52, 0.54]: dev [−0.02, 0, 0.02], std = 0.02 < 0.1 -> A = dev/0.1 = [−0.2, 0, 0.2]
    a = group_advantages(torch.tensor([[0.5, 0.52, 0.54]], dtype=torch.float64))
    assert torch.allclose(a, torch.tensor([[-0.2, 0.0, 0.2]], dtype=torch.float64))
    # r = [0,0,1]: mean 1/3, dev [−1/3,−1/3,2/3], var = (1/9+1/9+4/9)/2 = 1/3, std = 0.577350
    # A = [−0.577350, −0.577350, 1.154701]; with clip = 1 -> [−0.577350, −0.577350, 1.0]
    a = group_advantages(torch.tensor([[0.0, 0.0, 1.0]]), clip=1.0)
    assert torch.allclose(a, torch.tensor([[-1 / math.sqrt(3), -1 / math.sqrt(3), 1.0]]), atol=1e-6)


def test_group_advantages_default_clip_five():
    # 35 zeros and one 1: mean 1/36, Σdev² = 35/1296 + 1225/1296 = 35/36, var = (35/36)/35 = 1/36, std = 1/6
    # top A = (35/36)·6 = 5.8333 -> clipped to 5; others = −(1/36)·6 = −1/6
    r = torch.zeros(1, 36)
    r[0, 7] = 1.0
    a = group_advantages(r)
    assert a[0, 7].item() == 5.0
    assert a[0, 0].item() == pytest.approx(-1 / 6, abs=1e-6)


def test_group_advantages_single_member_constant_group_and_mask():
    # G = 1: the reference gives NaN (std of one value); ours gives 0
    assert group_advantages(torch.tensor([[3.0]])).tolist() == [[0.0]]
    # constant group: dev 0 / floor 0.1 = 0
    assert group_advantages(torch.tensor([[2.0, 2.0, 2.0]])).tolist() == [[0.0, 0.0, 0.0]]
    # masked junk ignored: valid [1, 0, 2] -> [0, −1, 1], padded -> 0; row with one valid member -> 0
    r = torch.tensor([[1.0, 0.0, NAN, 2.0], [4.0, NAN, NAN, NAN]])
    mask = torch.tensor([[True, True, False, True], [True, False, False, False]])
    assert group_advantages(r, mask=mask).tolist() == [[0.0, -1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]


def test_kl_k3_values():
    # exp(x) − 1 − x: x=0 -> 0; x=ln2 -> 2 − 1 − 0.693147 = 0.306853; x=−ln2 -> 0.5 − 1 + 0.693147 = 0.193147;
    # x=1 -> e − 2 = 0.718282
    x = torch.tensor([0.0, math.log(2), -math.log(2), 1.0], dtype=torch.float64)
    expected = torch.tensor([0.0, 0.306853, 0.193147, 0.718282], dtype=torch.float64)
    assert torch.allclose(kl_k3(x), expected, atol=1e-6)
    assert (kl_k3(torch.linspace(-5, 5, 101)) >= 0).all()


# ---------------------------------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------------------------------


def test_grpo_ratio_one_gives_minus_mean_advantage_and_zero_kl():
    lp = torch.tensor([[-1.0, -2.0, -3.0]])
    # explicit A = [0.5, −1, 2]: ratio 1 -> min(A, A) = A -> L = −mean(A) = −1.5/3 = −0.5; kl = 0
    out = grpo_loss(lp, lp.clone(), torch.zeros(1, 3), advantages=torch.tensor([[0.5, -1.0, 2.0]]))
    assert out["loss"].item() == pytest.approx(-0.5) and out["ppo_loss"].item() == pytest.approx(-0.5)
    assert out["kl"].item() == 0.0 and out["kl_loss"].item() == 0.0
    assert out["mean_ratio"].item() == 1.0 and out["clip_ratio"].item() == 0.0
    # derived A with clipping (35 zeros + one 1): A = 35·(−1/6) + 5 summed = −0.833333; mean = −0.023148
    # -> L = +0.023148
    r = torch.zeros(1, 36)
    r[0, 3] = 1.0
    lp36 = torch.randn(1, 36)
    assert grpo_loss(lp36, lp36.clone(), r)["loss"].item() == pytest.approx(0.833333 / 36, abs=1e-6)


# Five members, ε = 0.2, explicit A = [1, 1, −1, −1, 2], ratios [1.5, 0.5, 1.5, 0.5, 1.1]:
#   m0: min(1.5·1, 1.2·1)    = 1.2   (clipped term chosen)
#   m1: min(0.5·1, 0.8·1)    = 0.5   (unclipped)
#   m2: min(−1.5, −1.2)      = −1.5  (unclipped)
#   m3: min(−0.5, −0.8)      = −0.8  (clipped)
#   m4: min(2.2, 2.2)        = 2.2   (inside the range)
#   Σ = 1.2 + 0.5 − 1.5 − 0.8 + 2.2 = 1.6; mean 0.32 -> L_PPO = −0.32
#   k3: 1.5 -> 0.5 − ln1.5 = 0.094535; 0.5 -> −0.5 + ln2 = 0.193147; 1.1 -> 0.1 − ln1.1 = 0.004690
#   kl = (2·0.094535 + 2·0.193147 + 0.004690)/5 = 0.580054/5 = 0.116011; β = 0.1 -> β·kl = 0.0116011
#   loss = −0.32 + 0.0116011 = −0.308399
#   clip_ratio = 4/5 = 0.8 (1.5, 0.5, 1.5, 0.5 are outside [0.8, 1.2]); mean_ratio = 5.1/5 = 1.02
#   adv: mean 2/5 = 0.4; dev [.6,.6,−1.4,−1.4,1.6], Σdev² = 7.2, unbiased std = sqrt(1.8) = 1.341641; max|A| = 2
RATIOS = [1.5, 0.5, 1.5, 0.5, 1.1]
ADV = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0]], dtype=torch.float64)


def _hand_case():
    old = torch.tensor([[-2.0, -1.0, -3.0, -0.5, -4.0]], dtype=torch.float64)
    new = (old + torch.log(torch.tensor([RATIOS], dtype=torch.float64))).requires_grad_(True)
    return new, old


def test_grpo_hand_case_with_clipping():
    new, old = _hand_case()
    out = grpo_loss(new, old, torch.zeros_like(old), clip_epsilon=0.2, kl_beta=0.1, advantages=ADV)
    assert out["ppo_loss"].item() == pytest.approx(-0.32)
    assert out["kl"].item() == pytest.approx(0.116011, abs=1e-6)
    assert out["kl_loss"].item() == pytest.approx(0.0116011, abs=1e-7)
    assert out["loss"].item() == pytest.approx(-0.308399, abs=1e-6)
    assert out["clip_ratio"].item() == pytest.approx(0.8)
    assert out["mean_ratio"].item() == pytest.approx(1.02)
    assert out["adv_mean"].item() == pytest.approx(0.4)
    assert out["adv_std"].item() == pytest.approx(math.sqrt(1.8))
    assert out["adv_max_abs"].item() == 2.0
    assert out["per_query_loss"].shape == (1,)


def test_grpo_clip_only_drops_beta_kl_but_reports_kl_and_gradients_match_hand():
    new, old = _hand_case()
    out = grpo_loss(new, old, torch.zeros_like(old), kl_beta=0.1, use_ppo_clip_only=True, advantages=ADV)
    assert out["loss"].item() == pytest.approx(-0.32)
    assert out["kl_loss"].item() == 0.0
    assert out["kl"].item() == pytest.approx(0.116011, abs=1e-6)
    # d/d new_i of −(1/5)·min(...): clipped picks have zero gradient (m0, m3);
    # otherwise −(1/5)·ratio·A: m1 −0.2·0.5·1 = −0.1, m2 −0.2·1.5·(−1) = 0.3, m4 −0.2·1.1·2 = −0.44
    out["loss"].backward()
    assert torch.allclose(new.grad, torch.tensor([[0.0, -0.1, 0.3, 0.0, -0.44]], dtype=torch.float64))


def test_grpo_uses_group_advantages_from_rewards():
    # rewards [1,0,2] -> A = [0,−1,1]; ratios [1.5, 0.5, 1.1] (ε = 0.2):
    #   m0: A=0 -> 0; m1: min(−0.5, −0.8) = −0.8; m2: min(1.1, 1.1) = 1.1 -> Σ = 0.3, L_PPO = −0.1
    old = torch.tensor([[-1.0, -1.0, -1.0]], dtype=torch.float64)
    new = old + torch.log(torch.tensor([[1.5, 0.5, 1.1]], dtype=torch.float64))
    out = grpo_loss(new, old, torch.tensor([[1.0, 0.0, 2.0]]), use_ppo_clip_only=True)
    assert out["ppo_loss"].item() == pytest.approx(-0.1)


grpo_groups_st = st.lists(
    st.lists(st.tuples(st.floats(-3, 3), st.floats(-0.8, 0.8), st.floats(-6, 0)), min_size=1, max_size=5),
    min_size=1, max_size=4)  # members: (reward, log ratio, old logp)


@settings(max_examples=40, deadline=None)
@given(groups=grpo_groups_st, extra=st.integers(0, 2), junk=st.sampled_from([NAN, 50.0, 0.0]),
       clip_only=st.booleans())
def test_grpo_batched_with_junk_padding_equals_per_query(groups, extra, junk, clip_only):
    g_max = max(len(m) for m in groups) + extra
    b = len(groups)
    r = torch.full((b, g_max), junk, dtype=torch.float64)
    old = torch.full((b, g_max), junk, dtype=torch.float64)
    new = torch.full((b, g_max), junk, dtype=torch.float64)
    mask = torch.zeros(b, g_max, dtype=torch.bool)
    for q, members in enumerate(groups):
        for i, (ri, lr, lo) in enumerate(members):
            r[q, i], old[q, i], new[q, i], mask[q, i] = ri, lo, lo + lr, True
    new.requires_grad_(True)
    out = grpo_loss(new, old, r, kl_beta=0.3, mask=mask, use_ppo_clip_only=clip_only)
    out["loss"].backward()
    assert torch.isfinite(new.grad).all() and (new.grad[~mask] == 0).all()
    singles = []
    for members in groups:
        rq = torch.tensor([[m[0] for m in members]], dtype=torch.float64)
        oq = torch.tensor([[m[2] for m in members]], dtype=torch.float64)
        nq = oq + torch.tensor([[m[1] for m in members]], dtype=torch.float64)
        singles.append(grpo_loss(nq, oq, rq, kl_beta=0.3, use_ppo_clip_only=clip_only))
    assert torch.allclose(out["per_query_loss"], torch.stack([s["loss"] for s in singles]), atol=1e-10)
    assert out["loss"].item() == pytest.approx(sum(s["loss"].item() for s in singles) / b, abs=1e-10)
    assert out["kl"].item() == pytest.approx(sum(s["kl"].item() for s in singles) / b, abs=1e-10)


def test_grpo_errors():
    z = torch.zeros(1, 2)
    with pytest.raises(LeverPlusInputError, match="clip_epsilon"):
        grpo_loss(z, z, z, clip_epsilon=1.5)
    with pytest.raises(LeverPlusInputError, match="kl_beta"):
        grpo_loss(z, z, z, kl_beta=-0.1)
    with pytest.raises(LeverPlusInputError, match="does not match"):
        grpo_loss(z, torch.zeros(1, 3), z)


# ---------------------------------------------------------------------------------------------------
# Member selection
# ---------------------------------------------------------------------------------------------------


def test_top_k_members_with_ties_and_masks():
    r = torch.tensor([[0.5, 2.0, 0.5, 1.0], [3.0, 9.0, 2.0, 9.0]])
    mask = torch.tensor([[True, True, True, True], [True, False, True, False]])
    idx, sel = top_k_members(r, mask=mask, k=3)
    # row 0: 2.0 (1), 1.0 (3), then the tie 0.5/0.5 -> lower index 0 first
    # row 1: valid are 3.0 (0) and 2.0 (2); the masked 9.0s never win; 3rd slot is padding (mask False)
    assert idx[0].tolist() == [1, 3, 0] and sel[0].tolist() == [True, True, True]
    assert idx[1, :2].tolist() == [0, 2] and sel[1].tolist() == [True, True, False]
    # k = None -> all G; k > G -> G
    assert top_k_members(r, mask=mask, k=None)[0].shape == (2, 4)
    assert top_k_members(r, mask=None, k=10)[0][0].tolist() == [1, 3, 0, 2]
    # all tied -> lowest indices
    assert top_k_members(torch.ones(1, 3), mask=None, k=2)[0].tolist() == [[0, 1]]
    with pytest.raises(LeverPlusInputError, match="positive int"):
        top_k_members(r, mask=mask, k=0)


def test_top1_member():
    assert top1_member(torch.tensor([[0.5, 2.0, 2.0]])).tolist() == [1]  # tie -> lowest index
    mask = torch.tensor([[True, False, True]])
    assert top1_member(torch.tensor([[0.5, 2.0, 2.0]]), mask=mask).tolist() == [2]
    # negative valid rewards vs a junk padded value: the padded one never wins
    assert top1_member(torch.tensor([[-1.0, -2.0, NAN]]), mask=torch.tensor([[True, True, False]])).tolist() == [0]
    assert top1_member(torch.tensor([[-3.0, -2.0, 5.0]]), mask=torch.tensor([[True, True, False]])).tolist() == [1]
    # reference quirk: always candidate 0
    assert top1_member(torch.tensor([[0.5, 2.0], [1.0, 3.0]]), compat_index0=True).tolist() == [0, 0]


# ---------------------------------------------------------------------------------------------------
# Keyword-only arguments and the GRPO epoch statistics
# ---------------------------------------------------------------------------------------------------


def test_everything_after_the_rewards_is_keyword_only():
    lp, r = torch.zeros(1, 2), torch.tensor([[0.0, 1.0]])
    with pytest.raises(TypeError):
        rce_loss(lp, r, 1.0)
    with pytest.raises(TypeError):
        grpo_loss(lp, lp, r, 0.2)
    with pytest.raises(TypeError):
        group_advantages(r, torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(TypeError):
        top_k_members(r, None, 1)


def test_count_zero_std_groups_by_hand():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, 4.0], [5.0, 0.0, 0.0], [0.5, 0.5 + 1e-7, 0.0], [0.5, 0.50001, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, True], [True, False, False], [True, True, False],
                         [True, True, False]])
    # flat; variance 4 -> not flat; one real member (padding ignored) -> flat; std 7e-8 <= 1e-6 -> flat; std 7e-6 > 1e-6 -> not flat
    assert count_zero_std_groups(r, mask) == 3
    # the tolerance is on the unbiased variance: row 1 has ((0-2)² + 0 + (4-2)²) / 2 = 4
    assert count_zero_std_groups(r[1:2], mask[1:2], var_tol=4.0) == 1
    assert count_zero_std_groups(r[1:2], mask[1:2], var_tol=3.9) == 0


def _out(loss):
    return {key: torch.tensor(loss if key == "loss" else 0.0) for key in GRPO_LOSS_KEYS}


def test_grpo_epoch_stats_on_a_hand_computed_epoch():
    stats = GRPOEpochStats()
    # batch 1: two queries, top-3 rewards [1, 1, 1] (flat) and [0, 2, 4]; raw rewards of the 3 real members of each
    stats.add(_out(1.0), torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, 4.0]]), torch.ones(2, 3, dtype=torch.bool),
              torch.tensor([[1.0, 1.0, 1.0, 9.0], [0.0, 2.0, 4.0, 9.0]]),
              torch.tensor([[True, True, True, False], [True, True, True, False]]))
    # batch 2: one query with a single selected member (flat by definition), raw rewards [5, (padding 7)]
    stats.add(_out(4.0), torch.tensor([[5.0, 0.0]]), torch.tensor([[True, False]]), torch.tensor([[5.0, 7.0]]),
              torch.tensor([[True, False]]))
    m = stats.summary()
    assert m["loss"] == pytest.approx((1.0 * 2 + 4.0 * 1) / 3)  # query-weighted mean of the batch losses
    assert m["kl"] == 0.0
    assert m["frac_reward_zero_std"] == pytest.approx(2 / 3)
    # raw rewards of the 7 real members: 1 1 1 0 2 4 5 -> mean 2, E[r^2] = 48/7, std = sqrt(48/7 - 4)
    assert m["reward_mean"] == pytest.approx(2.0)
    assert m["reward_std"] == pytest.approx(math.sqrt(48 / 7 - 4))
    assert list(m) == [*GRPO_LOSS_KEYS, "frac_reward_zero_std", "reward_mean", "reward_std", "max_advantage"]


def test_grpo_epoch_stats_of_an_empty_epoch_are_zero():
    m = GRPOEpochStats().summary()
    assert m["loss"] == 0.0 and m["frac_reward_zero_std"] == 0.0 and m["reward_std"] == 0.0
