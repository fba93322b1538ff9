"""``hybrid`` reads each candidate's ``info_score`` (written for every RL candidate at generation time), scaled only
against the other InfoScores of its group; ``hybrid_legacy`` keeps the beam-JSON formula; ``inspect_data`` reports
the InfoScore coverage, 100% for freshly generated data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from leverplus.config import sim_params
from leverplus.config.reward_modes import REWARD_MODE_SPECS, info_field, needs_infoscores, takes_info
from leverplus.config.sim_params import SimParams, params_hash
from leverplus.data.formats.beam_json import read_beam_json
from leverplus.data.formats.rl_json import read_rl_json, write_rl_json
from leverplus.data.groups import GroupOptions, build_groups, infoscore_lookup
from leverplus.data.rewards import compute_reward, group_info_scores
from leverplus.datagen.inspect_data import format_report, info_score_coverage, inspect_rl
from leverplus.errors import LeverPlusInputError
from leverplus.sim import generate as gen
from leverplus.sim.scorer import SimScorer

# ------------------------------------------------------------------------------------------- the formula


def test_the_two_hybrid_modes_are_declared_once():
    assert info_field("hybrid") == "info_score" and "info_score" in REWARD_MODE_SPECS["hybrid"].candidate_fields
    assert not needs_infoscores("hybrid") and needs_infoscores("hybrid_legacy")
    assert takes_info("hybrid") and takes_info("hybrid_legacy") and not takes_info("hard_plus_soft")


def test_group_info_scores_min_max_over_the_group_only():
    # info_score [0.02, -0.01, 0.05]: lo −0.01, hi 0.05, range 0.06 -> [0.03/0.06, 0, 0.06/0.06] = [0.5, 0, 1]
    group = [{"info_score": 0.02, "beam_score": 9.0}, {"info_score": -0.01}, {"info_score": 0.05}]
    assert group_info_scores(group) == pytest.approx([0.5, 0.0, 1.0])  # beam_score never enters
    assert group_info_scores([{"info_score": 0.3}, {"info_score": 0.3}]) == [0.5, 0.5]  # all equal
    assert group_info_scores([{"info_score": -2.0}]) == [0.5]
    with pytest.raises(LeverPlusInputError, match="candidate 1 of the group has no info_score") as err:
        group_info_scores([{"info_score": 0.1}, {"info_score": None}])
    assert "hybrid_legacy" in err.value.fix


HAND_GROUP = [
    {"pointer": [1, 2], "vqa_correct": 1, "vqa_acc_score": 1.0, "vqa_eval_mode": "vqaEval", "info_score": 0.02,
     "beam_score": 1.2, "gen_method": "beam"},
    {"pointer": [3, 4], "vqa_correct": 0, "vqa_acc_score": 0.0, "vqa_eval_mode": "vqaEval", "info_score": -0.01,
     "beam_score": None, "gen_method": "random"},
    {"pointer": [2, 5], "vqa_correct": 1, "vqa_acc_score": 0.6, "vqa_eval_mode": "vqaEval", "info_score": 0.05,
     "beam_score": 0.8, "gen_method": "beam"},
]


def test_hybrid_rewards_by_hand():
    info = group_info_scores(HAND_GROUP)  # [0.5, 0, 1]
    got = [compute_reward(c, "hybrid", info=i) for c, i in zip(HAND_GROUP, info)]
    # info_weight 0.5; corr = separated (hw = sw = 1) = [2+1, 0, 2+0.6] = [3, 0, 2.6]
    # -> [0.5·0.5 + 0.5·3, 0.5·0 + 0, 0.5·1 + 0.5·2.6] = [1.75, 0.0, 1.8]
    assert got == pytest.approx([1.75, 0.0, 1.8])


@pytest.fixture
def hand_file(tmp_path):
    path = tmp_path / "rl.json"
    write_rl_json(path, {0: {"query": {"query_id": 0}, "pointer_candidates": HAND_GROUP}}, {"notes": "hand"})
    return read_rl_json(path, shot_num=2)


def test_groups_get_the_hand_computed_hybrid_rewards(hand_file):
    (g,) = build_groups(hand_file, GroupOptions(reward_mode="hybrid", normalize_method="none"))
    assert g.rewards_raw.tolist() == pytest.approx([1.75, 0.0, 1.8])
    # hybrid_legacy without beams: raw info = beam_score [1.2, missing, 0.8] -> [1, 0 (missing), 0]
    # -> [0.5·1 + 0.5·3, 0, 0.5·0 + 0.5·2.6] = [2.0, 0.0, 1.3]
    with pytest.warns(UserWarning, match="beam_score"):
        (legacy,) = build_groups(hand_file, GroupOptions(reward_mode="hybrid_legacy", normalize_method="none"))
    assert legacy.rewards_raw.tolist() == pytest.approx([2.0, 0.0, 1.3])


def test_hybrid_on_a_file_without_info_score_names_the_file_and_the_way_out(tmp_path):
    old = [{k: v for k, v in c.items() if k != "info_score"} for c in HAND_GROUP]
    path = tmp_path / "old_rl.json"
    write_rl_json(path, {0: {"query": {"query_id": 0}, "pointer_candidates": old}}, {"notes": "old"})
    rl = read_rl_json(path, shot_num=2)
    with pytest.raises(LeverPlusInputError) as err:
        build_groups(rl, GroupOptions(reward_mode="hybrid"))
    msg = str(err.value)
    assert "old_rl.json" in msg and "query 0, candidate 0" in msg and "info_score" in msg
    assert "hybrid_legacy" in msg and "regenerate" in msg
    with pytest.warns(UserWarning):
        assert len(build_groups(rl, GroupOptions(reward_mode="hybrid_legacy"))) == 1
    assert inspect_rl(str(path)).info_score_coverage == 0.0


def test_default_mode_ignores_info_score(hand_file, tmp_path):
    # hard_plus_soft rewards do not move when info_score changes
    moved = [{**c, "info_score": (c["info_score"] or 0) + 7.0} for c in HAND_GROUP]
    path = tmp_path / "moved.json"
    write_rl_json(path, {0: {"query": {"query_id": 0}, "pointer_candidates": moved}}, {"notes": "moved"})
    (a,) = build_groups(hand_file, GroupOptions())
    (b,) = build_groups(read_rl_json(path, shot_num=2), GroupOptions())
    assert a.rewards_raw.tolist() == b.rewards_raw.tolist() == pytest.approx([2.0, 0.0, 1.6])


def test_partial_coverage_is_flagged(tmp_path):
    cands = [dict(HAND_GROUP[0]), {**HAND_GROUP[1], "info_score": None}]
    assert info_score_coverage(cands) == 0.5
    path = tmp_path / "half.json"
    write_rl_json(path, {0: {"query": {"query_id": 0}, "pointer_candidates": cands}}, {"notes": "half"})
    report = inspect_rl(str(path))
    assert report.info_score_coverage == 0.5 and any("50.00% of candidates have info_score" in p
                                                     for p in report.problems)


# ------------------------------------------------------------------------------------------- generated data

SMALL = dict(num_train=200, num_anchors=24, num_val=8, num_test=8, candidate_num=16, fallback_fraction=0.25)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    params = SimParams(**SMALL)
    return params, gen.generate_world_data(params, tmp_path_factory.mktemp("world"))


def test_every_generated_candidate_has_its_infoscore(world):
    params, paths = world
    scorer = SimScorer(gen.load_lvlm(paths))
    beams = infoscore_lookup(read_beam_json(paths.beam_json))
    matched = 0
    for shot in params.shot_nums:
        rl = read_rl_json(paths.rl_json[shot], shot_num=shot)
        qs, icds, stored = [], [], []
        for qid, q in rl.queries.items():
            for c in q.candidates:
                assert isinstance(c.raw["info_score"], float)
                qs.append(qid)
                icds.append(list(c.pointer))
                stored.append(c.raw["info_score"])
                if c.pointer in beams.get(qid, {}):  # an InfoScore beam: the sum of its per-step scores
                    assert c.raw["info_score"] == pytest.approx(beams[qid][c.pointer], abs=1e-9)
                    matched += 1
        # one teacher-forced pass per candidate minus the zero-shot pass, P(answer | ...)
        y = [scorer.item("train", q)["answer"] for q in qs]
        p = scorer.answer_probs("train", qs, icds, y)
        p0 = scorer.answer_probs("train", qs, [[] for _ in qs], y)
        assert stored == pytest.approx((p - p0).tolist(), abs=1e-12)
        report = inspect_rl(str(paths.rl_json[shot]), shot_num=shot, beam_json=str(paths.beam_json))
        assert report.info_score_coverage == 1.0
        text = format_report(report)
        assert "hybrid InfoScore coverage 100.00%" in text and "hybrid_legacy: " in text
        legacy_hits = sum(c.pointer in beams.get(qid, {}) for qid, q in rl.queries.items() for c in q.candidates)
        assert report.beam_match_coverage == round(legacy_hits / rl.num_candidates, 4) < 1.0
        if shot == 1:  # the beams hold 2 ICDs: no 1-shot candidate ever matches
            assert report.beam_match_coverage == 0.0
    assert matched > 0  # the check against the beam JSON ran


def test_hybrid_trains_on_generated_data_and_spans_the_unit_interval(world):
    params, paths = world
    rl = read_rl_json(paths.rl_json[2], shot_num=2)
    groups = build_groups(rl, GroupOptions(reward_mode="hybrid", info_weight=1.0, normalize_method="none"))
    for g in groups:
        if g.size > 1:
            vals = g.rewards_raw.tolist()
            assert min(vals) == pytest.approx(0.0) and max(vals) == pytest.approx(1.0)


def test_the_world_version_moves_so_old_caches_are_regenerated(world, monkeypatch):
    params, paths = world
    manifest = json.loads(paths.manifest.read_text())
    assert manifest["generator_version"] == sim_params.GENERATOR_VERSION == "3"
    new_hash = params_hash(params)
    monkeypatch.setattr(sim_params, "GENERATOR_VERSION", "2")
    assert params_hash(params) != new_hash  # the cache folder is named by the hash: an old folder is never reused
    monkeypatch.undo()
    manifest["generator_version"] = "2"
    paths.manifest.write_text(json.dumps(manifest))
    try:
        with pytest.raises(LeverPlusInputError, match="regenerate"):
            gen.load_world(paths.root)
    finally:
        manifest["generator_version"] = sim_params.GENERATOR_VERSION
        paths.manifest.write_text(json.dumps(manifest, indent=2))


def test_infoscore_batch_matches_answer_probs_for_mixed_queries(world):
    _, paths = world
    scorer = SimScorer(gen.load_lvlm(paths))
    got = scorer.info_score_batch("train", [3, 5, 3], [[1, 2], [7, 8], [9, 10]])
    y3, y5 = scorer.item("train", 3)["answer"], scorer.item("train", 5)["answer"]
    p = scorer.answer_probs("train", [3, 5, 3, 3, 5], [[1, 2], [7, 8], [9, 10], [], []], [y3, y5, y3, y3, y5])
    assert np.allclose(got, [p[0] - p[3], p[1] - p[4], p[2] - p[3]])
