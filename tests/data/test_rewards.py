"""Reward modes (reference#reward-modes), hybrid InfoScore scaling, group normalisation (reference#reward-normalisation), sequence diversity.

Expected values are computed by hand in the comments.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leverplus.config.reward_modes import REWARD_KNOBS, REWARD_MODE_SPECS, RewardModeSpec
from leverplus.config.schema import RewardMode
from leverplus.data.rewards import (
    NORMALIZE_METHODS,
    REWARD_MODES,
    compute_reward,
    hybrid_info_values,
    normalize_group,
    register_reward,
    sequence_diversity,
)
from leverplus.errors import LeverPlusInputError

# Positive: h=1, s=0.6, p=0.8, ρ=0.5.  Negative: h=0, s=0, p=0.3, ρ=0.4.
POS = {"vqa_correct": 1, "vqa_acc_score": 0.6, "vqa_gt_prob": 0.8, "vqa_rel_score": 0.5}
NEG = {"vqa_correct": 0, "vqa_acc_score": 0.0, "vqa_gt_prob": 0.3, "vqa_rel_score": 0.4}

# (mode, pos with hw=2 sw=0.5 rw=0.1, neg with hw=2 sw=0.5 rw=0.1, pos with defaults hw=sw=1 rw=0.1, neg defaults)
MODE_CASES = [
    # hw·h + sw·s: 2·1 + 0.5·0.6 = 2.3 ; 0 ; 1 + 0.6 = 1.6 ; 0
    ("hard_plus_soft", 2.3, 0.0, 1.6, 0.0),
    # sw·s + 2·hw·h: 0.3 + 4 = 4.3 ; 0 ; 0.6 + 2 = 2.6 ; 0
    ("hard_plus_soft_v2", 4.3, 0.0, 2.6, 0.0),
    # h==1: 2·hw + sw·s = 4 + 0.3 = 4.3 ; h==0: sw·s = 0 ; 2 + 0.6 = 2.6 ; 0
    ("separated", 4.3, 0.0, 2.6, 0.0),
    # hw·h: 2 ; 0 ; 1 ; 0
    ("hard_only", 2.0, 0.0, 1.0, 0.0),
    # sw·s: 0.5·0.6 = 0.3 ; 0 ; 0.6 ; 0
    ("soft_only", 0.3, 0.0, 0.6, 0.0),
    # hw·h + sw·p: 2 + 0.4 = 2.4 ; 0.5·0.3 = 0.15 ; 1 + 0.8 = 1.8 ; 0.3
    ("hard01_plus_gtprob", 2.4, 0.15, 1.8, 0.3),
    # h==1: 2·hw + sw·p = 4 + 0.4 = 4.4 ; h==0: sw·p = 0.15 ; 2 + 0.8 = 2.8 ; 0.3
    ("hard01_plus_gtprob_separated", 4.4, 0.15, 2.8, 0.3),
    # hw·h + sw·p + rw·(1−h)·ρ: 2 + 0.4 + 0 = 2.4 ; 0 + 0.15 + 0.1·1·0.4 = 0.19 ; 1.8 ; 0.3 + 0.04 = 0.34
    ("hard_plus_gtprob_plus_rel", 2.4, 0.19, 1.8, 0.34),
    # α = β = 0 by default: always 0
    ("legacy", 0.0, 0.0, 0.0, 0.0),
]


@pytest.mark.parametrize("mode,pos_w,neg_w,pos_d,neg_d", MODE_CASES)
def test_every_mode_positive_and_negative(mode, pos_w, neg_w, pos_d, neg_d):
    assert compute_reward(POS, mode, hard_weight=2.0, soft_weight=0.5, rel_weight=0.1) == pytest.approx(pos_w)
    assert compute_reward(NEG, mode, hard_weight=2.0, soft_weight=0.5, rel_weight=0.1) == pytest.approx(neg_w)
    assert compute_reward(POS, mode) == pytest.approx(pos_d)
    assert compute_reward(NEG, mode) == pytest.approx(neg_d)


def test_registry_the_config_enum_and_the_hand_computed_cases_cover_the_same_modes():
    declared = set(REWARD_MODE_SPECS)
    assert set(REWARD_MODES) == declared == {m.value for m in RewardMode}
    # every registered mode has a hand-computed case (hybrid, hybrid_legacy: test_hybrid_reward_on_a_three_candidate_group
    # and tests/data/test_hybrid_infoscore.py)
    assert {case[0] for case in MODE_CASES} | {"hybrid", "hybrid_legacy"} == set(REWARD_MODES)


# Every knob and candidate field set to a value that moves every formula reading it (clip out of the way).
KNOBS = dict(hard_weight=2.0, soft_weight=0.5, rel_weight=0.3, reward_alpha=0.7, reward_beta=0.4,
             correctness_mode="01", use_logprob=False, info_weight=0.3, info=0.5, clip=100.0)
CHANGED = dict(hard_weight=3.0, soft_weight=0.8, rel_weight=0.6, reward_alpha=1.1, reward_beta=0.9,
               correctness_mode="pm1", use_logprob=True, info_weight=0.6)
FULL_POS = {**POS, "logprob_score": -2.0, "beam_score": 0.9}
FULL_NEG = {**NEG, "logprob_score": -1.0, "beam_score": 0.2}
NO_CORRECT = {k: v for k, v in FULL_POS.items() if k != "vqa_correct"}  # legacy falls back to vqa_acc_score
SETTINGS = [KNOBS, {**KNOBS, "use_logprob": True}]  # legacy reads logprob_score only with use_logprob


def _moves(mode, cands, settings, change) -> bool:
    """Whether ``change(candidate, knobs) -> (candidate, knobs)`` alters the reward anywhere."""
    for c in cands:
        for k in settings:
            c2, k2 = change(c, k)
            if compute_reward(c2, mode, **k2) != compute_reward(c, mode, **k):
                return True
    return False


@pytest.mark.parametrize("mode", sorted(REWARD_MODE_SPECS))
def test_each_mode_reads_exactly_its_declared_knobs(mode):
    for knob in REWARD_KNOBS:
        moved = _moves(mode, [FULL_POS, FULL_NEG], SETTINGS, lambda c, k: (c, {**k, knob: CHANGED[knob]}))
        assert moved == (knob in REWARD_MODE_SPECS[mode].reads), (mode, knob)


@pytest.mark.parametrize("mode", sorted(REWARD_MODE_SPECS))
def test_each_mode_reads_exactly_its_declared_candidate_fields(mode):
    def bump(name):
        def change(c, k):
            value = c.get(name)
            return {**c, name: 1 - value if name == "vqa_correct" and value is not None else (value or 0) + 0.25}, k
        return change

    every = sorted({f for spec in REWARD_MODE_SPECS.values() for f in spec.candidate_fields})
    assert {"vqa_correct", "vqa_acc_score", "vqa_gt_prob", "vqa_rel_score", "logprob_score", "beam_score",
            "info_score"} == set(every)
    spec = REWARD_MODE_SPECS[mode]
    for name in every:
        moved = _moves(mode, [FULL_POS, FULL_NEG, NO_CORRECT], SETTINGS, bump(name))
        # an info_field is read through the group scaling (the info term), not by the per-candidate formula
        assert moved == (name in spec.candidate_fields and name != spec.info_field), (mode, name)


def test_rel_weight_scales_negative_relevance():
    # hard_plus_gtprob_plus_rel, negative, hw=sw=1, rw=0.3: 0 + 0.3 + 0.3·1·0.4 = 0.42
    assert compute_reward(NEG, "hard_plus_gtprob_plus_rel", rel_weight=0.3) == pytest.approx(0.42)


def test_clipping_at_plus_and_minus_five():
    # hard_plus_soft_v2 with hw=3: 0.6 + 2·3·1 = 6.6 -> clipped to 5
    assert compute_reward(POS, "hard_plus_soft_v2", hard_weight=3.0) == 5.0
    # legacy α=1, β=0, quality = beam_score = −7 -> −7 -> clipped to −5
    assert compute_reward({"beam_score": -7.0}, "legacy", reward_alpha=1.0) == -5.0
    # custom clip 2: hard_plus_soft hw=sw=1 on POS = 1.6 (kept), hw=2 -> 2.6 -> 2
    assert compute_reward(POS, "hard_plus_soft", clip=2.0) == pytest.approx(1.6)
    assert compute_reward(POS, "hard_plus_soft", hard_weight=2.0, clip=2.0) == 2.0


def test_missing_fields_count_as_zero_and_balanced_data_gives_accuracy():
    # VQAv2 "balanced" candidates have no vqa_correct: hard_plus_soft = 1·0 + 1·0.6 = 0.6 = acc
    balanced = {"pointer": [3, 7], "vqa_pred_answer": "red", "vqa_acc_score": 0.6}
    assert compute_reward(balanced, "hard_plus_soft") == pytest.approx(0.6)
    # null fields also count as 0: hard01_plus_gtprob = 1·0 + 1·0 = 0
    assert compute_reward({"vqa_correct": None, "vqa_gt_prob": None}, "hard01_plus_gtprob") == 0.0
    # bool correctness works: True -> 1; separated = 2·1 + 1·0 = 2
    assert compute_reward({"vqa_correct": True}, "separated") == 2.0


@settings(max_examples=60, deadline=None)
@given(h=st.sampled_from([0, 1]), s=st.floats(0, 1), hw=st.floats(0, 3), sw=st.floats(0, 3))
def test_separated_equals_hard_plus_soft_v2_for_binary_h(h, s, hw, sw):
    c = {"vqa_correct": h, "vqa_acc_score": s}
    a = compute_reward(c, "separated", hard_weight=hw, soft_weight=sw)
    b = compute_reward(c, "hard_plus_soft_v2", hard_weight=hw, soft_weight=sw)
    assert a == pytest.approx(b, abs=1e-12)


LEGACY = {"vqa_correct": 1, "vqa_acc_score": 0.6, "beam_score": 0.8, "logprob_score": -1.5}


def test_legacy_01_pm1_and_logprob():
    kw = dict(reward_alpha=0.5, reward_beta=2.0)
    # "01": α·beam_score + β·h = 0.5·0.8 + 2·1 = 2.4
    assert compute_reward(LEGACY, "legacy", **kw) == pytest.approx(2.4)
    # use_logprob: quality = −logprob = 1.5 -> 0.5·1.5 + 2·1 = 2.75
    assert compute_reward(LEGACY, "legacy", use_logprob=True, **kw) == pytest.approx(2.75)
    # use_logprob but no logprob_score -> falls back to beam_score: 2.4
    no_lp = {k: v for k, v in LEGACY.items() if k != "logprob_score"}
    assert compute_reward(no_lp, "legacy", use_logprob=True, **kw) == pytest.approx(2.4)
    # "pm1" with h=0: c = 2·0 − 1 = −1 -> 0.4 − 2 = −1.6
    assert compute_reward({**LEGACY, "vqa_correct": 0}, "legacy", correctness_mode="pm1", **kw) == pytest.approx(-1.6)
    # "pm1" without vqa_correct uses acc: c = 2·0.6 − 1 = 0.2 -> 0.4 + 0.4 = 0.8
    no_h = {k: v for k, v in LEGACY.items() if k != "vqa_correct"}
    assert compute_reward(no_h, "legacy", correctness_mode="pm1", **kw) == pytest.approx(0.8)
    # "01" without vqa_correct uses acc: 0.4 + 2·0.6 = 1.6
    assert compute_reward(no_h, "legacy", **kw) == pytest.approx(1.6)
    # nothing present: quality 0 and c 0 in both modes (pm1 does NOT give −1): 0
    assert compute_reward({}, "legacy", correctness_mode="pm1", **kw) == 0.0


def test_hybrid_info_values_min_max_missing_and_all_equal():
    cands = [{"beam_score": 0.6}, {"beam_score": 5.0}, {}]
    # raw = [0.6 (beam_score), 0.2 (InfoScore wins over beam_score 5.0), 0.3]; lo 0.2, hi 0.6
    # -> [(0.6−0.2)/0.4, 0, (0.3−0.2)/0.4] = [1, 0, 0.25]
    assert hybrid_info_values(cands, [None, 0.2, 0.3]) == pytest.approx([1.0, 0.0, 0.25])
    # third missing (no InfoScore, no beam_score) -> 0.0; raw [0.6, 0.2] -> [1, 0]
    assert hybrid_info_values(cands, [None, 0.2, None]) == pytest.approx([1.0, 0.0, 0.0])
    # all present values equal -> 0.5 each, missing still 0.0
    assert hybrid_info_values(cands, [0.4, 0.4, None]) == [0.5, 0.5, 0.0]
    # nothing present -> all 0.0
    assert hybrid_info_values([{}, {}], [None, None]) == [0.0, 0.0]
    with pytest.raises(LeverPlusInputError, match="2 candidates but 3 InfoScores"):
        hybrid_info_values([{}, {}], [0.1, 0.2, 0.3])


def test_hybrid_reward_on_a_three_candidate_group():
    group = [{"vqa_correct": 1, "vqa_acc_score": 1.0}, {"vqa_correct": 0, "vqa_acc_score": 0.0},
             {"vqa_correct": 1, "vqa_acc_score": 0.6}]
    info = [1.0, 0.0, 0.25]
    got = [compute_reward(c, "hybrid", info=i) for c, i in zip(group, info)]
    # info_weight 0.5, corr = separated (hw=sw=1): [2+1, 0, 2+0.6] = [3, 0, 2.6]
    # -> [0.5·1 + 0.5·3, 0, 0.5·0.25 + 0.5·2.6] = [2.0, 0.0, 1.425]
    assert got == pytest.approx([2.0, 0.0, 1.425])
    # hw=2, sw=0.5, info_weight=0.2 on the third: corr = 4 + 0.3 = 4.3 -> 0.2·0.25 + 0.8·4.3 = 0.05 + 3.44 = 3.49
    r = compute_reward(group[2], "hybrid", hard_weight=2.0, soft_weight=0.5, info=0.25, info_weight=0.2)
    assert r == pytest.approx(3.49)


def test_hybrid_errors():
    with pytest.raises(LeverPlusInputError, match="group_info_scores"):
        compute_reward(POS, "hybrid")
    with pytest.raises(LeverPlusInputError, match="hybrid_info_values"):
        compute_reward(POS, "hybrid_legacy")
    with pytest.raises(LeverPlusInputError, match=r"\[0, 1\]"):
        compute_reward(POS, "hybrid", info=1.5)
    with pytest.raises(LeverPlusInputError, match="info_weight"):
        compute_reward(POS, "hybrid", info=0.5, info_weight=2.0)


def test_unknown_mode_lists_the_valid_ones():
    with pytest.raises(LeverPlusInputError) as err:
        compute_reward(POS, "hard_plus_sfot")
    msg = str(err.value)
    assert "unknown reward mode 'hard_plus_sfot'" in msg and err.value.field == "reward_mode"
    for mode in ("hard_plus_soft", "separated", "legacy", "hybrid", "hard_plus_gtprob_plus_rel"):
        assert mode in msg


def test_bad_field_and_option_errors_name_the_field():
    with pytest.raises(LeverPlusInputError) as err:
        compute_reward({"vqa_acc_score": "high"}, "hard_plus_soft")
    assert err.value.field == "vqa_acc_score"
    with pytest.raises(LeverPlusInputError, match="not finite"):
        compute_reward({"vqa_gt_prob": float("nan")}, "hard01_plus_gtprob")
    with pytest.raises(LeverPlusInputError, match="correctness mode"):
        compute_reward(POS, "legacy", correctness_mode="bool")
    with pytest.raises(LeverPlusInputError, match="must be a dict"):
        compute_reward([1, 0.6], "hard_plus_soft")


def test_register_reward_adds_a_declared_mode_and_rejects_duplicates(monkeypatch):
    name = "test_only_triple_acc"
    monkeypatch.setitem(REWARD_MODE_SPECS, name, RewardModeSpec(("soft_weight",), ("vqa_acc_score",)))
    try:
        @register_reward(name)
        def triple(c, *, soft_weight):
            return 3.0 * soft_weight * float(c.get("vqa_acc_score") or 0)

        # 3·1·0.6 = 1.8 ; 3·1·2 = 6 -> clipped to 5
        assert compute_reward(POS, name) == pytest.approx(1.8)
        assert compute_reward({"vqa_acc_score": 2.0}, name) == 5.0
        with pytest.raises(LeverPlusInputError, match="registered twice"):
            register_reward(name)(triple)
    finally:
        REWARD_MODES.pop(name, None)


def test_register_reward_refuses_an_undeclared_mode_and_a_function_that_reads_other_knobs(monkeypatch):
    with pytest.raises(LeverPlusInputError, match="not declared"):
        register_reward("test_only_undeclared")(lambda c, *, soft_weight: 0.0)
    name = "test_only_mismatch"
    monkeypatch.setitem(REWARD_MODE_SPECS, name, RewardModeSpec(("soft_weight",), ("vqa_acc_score",)))
    with pytest.raises(LeverPlusInputError, match="hard_weight"):
        register_reward(name)(lambda c, *, hard_weight, soft_weight: 0.0)
    assert name not in REWARD_MODES


# ---------------------------------------------------------------------------------------------------
# normalize_group
# ---------------------------------------------------------------------------------------------------


def test_z_score_by_hand():
    # r = [1,2,3,6]: μ = 3, dev = [−2,−1,0,3], Σdev² = 14, unbiased σ = sqrt(14/3) = 2.160247
    # z = dev/σ = [−0.925820, −0.462910, 0, 1.388730]
    r = torch.tensor([1.0, 2.0, 3.0, 6.0])
    expected = torch.tensor([-0.925820, -0.462910, 0.0, 1.388730])
    assert torch.allclose(normalize_group(r, "z_score"), expected, atol=1e-5)
    # clamp 1.0 cuts the last entry only
    assert torch.allclose(normalize_group(r, "z_score_clamp", clamp=1.0),
                          torch.tensor([-0.925820, -0.462910, 0.0, 1.0]), atol=1e-5)


def test_z_score_clamp_default_three():
    # 16 zeros and one 1: μ = 1/17, Σdev² = 16/289 + 256/289 = 16/17, σ² = (16/17)/16 = 1/17
    # top z = (16/17)·sqrt(17) = 16/sqrt(17) = 3.8806 -> clamped to 3; others −1/sqrt(17) = −0.242536
    r = torch.zeros(17)
    r[5] = 1.0
    out = normalize_group(r)  # default method z_score_clamp, clamp 3
    assert out[5].item() == pytest.approx(3.0)
    assert out[0].item() == pytest.approx(-1 / math.sqrt(17), abs=1e-6)
    assert normalize_group(r, "z_score")[5].item() == pytest.approx(16 / math.sqrt(17), abs=1e-5)


@pytest.mark.parametrize("method", ["z_score", "z_score_clamp"])
def test_zero_sigma_and_single_member_return_raw(method):
    # σ = 0 -> raw rewards unchanged, and NOT clamped even when beyond ±3 (reference behaviour)
    assert normalize_group(torch.tensor([0.5, 0.5, 0.5]), method).tolist() == [0.5, 0.5, 0.5]
    assert normalize_group(torch.tensor([7.0, 7.0]), method).tolist() == [7.0, 7.0]
    # G = 1: unbiased σ would be NaN; raw value, no NaN
    out = normalize_group(torch.tensor([2.5]), method)
    assert out.tolist() == [2.5]


def test_rank_normalize_with_ties_and_single():
    # r = [0.5, 2.0, 0.5, −1.0]: descending stable order = idx1 (rank 0), idx0 (1), idx2 (2), idx3 (3)
    # 1 − 2·rank/3 -> idx0: 1/3, idx1: 1, idx2: −1/3, idx3: −1
    out = normalize_group(torch.tensor([0.5, 2.0, 0.5, -1.0]), "rank_normalize")
    assert torch.allclose(out, torch.tensor([1 / 3, 1.0, -1 / 3, -1.0]))
    assert normalize_group(torch.tensor([4.0]), "rank_normalize").tolist() == [0.0]


def test_none_returns_a_new_float_tensor_and_int_input_works():
    r = torch.tensor([1.0, 5.0])
    out = normalize_group(r, "none")
    out[0] = 99.0
    assert r.tolist() == [1.0, 5.0]  # input untouched
    # int input: [1,2,3] -> μ 2, σ 1 -> [−1, 0, 1] as floats
    z = normalize_group(torch.tensor([1, 2, 3]), "z_score")
    assert z.is_floating_point() and z.tolist() == [-1.0, 0.0, 1.0]


def test_normalize_errors():
    with pytest.raises(LeverPlusInputError) as err:
        normalize_group(torch.tensor([1.0, 2.0]), "minmax")
    for m in NORMALIZE_METHODS:
        assert m in str(err.value)
    with pytest.raises(LeverPlusInputError, match="shape"):
        normalize_group(torch.zeros(2, 3))
    with pytest.raises(LeverPlusInputError, match="NaN"):
        normalize_group(torch.tensor([1.0, float("nan")]))


group_st = st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=12)


@settings(max_examples=80, deadline=None)
@given(values=group_st)
def test_z_score_has_mean_zero_std_one(values):
    r = torch.tensor(values, dtype=torch.float64)
    if r.std() <= 1e-6:
        return
    z = normalize_group(r, "z_score")
    assert abs(z.mean().item()) < 1e-9
    assert z.std().item() == pytest.approx(1.0, abs=1e-9)


@settings(max_examples=80, deadline=None)
@given(values=group_st)
def test_rank_output_spans_minus_one_to_one(values):
    r = torch.tensor(values, dtype=torch.float64)
    out = normalize_group(r, "rank_normalize")
    assert out.min().item() == pytest.approx(-1.0) and out.max().item() == pytest.approx(1.0)
    assert ((out >= -1) & (out <= 1)).all()
    # the best member (first of tied maxima, as argmax) gets +1
    assert out[r.argmax()].item() == pytest.approx(1.0)


@settings(max_examples=80, deadline=None)
@given(values=st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=10, unique=True),
       data=st.data())
def test_normalisation_is_permutation_equivariant(values, data):
    r = torch.tensor(values, dtype=torch.float64)
    perm = torch.tensor(data.draw(st.permutations(range(len(values)))))
    for method in NORMALIZE_METHODS:  # unique values, so rank ties cannot break equivariance
        assert torch.allclose(normalize_group(r[perm], method), normalize_group(r, method)[perm], atol=1e-9)


# ---------------------------------------------------------------------------------------------------
# sequence_diversity
# ---------------------------------------------------------------------------------------------------


def test_sequence_diversity_by_hand():
    # rows [1,0],[0,1],[1,1]: cosines (0,1)=0, (0,2)=1/√2, (1,2)=1/√2; mean = √2/3 = 0.471405 -> 1 − 0.471405
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert sequence_diversity(e) == pytest.approx(1 - math.sqrt(2) / 3)
    assert sequence_diversity(torch.tensor([[2.0, 0.0], [1.0, 0.0]])) == pytest.approx(0.0)  # same direction
    assert sequence_diversity(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(2.0)  # cos −1
    assert sequence_diversity(torch.ones(1, 4)) == 0.0  # S < 2
    with pytest.raises(LeverPlusInputError):
        sequence_diversity(torch.ones(4))
