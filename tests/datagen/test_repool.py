"""``python -m leverplus.repool``: K=64 re-pooling of legacy RL files (pad from the anchor pool, every local pointer
maps to its global id, atomic write, clear errors)."""

from __future__ import annotations

import json

import pytest

from leverplus.data.formats.rl_json import read_rl_json, write_rl_json
from leverplus.data.groups import GroupOptions, build_groups
from leverplus.datagen.repool import check_repooled, repool_file
from leverplus.errors import LeverPlusInputError
from leverplus.repool import main


def cand(pointer, correct, acc):
    return {"pointer": pointer, "pointer_pos": list(pointer), "gen_method": "beam", "vqa_correct": correct,
            "vqa_acc_score": acc, "vqa_eval_mode": "vqaEval", "info_score": 0.01 * sum(pointer)}


@pytest.fixture
def legacy(tmp_path):
    """A legacy file: global pointers, no candidate_pool_ids (query 0 uses ICDs 7, 3, 9; query 1 uses 2, 4)."""
    records = {0: {"query": {"query_id": 0}, "pointer_candidates": [cand([7, 3], 1, 1.0), cand([3, 9], 0, 0.0)]},
               1: {"query": {"query_id": 1}, "pointer_candidates": [cand([2, 4], 1, 0.6)]}}
    path = tmp_path / "legacy.json"
    write_rl_json(path, records, {"notes": "legacy", "vqa_model": "m"})
    pools = tmp_path / "pools.json"
    pools.write_text(json.dumps({"0": [9, 0, 5, 6, 7, 8], "1": [1, 5, 6, 2, 8, 9]}))
    return path, pools


def test_pads_from_the_anchor_pool_and_maps_every_pointer(legacy, tmp_path):
    src, pools = legacy
    out = tmp_path / "k5.json"
    meta = repool_file(src, out, k=5, pools=pools)
    raw = json.loads(out.read_text())
    # query 0: used ids in first appearance (7, 3, 9), then its anchor pool minus used and itself: 5, 6 -> K=5
    assert raw["0"]["candidate_pool_ids"] == [7, 3, 9, 5, 6]
    assert [c["pointer"] for c in raw["0"]["pointer_candidates"]] == [[0, 1], [1, 2]]
    assert [c["pointer_global"] for c in raw["0"]["pointer_candidates"]] == [[7, 3], [3, 9]]
    # query 1: used (2, 4), then its anchor pool [1, 5, 6, 2, 8, 9] minus itself (1) and 2 (used): 5, 6, 8
    assert raw["1"]["candidate_pool_ids"] == [2, 4, 5, 6, 8]
    assert raw["1"]["pointer_candidates"][0]["pointer"] == [0, 1]
    # every other field is kept; the reader sees the same global pointers and the K=64 shape
    rl, before = read_rl_json(out, shot_num=2), read_rl_json(src, shot_num=2)
    for qid, q in rl.queries.items():
        assert q.local_pointers and len(q.candidate_pool_ids) == 5
        assert [c.pointer for c in q.candidates] == [c.pointer for c in before.queries[qid].candidates]
        old = before.queries[qid].candidates
        assert [c.raw["info_score"] for c in q.candidates] == [c.raw["info_score"] for c in old]
    assert meta["notes"] == "legacy" and meta["repool"]["k"] == 5 and meta["repool"]["pools"]["file"] == "pools.json"
    # training on it: labels index the new pools, rewards unchanged
    new_groups, old_groups = build_groups(rl, GroupOptions()), build_groups(before, GroupOptions())
    assert [g.global_pointers() for g in new_groups] == [g.global_pointers() for g in old_groups]
    assert [g.rewards_raw.tolist() for g in new_groups] == [g.rewards_raw.tolist() for g in old_groups]
    assert new_groups[0].pool_ids == [7, 3, 9, 5, 6]


def test_without_pools_a_k64_file_pads_from_its_own_pool_and_fill_range(legacy, tmp_path):
    src, pools = legacy
    first = tmp_path / "k5.json"
    repool_file(src, first, k=5, pools=pools)
    again = tmp_path / "k7.json"
    repool_file(first, again, k=7, fill_range=12)  # own pool [7,3,9,5,6], then range(12): 1, 2 (0 is the query)
    raw = json.loads(again.read_text())
    assert raw["0"]["candidate_pool_ids"] == [7, 3, 9, 5, 6, 1, 2]
    assert raw["0"]["pointer_candidates"][1]["pointer"] == [1, 2]
    assert raw["_meta"]["repool"]["pools"] == "candidate_pool_ids" and raw["_meta"]["repool"]["fill_range"] == 12


def test_clear_errors(legacy, tmp_path):
    src, pools = legacy
    with pytest.raises(LeverPlusInputError, match="only 3 ids after padding") as err:
        repool_file(src, tmp_path / "a.json", k=5)  # no pools, no fill range: query 0 has 3 used ids
    assert "--pools" in err.value.fix and "--fill-range" in err.value.fix and err.value.record == "query 0"
    with pytest.raises(LeverPlusInputError, match="more than K=2"):
        repool_file(src, tmp_path / "b.json", k=2, pools=pools)
    partial = tmp_path / "partial_pools.json"
    partial.write_text(json.dumps({"0": [5, 6]}))
    with pytest.raises(LeverPlusInputError, match="has no pool for query 1"):
        repool_file(src, tmp_path / "c.json", k=5, pools=partial)
    existing = tmp_path / "exists.json"
    existing.write_text("keep me")
    with pytest.raises(LeverPlusInputError, match="exists already"):
        repool_file(src, existing, k=5, pools=pools)
    assert existing.read_text() == "keep me" and not (tmp_path / "a.json").exists()


def test_the_invariant_check_names_a_broken_record():
    rec = {"candidate_pool_ids": [5, 6, 7], "pointer_candidates": [{"pointer": [0, 2], "pointer_global": [5, 6]}]}
    with pytest.raises(LeverPlusInputError, match="local pointer 2 .* global id 6") as err:
        check_repooled(0, rec, 3, path="x.json")
    assert err.value.record == "query 0, candidate 0"
    with pytest.raises(LeverPlusInputError, match="expected 4 distinct"):
        check_repooled(0, rec, 4, path="x.json")
    with pytest.raises(LeverPlusInputError, match="without the query"):
        check_repooled(6, rec, 3, path="x.json")


def test_the_command(legacy, tmp_path, capsys):
    src, pools = legacy
    out = tmp_path / "cli.json"
    assert main([str(src), str(out), "--k", "5", "--pools", str(pools)]) == 0
    assert "wrote" in capsys.readouterr().out and read_rl_json(out).queries[0].local_pointers
    assert main([str(src), str(out), "--k", "5", "--pools", str(pools)]) == 2  # exists: refused
    assert "exists already" in capsys.readouterr().err
    assert main([str(src), str(out), "--k", "5", "--pools", str(pools), "--overwrite"]) == 0
