"""The simulated world: formulas (hand-computed), effect signs, file formats, determinism, caching."""

from __future__ import annotations

import ast
import inspect
import json
import math
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from leverplus.config.sim_params import GENERATOR_VERSION, SimParams, params_hash
from leverplus.data.formats.beam_json import read_beam_json
from leverplus.data.formats.embeddings import read_embeddings
from leverplus.data.formats.rl_json import read_rl_json
from leverplus.datagen.scorers.base import SCORERS
from leverplus.errors import LeverPlusInputError
from leverplus.evaluation.vqa_metric import (
    fallback_match,
    gt_prob_formula,
    normalize_answer,
    vqa_accuracy,
    vqa_postprocess,
)
from leverplus.sim import generate as gen
from leverplus.sim import scorer as sim_scorer
from leverplus.sim.lvlm import SimLVLM, hash_uniform
from leverplus.sim.world import VOCABULARY, World, surface_variants

SMALL = dict(num_train=240, num_anchors=40, num_val=12, num_test=15, candidate_num=16, fallback_fraction=0.25)
RL_FIELDS = {"pointer", "pointer_global", "pointer_pos", "gen_method", "beam_rank", "beam_score", "logprob_score",
             "temperature", "similarity_score", "vqa_raw_generation", "vqa_pred_answer", "vqa_correct",
             "vqa_acc_score", "vqa_gt_prob", "vqa_rel_token_f1", "vqa_rel_edit_sim", "vqa_rel_score",
             "info_score", "vqa_eval_mode", "eval_split_used", "eval_failed"}


@pytest.fixture(scope="module")
def small_params() -> SimParams:
    return SimParams(**SMALL)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, small_params):
    return gen.generate_world_data(small_params, tmp_path_factory.mktemp("world_a"))


@pytest.fixture(scope="module")
def default_world():
    w = World(SimParams())
    return w, SimLVLM(w)


# ------------------------------------------------------------------------------------------------ params


def test_params_hash_tracks_every_parameter_and_ignores_int_float_spelling():
    a = SimParams()
    assert params_hash(a) == params_hash(SimParams())
    assert params_hash(a) != params_hash(SimParams(seed=1))
    assert params_hash(a) != params_hash(SimParams(temps=[1.0, 1.5]))
    assert params_hash(a) != params_hash(SimParams(vqa_normalization="lever_plus"))  # the RL scores differ
    assert params_hash(SimParams(recency=1)) == params_hash(SimParams(recency=1.0))
    assert len(params_hash(a)) == 16 and GENERATOR_VERSION


def test_params_validation_names_the_field():
    with pytest.raises(LeverPlusInputError, match="data.sim.candidate_num"):
        SimParams(num_train=20, num_anchors=5, candidate_num=64)
    with pytest.raises(LeverPlusInputError, match="data.sim.answer_type_probs"):
        SimParams(answer_type_probs=[0.5, 0.5])
    with pytest.raises(LeverPlusInputError, match="data.sim.vqa_normalization"):
        SimParams(vqa_normalization="lavis")
    with pytest.raises(LeverPlusInputError, match="unknown simulation parameter"):
        SimParams.from_mapping({"seed": 1, "num_trian": 5})
    assert SimParams.from_mapping({"seed": 3, "temps": (1.0,)}).temps == [1.0]


# ------------------------------------------------------------------------------------------------ answers


def test_surface_variants_all_normalise_to_a_canonical_fixed_point():
    for answer_type, vocab in VOCABULARY.items():
        for canonical in vocab:
            assert normalize_answer(canonical) == canonical
            forms = surface_variants(canonical, answer_type)
            assert forms[0] == canonical and len(set(forms)) == len(forms) >= 4
            for form in forms:
                assert normalize_answer(form) == canonical, (answer_type, form)
    assert "two" in surface_variants("2", "number") and "a dog" in surface_variants("dog", "object")
    assert "cant tell" in surface_variants("can't tell", "other")


def test_gt_lists_exercise_surface_variants_and_alternatives(default_world):
    w, _ = default_world
    gts = w.items("train").gt_answers
    assert all(len(g) == 10 for g in gts)
    not_identical_lower = [g for g in gts if len({a.lower() for a in g}) > 1]
    assert len(not_identical_lower) > 0.3 * len(gts)
    variants = [a for g in gts for a in g if a not in w.class_of]  # raw spellings, not canonical
    assert len(variants) > 0.05 * 10 * len(gts)
    # the canonical answer is the majority class of every list
    for q in range(200):
        counts = Counter(w.class_of[normalize_answer(a)] for a in gts[q])
        assert counts.most_common(1)[0][0] == w.items("train").answer_class[q]


def test_gt_prob_formula_by_hand():
    # unique strings: "2" x4 -> min(4/3,1)=1; "two" x1 -> 1/3; "3" x1 -> 1/3
    # 1*0.5 + (1/3)*0.5 + (1/3)*0.2 = 0.5 + 0.166667 + 0.066667 = 0.733333
    probs = {"2": 0.5, "two": 0.5, "3": 0.2}
    got = gt_prob_formula(["2", "2", "2", "2", "two", "3"], probs.__getitem__)
    assert got == pytest.approx(0.7333333333)


# ------------------------------------------------------------------------------------------------ p_correct


def _designed_world():
    """A world whose first items are overwritten with hand-picked latent vectors (latent_dim 4).

    val query 0: z_q = e1, base 0, type 0.  train 0: e1 (type 0); 1: e2 (type 0); 2: normalize(e1 + 0.2 e2)
    (type 0); 3: e1 with type 1; 4: e3 (type 0).
    """
    w = World(SimParams(num_train=60, num_anchors=5, num_val=3, num_test=3, candidate_num=8, latent_dim=4,
                        answer_types=["yes/no", "number"], answer_type_probs=[0.5, 0.5]))
    e = np.eye(4)
    tr, va = w.splits["train"], w.splits["val"]
    va.latent[0], va.base[0], va.answer_type[0] = e[0], 0.0, 0
    tr.latent[0], tr.answer_type[0] = e[0], 0
    tr.latent[1], tr.answer_type[1] = e[1], 0
    tr.latent[2], tr.answer_type[2] = (e[0] + 0.2 * e[1]) / math.sqrt(1.04), 0
    tr.latent[3], tr.answer_type[3] = e[0], 1
    tr.latent[4], tr.answer_type[4] = e[2], 0
    return w, SimLVLM(w)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_p_correct_formula_by_hand():
    _, m = _designed_world()
    # defaults: a_fmt .15, a_rel 1.1, a_type .35, recency .7, rho .6, s0 .6, H_max 2
    # u(train 0) = .15 + 1.1*1 + .35*1 = 1.6 ; u(train 1) = .15 + 1.1*0 + .35*1 = 0.5
    # pair cos(e1, e2) = 0 < s0 -> no redundancy
    # [1, 0]: H = .7*0.5 + 1*1.6 = 1.95 ; logit = 2*tanh(0.975) = 2*0.750893 = 1.501787 ; p = σ(1.501787)
    assert m.p_correct("val", 0, [1, 0]) == pytest.approx(_sigmoid(1.501787), abs=1e-6)
    # zero-shot: logit = base = 0 -> p = 0.5
    assert m.p_correct("val", 0, []) == pytest.approx(0.5)
    # near-duplicate pair [2, 0]: cos = 1/sqrt(1.04) = 0.980581 ; red = (0.980581-.6)/.4 = 0.951452
    # novelty = 1 - .6*0.951452 = 0.429129 for both ; u(train 2) = .15 + 1.1*0.980581 + .35 = 1.578639
    # H = 0.429129*(.7*1.578639 + 1.6) = 0.429129*2.705047 = 1.160815
    terms = m.help_terms("val", 0, [2, 0])
    assert terms["novelty"][0] == pytest.approx([0.429129, 0.429129], abs=1e-6)
    assert terms["help"][0] == pytest.approx(1.160815, abs=1e-6)
    assert terms["p_correct"][0] == pytest.approx(_sigmoid(2 * math.tanh(1.160815 / 2)), abs=1e-6)


def test_effect_signs_on_designed_items():
    _, m = _designed_world()
    p = m.p_correct
    # relevance: e1 (cos 1) beats e2 (cos 0), same type
    assert p("val", 0, [0]) > p("val", 0, [1]) > p("val", 0, [])
    # type match: same latent e1, type 0 (match) vs type 1 (mismatch)
    assert p("val", 0, [0]) > p("val", 0, [3])
    # recency: order matters, the more relevant ICD last is better
    assert p("val", 0, [1, 0]) > p("val", 0, [0, 1])
    # [0,1]: H = .7*1.6 + 0.5 = 1.62 vs [1,0]: 1.95 (hand-computed above)
    assert m.help_terms("val", 0, [0, 1])["help"][0] == pytest.approx(1.62)
    # redundancy: the near-duplicate of train 0 helps less than an unrelated one with lower utility
    # [2, 0] H = 1.160815 (duplicate) < [1, 0] H = 1.95 although u(2) = 1.58 > u(1) = 0.5
    assert p("val", 0, [2, 0]) < p("val", 0, [1, 0])
    # more shots (e2 and e3: orthogonal to everything, u = 0.5 each): logit increments shrink
    logits = [m.help_terms("val", 0, icds)["logit"][0] for icds in ([], [0], [1, 0], [4, 1, 0])]
    steps = np.diff(logits)
    assert (steps > 0).all() and steps[1] < steps[0] and steps[2] < steps[1]


def test_population_baselines_order_and_diminishing_returns(default_world):
    """The tuning targets of docs/sim.md, on the default world's test queries (exact expectations)."""
    w, m = default_world
    qs = w.query_ids("test")
    it, tr = w.items("test"), w.items("train")
    rng = np.random.default_rng(0)
    acc = {}
    for S in (1, 2, 3, 4):
        rand, sim, orc = [], [], []
        for q in qs:
            pool = w.pool("test", q)
            rand.append(rng.choice(pool, S, replace=False))
            sim.append(pool[np.argsort(-w.visible_similarity("test", q, pool), kind="stable")[:S]][::-1])
            util = w.params.relevance_gain * w.hidden_relevance("test", q, pool) + \
                w.params.type_gain * (tr.answer_type[pool] == it.answer_type[q])
            orc.append(pool[np.argsort(-util, kind="stable")[:S]][::-1])
        for name, sel in (("random", rand), ("similarity", sim), ("oracle", orc)):
            acc[name, S] = m.expected_accuracy_many("test", zip(qs, sel)).mean()
    zero = m.expected_accuracy_many("test", [(q, []) for q in qs]).mean()
    assert zero < acc["random", 2] < acc["similarity", 2] - 0.04 < acc["oracle", 2] - 0.08
    sims = [acc["similarity", S] for S in (1, 2, 3, 4)]
    inc = np.diff(sims)
    assert (inc > 0).all() and inc[0] > inc[1] > inc[2]
    assert 0.35 < zero and acc["oracle", 4] < 0.70


# ------------------------------------------------------------------------------------------------ LVLM answers


def test_answers_are_deterministic_and_follow_p_correct(default_world):
    w, m = default_world
    m2 = SimLVLM(World(SimParams()))
    qs = np.repeat(w.anchors[:200], 10)
    icds = np.stack([w.pool("train", q)[[j, j + 1]] for q, j in zip(qs, np.tile(np.arange(10), 200))])
    answers = m.answer_batch("train", qs, icds)
    assert answers == m2.answer_batch("train", qs, icds)
    assert m.answer("train", int(qs[7]), list(icds[7])) == answers[7]
    correct = np.array([w.class_of.get(normalize_answer(a)) == w.items("train").answer_class[q]
                        for a, q in zip(answers, qs)])
    p = m.p_correct_batch("train", qs, icds)
    se = math.sqrt((p * (1 - p)).sum()) / len(p)
    assert abs(correct.mean() - p.mean()) < 4 * se
    # the raw generation sometimes needs vqa_postprocess, and surface variants appear
    raws = m.raw_generation_batch("train", qs, icds)
    assert any(r != vqa_postprocess(r) for r in raws)
    assert any(a not in w.class_of for a in answers)


def test_answer_prob_is_a_distribution_over_normalised_answers(default_world):
    w, m = default_world
    q = int(w.anchors[3])
    icds = list(w.pool("train", q)[:2])
    dist = m.answer_distribution("train", q, icds)
    assert sum(dist.values()) == pytest.approx(1.0)
    gold = w.canonical_answer("train", q)
    assert m.answer_prob("train", q, icds, gold) == pytest.approx(m.p_correct("train", q, icds))
    for form in w.class_variants[w.class_of[gold]]:
        assert m.answer_prob("train", q, icds, form) == pytest.approx(m.p_correct("train", q, icds))
    assert m.answer_prob("train", q, icds, "not an answer") == 0.0
    # batch gt_prob == the literal reference#gt-prob formula with answer_prob
    qs = w.anchors[:20]
    pairs = np.stack([w.pool("train", a)[:3] for a in qs])
    batch = m.vqa_gt_prob_batch("train", qs, pairs)
    single = [m.vqa_gt_prob("train", int(a), list(c)) for a, c in zip(qs, pairs)]
    assert batch == pytest.approx(single, abs=1e-12)


def test_expected_accuracy_matches_the_official_metric(default_world):
    w, m = default_world
    gts_of = {int(a): m.gt_answers("train", int(a)) for a in w.anchors}
    same = next(a for a, g in gts_of.items() if len(set(g)) == 1)  # ten identical GTs: official normalises nothing
    mixed = next(a for a, g in gts_of.items() if len(set(g)) > 1)
    pv = w.params.pred_variant_prob
    for q in (same, mixed):
        icds = list(w.pool("train", q)[:2])
        gts = gts_of[q]
        dist = m.answer_distribution("train", q, icds)
        for norm in ("official", "lever_plus"):
            # E[acc] = sum_class P(class) · sum_spelling P(spelling | class) · vqa_accuracy(spelling, GTs); the LVLM
            # writes the canonical spelling with prob 1 - pv, else one of the other spellings uniformly
            want = 0.0
            for c, pr in dist.items():
                forms = w.class_variants[c]
                want += pr * ((1 - pv) * vqa_accuracy(forms[0], gts, normalization=norm)
                              + pv * np.mean([vqa_accuracy(f, gts, normalization=norm) for f in forms[1:]]))
            assert m.expected_accuracy("train", q, icds, norm) == pytest.approx(want)
        # with differing GTs every spelling scores like the canonical one; with identical GTs the variants score 0
        # under official (case/punctuation/articles/number words all count), so official < lever_plus there
        official = m.expected_accuracy("train", q, icds)
        lever_plus = m.expected_accuracy("train", q, icds, "lever_plus")
        assert official == pytest.approx(lever_plus) if q == mixed else official < lever_plus
    # the expectation agrees with sampled answers on the identical-GT anchor (many different ICD pairs)
    pool = w.pool("train", same)
    icds = np.array([[pool[i], pool[j]] for i in range(len(pool)) for j in range(len(pool)) if i != j])
    qs = np.full(len(icds), same)
    answers = m.answer_batch("train", qs, icds)
    acc = np.array([vqa_accuracy(a, gts_of[same]) for a in answers])
    exp = m.expected_accuracy_many("train", zip(qs, icds.tolist()))
    assert abs(acc.mean() - exp.mean()) < 4 * acc.std() / math.sqrt(len(acc))


def test_hash_uniform_depends_on_order_and_is_uniform():
    a = hash_uniform(0, 1, 1, np.array([5]), np.array([[1, 2]]))[0]
    b = hash_uniform(0, 1, 1, np.array([5]), np.array([[2, 1]]))[0]
    assert a != b and 0 <= a < 1
    u = hash_uniform(3, 1, 2, np.arange(20000), np.zeros((20000, 0), dtype=np.int64))
    assert abs(u.mean() - 0.5) < 0.01 and (u < 0.1).mean() == pytest.approx(0.1, abs=0.01)


def test_lvlm_rejects_a_query_among_its_own_icds(default_world):
    _, m = default_world
    with pytest.raises(LeverPlusInputError, match="own ICDs"):
        m.p_correct("train", 7, [7, 8])


# ------------------------------------------------------------------------------------------------ world


def test_pools_exclude_the_query_and_embeddings_are_unit(small_params):
    w = World(small_params)
    for a in w.anchors:
        pool = w.pool("train", a)
        assert a not in pool and len(set(pool.tolist())) == small_params.candidate_num
    assert w.pools["test"].shape == (small_params.num_test, small_params.candidate_num)
    for split in ("train", "val", "test"):
        assert np.allclose(np.linalg.norm(w.items(split).embedding, axis=1), 1.0, atol=1e-5)
    with pytest.raises(LeverPlusInputError, match="not an anchor"):
        w.pool("train", int(np.setdiff1d(np.arange(small_params.num_train), w.anchors)[0]))


def test_visible_similarity_is_informative_but_imperfect(default_world):
    w, _ = default_world
    rel, vis = [], []
    for q in range(100):
        pool = w.pool("test", q)
        rel.append(w.hidden_relevance("test", q, pool))
        vis.append(w.visible_similarity("test", q, pool))
    corr = np.corrcoef(np.concatenate(rel), np.concatenate(vis))[0, 1]
    assert 0.3 < corr < 0.9


# ------------------------------------------------------------------------------------------------ files


def test_infoscore_beam_search_matches_brute_force(small_params):
    w = World(small_params)
    m = SimLVLM(w)
    rec = gen.infoscore_beam_search(m, w.anchors[:4], w.pools["train"][:4], beam_size=5, max_shot=2)
    for a in w.anchors[:4]:
        pool = [int(x) for x in w.pool("train", a)]
        p0 = m.p_correct("train", a, [])
        step1 = sorted(((m.p_correct("train", a, [c]) - p0, c) for c in pool), key=lambda t: -t[0])[:5]
        cands = []
        for s1, c1 in step1:
            p1 = m.p_correct("train", a, [c1])
            row = sorted(((m.p_correct("train", a, [c, c1]) - p1, c) for c in pool if c != c1),
                         key=lambda t: -t[0])[:5]
            cands += [(s2, [c2, c1], [s1, s2]) for s2, c2 in row]
        best = sorted(cands, key=lambda t: -t[0])[:5]
        r = rec[int(a)]
        assert r["id_list"] == [ids + [int(a)] for _, ids, _ in best]
        assert np.allclose(r["shot_scores"], [h for _, _, h in best], rtol=0, atol=1e-12)
        assert r["score_list"] == [h[-1] for h in r["shot_scores"]]
        assert r["score_list"] == sorted(r["score_list"], reverse=True) and r["score_list"][0] > 0


def test_files_are_valid_lever_plus_formats(small_data, small_params):
    p = small_params
    emb = read_embeddings(small_data.embeddings, expected_rows=p.num_train)
    assert emb.shape == (p.num_train, p.embedding_dim)
    beams = read_beam_json(small_data.beam_json, num_items=p.num_train, shot_num=p.beam_max_shot)
    w = World(p)
    assert sorted(beams) == sorted(int(a) for a in w.anchors)
    for shot, path in small_data.rl_json.items():
        data = read_rl_json(path, shot_num=shot, num_items=p.num_train)
        assert data.shot_num == shot and sorted(data.queries) == sorted(beams)
        assert data.meta["vqa_model"] == "sim-lvlm" and data.meta["eval_mode_counts"]["error"] == 0
        for qid, q in data.queries.items():
            pool = q.candidate_pool_ids
            assert q.local_pointers and len(pool) == p.candidate_num and qid not in pool
            assert pool == [int(x) for x in w.pool("train", qid)]
            assert {"query_id", "question_id", "image_id", "question", "gt_answers_raw",
                    "gt_answers_norm"} <= set(q.query)
            keys = [tuple(sorted(c.pointer)) for c in q.candidates]
            assert len(keys) == len(set(keys))  # de-duplicated by unordered set
            for c in q.candidates:
                raw = c.raw
                assert set(raw) == RL_FIELDS
                assert raw["pointer_pos"] == raw["pointer"]
                assert [pool[i] for i in raw["pointer"]] == list(c.pointer) == raw["pointer_global"]
                assert raw["vqa_correct"] == int(raw["vqa_acc_score"] > 0)
                assert raw["vqa_pred_answer"] == vqa_postprocess(raw["vqa_raw_generation"])
                assert raw["eval_failed"] is False
                assert (raw["beam_rank"] is not None) == (raw["gen_method"] == "beam")
                assert (raw["temperature"] is not None) == (raw["gen_method"] == "sample")
                assert (raw["similarity_score"] is not None) == (raw["gen_method"] == "retrieval")
                if raw["vqa_eval_mode"] == "vqaEval":
                    assert raw["eval_split_used"] == "train"
                    assert raw["vqa_acc_score"] == vqa_accuracy(raw["vqa_pred_answer"], q.query["gt_answers_raw"])
    ev = gen.load_eval_queries(small_data, "test")
    assert len(ev) == p.num_test and ev.embeddings.shape == (p.num_test, p.embedding_dim)
    assert torch.equal(ev.embeddings, torch.from_numpy(w.items("test").embedding))
    assert ev.pools[0] == [int(x) for x in w.pool("test", 0)]


def test_rl_scores_follow_the_worlds_vqa_normalization():
    # data.sim.vqa_normalization picks the metric behind vqa_acc_score; on an anchor whose ten GTs are identical a
    # variant spelling ("Yes" for "yes") scores 0 under official and full credit under lever_plus
    scores = {}
    for norm in ("official", "lever_plus"):
        w = World(SimParams(**SMALL, vqa_normalization=norm))
        recs, _ = gen.rl_records(w, SimLVLM(w), 2, fallback_anchors=set())
        for qid, rec in recs.items():
            gts = rec["query"]["gt_answers_raw"]
            for c in rec["pointer_candidates"]:
                assert c["vqa_acc_score"] == vqa_accuracy(c["vqa_pred_answer"], gts, normalization=norm)
                scores.setdefault((qid, tuple(c["pointer"])), []).append(c["vqa_acc_score"])
    assert all(len(v) == 2 and v[1] >= v[0] for v in scores.values())  # same candidates; lever_plus never lower
    assert any(v[1] > v[0] for v in scores.values())


def test_candidate_generators_and_priorities(small_params):
    w = World(small_params)
    a = int(w.anchors[0])
    cands = gen.pointer_candidates(w, a, 2)
    methods = Counter(c["gen_method"] for c in cands)
    assert set(methods) <= {"beam", "sample", "retrieval", "random"} and methods["beam"] >= 1
    by_set = {tuple(sorted(c["pointer"])): c["gen_method"] for c in cands}
    # every retrieval window is present, as "retrieval" unless beam (higher priority) produced the same set
    cos = w.visible_similarity("train", a, w.pool("train", a))
    order = np.argsort(-cos, kind="stable")
    for r in range(small_params.num_retrieval):
        assert by_set[tuple(sorted(order[r:r + 2].tolist()))] in ("beam", "retrieval")
    for c in cands:
        if c["gen_method"] == "retrieval":
            assert c["pointer"] == order[order.tolist().index(c["pointer"][0]):][:2].tolist()
            assert c["similarity_score"] == pytest.approx(cos[c["pointer"]].mean())
    # generalised to S items
    c4 = gen.pointer_candidates(w, a, 4)
    assert all(len(c["pointer"]) == 4 == len(set(c["pointer"])) for c in c4)


def test_fallback_fraction_and_eval_mode_counts(small_data, small_params):
    w = World(small_params)
    fallback = gen.fallback_anchor_set(w)
    assert len(fallback) == round(small_params.fallback_fraction * small_params.num_anchors) == 10
    manifest = json.loads(small_data.manifest.read_text())
    for shot, path in small_data.rl_json.items():
        data = read_rl_json(path, shot_num=shot)
        counts = data.eval_mode_counts()
        stored = {k: v for k, v in data.meta["eval_mode_counts"].items() if v}
        assert counts == stored == {k: v for k, v in manifest["eval_mode_counts"][str(shot)].items() if v}
        assert data.meta["strict_eval"] is False
        for qid, q in data.queries.items():
            modes = {c.raw["vqa_eval_mode"] for c in q.candidates}
            splits = {c.raw["eval_split_used"] for c in q.candidates}
            assert modes == ({"fallback"} if qid in fallback else {"vqaEval"})
            assert splits == ({"fallback"} if qid in fallback else {"train"})


def test_fallback_noise_is_a_coin_flip_unrelated_to_the_answer(small_params):
    gts = ["dog"] * 10
    clean = World(SimParams(**{**SMALL, "fallback_noise": 0.0}))
    noisy = World(SimParams(**{**SMALL, "fallback_noise": 1.0}))
    tuples = [[i, i + 1] for i in range(400)]
    assert all(gen.score_fallback(clean, 1, t, "dog", gts) == (1, 1.0) for t in tuples)
    assert all(gen.score_fallback(clean, 1, t, "a dog", gts) == fallback_match("a dog", gts) == (1, 0.5)
               for t in tuples[:5])
    right = [gen.score_fallback(noisy, 1, t, "dog", gts)[0] for t in tuples]
    wrong = [gen.score_fallback(noisy, 1, t, "cat", gts)[0] for t in tuples]
    assert 0.4 < np.mean(right) < 0.6 and 0.4 < np.mean(wrong) < 0.6  # independent of the answer


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path, small_data, small_params):
    again = gen.generate_world_data(small_params, tmp_path / "again")
    for f_a, f_b in zip(small_data.all_files(), again.all_files()):
        if f_a.suffix == ".json":
            assert f_a.read_bytes() == f_b.read_bytes(), f_a.name
        else:  # torch.save embeds a random serialisation id: compare the tensors
            assert torch.equal(torch.load(f_a), torch.load(f_b))
    other = gen.generate_world_data(SimParams(**{**SMALL, "seed": 1}), tmp_path / "other")
    assert other.rl_json[2].read_bytes() != small_data.rl_json[2].read_bytes()
    assert not torch.equal(torch.load(other.embeddings), torch.load(small_data.embeddings))


def test_cache_hit_returns_the_same_paths_without_regenerating(tmp_path, monkeypatch):
    params = SimParams(**{**SMALL, "num_anchors": 10, "shot_nums": [2]})
    calls = []
    real = gen.generate_world_data

    def counting(p, out):
        calls.append(out)
        time.sleep(0.2)  # widen the race window for the concurrent callers
        return real(p, out)

    monkeypatch.setattr(gen, "generate_world_data", counting)
    results = []
    threads = [threading.Thread(target=lambda: results.append(gen.load_or_generate(params, tmp_path)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results[0] == results[1]
    paths = results[0]
    assert paths.root == tmp_path / params_hash(params) and paths.manifest.is_file()
    mtimes = {f: f.stat().st_mtime_ns for f in paths.all_files()}
    assert gen.load_or_generate(params, tmp_path) == paths and len(calls) == 1
    assert {f: f.stat().st_mtime_ns for f in paths.all_files()} == mtimes
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    # the evaluator rebuilds the same world from the folder
    w = gen.load_world(paths)
    assert np.array_equal(w.items("train").embedding, World(params).items("train").embedding)
    assert gen.load_lvlm(paths).answer("test", 0, [1, 2]) == SimLVLM(World(params)).answer("test", 0, [1, 2])


def test_load_world_refuses_a_folder_from_another_generator_version(tmp_path, small_data):
    manifest = json.loads(small_data.manifest.read_text())
    manifest["generator_version"] = "0"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LeverPlusInputError, match="generator_version"):
        gen.load_world(tmp_path)


def test_default_cache_root_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LEVERPLUS_CACHE", str(tmp_path))
    assert gen.default_cache_root() == tmp_path / "sim"
    monkeypatch.delenv("LEVERPLUS_CACHE")
    assert gen.default_cache_root() == Path.home() / ".cache" / "leverplus" / "sim"


# ------------------------------------------------------------------------------------------------ module layout


def test_sim_scorer_factory_is_registered_next_to_the_world_cache(small_data, small_params):
    """``scorer.name=sim`` resolves to ``generate.from_config``; the scorer built from a world folder answers like
    the world's LVLM and scores its fallback anchors with the world's noisy fallback."""
    assert SCORERS["sim"] == "leverplus.sim.generate:from_config"
    imported = {n.module for n in ast.walk(ast.parse(inspect.getsource(sim_scorer))) if isinstance(n, ast.ImportFrom)}
    assert "leverplus.sim.generate" not in imported  # the cycle generate <-> scorer stays broken
    sc = gen.from_world_dir(small_data.root)
    assert sc.name == gen.VQA_MODEL_NAME and sc.embeddings_path() == str(small_data.root / gen.EMBEDDINGS_FILE)
    world, lvlm = sc.world, gen.load_lvlm(small_data)
    assert sc.fallback_queries == gen.fallback_anchor_set(world) and sc.fallback_queries
    a = int(sorted(sc.fallback_queries)[0])
    assert sc.official_answers("train", a) is None
    icds = [int(i) for i in world.pool("train", a)[:2]]
    assert sc.answer("train", a, icds) == lvlm.answer("train", a, icds)
    assert sc.fallback_score("train", a, icds, "yes", ["no"] * 10) == gen.score_fallback(world, a, icds, "yes",
                                                                                          ["no"] * 10)
    assert sc.describe()["eval"]["train_ques_path"] == f"sim://{params_hash(small_params)}/train/questions"
