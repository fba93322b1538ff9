"""Tests for leverplus.formats: round trips on small generated files, one test per bad-input case, atomic writes."""

from __future__ import annotations

import copy
import json
import math
import os
import stat

import numpy as np
import pytest
import torch

from leverplus.data.formats import io as fmt_io
from leverplus.data.formats import rl_json as formats
from leverplus.data.formats.beam_json import BeamRecord, read_beam_json, write_beam_json
from leverplus.data.formats.embeddings import read_embeddings, save_embeddings
from leverplus.data.formats.io import atomic_torch_save, atomic_write_json, file_fingerprint, load_json
from leverplus.data.formats.rl_json import RLQuery, read_rl_json, write_rl_json
from leverplus.errors import LeverPlusInputError

# --------------------------------------------------------------------------------------------------
# Fixtures: small valid files in every accepted shape
# --------------------------------------------------------------------------------------------------

META = {"created_at": "2025-12-01 10:00:00", "vqa_model": "sim", "strict_eval": True, "notes": "test"}


def _cand(pointer, method="beam", mode="vqaEval", acc=1.0, **extra):
    c = {"pointer": list(pointer), "pointer_pos": list(pointer), "gen_method": method, "beam_rank": 0,
         "beam_score": 0.9, "logprob_score": -1.2, "temperature": None, "vqa_pred_answer": "cat",
         "vqa_correct": int(acc > 0), "vqa_acc_score": acc, "vqa_gt_prob": 1.3, "vqa_rel_score": 0.5,
         "vqa_eval_mode": mode}
    c.update(extra)
    return c


def _plain_records():
    """Two queries (ids 5 and 2, stored out of order), shot_num = 2, N = 10 train rows."""
    return {
        "5": {"query": {"query_id": 5, "question_id": 501, "question": "what?", "gt_answers_raw": ["cat"]},
              "pointer_candidates": [_cand([1, 3]), _cand([3, 1], "sample", "fallback", 0.5),
                                     _cand([0, 9], "random", "vqaEval", 0.0)]},
        "2": {"query": {"query_id": 2, "question_id": 201, "question": "who?", "gt_answers_raw": ["dog"]},
              "pointer_candidates": [_cand([4, 7], "retrieval", "error", 0.0)]},
    }


def _k64_records():
    """K=64-fixed variant (here a pool of 4): `pointer` local into candidate_pool_ids, `pointer_global` global."""
    pool = [8, 3, 6, 1]
    return {"7": {"query": {"query_id": 7, "question": "q"}, "candidate_pool_ids": pool,
                  "pointer_candidates": [
                      {"pointer": [1, 3], "pointer_global": [3, 1], "vqa_acc_score": 1.0, "vqa_correct": 1},
                      {"pointer": [0, 2], "pointer_global": [8, 6], "vqa_acc_score": 0.0, "vqa_correct": 0}]}}


def _raw_write(path, obj):
    """Write JSON without validation (Python's json writes NaN/Infinity literals, as the reference did)."""
    path.write_text(json.dumps(obj, indent=2))
    return str(path)


# --------------------------------------------------------------------------------------------------
# RL JSON round trips
# --------------------------------------------------------------------------------------------------


def test_rl_plain_round_trip(tmp_path):
    path = tmp_path / "sub" / "rl.json"  # parent created by the writer
    records = _plain_records()
    write_rl_json(path, records, META)
    text = path.read_text()
    assert text.startswith('{\n  "_meta": {')  # _meta first, indent=2
    assert list(json.loads(text)) == ["_meta", "2", "5"]  # numeric key order

    data = read_rl_json(path, num_items=10)
    assert data.path == str(path) and data.meta == META and data.shot_num == 2
    assert list(data.queries) == [2, 5]
    q5 = data.queries[5]
    assert q5.query_id == 5 and q5.query["question_id"] == 501
    assert [c.pointer for c in q5.candidates] == [(1, 3), (3, 1), (0, 9)]  # prompt order kept
    assert [c.index for c in q5.candidates] == [0, 1, 2]
    assert [c.gen_method for c in q5.candidates] == ["beam", "sample", "random"]
    assert q5.candidates[1].eval_mode == "fallback"
    assert q5.candidates[1].raw == records["5"]["pointer_candidates"][1]  # unmodified
    assert q5.candidate_pool_ids is None and not q5.fix_failed and not q5.local_pointers
    # modes: q5 vqaEval, fallback, vqaEval; q2 error -> {error:1, fallback:1, vqaEval:2}
    assert data.eval_mode_counts() == {"error": 1, "fallback": 1, "vqaEval": 2}
    assert data.num_candidates == 4

    # RLQuery objects write back to the same content
    path2 = tmp_path / "rl2.json"
    write_rl_json(path2, data.queries, data.meta)
    assert json.loads(path2.read_text()) == json.loads(text)


def test_rl_interim_save_without_meta(tmp_path):
    path = tmp_path / "rl.json"
    write_rl_json(path, _plain_records(), None)
    assert "_meta" not in json.loads(path.read_text())
    assert read_rl_json(path).meta == {}


def test_rl_legacy_flat_shape(tmp_path):
    """No "query" wrapper: query fields sit next to pointer_candidates; pointer_pos is the only pointer."""
    obj = {"_meta": META, "_other": "skipped",
           "3": {"query_id": 3, "question": "flat?", "gt_answers_raw": ["x"],
                 "pointer_candidates": [{"pointer_pos": [0, 1], "vqa_acc_score": 0.3, "vqa_correct": True},
                                        {"pointer_pos": [2, 0], "vqa_acc_score": 0.0, "vqa_correct": False}]}}
    data = read_rl_json(_raw_write(tmp_path / "legacy.json", obj), shot_num=2, num_items=4)
    q = data.queries[3]
    assert q.query == {"query_id": 3, "question": "flat?", "gt_answers_raw": ["x"]}
    assert [c.pointer for c in q.candidates] == [(0, 1), (2, 0)]
    assert data.eval_mode_counts() == {"missing": 2}


def test_rl_k64_local_pointers_become_global(tmp_path):
    path = tmp_path / "k64.json"
    write_rl_json(path, _k64_records(), META)
    q = read_rl_json(path, num_items=9).queries[7]
    # local [1,3] -> pool[1], pool[3] = 3, 1 ; local [0,2] -> 8, 6
    assert [c.pointer for c in q.candidates] == [(3, 1), (8, 6)]
    assert q.candidate_pool_ids == [8, 3, 6, 1] and q.local_pointers
    assert q.candidates[0].raw["pointer"] == [1, 3]  # stored local pointer untouched
    assert q.to_json_dict() == _k64_records()["7"]


def test_rl_pool_inside_query_and_fix_failed(tmp_path):
    rec = _k64_records()["7"]
    pool = rec.pop("candidate_pool_ids")
    rec["query"]["candidate_pool_ids"] = pool
    rec["_fix_failed"], rec["_fix_error"] = True, "boom"
    q = read_rl_json(_raw_write(tmp_path / "k.json", {"7": rec})).queries[7]
    assert q.candidate_pool_ids == pool and q.fix_failed and q.fix_error == "boom"
    assert [c.pointer for c in q.candidates] == [(3, 1), (8, 6)]


def test_rl_balanced_variant(tmp_path):
    """VQAv2 balanced: only pointer, vqa_pred_answer, vqa_acc_score; no vqa_correct / vqa_eval_mode."""
    obj = {"11": {"query": {"query_id": 11, "question_id": 1, "question": "q", "gt_answers_raw": ["a"]},
                  "pointer_candidates": [{"pointer": [i, i + 1], "vqa_pred_answer": "a", "vqa_acc_score": acc}
                                         for i, acc in zip(range(0, 8, 2), [1.0, 0.0, 0.6, 0.3])]}}
    path = tmp_path / "bal.json"
    write_rl_json(path, obj, {})
    data = read_rl_json(path, shot_num=2, num_items=12)
    assert data.eval_mode_counts() == {"missing": 4}
    assert [c.raw["vqa_acc_score"] for c in data.queries[11].candidates] == [1.0, 0.0, 0.6, 0.3]
    assert all(c.eval_mode is None for c in data.queries[11].candidates)


def test_rl_reader_writes_nothing(tmp_path):
    path = tmp_path / "rl.json"
    write_rl_json(path, _plain_records(), META)
    before = sorted(os.listdir(tmp_path)), path.stat().st_mtime_ns
    read_rl_json(path)
    assert (sorted(os.listdir(tmp_path)), path.stat().st_mtime_ns) == before


# --------------------------------------------------------------------------------------------------
# RL JSON: one test per bad-input case
# --------------------------------------------------------------------------------------------------


def _set(qkey, i, **fields):
    def mutate(obj):
        obj[qkey]["pointer_candidates"][i].update(fields)
    return mutate


def _del(qkey, i, *names):
    def mutate(obj):
        for n in names:
            obj[qkey]["pointer_candidates"][i].pop(n)
    return mutate


def _entry(qkey, **fields):
    def mutate(obj):
        obj[qkey].update(fields)
    return mutate


# (case id, mutation of _plain_records(), read kwargs, record named, field named, message fragment)
RL_BAD = [
    ("pointer_not_list", _set("5", 1, pointer=7), {}, "query 5, candidate 1", "pointer", "must be a list"),
    ("pointer_float_entry", _set("5", 0, pointer=[1, 3.0]), {}, "query 5, candidate 0", "pointer", "integer id"),
    ("pointer_bool_entry", _set("5", 0, pointer=[1, True]), {}, "query 5, candidate 0", "pointer", "integer id"),
    ("pointer_len_vs_arg", _set("5", 2, pointer=[0, 9, 8]), {"shot_num": 2}, "query 5, candidate 2", "pointer",
     "data.shot_nums=[3]"),
    ("pointer_len_vs_inferred", _set("5", 2, pointer=[0]), {}, "query 5, candidate 2", "pointer",
     "inferred from the first candidate"),
    ("pointer_duplicate", _set("5", 1, pointer=[3, 3]), {}, "query 5, candidate 1", "pointer",
     "more than once"),
    ("pointer_out_of_range", _set("5", 2, pointer=[0, 10]), {"num_items": 10}, "query 5, candidate 2", "pointer",
     "outside [0, 10)"),
    ("pointer_negative", _set("5", 2, pointer=[-1, 4]), {}, "query 5, candidate 2", "pointer", "outside"),
    ("query_in_pointer", _set("5", 0, pointer=[5, 1]), {}, "query 5, candidate 0", "pointer", "own id 5"),
    ("no_pointer_field", _del("5", 1, "pointer", "pointer_pos"), {}, "query 5, candidate 1", "pointer",
     "no pointer field"),
    ("pointer_pos_bad", lambda o: (_del("5", 1, "pointer")(o), _set("5", 1, pointer_pos=[3, 3])(o)), {},
     "query 5, candidate 1", "pointer_pos", "more than once"),
    ("acc_above_one", _set("5", 0, vqa_acc_score=1.5), {}, "query 5, candidate 0", "vqa_acc_score", "[0, 1]"),
    ("acc_negative", _set("5", 0, vqa_acc_score=-0.1), {}, "query 5, candidate 0", "vqa_acc_score", "[0, 1]"),
    ("acc_string", _set("5", 0, vqa_acc_score="1.0"), {}, "query 5, candidate 0", "vqa_acc_score",
     "must be a number"),
    ("correct_two", _set("2", 0, vqa_correct=2), {}, "query 2, candidate 0", "vqa_correct", "0, 1, true"),
    ("correct_string", _set("2", 0, vqa_correct="yes"), {}, "query 2, candidate 0", "vqa_correct", "0, 1, true"),
    ("correct_half", _set("2", 0, vqa_correct=0.5), {}, "query 2, candidate 0", "vqa_correct", "0, 1, true"),
    ("eval_mode_not_str", _set("2", 0, vqa_eval_mode=1), {}, "query 2, candidate 0", "vqa_eval_mode",
     "must be a string"),
    ("candidate_not_dict", _entry("2", pointer_candidates=[[4, 7]]), {}, "query 2, candidate 0",
     "pointer_candidates", "must be an object"),
    ("candidates_not_list", _entry("2", pointer_candidates={"0": 1}), {}, "query 2", "pointer_candidates",
     "must be a list"),
    ("candidates_missing", lambda o: o["2"].pop("pointer_candidates"), {}, "query 2", "pointer_candidates",
     "must be a list"),
    ("empty_group", _entry("2", pointer_candidates=[]), {}, "query 2", "pointer_candidates", "empty group"),
    ("query_not_dict", _entry("2", query="who?"), {}, "query 2", "query", "must be an object"),
    ("query_id_mismatch", lambda o: o["2"]["query"].update(query_id=3), {}, "query 2", "query_id",
     "record key says 2"),
    ("query_id_out_of_range", lambda o: None, {"num_items": 5}, "query 5", "query_id", "outside [0, 5)"),
    ("pool_duplicates", _entry("5", candidate_pool_ids=[1, 3, 1]), {}, "query 5", "candidate_pool_ids",
     "more than once"),
    ("pool_out_of_range", _entry("5", candidate_pool_ids=[1, 3, 12]), {"num_items": 10}, "query 5",
     "candidate_pool_ids", "outside [0, 10)"),
    ("pool_contains_query", _entry("5", candidate_pool_ids=[1, 5, 3]), {}, "query 5", "candidate_pool_ids",
     "own id 5"),
    ("pool_not_ints", _entry("5", candidate_pool_ids=["1", 3]), {}, "query 5", "candidate_pool_ids", "integer id"),
    ("eval_mode_typo", _set("5", 1, vqa_eval_mode="Fallback"), {}, "query 5, candidate 1", "vqa_eval_mode",
     "unknown value 'Fallback'"),
    ("gt_prob_negative", _set("5", 0, vqa_gt_prob=-0.2), {}, "query 5, candidate 0", "vqa_gt_prob", "negative"),
]

NONFINITE = [(f"{name}_{v}", name, v) for name in formats.RL_NUMERIC_FIELDS for v in (math.nan, math.inf, -math.inf)]


@pytest.mark.parametrize("case,mutate,kwargs,record,field,fragment", RL_BAD, ids=[c[0] for c in RL_BAD])
def test_rl_bad_input(tmp_path, case, mutate, kwargs, record, field, fragment):
    obj = _plain_records()
    mutate(obj)
    path = _raw_write(tmp_path / "bad.json", obj)
    with pytest.raises(LeverPlusInputError) as ei:
        read_rl_json(path, **kwargs)
    e = ei.value
    assert (e.file, e.record, e.field) == (path, f"{record}", field)
    msg = str(e)
    assert path in msg and f"record {record}" in msg and repr(field) in msg and fragment in msg


@pytest.mark.parametrize("case,name,value", NONFINITE, ids=[c[0] for c in NONFINITE])
def test_rl_nonfinite_numeric_field(tmp_path, case, name, value):
    obj = _plain_records()
    obj["5"]["pointer_candidates"][1][name] = value
    path = _raw_write(tmp_path / "bad.json", obj)
    with pytest.raises(LeverPlusInputError) as ei:
        read_rl_json(path)
    msg = str(ei.value)
    assert path in msg and "record query 5, candidate 1" in msg and repr(name) in msg and "finite" in msg


K64_BAD = [
    ("local_out_of_pool", lambda r: r["pointer_candidates"][0].update(pointer=[1, 4]), "query 7, candidate 0",
     "pointer", "outside the pool [0, 4)"),
    ("pool_mismatch", lambda r: r["pointer_candidates"][1].update(pointer=[0, 3]), "query 7, candidate 1",
     "pointer", "candidate_pool_ids[3] = 1 but pointer_global[1] = 6"),
    ("global_without_pool", lambda r: r.pop("candidate_pool_ids"), "query 7, candidate 0", "pointer_global",
     "no candidate_pool_ids"),
    ("mixed_local_global", lambda r: r["pointer_candidates"][1].pop("pointer_global"), "query 7, candidate 1",
     "pointer_global", "mix local pointers"),
    ("global_duplicate", lambda r: r["pointer_candidates"][0].update(pointer=[1, 1], pointer_global=[3, 3]),
     "query 7, candidate 0", "pointer_global", "more than once"),
    ("local_wrong_length", lambda r: r["pointer_candidates"][0].update(pointer=[1]), "query 7, candidate 0",
     "pointer", "list of 2 integers"),
    ("local_missing", lambda r: r["pointer_candidates"][0].pop("pointer"), "query 7, candidate 0", "pointer",
     "no local 'pointer'"),
]


@pytest.mark.parametrize("case,mutate,record,field,fragment", K64_BAD, ids=[c[0] for c in K64_BAD])
def test_rl_k64_bad_input(tmp_path, case, mutate, record, field, fragment):
    obj = _k64_records()
    mutate(obj["7"])
    path = _raw_write(tmp_path / "bad.json", obj)
    with pytest.raises(LeverPlusInputError) as ei:
        read_rl_json(path)
    e = ei.value
    assert (e.file, e.record, e.field) == (path, record, field)
    assert path in str(e) and fragment in str(e)


FILE_LEVEL_BAD = [
    # the stray '}' is character 43 (0-based) -> column 44
    ("malformed", '{"5": {"query": {}, "pointer_candidates": [}', None, "line 1, column 44 (char 43)"),
    ("truncated", '{\n  "5": {\n    "query": {', None, "line 3"),
    ("top_level_list", "[1, 2]", None, "top level must be a JSON object"),
    ("non_int_key", '{"abc": {}}', "key 'abc'", "not a non-negative integer"),
    ("negative_key", '{"-4": {}}', "key '-4'", "not a non-negative integer"),
    ("duplicate_id", '{"12": {"pointer_candidates": [{"pointer": [1]}]}, '
                     '"012": {"pointer_candidates": [{"pointer": [1]}]}}', "query 12", "appears twice"),
    ("entry_not_dict", '{"3": [1, 2]}', "query 3", "must be an object"),
    ("meta_not_dict", '{"_meta": [], "3": {"pointer_candidates": [{"pointer": [1]}]}}', "_meta",
     "must be an object"),
    ("only_meta", '{"_meta": {}}', None, "no query records"),
]


@pytest.mark.parametrize("case,text,record,fragment", FILE_LEVEL_BAD, ids=[c[0] for c in FILE_LEVEL_BAD])
def test_rl_file_level_bad_input(tmp_path, case, text, record, fragment):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(LeverPlusInputError) as ei:
        read_rl_json(path)
    assert ei.value.file == str(path) and ei.value.record == record
    assert str(path) in str(ei.value) and fragment in str(ei.value)


def test_load_json_missing_file(tmp_path):
    with pytest.raises(LeverPlusInputError, match="file not found"):
        load_json(tmp_path / "nope.json")


def test_rl_writer_validates_before_writing(tmp_path):
    path = tmp_path / "rl.json"
    bad = _plain_records()
    bad["5"]["pointer_candidates"][0]["pointer"] = [1, np.int64(3)]  # numpy int: not JSON, named clearly
    with pytest.raises(LeverPlusInputError, match="numpy.int64") as ei:
        write_rl_json(path, bad, META)
    assert ei.value.record == "query 5, candidate 0" and not path.exists()
    obj = _plain_records()
    obj["2"]["pointer_candidates"] = []
    write_rl_json(path, obj, META, validate=False)  # lets tests of other modules write bad files on purpose
    with pytest.raises(LeverPlusInputError, match="empty group"):
        read_rl_json(path)


# --------------------------------------------------------------------------------------------------
# Beam JSON
# --------------------------------------------------------------------------------------------------


def _beam_records(with_extras=True):
    """Query 4, beam_size 2, 2 shots. Beams are [icd_last_chosen, icd_first_chosen, query]."""
    rec = {"id_list": [[1, 7, 4], [7, 2, 4]], "score_list": [0.25, 0.125]}
    if with_extras:
        rec["shot_scores"] = [[0.5, 0.25], [0.5, 0.125]]  # selection order: first 7 (0.5) then 1 / 2
        rec["beams"] = [{"shots": [{"id": 7, "score": 0.5}, {"id": 1, "score": 0.25}], "final_score": 0.25,
                         "full_sequence": [1, 7, 4]},
                        {"shots": [{"id": 2, "score": 0.5}, {"id": 7, "score": 0.125}], "final_score": 0.125,
                         "full_sequence": [7, 2, 4]}]
        rec["few_shot_num"] = 2
    return {"4": rec, "0": {"id_list": [[3, 5, 0]], "score_list": [-0.5],
                            **({"shot_scores": [[0.25, -0.5]], "few_shot_num": 2} if with_extras else {})}}


@pytest.mark.parametrize("with_extras", [True, False])
def test_beam_round_trip(tmp_path, with_extras):
    path = tmp_path / "beam.json"
    write_beam_json(path, _beam_records(with_extras))
    recs = read_beam_json(path, num_items=8, shot_num=2)
    assert list(recs) == [0, 4]
    r = recs[4]
    assert r.query_id == 4 and r.id_list == [[1, 7, 4], [7, 2, 4]] and r.score_list == [0.25, 0.125]
    assert r.icd_sequences == [(1, 7), (7, 2)]
    if with_extras:
        assert r.few_shot_num == 2 and len(r.beams) == 2
        # total gain = sum of per-step scores: 0.5 + 0.25 = 0.75 ; 0.5 + 0.125 = 0.625 ; 0.25 - 0.5 = -0.25
        assert [r.sequence_infoscore(0), r.sequence_infoscore(1), recs[0].sequence_infoscore(0)] == \
            [0.75, 0.625, -0.25]
    else:
        assert r.shot_scores is None and r.beams is None and r.few_shot_num is None
        # fallback: the stored last-step score
        assert [r.sequence_infoscore(0), r.sequence_infoscore(1)] == [0.25, 0.125]
    path2 = tmp_path / "beam2.json"
    write_beam_json(path2, recs)  # BeamRecord objects write back identically
    assert json.loads(path2.read_text()) == json.loads(path.read_text()) == _beam_records(with_extras)


def _bset(**fields):
    def mutate(obj):
        obj["4"].update(fields)
    return mutate


BEAM_BAD = [
    ("query_not_last", _bset(id_list=[[1, 4, 7], [7, 2, 4]]), {}, "query 4, beam 0", "id_list",
     "does not end with the query id 4"),
    ("unequal_beams", _bset(id_list=[[1, 7, 4], [2, 4]]), {}, "query 4, beam 1", "id_list", "same length"),
    # records are checked in file order: "4" comes first
    ("shot_num_arg", lambda o: None, {"shot_num": 3}, "query 4, beam 0", "id_list", "pass shot_num=2"),
    ("shot_num_inferred", lambda o: o["0"].update(id_list=[[3, 0]], score_list=[1.0], shot_scores=None),
     {}, "query 0, beam 0", "id_list", "same shot count"),
    ("duplicate_id", _bset(id_list=[[7, 7, 4], [7, 2, 4]]), {}, "query 4, beam 0", "id_list", "more than once"),
    ("query_among_icds", _bset(id_list=[[4, 7, 4], [7, 2, 4]]), {}, "query 4, beam 0", "id_list",
     "more than once"),
    ("id_out_of_range", _bset(id_list=[[1, 9, 4], [7, 2, 4]]), {"num_items": 8}, "query 4, beam 0", "id_list",
     "outside [0, 8)"),
    ("no_icd", lambda o: o["0"].update(id_list=[[0]]), {}, "query 0, beam 0", "id_list", "holds no ICD"),
    ("id_list_empty", _bset(id_list=[]), {}, "query 4", "id_list", "non-empty list"),
    ("score_list_length", _bset(score_list=[0.25]), {}, "query 4", "score_list", "2 scores"),
    ("score_nan", _bset(score_list=[0.25, math.nan]), {}, "query 4, beam 1", "score_list", "finite"),
    ("shot_scores_rows", _bset(shot_scores=[[0.5, 0.25]]), {}, "query 4", "shot_scores", "2 per-beam lists"),
    ("shot_scores_width", _bset(shot_scores=[[0.5, 0.25], [0.5]]), {}, "query 4, beam 1", "shot_scores",
     "2 per-step scores"),
    ("shot_scores_inf", _bset(shot_scores=[[0.5, math.inf], [0.5, 0.125]]), {}, "query 4, beam 0", "shot_scores",
     "finite"),
    ("beams_length", lambda o: o["4"]["beams"].pop(), {}, "query 4", "beams", "list of 2 beam objects"),
    ("full_sequence", lambda o: o["4"]["beams"][1].update(full_sequence=[2, 7, 4]), {}, "query 4, beam 1",
     "beams.full_sequence", "!= id_list[1]"),
    ("final_score", lambda o: o["4"]["beams"][0].update(final_score=0.5), {}, "query 4, beam 0",
     "beams.final_score", "!= score_list[0]"),
    ("shots_order", lambda o: o["4"]["beams"][0].update(shots=[{"id": 1, "score": 0.25}, {"id": 7, "score": 0.5}]),
     {}, "query 4, beam 0", "beams.shots", "selection order"),
    ("few_shot_num", _bset(few_shot_num=3), {}, "query 4", "few_shot_num", "hold 2 ICDs"),
]


@pytest.mark.parametrize("case,mutate,kwargs,record,field,fragment", BEAM_BAD, ids=[c[0] for c in BEAM_BAD])
def test_beam_bad_input(tmp_path, case, mutate, kwargs, record, field, fragment):
    obj = _beam_records()
    mutate(obj)
    path = _raw_write(tmp_path / "beam.json", obj)
    with pytest.raises(LeverPlusInputError) as ei:
        read_beam_json(path, **kwargs)
    e = ei.value
    assert (e.file, e.record, e.field) == (path, record, field)
    assert path in str(e) and f"record {record}" in str(e) and repr(field) in str(e) and fragment in str(e)


def test_beam_malformed_json(tmp_path):
    path = tmp_path / "beam.json"
    path.write_text('{"4": {"id_list": [[1, 7, 4]],\n "score_list": [0.1,]}}')
    # line 2 = ' "score_list": [0.1,]}}': 1 space + 12 chars '"score_list"' + ': [' (3) + '0.1,' (4) -> ']' at column 21
    with pytest.raises(LeverPlusInputError, match=r"line 2, column 21"):
        read_beam_json(path)


# --------------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------------


def test_embeddings_pt_round_trip(tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    save_embeddings(tmp_path / "e.pt", t)
    out = read_embeddings(tmp_path / "e.pt", expected_rows=4)
    assert out.dtype == torch.float32 and out.is_contiguous() and torch.equal(out, t)


def test_embeddings_pt_dict_and_float64_npy(tmp_path):
    t = torch.randn(5, 2, dtype=torch.float64)
    torch.save({"embeddings": t, "note": "x"}, tmp_path / "d.pt")
    assert torch.equal(read_embeddings(tmp_path / "d.pt"), t.float())
    np.save(tmp_path / "e.npy", t.numpy())
    out = read_embeddings(tmp_path / "e.npy", expected_rows=5)
    assert out.dtype == torch.float32 and torch.equal(out, t.float())
    save_embeddings(tmp_path / "f.npy", out)
    assert np.load(tmp_path / "f.npy").dtype == np.float32


def test_save_embeddings_of_a_view_stores_only_its_rows(tmp_path):
    big = torch.randn(1000, 16)
    view = big[10:12]
    save_embeddings(tmp_path / "v.pt", view)
    assert torch.equal(read_embeddings(tmp_path / "v.pt"), view)
    # 2 x 16 float32 = 128 bytes of data; the whole parent storage would be 64,000 bytes
    assert os.path.getsize(tmp_path / "v.pt") < 10_000


def _nan_row(t):
    t = t.clone()
    t[3, 1] = math.nan
    return t


EMB_BAD = [
    ("one_d", lambda p: torch.save(torch.zeros(4), p), "e.pt", {}, "shape (4,)"),
    ("three_d", lambda p: torch.save(torch.zeros(2, 2, 2), p), "e.pt", {}, "shape (2, 2, 2)"),
    ("int_dtype", lambda p: torch.save(torch.zeros(3, 2, dtype=torch.int64), p), "e.pt", {}, "not floating"),
    ("int_npy", lambda p: np.save(p, np.zeros((3, 2), dtype=np.int32)), "e.npy", {}, "not floating"),
    ("nan_row", lambda p: torch.save(_nan_row(torch.zeros(5, 2)), p), "e.pt", {}, "row 3 contains NaN"),
    ("inf_row_npy", lambda p: np.save(p, np.array([[0.0, 1.0], [np.inf, 0.0]])), "e.npy", {}, "row 1"),
    ("row_count", lambda p: torch.save(torch.zeros(5, 2), p), "e.pt", {"expected_rows": 7},
     "has 5 rows but 7 were expected"),
    ("dict_two_tensors", lambda p: torch.save({"a": torch.zeros(2, 2), "b": torch.zeros(2, 2)}, p), "e.pt", {},
     "2 tensors"),
    ("dict_no_tensor", lambda p: torch.save({"a": 1}, p), "e.pt", {}, "0 tensors"),
    ("dict_1d_tensor", lambda p: torch.save({"a": torch.zeros(3)}, p), "e.pt", {}, "shape (3,)"),
    ("list_payload", lambda p: torch.save([torch.zeros(2, 2)], p), "e.pt", {}, "not a tensor"),
    ("pickled_object", lambda p: torch.save({"a": torch.zeros(2, 2), "f": _nan_row}, p), "e.pt", {},
     "weights_only"),
    ("object_npy", lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True), "e.npy", {},
     "plain .npy"),
    ("corrupt_pt", lambda p: open(p, "wb").write(b"not a torch file"), "e.pt", {}, "is a text file, not a torch embedding table"),
    ("wrong_suffix", lambda p: open(p, "w").write("1,2"), "e.csv", {}, "unsupported extension"),
    ("missing", lambda p: None, "e.pt", {}, "file not found"),
]


@pytest.mark.parametrize("case,make,name,kwargs,fragment", EMB_BAD, ids=[c[0] for c in EMB_BAD])
def test_embeddings_bad_input(tmp_path, case, make, name, kwargs, fragment):
    path = str(tmp_path / name)
    make(path)
    with pytest.raises(LeverPlusInputError) as ei:
        read_embeddings(path, **kwargs)
    assert ei.value.file == path and path in str(ei.value) and fragment in str(ei.value)


def test_save_embeddings_refuses_nan(tmp_path):
    with pytest.raises(LeverPlusInputError, match="row 3"):
        save_embeddings(tmp_path / "e.pt", _nan_row(torch.zeros(4, 2)))
    assert not (tmp_path / "e.pt").exists()


# --------------------------------------------------------------------------------------------------
# Atomic writers and fingerprints
# --------------------------------------------------------------------------------------------------


def test_atomic_write_json_failure_keeps_old_file(tmp_path):
    path = tmp_path / "out.json"
    atomic_write_json(path, {"old": 1})
    # a big serialisable prefix then an unserialisable object: json.dump fails mid-stream
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": list(range(100_000)), "b": object()})
    assert json.loads(path.read_text()) == {"old": 1}
    assert os.listdir(tmp_path) == ["out.json"]  # no temp file left


def test_write_rl_json_failure_keeps_old_file(tmp_path):
    path = tmp_path / "rl.json"
    write_rl_json(path, _plain_records(), META)
    old = path.read_text()
    bad = _plain_records()
    bad["5"]["pointer_candidates"][2]["extra"] = object()  # passes validation, fails in json.dump
    with pytest.raises(TypeError):
        write_rl_json(path, bad, META)
    assert path.read_text() == old and os.listdir(tmp_path) == ["rl.json"]


def test_atomic_torch_save_failure_keeps_old_file(tmp_path):
    path = tmp_path / "ck.pt"
    atomic_torch_save(path, {"w": torch.ones(2)})
    with pytest.raises(Exception):
        atomic_torch_save(path, {"w": torch.zeros(2), "f": lambda x: x})  # lambdas cannot be pickled
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["ck.pt"]


def test_atomic_write_creates_parents_and_normal_permissions(tmp_path):
    path = tmp_path / "a" / "b" / "x.json"
    atomic_write_json(path, [1, 2], indent=2)
    assert load_json(path) == [1, 2] and path.read_text() == "[\n  1,\n  2\n]"
    plain = tmp_path / "plain.json"
    plain.write_text("[]")
    # mkstemp creates 0600 files; the atomic writer must give the same mode as a plain open()
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_file_fingerprint(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text('{"x": 1}')
    b.write_text('{"y": 2}')
    fp = file_fingerprint([a, b])
    assert len(fp) == 16 and all(ch in "0123456789abcdef" for ch in fp)
    assert file_fingerprint([str(a), str(b)]) == fp  # str and Path agree
    assert file_fingerprint([b, a]) != fp  # order (= role) matters
    assert file_fingerprint(a) == file_fingerprint([a])  # a single path is not iterated char by char
    a.write_text('{"x": 2}')
    assert file_fingerprint([a, b]) != fp  # content change
    a.write_text('{"x": 1}')
    assert file_fingerprint([a, b]) == fp  # deterministic
    moved = tmp_path / "sub"
    moved.mkdir()
    (moved / "a.json").write_text('{"x": 1}')
    (moved / "b.json").write_text('{"y": 2}')
    assert file_fingerprint([moved / "a.json", moved / "b.json"]) == fp  # directory is not hashed
    (moved / "c.json").write_text('{"x": 1}')
    assert file_fingerprint([moved / "c.json", b]) != fp  # name is hashed
    with pytest.raises(LeverPlusInputError, match="not an existing file"):
        file_fingerprint([tmp_path / "missing.json"])


def test_fingerprint_streams_large_files(tmp_path, monkeypatch):
    """Content past the first chunk still counts (the hash is streamed, not truncated)."""
    monkeypatch.setattr(fmt_io, "_HASH_CHUNK", 4)
    p = tmp_path / "big.bin"
    p.write_bytes(b"0123456789")
    fp = file_fingerprint([p])
    p.write_bytes(b"012345678X")
    assert file_fingerprint([p]) != fp


def test_rl_records_are_not_mutated_by_write(tmp_path):
    records = _plain_records()
    snapshot = copy.deepcopy(records)
    write_rl_json(tmp_path / "rl.json", records, META)
    assert records == snapshot
    beams = _beam_records()
    snap_b = copy.deepcopy(beams)
    write_beam_json(tmp_path / "b.json", beams)
    assert beams == snap_b


def test_rlquery_constructed_directly_writes(tmp_path):
    q = RLQuery(query_id=1, query={"query_id": 1}, candidates=[], candidate_pool_ids=None, fix_failed=False)
    with pytest.raises(LeverPlusInputError, match="empty group"):
        write_rl_json(tmp_path / "x.json", {1: q}, META)
    rec = BeamRecord(query_id=1, id_list=[[0, 1]], score_list=[0.5])
    write_beam_json(tmp_path / "b.json", {1: rec})
    assert read_beam_json(tmp_path / "b.json")[1] == rec


def test_atomic_write_text_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    from leverplus.data.formats.io import atomic_open, atomic_write_text

    target = tmp_path / "report.md"
    atomic_write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_open(target, "w") as f:
            f.write("half of the new")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]  # no temp file left behind
    atomic_write_text(target, "new ü\n")
    assert target.read_text(encoding="utf-8") == "new ü\n"


@pytest.mark.parametrize("key", ["9_0_0_0", " 9", "+9", "٩"])
def test_query_keys_are_plain_decimal_ids(tmp_path, key):
    obj = _plain_records()
    obj[key] = obj.pop("5")
    with pytest.raises(LeverPlusInputError) as ei:
        read_rl_json(_raw_write(tmp_path / "bad.json", obj))
    assert ei.value.record == f"key {key!r}" and "non-negative integer" in ei.value.problem


def test_duplicate_json_keys_are_refused(tmp_path):
    text = json.dumps(_plain_records())
    dup = text.replace('"2": {', '"5": {"query": {}, "pointer_candidates": []}, "2": {', 1)
    path = tmp_path / "dup.json"
    path.write_text(dup)
    with pytest.raises(LeverPlusInputError) as ei:
        read_rl_json(str(path))
    assert ei.value.file == str(path) and ei.value.record == "key '5'" and "twice" in ei.value.problem

