"""PointerSelector (reference#model) and the model-free decoders (reference#rldata-candidates)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leverplus.errors import LeverPlusInputError
from leverplus.model.decoding import Decoded, beam_search, sample_sequences
from leverplus.model.pointer import PointerSelector


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def tiny_model(gate: bool, gate_bias: float = 0.0) -> PointerSelector:
    """d = H = 2, no attention layer, identity projections: encode() is just L2-normalisation."""
    m = PointerSelector(2, hidden_dim=2, num_layers=0, dropout=0.0, use_query_update_gate=gate)
    with torch.no_grad():
        m.query_proj.weight.copy_(torch.eye(2))
        m.cand_proj.weight.copy_(torch.eye(2))
        if gate:
            m.query_update_gate.weight.zero_()
            m.query_update_gate.bias.fill_(gate_bias)
    return m.eval()


# the tiny pool: q = [1, 0]; items [1,0], [0,1], [0.6,0.8] (all unit length already)
TQ = torch.tensor([[1.0, 0.0]])
TC = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]])


def random_inputs(B=3, K=7, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = unit(torch.randn(B, d, generator=g, dtype=dtype))
    C = unit(torch.randn(B, K, d, generator=g, dtype=dtype))
    return q, C


# ----------------------------------------------------------------------------- architecture


def test_parameter_names_shapes_and_count_match_the_reference():
    m = PointerSelector(512, hidden_dim=256, num_layers=1)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "input_proj.weight": (256, 512),
        "cross_attn_layers.0.in_proj_weight": (768, 256),
        "cross_attn_layers.0.in_proj_bias": (768,),
        "cross_attn_layers.0.out_proj.weight": (256, 256),
        "cross_attn_layers.0.out_proj.bias": (256,),
        "attn_norms.0.weight": (256,),
        "attn_norms.0.bias": (256,),
        "query_proj.weight": (256, 256),
        "cand_proj.weight": (256, 256),
        "query_update_gate.weight": (256, 512),
        "query_update_gate.bias": (256,),
    }
    # 512*256 + 3*256*256 + 768 + 256*256 + 256 + 2*256 + 2*256*256 = 525,824; gate 512*256 + 256 = 131,328
    assert sum(p.numel() for p in m.parameters()) == 657_152
    no_gate = PointerSelector(512, hidden_dim=256, use_query_update_gate=False)
    assert len(no_gate.state_dict()) == 9
    assert sum(p.numel() for p in no_gate.parameters()) == 525_824
    assert "temperature" not in m.state_dict() and m.temperature == 0.1
    assert m.config["num_layers"] == 1 and m.config["d_model"] == 512


def test_identity_input_projection_when_d_equals_hidden_and_reference_init():
    m = PointerSelector(8, hidden_dim=8, num_layers=3)
    assert isinstance(m.input_proj, torch.nn.Identity)
    assert "input_proj.weight" not in m.state_dict()
    assert [k for k in m.state_dict() if k.endswith("in_proj_bias")] == [
        f"cross_attn_layers.{i}.in_proj_bias" for i in range(3)
    ]
    big = PointerSelector(16, hidden_dim=128)
    noise = big.query_proj.weight.detach() - torch.eye(128)
    assert 0.008 < noise.std().item() < 0.012  # I + N(0, 0.01²)
    assert torch.all(big.query_update_gate.bias == 0)


# ----------------------------------------------------------------------------- hand-computed forward


def test_tiny_model_step_logits_and_log_probs_by_hand():
    m = tiny_model(gate=False)
    logits, preds = m(TQ, TC, shot_num=2)
    # step 0: s = [1,0]; s·ĉ = [1, 0, 0.6]; / 0.1 -> [10, 0, 6]; argmax 0
    # step 1: item 0 chosen -> -100 (finite): [-100, 0, 6]; argmax 2
    assert torch.allclose(logits[0], torch.tensor([[10.0, 0.0, 6.0], [-100.0, 0.0, 6.0]]), atol=1e-5)
    assert preds.tolist() == [[0, 2]]
    # log π([0,2]) = (10 - log(e^10 + e^0 + e^6)) + (6 - log(e^-100 + e^0 + e^6))
    #   10 - log 22430.8946 = -log(1 + 404.4288/22026.4658) = -log 1.018361 = -0.018195
    #    6 - log 404.4288   = -log(1 + 1/403.4288)          = -log 1.002479 = -0.002476   -> total -0.020671
    expected = (10 - math.log(math.exp(10) + 1 + math.exp(6))) + (6 - math.log(math.exp(-100) + 1 + math.exp(6)))
    assert expected == pytest.approx(-0.020671, abs=1e-5)
    lp = m.sequence_log_probs(TQ, TC, torch.tensor([[[0, 2]]]))
    assert lp.item() == pytest.approx(expected, abs=1e-5)
    # an off-policy member [1, 0]: step 0 -> 0 - log 22430.895; step 1 logits [10, -100, 6] -> 10 - log(e^10 + e^6)
    off = (0 - math.log(math.exp(10) + 1 + math.exp(6))) + (10 - math.log(math.exp(10) + math.exp(6)))
    lp2 = m.sequence_log_probs(TQ, TC, torch.tensor([[[0, 2], [1, 0]]]))
    assert lp2[0, 1].item() == pytest.approx(off, abs=1e-4)


def test_gate_update_changes_the_state_as_documented():
    # gate weight 0, bias 0 -> g = σ(0) = 0.5; after picking item 1 ([0,1]):
    # s1 = normalize(0.5*[1,0] + 0.5*[0,1]) = [1/√2, 1/√2]
    on = tiny_model(gate=True, gate_bias=0.0)
    s1 = on.gate_update(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert torch.allclose(s1, torch.tensor([1.0, 1.0]) / math.sqrt(2), atol=1e-6)
    # step-1 logits with label 1 at step 0: item0 (1/√2)/0.1 = 7.0711; item1 chosen -100; item2 (1.4/√2)/0.1 = 9.8995
    logits_on, _ = on(TQ, TC, torch.tensor([[1, 2]]))
    assert torch.allclose(logits_on[0, 1], torch.tensor([7.0711, -100.0, 9.8995]), atol=1e-4)
    # gate off: the state stays [1,0]: step-1 logits [10, -100, 6]
    logits_off, _ = tiny_model(gate=False)(TQ, TC, torch.tensor([[1, 2]]))
    assert torch.allclose(logits_off[0, 1], torch.tensor([10.0, -100.0, 6.0]), atol=1e-5)
    # bias 2 -> g = σ(2) = 0.880797: s1 = normalize([0.880797, 0.119203]) = [0.99095, 0.13411]
    strong = tiny_model(gate=True, gate_bias=2.0)
    s1 = strong.gate_update(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert torch.allclose(s1, torch.tensor([0.99095, 0.13411]), atol=1e-4)
    # gate off -> gate_update is the identity
    assert torch.equal(tiny_model(gate=False).gate_update(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])),
                       torch.tensor([1.0, 0.0]))


def test_encode_matches_the_spec_formula_with_one_attention_layer():
    torch.manual_seed(1)
    m = PointerSelector(3, hidden_dim=3, num_layers=1, dropout=0.0).eval()
    with torch.no_grad():  # q, k, v and output projections = identity, zero biases
        attn = m.cross_attn_layers[0]
        attn.in_proj_weight.copy_(torch.cat([torch.eye(3)] * 3))
        attn.in_proj_bias.zero_()
        attn.out_proj.weight.copy_(torch.eye(3))
        attn.out_proj.bias.zero_()
    q = torch.tensor([[1.0, 2.0, 0.5]])
    C = torch.tensor([[[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]])
    state, cand_hat = m.encode(q, C)
    # attention weights softmax(q·c_k / √3): q·c = [2, 1.5]
    w = torch.softmax(torch.tensor([2.0, 1.5]) / math.sqrt(3), 0)
    h = w[0] * C[0, 0] + w[1] * C[0, 1] + q[0]  # residual
    h = (h - h.mean()) / torch.sqrt(h.var(unbiased=False) + 1e-5)  # LayerNorm(weight 1, bias 0), post-norm
    assert torch.allclose(state[0], unit(m.query_proj.weight @ h), atol=1e-5)
    assert torch.allclose(cand_hat[0], unit(C[0] @ m.cand_proj.weight.T), atol=1e-6)
    # a padded third candidate (far away) is not attended to
    C_pad = torch.cat([C, torch.full((1, 1, 3), 5.0)], dim=1)
    state_pad, _ = m.encode(q, C_pad, torch.tensor([[True, True, False]]))
    assert torch.allclose(state_pad, state, atol=1e-6)


# ----------------------------------------------------------------------------- masking invariants


_PROP_MODEL = PointerSelector(6, hidden_dim=4, dropout=0.0).eval()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_masking_never_repeats_and_padding_is_never_chosen(data):
    K = data.draw(st.integers(1, 8), label="K")
    n_valid = data.draw(st.integers(1, K), label="n_valid")
    S = data.draw(st.integers(1, n_valid), label="S")
    seed = data.draw(st.integers(0, 10_000), label="seed")
    q, C = random_inputs(B=1, K=K, d=6, seed=seed)
    mask = torch.zeros(1, K, dtype=torch.bool)
    mask[0, torch.randperm(K, generator=torch.Generator().manual_seed(seed))[:n_valid]] = True
    valid_ids = mask[0].nonzero().flatten().tolist()
    logits, preds = _PROP_MODEL(q, C, shot_num=S, cand_mask=mask)
    assert len(set(preds[0].tolist())) == S and set(preds[0].tolist()) <= set(valid_ids)
    assert torch.all(logits[0][:, ~mask[0]] == float("-inf"))
    # teacher forcing on random distinct valid labels: chosen items sit at exactly -100, never predicted
    labels = data.draw(st.permutations(valid_ids), label="labels")[:S]
    logits, preds = _PROP_MODEL(q, C, torch.tensor([labels]), cand_mask=mask)
    for t in range(S):
        assert torch.all(logits[0, t, labels[:t]] == -100.0)
        assert preds[0, t].item() not in labels[:t] and mask[0, preds[0, t]]


def test_greedy_never_repeats_even_when_minus_100_would_win_the_argmax():
    m = tiny_model(gate=False)
    m.temperature = 0.001
    q = torch.tensor([[1.0, 0.0]])
    C = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [-0.6, -0.8]]])
    # step 1 logits: [-100 (chosen), -1000, -600]; a plain argmax would repeat item 0
    assert m.greedy(q, C, 2).tolist() == [[0, 2]]
    with pytest.raises(LeverPlusInputError, match="valid entries"):
        m.greedy(q, C, 2, cand_mask=torch.tensor([[True, False, False]]))


def test_teacher_forcing_on_the_greedy_path_reproduces_greedy_logits_and_log_probs():
    torch.manual_seed(3)
    m = PointerSelector(16, hidden_dim=8, num_layers=2).eval()
    q, C = random_inputs(B=4, K=9, d=16, seed=3)
    g_logits, g_preds = m(q, C, shot_num=4)
    tf_logits, tf_preds = m(q, C, g_preds)
    assert torch.equal(tf_preds, g_preds)
    assert torch.allclose(tf_logits, g_logits, atol=1e-6)
    max_logits = g_logits.max(dim=-1).values  # reference predict(): the chosen item's logit is the step max
    assert torch.allclose(torch.gather(g_logits, 2, g_preds[..., None]).squeeze(-1), max_logits)
    expected = (max_logits - torch.logsumexp(g_logits, dim=-1)).sum(dim=-1)
    lp = m.sequence_log_probs(q, C, g_preds[:, None, :])
    assert torch.allclose(lp[:, 0], expected, atol=1e-5)


def test_greedy_restores_train_mode_and_ignores_dropout():
    torch.manual_seed(4)
    m = PointerSelector(16, hidden_dim=8, dropout=0.5).train()
    q, C = random_inputs(B=2, K=6, d=16, seed=4)
    a, b = m.greedy(q, C, 3), m.greedy(q, C, 3)
    assert torch.equal(a, b) and m.training


# ----------------------------------------------------------------------------- group log-probs


def test_sequence_log_probs_with_padded_pools_equals_per_query_and_per_member():
    torch.manual_seed(5)
    m = PointerSelector(16, hidden_dim=8, num_layers=2).double().eval()
    sizes = [7, 4, 5]
    q, C = random_inputs(B=3, K=7, d=16, seed=5, dtype=torch.float64)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    for b, k in enumerate(sizes):
        mask[b, :k] = True
        C[b, k:] = 0.0  # padding content must not matter either way
    g = torch.Generator().manual_seed(5)
    labels = torch.stack([torch.stack([torch.randperm(k, generator=g)[:3] for _ in range(4)]) for k in sizes])
    lp = m.sequence_log_probs(q, C, labels, mask)
    assert lp.shape == (3, 4) and torch.all(lp < 0)
    for b, k in enumerate(sizes):
        alone = m.sequence_log_probs(q[b : b + 1], C[b : b + 1, :k], labels[b : b + 1])
        assert torch.allclose(lp[b], alone[0], atol=1e-6)
        for i in range(4):  # each member alone, via the plain teacher-forced forward
            logits, _ = m(q[b : b + 1], C[b : b + 1, :k], labels[b, i][None])
            ref = torch.log_softmax(logits[0], -1).gather(1, labels[b, i][:, None]).sum()
            assert lp[b, i].item() == pytest.approx(ref.item(), abs=1e-6)
    # padding also never changes sequence_nll (with smoothing over the valid entries only)
    nll = m.sequence_nll(q, C, labels, mask, label_smoothing=0.1)
    alone = m.sequence_nll(q[1:2], C[1:2, :4], labels[1:2], label_smoothing=0.1)
    assert torch.allclose(nll[1], alone[0], atol=1e-6)


def test_sequence_nll_equals_reference_cross_entropy_and_minus_log_prob():
    torch.manual_seed(6)
    m = PointerSelector(16, hidden_dim=8).eval()
    q, C = random_inputs(B=2, K=6, d=16, seed=6)
    labels = torch.tensor([[[0, 1, 2], [5, 4, 3]], [[2, 0, 1], [1, 3, 5]]])
    lp = m.sequence_log_probs(q, C, labels)
    assert torch.allclose(m.sequence_nll(q, C, labels), -lp, atol=1e-6)
    # reference: Σ_t cross_entropy(clamp(logits_t, min=-100), a_t, label_smoothing=0.1), per member
    nll = m.sequence_nll(q, C, labels, label_smoothing=0.1)
    for b in range(2):
        for i in range(2):
            logits, _ = m(q[b : b + 1], C[b : b + 1], labels[b, i][None])
            ce = F.cross_entropy(logits[0].clamp(min=-100), labels[b, i], label_smoothing=0.1, reduction="sum")
            assert nll[b, i].item() == pytest.approx(ce.item(), abs=1e-5)


def test_label_smoothing_by_hand_on_the_tiny_model():
    m = tiny_model(gate=False)
    # member [0, 2]; step 0 logits [10, 0, 6], step 1 [-100, 0, 6]; ε = 0.1, K = 3
    # CE_t = 0.9 * (-log p_a) + 0.1 * mean_k(-log p_k)
    lse0 = math.log(math.exp(10) + 1 + math.exp(6))
    lse1 = math.log(math.exp(-100) + 1 + math.exp(6))
    ce0 = 0.9 * (lse0 - 10) + 0.1 * ((lse0 - 10) + (lse0 - 0) + (lse0 - 6)) / 3
    ce1 = 0.9 * (lse1 - 6) + 0.1 * ((lse1 + 100) + (lse1 - 0) + (lse1 - 6)) / 3
    # ce0 = 0.9*0.018195 + 0.1*(0.018195 + 10.018195 + 4.018195)/3 = 0.016376 + 0.468486 = 0.484862
    # ce1 = 0.9*0.002476 + 0.1*(106.002476 + 6.002476 + 0.002476)/3 = 0.002228 + 3.733581 = 3.735809
    got = m.sequence_nll(TQ, TC, torch.tensor([[[0, 2]]]), label_smoothing=0.1)
    assert got.item() == pytest.approx(ce0 + ce1, abs=1e-4)
    assert ce0 + ce1 == pytest.approx(0.484862 + 3.735809, abs=1e-5)


def test_policy_temperature_scales_unmasked_logits_only():
    m = tiny_model(gate=False)
    logits, _ = m(TQ, TC, torch.tensor([[0, 2]]), policy_temperature=2.0)
    # [10, 0, 6] / 2 = [5, 0, 3]; step 1: [-100 (stays), 0, 3]
    assert torch.allclose(logits[0], torch.tensor([[5.0, 0.0, 3.0], [-100.0, 0.0, 3.0]]), atol=1e-5)
    lp = m.sequence_log_probs(TQ, TC, torch.tensor([[[0, 2]]]), policy_temperature=2.0)
    assert lp.item() == pytest.approx(torch.log_softmax(logits[0], -1)[[0, 1], [0, 2]].sum().item(), abs=1e-6)


@pytest.mark.parametrize("smoothed", [False, True])
def test_per_member_dropout_equals_tiling_the_inputs_bit_for_bit(smoothed):
    """The per-member path projects each query and pool once and tiles the projection; that is exactly the model on
    inputs tiled by hand (one member per row), with the same dropout draws: equal values, and gradients equal up to
    float32 rounding (the input projection's weight gradient sums the members before the product, not after)."""
    m = PointerSelector(32, hidden_dim=16, dropout=0.5, attn_dropout=0.1).train()
    B, G, K = 3, 4, 7
    q, C = random_inputs(B=B, K=K, d=32, seed=5)
    mask = torch.ones(B, K, dtype=torch.bool)
    mask[1, 5:] = False
    g = torch.Generator().manual_seed(2)
    labels = torch.stack([torch.stack([torch.randperm(5, generator=g)[:2] for _ in range(G)]) for _ in range(B)])
    fn = m.sequence_nll if smoothed else m.sequence_log_probs

    def run(tiled: bool):
        m.zero_grad()
        torch.manual_seed(9)
        if tiled:
            out = fn(q.repeat_interleave(G, 0), C.repeat_interleave(G, 0), labels.reshape(B * G, 1, 2),
                     mask.repeat_interleave(G, 0)).reshape(B, G)
        else:
            out = fn(q, C, labels, mask, per_member_dropout=True)
        out.sum().backward()
        return out.detach(), [p.grad.clone() for p in m.parameters()]

    (a, grads_a), (b, grads_b) = run(False), run(True)
    assert torch.equal(a, b)
    for x, y in zip(grads_a, grads_b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6 * float(y.abs().max()))
    assert not torch.allclose(a, a[:, :1].expand(B, G))  # the members did draw masks of their own


def test_shared_encoding_vs_reference_per_member_dropout():
    torch.manual_seed(7)
    m = PointerSelector(16, hidden_dim=8, dropout=0.5).train()
    q, C = random_inputs(B=1, K=6, d=16, seed=7)
    labels = torch.tensor([[[0, 1], [0, 1], [0, 1]]])  # identical members
    shared = m.sequence_log_probs(q, C, labels)
    assert torch.allclose(shared, shared[:, :1].expand(1, 3))  # one dropout mask per query
    per_member = m.sequence_log_probs(q, C, labels, per_member_dropout=True)
    assert not torch.allclose(per_member, per_member[:, :1].expand(1, 3))  # reference: one mask per member
    torch.manual_seed(11)
    a = m.sequence_log_probs(q, C, labels)
    torch.manual_seed(11)
    assert torch.equal(a, m.sequence_log_probs(q, C, labels))  # same seed -> same draw
    a.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_gradients_are_finite_with_padding():
    m = PointerSelector(16, hidden_dim=8).train()
    q, C = random_inputs(B=2, K=5, d=16, seed=8)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    labels = torch.tensor([[[4, 0]], [[2, 1]]])
    nll = m.sequence_nll(q, C, labels, mask, label_smoothing=0.1)
    loss = nll.sum() - m.sequence_log_probs(q, C, labels, mask).sum()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_bad_inputs_raise_clear_errors():
    m = PointerSelector(16, hidden_dim=8)
    q, C = random_inputs(B=1, K=4, d=16)
    with pytest.raises(LeverPlusInputError, match="d_model=16"):
        m(q[:, :8], C[:, :, :8], shot_num=1)
    with pytest.raises(LeverPlusInputError, match="NaN"):
        m(q * float("nan"), C, shot_num=1)
    with pytest.raises(LeverPlusInputError, match=r"\[0, 4\)"):
        m.sequence_log_probs(q, C, torch.tensor([[[0, 4]]]))
    with pytest.raises(LeverPlusInputError, match="padded pool entry"):
        m.sequence_log_probs(q, C, torch.tensor([[[0, 3]]]), torch.tensor([[True, True, True, False]]))
    with pytest.raises(LeverPlusInputError, match="no valid candidate"):
        m(q, C, shot_num=1, cand_mask=torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(LeverPlusInputError, match="distinct items"):
        m(q, C, shot_num=5)


# ----------------------------------------------------------------------------- decoding


# step 1 probabilities [0.5, 0.3, 0.15, 0.05]; step 2 weights per first pick (the prefix item's value is unused)
P1 = [0.5, 0.3, 0.15, 0.05]
P2 = {0: [9.0, 0.2, 0.2, 0.6], 1: [0.9, 9.0, 0.05, 0.05], 2: [0.5, 0.4, 9.0, 0.1], 3: [0.25, 0.25, 0.5, 9.0]}


def table_step(prefix):
    return torch.tensor(P1 if not prefix else P2[prefix[0]]).log()


def test_beam_search_on_a_hand_made_step_function():
    beams = beam_search(table_step, num_items=4, length=2, num_beams=3)
    # step 1 keeps 0 (.5), 1 (.3), 2 (.15). Step 2 joint probabilities:
    # (0,1) .5*.2=.10  (0,2) .10  (0,3) .5*.6=.30  (1,0) .3*.9=.27  (1,2) .015  (1,3) .015
    # (2,0) .15*.5=.075  (2,1) .15*.4=.06  (2,3) .15*.1=.015   (P2 rows without the prefix item sum to 1)
    # top 3: (0,3) .30, (1,0) .27, then the exact tie (0,1)/(0,2) at .10 -> lower id (0,1)
    assert [b.pointer for b in beams] == [(0, 3), (1, 0), (0, 1)]
    assert [b.rank for b in beams] == [0, 1, 2]
    assert [b.logprob for b in beams] == pytest.approx([math.log(0.30), math.log(0.27), math.log(0.10)], abs=1e-6)
    # score = Σ per-step softmax probabilities: .5+.6, .3+.9, .5+.2
    assert [b.score for b in beams] == pytest.approx([1.1, 1.2, 0.7], abs=1e-6)


def test_beam_search_respects_exclude_and_breaks_ties_by_lower_id():
    beams = beam_search(table_step, num_items=4, length=2, num_beams=2, exclude=[0])
    # step 1 over {1,2,3}: [.3,.15,.05]/.5 = [.6,.3,.1] -> beams 1, 2
    # (1,2) .6*.5=.30, (1,3) .30 (exact tie), (2,1) .3*.8=.24, (2,3) .06
    assert [b.pointer for b in beams] == [(1, 2), (1, 3)]
    assert beams[0].logprob == pytest.approx(math.log(0.3), abs=1e-6)
    assert beams[1].score == pytest.approx(0.6 + 0.5, abs=1e-6)
    with pytest.raises(LeverPlusInputError, match="outside the pool"):
        beam_search(table_step, 4, 2, exclude=[4])
    with pytest.raises(LeverPlusInputError, match="length"):
        beam_search(table_step, 4, 4, exclude=[0])


def _hashed_step(K: int, seed: int):
    def step(prefix):
        g = torch.Generator().manual_seed(seed * 1000 + hash(tuple(prefix)) % 997)
        return torch.randn(K, generator=g) * 3

    return step


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(K=st.integers(2, 6), S=st.integers(1, 3), n_ex=st.integers(0, 2), seed=st.integers(0, 999))
def test_exhaustive_beam_search_equals_brute_force_enumeration(K, S, n_ex, seed):
    exclude = list(range(n_ex))
    if S > K - n_ex:
        return
    step = _hashed_step(K, seed)
    allowed = [i for i in range(K) if i not in exclude]
    brute = {}
    for perm in itertools.permutations(allowed, S):
        lp = 0.0
        for t in range(S):
            logits = step(perm[:t]).clone()
            logits[list(exclude) + list(perm[:t])] = float("-inf")
            lp += torch.log_softmax(logits, 0)[perm[t]].item()
        brute[perm] = lp
    beams = beam_search(step, K, S, num_beams=len(brute), exclude=exclude)
    assert {b.pointer for b in beams} == set(brute)
    for b in beams:
        assert len(set(b.pointer)) == S and not set(b.pointer) & set(exclude)
        assert b.logprob == pytest.approx(brute[b.pointer], abs=1e-5)
    assert all(x.logprob >= y.logprob for x, y in zip(beams, beams[1:]))


def test_model_step_fn_beam_one_is_greedy_and_logprob_matches_the_model():
    torch.manual_seed(9)
    m = PointerSelector(16, hidden_dim=8, num_layers=1, dropout=0.5).train()
    q, C = random_inputs(B=1, K=8, d=16, seed=9)
    step = m.step_logits_fn(q[0], C[0])
    assert m.training  # mode restored
    best = beam_search(step, 8, 3, num_beams=1)[0]
    assert best.pointer == tuple(m.greedy(q, C, 3)[0].tolist())
    m.eval()
    lp = m.sequence_log_probs(q, C, torch.tensor([[list(best.pointer)]]))
    assert best.logprob == pytest.approx(lp.item(), abs=1e-5)
    # step logits on a prefix equal the teacher-forced forward logits at that step
    logits, _ = m(q, C, torch.tensor([list(best.pointer)]))
    assert torch.allclose(step(list(best.pointer[:2])), logits[0, 2], atol=1e-5)
    # static_query (reference RL generator, no gate) equals the gate-off model
    static = m.step_logits_fn(q[0], C[0], static_query=True)
    s0 = m.encode(q, C)[0][0]
    expected = (m.encode(q, C)[1][0] @ s0) / 0.1
    expected[[best.pointer[0]]] = -100.0
    assert torch.allclose(static([best.pointer[0]]), expected, atol=1e-5)


def test_sampling_is_seeded_and_follows_the_tempered_softmax():
    probs = torch.tensor([0.5, 0.3, 0.2])
    step = lambda prefix: probs.log()  # noqa: E731
    a = sample_sequences(step, 3, 1, 1.0, 50, torch.Generator().manual_seed(1))
    b = sample_sequences(step, 3, 1, 1.0, 50, torch.Generator().manual_seed(1))
    assert a == b and [d.rank for d in a] == list(range(50))
    draws = sample_sequences(step, 3, 1, 2.0, 4000, torch.Generator().manual_seed(2))
    freq = torch.bincount(torch.tensor([d.pointer[0] for d in draws]), minlength=3).float() / 4000
    # τ = 2: p ∝ p^(1/2) = [.7071, .5477, .4472] / 1.7020 = [.4155, .3218, .2628]
    tempered = torch.tensor([0.4155, 0.3218, 0.2628])
    assert torch.allclose(freq, tempered, atol=0.03)
    d0 = draws[0]
    assert d0.logprob == pytest.approx(math.log(tempered[d0.pointer[0]].item() + 1e-8), abs=1e-3)
    assert d0.score == pytest.approx(tempered[d0.pointer[0]].item(), abs=1e-3)


def test_sampling_without_replacement_exclude_and_uniform_fallback():
    draws = sample_sequences(_hashed_step(5, 0), 5, 3, 1.3, 200, torch.Generator().manual_seed(3), exclude=[2])
    assert all(len(set(d.pointer)) == 3 and 2 not in d.pointer for d in draws)
    # vanished probabilities (all -inf) -> uniform over allowed: log(1/3) + log(1/2) with K=4, one excluded
    dead = lambda prefix: torch.full((4,), float("-inf"))  # noqa: E731
    out = sample_sequences(dead, 4, 2, 1.0, 30, torch.Generator().manual_seed(4), exclude=[1])
    assert all(d.logprob == pytest.approx(math.log(1 / 3) + math.log(1 / 2)) for d in out)
    assert all(1 not in d.pointer and len(set(d.pointer)) == 2 for d in out)
    assert len({d.pointer for d in out}) > 1
    assert isinstance(out[0], Decoded)
    with pytest.raises(LeverPlusInputError, match="temperature"):
        sample_sequences(dead, 4, 2, 0.0, 1, torch.Generator())


@pytest.mark.parametrize("num_heads,bias_scale", [(1, 0.0), (1, 0.3), (4, 0.3)])
def test_factored_attention_equals_nn_multihead_attention(num_heads, bias_scale):
    """The encoder's single-query attention is nn.MultiheadAttention's function on the same parameters."""
    from leverplus.model.pointer import single_query_attention

    torch.manual_seed(3)
    attn = torch.nn.MultiheadAttention(16, num_heads, dropout=0.1, batch_first=True).eval()
    with torch.no_grad():
        attn.in_proj_bias.copy_(torch.randn(48) * bias_scale)
        attn.out_proj.bias.copy_(torch.randn(16) * bias_scale)
    h, c = torch.randn(5, 16), torch.randn(5, 7, 16)
    pad = torch.zeros(5, 7, dtype=torch.bool)
    pad[1, 4:] = True
    pad[3, 1:] = True  # a single valid key
    want, _ = attn(h.unsqueeze(1), c, c, key_padding_mask=pad, need_weights=False)
    got = single_query_attention(attn, h, c, pad)
    assert torch.allclose(got, want.squeeze(1), atol=1e-5)
    # with one valid key the output is out_proj(W_v c_0 + b_v), whatever the other keys hold
    w_v, b_v = attn.in_proj_weight[32:], attn.in_proj_bias[32:]
    assert torch.allclose(got[3], attn.out_proj(c[3, 0] @ w_v.T + b_v), atol=1e-5)
    # gradients flow to every projection (the factored form must stay trainable)
    attn.train()
    single_query_attention(attn, h, c, pad).sum().backward()
    assert attn.in_proj_weight.grad[16:32].abs().sum() > 0 and attn.in_proj_weight.grad[32:].abs().sum() > 0


def test_rand_dropout_keeps_with_probability_1_minus_p_and_rescales():
    from leverplus.model.pointer import RandDropout

    d = RandDropout(0.5).train()
    torch.manual_seed(0)
    x = torch.ones(200_000)
    y = d(x)
    assert set(torch.unique(y).tolist()) == {0.0, 2.0}  # dropped, or kept and scaled by 1/(1-p)
    assert abs(float((y > 0).float().mean()) - 0.5) < 0.01  # keep rate 1 - p (sd 0.0011)
    torch.manual_seed(0)
    assert torch.equal(d(x), y)  # deterministic under the seed
    assert torch.equal(d.eval()(x), x) and torch.equal(RandDropout(0.0).train()(x), x)
    assert torch.equal(RandDropout(1.0).train()(x), torch.zeros_like(x))


@pytest.mark.parametrize("num_heads,gate,d", [(1, True, 6), (2, False, 6), (1, True, 8)])
def test_item_table_path_equals_the_per_pool_eval_path(num_heads, gate, d):
    """Eval on item tables (each item projected once, pools gather rows) computes the same function as projecting
    every pool slot: same log-probs (to float rounding) and the same greedy picks, with padded pools."""
    torch.manual_seed(3)
    model = PointerSelector(d_model=d, hidden_dim=8, num_heads=num_heads, use_query_update_gate=gate, dropout=0.5)
    model.train()  # the indexed methods switch to eval themselves and restore the mode
    emb = torch.randn(30, d)
    sizes = [7, 5, 7, 6]
    pools = [torch.randperm(30)[:k] for k in sizes]
    idx = torch.nn.utils.rnn.pad_sequence(pools, batch_first=True)
    mask = torch.arange(idx.shape[1])[None, :] < torch.tensor(sizes)[:, None]
    cand = emb[idx] * mask[..., None].float()
    q = torch.randn(4, d)
    labels = torch.stack([torch.stack([torch.randperm(k)[:3] for _ in range(5)]) for k in sizes])  # [4, 5, 3]
    table = model.item_table(emb)
    got = model.sequence_log_probs_indexed(q, idx, labels, table, mask)
    model.eval()
    want = model.sequence_log_probs(q, cand, labels, mask)
    assert torch.allclose(got, want, atol=1e-5)
    model.train()
    assert torch.equal(model.greedy_indexed(q, idx, 3, table, mask), model.greedy(q, cand, 3, mask))
    assert model.training  # restored
    with pytest.raises(LeverPlusInputError, match=r"pool ids must lie in \[0, 30\)"):
        model.greedy_indexed(q, idx + 30, 2, table, mask)
    with pytest.raises(LeverPlusInputError, match="NaN or inf"):
        model.item_table(torch.full((3, d), float("nan")))


def test_rand_dropout_quantises_p_to_16_bits_and_stays_unbiased():
    from leverplus.model.pointer import RandDropout

    torch.manual_seed(1)
    x = torch.ones(400_000)
    y = RandDropout(0.1).train()(x)
    q = round(0.1 * 65536) / 65536  # 0.10000610...: the drop probability actually used
    kept = y > 0
    assert abs(float(kept.float().mean()) - (1 - q)) < 0.003  # sd 0.0005
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - q)))  # scale 1/(1-q): E[y] = x exactly
    assert abs(float(y.mean()) - 1.0) < 0.005
    odd = torch.ones(3, 5, 7)  # numel not a multiple of 4
    assert odd.shape == RandDropout(0.5).train()(odd).shape
    assert torch.equal(RandDropout(0.99999999).train()(x), torch.zeros_like(x))  # rounds to p = 1
