"""The persistent LVLM answer cache: keys, hit/miss counting, order, sharing across instances and processes, CLI."""

import multiprocessing as mp
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from leverplus.config.sim_params import SimParams
from leverplus.datagen.scorers.base import Scorer
from leverplus.errors import LeverPlusInputError
from leverplus.evaluation.answer_cache import (
    SCHEMA_VERSION,
    AnswerCache,
    CachedScorer,
    default_path,
    key_digest,
    main,
    prompt_key,
    scorer_identity,
    weights_fingerprint,
)
from leverplus.evaluation.downstream import score_selections
from leverplus.evaluation.vqa_metric import vqa_postprocess
from leverplus.sim.lvlm import SimLVLM
from leverplus.sim.scorer import SimScorer
from leverplus.sim.world import World

REPO = Path(__file__).resolve().parents[2]
IDENTITY = {"model": "fake", "max_new_tokens": 5, "num_beams": 3, "prompt_template": "Question:<Q> Short answer:<A>"}


class FakeScorer(Scorer):
    """Deterministic generations ``"<q>-<icds>"`` (suffix for a second model), counting calls and prompts."""

    def __init__(self, suffix: str = "") -> None:
        self.suffix = suffix
        self.calls = []

    def num_items(self, split):
        return 100

    def item(self, split, query_index):
        return {"question_id": 1000 + query_index, "image_id": 7, "question": f"what is {query_index}?",
                "answer": "x", "gt_answers_raw": [f"{query_index}"] * 10}

    def official_answers(self, split, query_index):
        return None

    def generate(self, split, query_indices, icd_lists):
        self.calls.append((split, list(query_indices), [list(x) for x in icd_lists]))
        return [f"{q}-{list(icds)}{self.suffix}" for q, icds in zip(query_indices, icd_lists)]

    def answer_probs(self, split, query_indices, icd_lists, answers):
        raise NotImplementedError

    def describe(self):
        return {"vqa_model": "fake" + self.suffix, "task_gen_args": {"max_new_tokens": 5}, "eval": {}}

    def extra_method(self):
        return "passed through"


def _cached(path, identity=IDENTITY, suffix=""):
    fake = FakeScorer(suffix)
    return fake, CachedScorer(fake, AnswerCache(path), identity)


def test_hits_and_misses_are_counted(tmp_path):
    fake, cs = _cached(tmp_path / "a.sqlite")
    assert cs.generate("val", [1, 2], [[3, 4], [5, 6]]) == ["1-[3, 4]", "2-[5, 6]"]
    assert (cs.generated, cs.cached, len(fake.calls)) == (2, 0, 1)
    assert cs.generate("val", [1, 2, 3], [[3, 4], [5, 6], [7, 8]]) == ["1-[3, 4]", "2-[5, 6]", "3-[7, 8]"]
    assert (cs.generated, cs.cached, len(fake.calls)) == (3, 2, 2)
    assert fake.calls[-1] == ("val", [3], [[7, 8]])  # only the miss reached the LVLM
    cs.generate("val", [1], [[3, 4]])
    assert len(fake.calls) == 2 and cs.stats()["cached"] == 3  # all hits: no LVLM call at all
    assert cs.stats()["calls"] == 2 and len(cs.cache) == 3


def test_order_is_preserved_with_mixed_hits_and_misses(tmp_path):
    fake, cs = _cached(tmp_path / "a.sqlite")
    cs.generate("test", [2, 4], [[0], [1]])
    qs, icds = [5, 2, 6, 4, 7, 5], [[9], [0], [9], [1], [3], [9]]
    out = cs.generate("test", qs, icds)
    assert out == [f"{q}-{i}" for q, i in zip(qs, icds)]
    # one batched call for the misses, unique prompts in first-seen order (the repeated (5, [9]) generated once)
    assert fake.calls[-1] == ("test", [5, 6, 7], [[9], [9], [3]])
    assert (cs.generated, cs.cached) == (2 + 3, 3)


def test_icd_order_split_and_query_text_are_part_of_the_key(tmp_path):
    fake, cs = _cached(tmp_path / "a.sqlite")
    cs.generate("val", [1], [[3, 4]])
    assert cs.generate("val", [1], [[4, 3]]) == ["1-[4, 3]"]  # reversed ICDs: another prompt
    assert cs.generate("test", [1], [[3, 4]]) == ["1-[3, 4]"]  # another split
    assert (cs.generated, cs.cached) == (3, 0)
    ident = key_digest(IDENTITY)
    base = prompt_key(ident, "val", {"query_index": 1, "question": "a?"}, [3, 4])
    assert prompt_key(ident, "val", {"query_index": 1, "question": "b?"}, [3, 4]) != base
    assert prompt_key(ident, "val", {"question": "a?", "query_index": 1}, (3, 4)) == base  # canonical: dict order


def test_a_different_identity_is_a_miss(tmp_path):
    path = tmp_path / "a.sqlite"
    _, cs = _cached(path)
    cs.generate("val", [1, 2], [[3], [4]])
    fake2, cs2 = _cached(path, identity={**IDENTITY, "max_new_tokens": 10}, suffix="!")
    assert cs2.generate("val", [1, 2], [[3], [4]]) == ["1-[3]!", "2-[4]!"]
    assert (cs2.generated, cs2.cached, len(fake2.calls)) == (2, 0, 1)
    assert len(AnswerCache(path)) == 4


def test_a_second_wrapper_over_the_same_file_generates_nothing(tmp_path):
    path = tmp_path / "a.sqlite"
    qs, icds = list(range(20)), [[q % 3, q % 5] for q in range(20)]
    _, first = _cached(path)
    expected = first.generate("val", qs, icds)
    first.cache.close()
    fake, second = _cached(path)
    assert second.generate("val", qs, icds) == expected
    assert second.stats()["generated"] == 0 and second.stats()["cached"] == 20 and fake.calls == []


def test_answer_batch_and_answer_go_through_the_cache_and_other_methods_pass_through(tmp_path):
    fake, cs = _cached(tmp_path / "a.sqlite")
    assert cs.answer_batch("val", [1, 2], [[3], [4]]) == [vqa_postprocess("1-[3]"), vqa_postprocess("2-[4]")]
    assert cs.answer("val", 1, [3]) == vqa_postprocess("1-[3]")
    assert (cs.generated, cs.cached, len(fake.calls)) == (2, 1, 1)
    assert cs.extra_method() == "passed through" and cs.gt_answers("val", 4) == ["4"] * 10
    rows = score_selections(cs, type("Q", (), {"split": "val", "query_index": [1, 2]})(), [[3], [4]])
    assert [r["prediction"] for r in rows] == cs.answer_batch("val", [1, 2], [[3], [4]]) and len(fake.calls) == 1


def test_answer_batch_is_absent_when_the_wrapped_scorer_has_none(tmp_path):
    class GenerateOnly:
        def generate(self, split, qs, icds):
            return ["a"] * len(qs)

    cs = CachedScorer(GenerateOnly(), AnswerCache(tmp_path / "a.sqlite"), IDENTITY)
    assert not hasattr(cs, "answer_batch") and cs.generate("val", [0], [[1]]) == ["a"]
    with pytest.raises(LeverPlusInputError):
        CachedScorer(object(), AnswerCache(tmp_path / "a.sqlite"), IDENTITY)


def test_a_different_answer_for_a_stored_key_keeps_the_first_and_counts_a_conflict(tmp_path):
    cache = AnswerCache(tmp_path / "a.sqlite")
    assert cache.put_many([("k1", "yes"), ("k2", "no")]) == 2
    assert cache.put_many([("k1", "maybe"), ("k2", "no"), ("k3", "two")]) == 1
    assert cache.get_many(["k1", "k2", "k3", "absent"]) == {"k1": "yes", "k2": "no", "k3": "two"}
    assert cache.stats()["conflicts"] == 1 and cache.stats()["entries"] == 3


def test_wrong_schema_version_is_refused(tmp_path):
    path = tmp_path / "a.sqlite"
    AnswerCache(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(LeverPlusInputError, match="schema version"):
        AnswerCache(path)


def _writer(path: str, worker: int, barrier, out_q) -> None:
    """Worker process: keys 0..299 shifted by 100 per worker (overlapping), answers a function of the key only;
    all four start writing together (barrier), so their transactions interleave."""
    cache = AnswerCache(path)
    barrier.wait(timeout=120)
    keys = [f"k{i}" for i in range(100 * worker, 100 * worker + 300)]
    inserted = 0
    for start in range(0, len(keys), 7):  # many short transactions, interleaving with the other writers
        inserted += cache.put_many([(k, k.upper()) for k in keys[start : start + 7]])
    out_q.put((worker, inserted, cache.conflicts))


def test_concurrent_writers_end_with_exactly_the_union_of_keys(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    ctx = mp.get_context("spawn")
    out_q, barrier = ctx.Queue(), ctx.Barrier(4)
    procs = [ctx.Process(target=_writer, args=(path, w, barrier, out_q)) for w in range(4)]
    for p in procs:
        p.start()
    results = [out_q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    union = {f"k{i}" for i in range(0, 600)}
    with sqlite3.connect(path) as conn:
        rows = dict(conn.execute("SELECT key, answer FROM answers").fetchall())
    assert set(rows) == union and all(v == k.upper() for k, v in rows.items())
    assert sum(r[1] for r in results) == len(union)  # every key inserted by exactly one writer
    assert all(r[2] == 0 for r in results)


def test_clear_empties_the_store_and_it_stays_usable(tmp_path):
    fake, cs = _cached(tmp_path / "a.sqlite")
    cs.generate("val", list(range(50)), [[1]] * 50)
    assert cs.cache.stats()["entries"] == 50 and cs.cache.stats()["bytes"] > 0
    assert cs.cache.clear() == 50 and len(cs.cache) == 0
    cs.generate("val", [0], [[1]])
    assert cs.generated == 51 and len(cs.cache) == 1


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "leverplus.evaluation.answer_cache", *args], env=env,
                          capture_output=True, text=True, timeout=120, check=True).stdout.strip()


def test_cli_info_and_clear(tmp_path, monkeypatch, capsys):
    path = tmp_path / "cli.sqlite"
    with AnswerCache(path) as cache:
        cache.put_many([(f"k{i}", "a") for i in range(12)])
    info = _cli("info", "--path", str(path))
    assert info.startswith(f"answer cache {path.resolve()}: 12 answers, ") and info.endswith("MiB")
    assert "cleared 12 answers" in _cli("clear", "--path", str(path))
    assert len(AnswerCache(path)) == 0
    # in process from here on (each subprocess pays the torch import): without --path the default file is
    # <cache root>/answers.sqlite, and info does not create it
    monkeypatch.setenv("LEVERPLUS_CACHE", str(tmp_path / "root"))
    assert main(["info"]) == 0 and "no file" in capsys.readouterr().out and not (tmp_path / "root").exists()
    AnswerCache().put_many([("k", "a")])
    assert main(["info"]) == 0
    assert capsys.readouterr().out.startswith(f"answer cache {(tmp_path / 'root').resolve() / 'answers.sqlite'}: 1 answers")


def test_default_path_is_under_the_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("LEVERPLUS_CACHE", str(tmp_path))
    assert default_path() == tmp_path.resolve() / "answers.sqlite"


def test_weights_fingerprint_follows_the_weights(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"a": 1}')
    (model / "model.safetensors").write_bytes(b"\x00" * 1000)
    fp = weights_fingerprint(model)
    assert weights_fingerprint(model) == fp
    (model / "model.safetensors").write_bytes(b"\x00" * 999 + b"\x01")
    assert weights_fingerprint(model) != fp
    (model / "model.safetensors").unlink()
    with pytest.raises(LeverPlusInputError, match="no weights"):
        weights_fingerprint(model)


def test_the_simulated_scorer_is_served_from_the_cache_with_the_same_answers(tmp_path):
    # conf/data/sim_tiny.yaml's world
    world = World(SimParams(num_train=400, num_anchors=80, num_val=40, num_test=60, candidate_num=16,
                            embedding_dim=32, shot_nums=[1, 2]))
    sim = SimScorer(SimLVLM(world))
    qs = list(range(10))
    icds = [[int(i) for i in world.pool("test", q)[:2]] for q in qs]
    direct = sim.answer_batch("test", qs, icds)
    identity = scorer_identity(sim)
    assert identity["describe"] == sim.describe() and "weights" not in identity
    first = CachedScorer(sim, AnswerCache(tmp_path / "sim.sqlite"), identity)
    assert first.answer_batch("test", qs, icds) == direct and first.generated == 10
    second = CachedScorer(SimScorer(SimLVLM(world)), AnswerCache(tmp_path / "sim.sqlite"), scorer_identity(sim))
    assert second.answer_batch("test", qs, icds) == direct
    assert (second.generated, second.cached) == (0, 10)
    swapped = [list(reversed(x)) for x in icds]
    assert second.generate("test", qs, swapped) == sim.generate("test", qs, swapped) and second.generated == 10


def test_wrapping_the_trainers_sim_lvlm_as_a_cached_sim_scorer_scores_identically(tmp_path):
    """The wiring docs/answer_cache.md gives for the trainer's sim scorer (a bare SimLVLM, which has no generate):
    CachedScorer(SimScorer(lvlm)) yields the same per-query rows as the SimLVLM itself, from the cache the 2nd time."""
    world = World(SimParams(num_train=400, num_anchors=80, num_val=40, num_test=60, candidate_num=16,
                            embedding_dim=32, shot_nums=[1, 2]))
    lvlm = SimLVLM(world)
    qset = type("Q", (), {"split": "val", "query_index": list(range(40))})()
    sel = [[int(i) for i in world.pool("val", q)[-2:]] for q in range(40)]
    with pytest.raises(LeverPlusInputError, match="no generate"):
        CachedScorer(lvlm, AnswerCache(tmp_path / "a.sqlite"), {})
    sim = SimScorer(lvlm)
    cs = CachedScorer(sim, AnswerCache(tmp_path / "a.sqlite"), scorer_identity(sim))
    expected = score_selections(lvlm, qset, sel)
    assert score_selections(cs, qset, sel) == expected and cs.generated == 40
    cs.reset_stats()
    assert score_selections(cs, qset, sel) == expected and (cs.generated, cs.cached, cs.calls) == (0, 40, 0)
