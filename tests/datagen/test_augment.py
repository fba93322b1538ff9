"""Diversity augmentation (leverplus.datagen.augment): a constructed case by hand, the tiny simulated world
(single-level queries before/after, original candidates untouched, the RL-JSON reader round trip, determinism, the
try budget), bad inputs, the command line, the dataset option ``data.diversity_augment`` (cached derived file, run
key, in-process memo) and the data-quality report."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from paths import REPO
from paths import compose_cfg as compose_train

from leverplus.config.identity import run_key, to_container
from leverplus.config.validation import validate_config
from leverplus.data.formats.embeddings import save_embeddings
from leverplus.data.formats.rl_json import read_rl_json, write_rl_json
from leverplus.datagen import augment as aug
from leverplus.datagen import inspect_data
from leverplus.datagen.augment import AugmentSettings, augment_file, augment_rl, level_set
from leverplus.datagen.candidates import QueryJob, score_queries
from leverplus.datagen.scorers.base import Scorer
from leverplus.errors import LeverPlusInputError
from leverplus.pipeline import load_data
from leverplus.sim.scorer import SimScorer


def _quiet(_msg: str) -> None:
    pass


class NearZero(Scorer):
    """Answers "yes" when item 0 is among the ICDs, else "no"; every query's annotators say "yes" (official)."""

    name = "near-zero"

    def num_items(self, split):
        return 8

    def item(self, split, q):
        return {"question_id": 100 + q, "image_id": None, "question": f"q{q}", "answer": "yes",
                "gt_answers_raw": ["yes"] * 10}

    def official_answers(self, split, q):
        return self.gt_answers(split, q), "train"

    def generate(self, split, qs, icds):
        return ["yes" if 0 in ic else "no" for ic in icds]

    def answer_probs(self, split, qs, icds, answers):
        return np.full(len(answers), 0.5)


def _cand(local, pool, acc):
    return {"pointer": local, "pointer_global": [pool[i] for i in local], "gen_method": "beam",
            "vqa_correct": int(acc > 0), "vqa_acc_score": acc, "vqa_eval_mode": "vqaEval"}


@pytest.fixture
def constructed(tmp_path):
    """Items 0, 1 and the queries 5, 6, 7 point along +x, items 2, 3, 4 along -x. Query 7 is all wrong, query 6
    all right, query 5 mixed."""
    emb = torch.tensor([[1.0, 0.0]] * 2 + [[-1.0, 0.0]] * 3 + [[1.0, 0.0]] * 3)
    pool = [0, 1, 2, 3, 4]
    records = {
        5: {"query": {"query_id": 5}, "candidate_pool_ids": pool,
            "pointer_candidates": [_cand([0, 2], pool, 1.0), _cand([2, 3], pool, 0.0)]},
        6: {"query": {"query_id": 6}, "candidate_pool_ids": pool,
            "pointer_candidates": [_cand([0, 2], pool, 1.0), _cand([0, 3], pool, 1.0)]},
        7: {"query": {"query_id": 7}, "candidate_pool_ids": pool,
            "pointer_candidates": [_cand([2, 3], pool, 0.0), _cand([3, 4], pool, 0.0)]},
    }
    path = tmp_path / "rl.json"
    write_rl_json(path, records, {"notes": "constructed", "strict_eval": True})
    return read_rl_json(path, shot_num=2), emb


def test_each_single_level_query_gets_the_missing_level_by_hand(constructed):
    data, emb = constructed
    records, stats = augment_rl(data, NearZero(), emb, AugmentSettings(candidates_per_try=1, temperature=0.1))
    # query 7 (all 0): + similarity, logits ±10 -> it draws the two +x items {0, 1}: "yes", accuracy 1.0
    new7 = records[7]["pointer_candidates"][2:]
    assert len(new7) == 1 and sorted(new7[0]["pointer_global"]) == [0, 1] and new7[0]["vqa_acc_score"] == 1.0
    # query 6 (all 1.0): - similarity -> two of the -x items {2, 3, 4}, without item 0: "no", accuracy 0
    new6 = records[6]["pointer_candidates"][2:]
    assert len(new6) == 1 and set(new6[0]["pointer_global"]) <= {2, 3, 4} and new6[0]["vqa_acc_score"] == 0.0
    for c in new6 + new7:
        assert c["gen_method"] == "aug_diverse" and c["augmented"] is True and c["augment_try"] == 0
        assert c["temperature"] == 0.1 and c["vqa_eval_mode"] == "vqaEval"
        assert [data.queries[5].candidate_pool_ids[i] for i in c["pointer"]] == c["pointer_global"]
    # query 5 already has two levels: searched never, written as it was
    assert records[5] == data.queries[5].to_json_dict()
    assert (stats.single_level_before, stats.single_level_after) == (2, 0)
    assert (stats.candidates_added, stats.tries_used) == (2, 2)
    assert stats.tries_per_query == {"1": 2} and stats.queries_augmented == 2


def test_a_query_that_cannot_reach_the_target_spends_exactly_its_budget(constructed):
    data, emb = constructed
    # three levels are out of reach (the scorer only answers 0 or 1.0): every single-level query spends every try,
    # and query 5 (two levels) now searches too
    records, stats = augment_rl(data, NearZero(), emb, AugmentSettings(target_levels=3, max_tries=3,
                                                                       candidates_per_try=2))
    assert stats.below_target_before == 3 and stats.tries_used == 9 and stats.tries_per_query == {"3": 3}
    assert level_set(records[5]["pointer_candidates"]) == {0.0, 1.0}  # nothing new to add
    assert stats.below_target_after == 3 and stats.single_level_after == 0


# ---------------------------------------------------------------------------------------------- the tiny world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("augment")
    register = ["data=sim_tiny", f"data.cache_dir={root / 'cache'}", "tracking.enabled=false"]
    cfg = compose_train(register)
    data = load_data(cfg)
    return {"root": root, "base": register, "cfg": cfg, "data": data, "scorer": SimScorer(data.scorer),
            "rl": data.rl[2]}


def _augment(world, out, **settings):
    return augment_file(world["rl"].path, str(out), world["scorer"], world["data"].embeddings,
                        AugmentSettings(**settings), shot_num=2)


def test_single_level_queries_drop_and_the_originals_stay_as_they_were(world):
    out = world["root"] / "aug.json"
    meta, stats = _augment(world, out)
    before = world["rl"]
    flat_before = sum(len(level_set([c.raw for c in q.candidates])) == 1 for q in before.queries.values())
    assert stats.single_level_before == flat_before == 10 and stats.queries == 80
    after = read_rl_json(out, shot_num=2, num_items=int(world["data"].embeddings.shape[0]))  # the reader's checks
    flat_after = sum(len(level_set([c.raw for c in q.candidates])) == 1 for q in after.queries.values())
    assert stats.single_level_after == flat_after < flat_before
    assert stats.candidates_added == flat_before - flat_after == after.num_candidates - before.num_candidates
    assert sorted(after.queries) == sorted(before.queries)
    for qid, q in before.queries.items():
        new = after.queries[qid]
        n = len(q.candidates)
        assert [dict(c.raw) for c in new.candidates[:n]] == [dict(c.raw) for c in q.candidates]  # untouched, first
        assert new.candidate_pool_ids == q.candidate_pool_ids and new.query == q.query
        old_levels = level_set([c.raw for c in q.candidates])
        for c in new.candidates[n:]:
            assert c.raw["augmented"] is True and c.gen_method == "aug_diverse"
            assert aug.reward_level(c.raw) not in old_levels and len(old_levels) == 1
            assert set(c.pointer) <= set(q.candidate_pool_ids) and tuple(sorted(c.pointer)) not in \
                {tuple(sorted(o.pointer)) for o in q.candidates}
    assert meta["augment"]["stats"]["candidates_added"] == stats.candidates_added
    assert meta["notes"] == before.meta["notes"]  # the source's _meta is kept


def test_added_scores_are_what_the_scorer_gives_the_same_pointer(world):
    out = world["root"] / "rescored.json"
    _augment(world, out)
    after = read_rl_json(out, shot_num=2)
    added = [(qid, dict(c.raw)) for qid, q in after.queries.items() for c in q.candidates if c.raw.get("augmented")]
    assert added
    jobs = [QueryJob(qid, after.queries[qid].candidate_pool_ids, [dict(c)]) for qid, c in added]
    again, _ = score_queries(world["scorer"], "train", jobs, strict_eval=False)
    for qid, c in added:
        fresh = again[qid]["pointer_candidates"][0]
        for key in ("vqa_pred_answer", "vqa_acc_score", "vqa_correct", "vqa_gt_prob", "info_score", "vqa_eval_mode"):
            assert fresh[key] == c[key]


def test_the_output_is_deterministic_for_a_seed(world):
    a, b, c = (world["root"] / f"seed{i}.json" for i in "aab")
    _augment(world, a)
    _augment(world, world["root"] / "seed_a_again.json")
    _augment(world, c, seed=1)
    assert a.read_bytes() == (world["root"] / "seed_a_again.json").read_bytes()
    added = [[c.pointer for q in read_rl_json(p).queries.values() for c in q.candidates if c.raw.get("augmented")]
             for p in (a, c)]
    assert added[0] != added[1]  # another seed draws other pointers


def test_one_try_spends_one_try_per_searched_query(world):
    _, stats = _augment(world, world["root"] / "one_try.json", max_tries=1)
    assert stats.tries_used == stats.below_target_before == 10 and stats.tries_per_query == {"1": 10}


def test_inspect_data_counts_single_level_queries_and_augmented_candidates(world):
    out = world["root"] / "inspected.json"
    _, stats = _augment(world, out)
    r = inspect_data.inspect_rl(str(out))
    assert r.augmented_candidates == stats.candidates_added
    assert r.augmented_share == round(stats.candidates_added / r.candidates, 4)
    assert r.single_level_share == round(stats.single_level_after / 80, 4)
    plain = inspect_data.inspect_rl(world["rl"].path)
    assert plain.single_level_share == 10 / 80 == 0.125 and plain.augmented_candidates == 0
    assert "single-level queries (one vqa_acc_score level) 12.50% | augmented candidates 0" in \
        inspect_data.format_report(plain)


# ---------------------------------------------------------------------------------------------- bad input


def test_a_bad_input_file_gives_one_clear_error(world, tmp_path):
    raw = json.loads(open(world["rl"].path).read())
    qid = next(k for k in raw if not k.startswith("_"))
    raw[qid]["pointer_candidates"][1]["vqa_acc_score"] = "high"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(LeverPlusInputError) as err:
        augment_file(str(bad), str(tmp_path / "out.json"), world["scorer"], world["data"].embeddings,
                     AugmentSettings())
    e = err.value
    assert e.file == str(bad) and e.record == f"query {qid}, candidate 1" and e.field == "vqa_acc_score"
    assert not (tmp_path / "out.json").exists()
    # pools that do not index the embedding table: the query and the field are named, with a fix
    with pytest.raises(LeverPlusInputError, match="embedding table") as err:
        augment_file(world["rl"].path, str(tmp_path / "out.json"), world["scorer"], world["data"].embeddings[:20],
                     AugmentSettings())
    assert err.value.file == world["rl"].path and err.value.fix
    with pytest.raises(LeverPlusInputError, match="exists already"):
        augment_file(world["rl"].path, world["rl"].path, world["scorer"], world["data"].embeddings, AugmentSettings())


def _compose_app(overrides):
    aug.register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf" / "generate"), version_base=None):
        return compose("augment", overrides=list(overrides))


def test_the_settings_are_range_checked_naming_the_field():
    for override, name in (("augment.target_levels=1", "augment.target_levels"),
                           ("augment.max_tries=0", "augment.max_tries"),
                           ("augment.candidates_per_try=0", "augment.candidates_per_try"),
                           ("augment.temperature=0", "augment.temperature")):
        with pytest.raises(LeverPlusInputError) as err:
            aug.run(_compose_app(["input=a.json", "output=b.json", override]), say=_quiet)
        assert err.value.field == name


def test_the_dataset_option_composes_and_is_range_checked(compose_cfg):
    cfg = compose_cfg(["data=sim_tiny", "data.diversity_augment=true", "data.augment.max_tries=8"])
    validate_config(cfg)
    assert cfg.data.diversity_augment is True and cfg.data.augment.max_tries == 8
    with pytest.raises(LeverPlusInputError) as err:
        validate_config(compose_cfg(["data.augment.target_levels=1"]))
    assert err.value.field == "data.augment.target_levels"
    with pytest.raises(Exception, match="max_trys"):  # a typo fails at compose time
        compose_cfg(["data.augment.max_trys=8"])


def test_the_command_line_writes_the_file_and_reports_a_bad_one_in_one_line(world, tmp_path):
    sim = [f"scorer.sim.params.{k}={json.dumps(v) if isinstance(v, list) else v}"
           for k, v in dict(world["cfg"].data.sim).items() if k in ("num_train", "num_anchors", "num_val", "num_test",
                                                                    "candidate_num", "embedding_dim")]
    sim += [f"scorer.sim.params.shot_nums={list(world['cfg'].data.sim.shot_nums)}",
            f"scorer.sim.cache_dir={world['cfg'].data.cache_dir}"]
    out = tmp_path / "cli.json"
    cmd = [sys.executable, "-m", "leverplus.datagen.augment", f"input={world['rl'].path}", f"output={out}", *sim]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "single-level queries 10 -> " in done.stdout
    _augment(world, tmp_path / "lib.json")
    assert read_rl_json(out).queries.keys() == read_rl_json(tmp_path / "lib.json").queries.keys()
    assert [q.to_json_dict() for q in read_rl_json(out).queries.values()] == \
        [q.to_json_dict() for q in read_rl_json(tmp_path / "lib.json").queries.values()]
    (tmp_path / "broken.json").write_text("{")
    done = subprocess.run(cmd[:3] + [f"input={tmp_path / 'broken.json'}", f"output={tmp_path / 'x.json'}", *sim],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("[leverplus] error:") == 1 and "broken.json" in done.stderr


# ---------------------------------------------------------------------------------------------- dataset option


def test_the_dataset_option_augments_when_the_run_loads_its_data(world, compose_cfg):
    cfg = compose_cfg(world["base"] + ["data.diversity_augment=true"])
    validate_config(cfg)
    data = load_data(cfg)
    plain = world["data"]
    assert data is not plain and data.fingerprint != plain.fingerprint  # the memo keeps them apart
    assert data.rl[2].num_candidates > plain.rl[2].num_candidates
    derived = data.rl[2].path
    assert "/augmented/" in derived and derived in map(str, data.files)
    ours = [q.to_json_dict() for q in data.rl[2].queries.values()]
    _augment(world, world["root"] / "same.json")  # the dataset option = the command on the same file
    assert ours == [q.to_json_dict() for q in read_rl_json(world["root"] / "same.json").queries.values()]
    assert load_data(cfg) is data  # memoised per process
    assert load_data(compose_cfg(world["base"] + ["data.diversity_augment=true", "data.augment.seed=3"])) \
        is not data  # another seed is another derived file
    assert load_data(compose_cfg(world["base"])) is not data


def test_the_run_key_has_the_augmentation_only_when_it_is_on(compose_cfg):
    off, on = to_container(compose_cfg([])), to_container(compose_cfg(["data.diversity_augment=true"]))
    assert run_key(on, "fp") != run_key(off, "fp")
    assert run_key(to_container(compose_cfg(["data.augment.seed=5"])), "fp") == run_key(off, "fp")
    assert run_key(to_container(compose_cfg(["data.diversity_augment=true", "data.augment.seed=5"])), "fp") != \
        run_key(on, "fp")


def test_the_dataset_option_needs_a_scorer(tmp_path, compose_cfg):
    save_embeddings(tmp_path / "emb.pt", torch.randn(8, 4))
    pool = [0, 1, 2, 3, 4]
    write_rl_json(tmp_path / "rl.json", {7: {"query": {"query_id": 7}, "candidate_pool_ids": pool,
                                             "pointer_candidates": [_cand([0, 1], pool, 0.0),
                                                                    _cand([2, 3], pool, 1.0)]}}, {})
    cfg = compose_cfg(["data=files", f"data.files.embeddings={tmp_path / 'emb.pt'}",
                       f"+data.files.rl_json.2={tmp_path / 'rl.json'}", "data.diversity_augment=true"])
    with pytest.raises(LeverPlusInputError, match="needs a scorer") as err:
        load_data(cfg)
    assert err.value.field == "data.diversity_augment" and "data.files.scorer.model" in err.value.fix
