"""RL data generation: the shared reference#rldata-candidates candidate builder (hand-computed), scoring and eval modes on constructed
scorers, the generic generator on the embedded world (shots 1-4, read by the core readers, trained on), resume and
sharding byte-identical to an uninterrupted run, the InfoScore beam app, and the data-quality report."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from paths import REPO, compose_cfg

from leverplus.config.sim_params import SimParams
from leverplus.data.formats.beam_json import read_beam_json
from leverplus.data.formats.embeddings import save_embeddings
from leverplus.data.formats.rl_json import read_rl_json
from leverplus.datagen import generate_beam_data as gb
from leverplus.datagen import generate_rl_data as gr
from leverplus.datagen import inspect_data
from leverplus.datagen.candidates import (
    CandidateSettings,
    QueryJob,
    build_candidates,
    dedupe_by_priority,
    eval_mode_percent,
    query_generators,
    random_pointers,
    retrieval_pointers,
    score_queries,
)
from leverplus.datagen.scorers.base import Scorer
from leverplus.datagen.scorers.infoscore import infoscore_beam_search
from leverplus.errors import LeverPlusInputError
from leverplus.model.checkpoint import save_pointer_checkpoint
from leverplus.model.pointer import PointerSelector
from leverplus.pipeline import load_data, train_and_evaluate
from leverplus.sim import generate as simgen
from leverplus.sim.world import World

SIM = dict(num_train=240, num_anchors=20, num_val=4, num_test=4, candidate_num=16, embedding_dim=32,
           fallback_fraction=0.25, shot_nums=[1])
RL_FIELDS = {"pointer", "pointer_global", "pointer_pos", "gen_method", "beam_rank", "beam_score", "logprob_score",
             "temperature", "similarity_score", "vqa_raw_generation", "vqa_pred_answer", "vqa_correct",
             "vqa_acc_score", "vqa_gt_prob", "vqa_rel_token_f1", "vqa_rel_edit_sim", "vqa_rel_score",
             "info_score", "vqa_eval_mode", "eval_split_used", "eval_failed"}


def _compose(name: str, overrides) -> object:
    with initialize_config_dir(config_dir=str(REPO / "conf" / "generate"), version_base=None):
        return compose(name, overrides=list(overrides))


class Stop(Exception):
    """Raised by a ``say`` callback to simulate an interruption right after an interim save."""


def _quiet(_msg: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("rldata")
    torch.manual_seed(0)
    save_pointer_checkpoint(root / "sel.pt", PointerSelector(d_model=32, hidden_dim=32), phase="sft", epoch=0)
    sim = [f"scorer.sim.params.{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in SIM.items()]
    base = sim + [f"scorer.sim.cache_dir={root / 'cache'}"]
    world = World(SimParams(**SIM))
    return {"root": root, "base": base, "selector": f"selector.checkpoint={root / 'sel.pt'}", "world": world,
            "fallback": simgen.fallback_anchor_set(world)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny pointer nets run faster on one thread; restored for the other test files."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rl(env, output, *extra, say=_quiet, scorer=None):
    cfg = _compose("rl_data", env["base"] + [env["selector"], f"output={output}", *extra])
    return gr.run(cfg, say=say, scorer=scorer)


@pytest.fixture(scope="module")
def shot_files(env):
    """The embedded world's RL files for shots 1-4 (non-strict: fallback-scored anchors kept, as the simulator)."""
    out = {}
    for shot in (1, 2, 3, 4):
        path = env["root"] / f"rl_shot{shot}.json"
        _rl(env, path, f"shot_num={shot}", "strict_eval=false")
        out[shot] = path
    return out


# ---------------------------------------------------------------------------------------------- reference#rldata-candidates builder


def test_dedupe_keeps_the_first_position_and_the_highest_priority():
    cands = [{"gen_method": "random", "pointer": [1, 2]}, {"gen_method": "sample", "pointer": [3, 4]},
             {"gen_method": "retrieval", "pointer": [2, 1]},  # same set as random: retrieval wins, slot 0
             {"gen_method": "beam", "pointer": [4, 3]},  # same set as sample: beam wins, slot 1
             {"gen_method": "sample", "pointer": [1, 2]},  # lower than retrieval: ignored
             {"gen_method": "beam", "pointer": [5, 6]}, {"gen_method": "beam", "pointer": [6, 5]}]  # tie: first
    got = dedupe_by_priority(cands)
    assert [(c["gen_method"], c["pointer"]) for c in got] == [("retrieval", [2, 1]), ("beam", [4, 3]),
                                                              ("beam", [5, 6])]


def test_retrieval_windows_by_hand_and_exclusion():
    sim = np.array([0.1, 0.9, 0.5, 0.7, 0.3])  # order by similarity: 1 (.9), 3 (.7), 2 (.5), 4 (.3), 0 (.1)
    got = retrieval_pointers(sim, 2, 3)
    # windows (1,3) mean .8, (3,2) mean .6, (2,4) mean .4
    assert [p for p, _ in got] == [[1, 3], [3, 2], [2, 4]]
    assert [s for _, s in got] == pytest.approx([0.8, 0.6, 0.4])
    # without item 3: order 1, 2, 4, 0 -> (1,2) .7, (2,4) .4, (4,0) .2
    got = retrieval_pointers(sim, 2, 3, exclude=[3])
    assert [p for p, _ in got] == [[1, 2], [2, 4], [4, 0]] and [s for _, s in got] == pytest.approx([.7, .4, .2])
    assert len(retrieval_pointers(sim, 2, 9)) == 4  # only 5 - 2 + 1 windows exist


def test_random_pointers_are_distinct_allowed_and_seeded():
    a = random_pointers(6, 3, 50, np.random.default_rng(7), exclude=[2, 4])
    assert all(len(set(p)) == 3 and not {2, 4} & set(p) for p in a)
    assert a == random_pointers(6, 3, 50, np.random.default_rng(7), exclude=[2, 4])
    with pytest.raises(LeverPlusInputError, match="shot_num"):
        random_pointers(4, 3, 1, np.random.default_rng(0), exclude=[0, 1])


def test_beam_candidates_by_hand():
    logits = torch.tensor([2.0, 1.0, 0.0, 0.0, -1.0])  # static step function, K = 5
    settings = CandidateSettings(num_beams=3, temps=(), num_samples_per_temp=0, num_retrieval=0, num_random=0)
    gens = query_generators(0, 0, 2)
    got = build_candidates(lambda prefix: logits, np.zeros(5), 2, settings, sample_generator=gens[0],
                           random_rng=gens[1])
    # step 1: lse(2,1,0,0,-1) = log 12.475217 = 2.523744 -> beams (0) -.523744, (1) -1.523744, (2) -2.523744
    # step 2 from (0): lse(1,0,0,-1) = log 5.086161 = 1.626523 -> (0,1) = -.523744 - .626523 = -1.150267,
    #                  (0,2) = (0,3) = -.523744 - 1.626523 = -2.150267
    #        from (1): lse(2,0,0,-1) = log 9.756935 = 2.277978 -> (1,0) = -1.523744 - .277978 = -1.801722
    #        from (2): lse(2,1,0,-1) = log 11.475217 = 2.440190 -> (2,0) = -2.523744 - .440190 = -2.963934
    # top 3: (0,1), (1,0), (0,2) [tie with (0,3): lower id]; {0,1} twice -> de-duplicated (first kept)
    assert [c["pointer"] for c in got] == [[0, 1], [0, 2]]
    assert [c["beam_rank"] for c in got] == [0, 2]
    assert [c["logprob_score"] for c in got] == pytest.approx([-1.150267, -2.150267], abs=1e-6)
    # beam_score = Σ step softmax probabilities: e^-.523744 + e^-.626523 = .592299 + .534447 = 1.126746
    assert got[0]["beam_score"] == pytest.approx(1.126746, abs=2e-6)
    assert all(c["gen_method"] == "beam" and c["temperature"] is None for c in got)


def test_no_generator_proposes_an_excluded_item():
    torch.manual_seed(1)
    logits = torch.randn(12)
    sim = np.random.default_rng(0).random(12)
    for shot in (1, 2, 4):
        gens = query_generators(3, 5, shot)
        got = build_candidates(lambda prefix: logits, sim, shot, CandidateSettings(), sample_generator=gens[0],
                               random_rng=gens[1], exclude=[5, 0])
        assert {c["gen_method"] for c in got} >= {"beam", "retrieval"}
        assert all(len(set(c["pointer"])) == shot and not {0, 5} & set(c["pointer"]) for c in got)
        keys = [tuple(sorted(c["pointer"])) for c in got]
        assert len(keys) == len(set(keys))


def test_query_generators_depend_only_on_seed_query_and_shot():
    a, b = query_generators(0, 7, 2), query_generators(0, 7, 2)
    assert torch.equal(torch.rand(3, generator=a[0]), torch.rand(3, generator=b[0]))
    assert a[1].random() == b[1].random()
    assert not torch.equal(torch.rand(3, generator=query_generators(0, 8, 2)[0]),
                           torch.rand(3, generator=query_generators(0, 7, 2)[0]))


# ---------------------------------------------------------------------------------------------- scoring


class FakeScorer(Scorer):
    """Every item: question "q<i>", answer "blue", annotators 2 x "red" + 8 x "blue". The answer is "red" when the
    last ICD id is even, else "Blue, blue" (post-processed to "Blue"). P("red") = .25, P("blue") = .5. Official
    annotations exist for ``official``; ``broken`` queries have an empty official answer list (metric error)."""

    name = "fake"

    def __init__(self, n: int, official, broken=()):
        self.n, self.official, self.broken = n, set(official), set(broken)

    def num_items(self, split):
        return self.n

    def item(self, split, q):
        return {"question_id": 1000 + q, "image_id": None, "question": f"q{q}", "answer": "blue",
                "gt_answers_raw": ["red", "red"] + ["blue"] * 8}

    def official_answers(self, split, q):
        if q in self.broken:
            return [], "val"
        return (self.gt_answers(split, q), "train") if q in self.official else None

    def generate(self, split, qs, icds):
        return ["red" if (ic[-1] if ic else 0) % 2 == 0 else "Blue, blue" for ic in icds]

    def answer_probs(self, split, qs, icds, answers):
        return np.array([{"red": 0.25, "blue": 0.5}.get(a, 0.0) for a in answers])


def test_score_queries_fields_and_eval_modes_by_hand():
    s = FakeScorer(20, official={3}, broken={5})
    jobs = [QueryJob(q, [4, 5, 6], [{"gen_method": "beam", "pointer": [0], "beam_rank": 0, "beam_score": 1.0,
                                     "logprob_score": -0.1, "temperature": None, "similarity_score": None},
                                    {"gen_method": "random", "pointer": [1], "beam_rank": None, "beam_score": None,
                                     "logprob_score": None, "temperature": None, "similarity_score": None}])
            for q in (3, 4, 5)]
    recs, counts = score_queries(s, "train", jobs, strict_eval=False)
    red, blue = recs[3]["pointer_candidates"]
    assert set(red) == RL_FIELDS and recs[3]["candidate_pool_ids"] == [4, 5, 6]
    assert red["pointer"] == [0] and red["pointer_global"] == [4] and blue["pointer_global"] == [5]
    # official: "red" matches 2 of 10 annotators -> 0.6; "Blue" normalises to "blue", 8 matches -> 1.0
    assert (red["vqa_acc_score"], red["vqa_correct"], red["vqa_eval_mode"], red["eval_split_used"]) == \
        (0.6, 1, "vqaEval", "train")
    assert (blue["vqa_raw_generation"], blue["vqa_pred_answer"], blue["vqa_acc_score"]) == ("Blue, blue", "Blue", 1.0)
    # gt_prob = min(2/3, 1)·P(red) + min(8/3, 1)·P(blue) = 2/3·.25 + 1·.5 = .666667 (same for every prompt)
    assert red["vqa_gt_prob"] == pytest.approx(0.6666667) and blue["vqa_gt_prob"] == pytest.approx(0.6666667)
    fb = recs[4]["pointer_candidates"]
    assert [(c["vqa_eval_mode"], c["eval_split_used"], c["vqa_correct"], c["vqa_acc_score"]) for c in fb] == \
        [("fallback", "fallback", 1, 1.0)] * 2  # exact (case-insensitive) GT match
    err = recs[5]["pointer_candidates"]
    assert all(c["vqa_eval_mode"] == "error" and c["eval_failed"] is True and c["vqa_acc_score"] == 0.0
               and c["vqa_gt_prob"] == 0.0 and c["eval_split_used"] is None for c in err)
    assert counts.mode_counts() == {"vqaEval": 2, "fallback": 2, "error": 2}
    assert eval_mode_percent(counts.mode_counts()) == {"vqaEval": 33.33, "fallback": 33.33, "error": 33.33}

    recs, counts = score_queries(s, "train", jobs, strict_eval=True)
    assert recs[4] is None and recs[5] is None and len(recs[3]["pointer_candidates"]) == 2
    assert counts.mode_counts() == {"vqaEval": 2, "fallback": 0, "error": 0}
    assert counts.dropped_counts() == {"no_official_annotation": 2, "eval_error": 2}
    assert counts.empty_queries == [4, 5]


def _tiny_inputs(root: Path, n: int = 10, d: int = 8):
    torch.manual_seed(3)
    save_embeddings(root / "emb.pt", torch.randn(n, d))
    save_pointer_checkpoint(root / "sel8.pt", PointerSelector(d_model=d, hidden_dim=8), phase="rce", epoch=1)
    return [f"embeddings={root / 'emb.pt'}", f"selector.checkpoint={root / 'sel8.pt'}", "queries.ids=[0,1,2,3,4,5]",
            "pool.source=all", "shot_num=1", "candidates.num_beams=3", "candidates.temps=[]",
            "candidates.num_samples_per_temp=0", "candidates.num_retrieval=0", "candidates.num_random=0"]


def test_eval_mode_statistics_on_a_constructed_case(tmp_path):
    args = _tiny_inputs(tmp_path)
    scorer = FakeScorer(10, official={0, 2, 4}, broken={5})  # 1 and 3: no official annotation
    lines = []
    meta = gr.run(_compose("rl_data", args + [f"output={tmp_path / 'loose.json'}", "strict_eval=false"]),
                  say=lines.append, scorer=scorer)
    # 3 beam candidates per query (shot 1: distinct singletons): vqaEval 3·3 = 9, fallback 2·3 = 6, error 1·3 = 3
    # of 18 -> 50 %, 33.33 %, 16.67 %
    assert meta["eval_mode_counts"] == {"vqaEval": 9, "fallback": 6, "error": 3}
    assert meta["eval_mode_percent"] == {"vqaEval": 50.0, "fallback": 33.33, "error": 16.67}
    data = read_rl_json(tmp_path / "loose.json", shot_num=1, num_items=10)
    assert data.meta["eval_mode_counts"] == meta["eval_mode_counts"]
    assert data.eval_mode_counts() == {"error": 3, "fallback": 6, "vqaEval": 9}
    text = "\n".join(lines)
    assert "vqaEval          9   50.00%" in text and "fallback         6   33.33%" in text
    assert "error            3   16.67%" in text

    meta = gr.run(_compose("rl_data", args + [f"output={tmp_path / 'strict.json'}"]), say=_quiet, scorer=scorer)
    assert meta["eval_mode_counts"] == {"vqaEval": 9, "fallback": 0, "error": 0}
    assert meta["eval_mode_percent"]["vqaEval"] == 100.0
    assert meta["dropped_candidates"] == {"eval_error": 3, "no_official_annotation": 6}
    assert meta["empty_queries"] == [1, 3, 5]
    assert sorted(read_rl_json(tmp_path / "strict.json").queries) == [0, 2, 4]


def test_pool_all_writes_global_pointers_without_the_query(tmp_path):
    args = _tiny_inputs(tmp_path)[:-6] + ["shot_num=2"]  # default candidate settings, pool = every train row
    gr.run(_compose("rl_data", args + [f"output={tmp_path / 'all.json'}", "strict_eval=false"]), say=_quiet,
           scorer=FakeScorer(10, official=range(10)))
    data = read_rl_json(tmp_path / "all.json", shot_num=2, num_items=10)
    assert sorted(data.queries) == [0, 1, 2, 3, 4, 5]
    for qid, q in data.queries.items():
        assert q.candidate_pool_ids is None and not q.local_pointers
        assert {c.gen_method for c in q.candidates} >= {"beam", "retrieval"}
        for c in q.candidates:
            assert c.raw["pointer"] == c.raw["pointer_pos"] == list(c.pointer) and qid not in c.pointer
            assert "pointer_global" not in c.raw


class SameGTScorer(FakeScorer):
    """FakeScorer whose ten annotators all wrote "blue"."""

    def item(self, split, q):
        return {**super().item(split, q), "gt_answers_raw": ["blue"] * 10}


def test_vqa_normalization_scores_the_candidates_and_is_part_of_the_generation_settings(tmp_path):
    args = _tiny_inputs(tmp_path)
    scorer = SameGTScorer(10, official=range(10))
    accs = {}
    for norm in ("official", "lever_plus"):
        out = tmp_path / f"{norm}.json"
        meta = gr.run(_compose("rl_data", args + [f"output={out}", f"vqa_normalization={norm}"]), say=_quiet,
                      scorer=scorer)
        assert meta["generation"]["vqa_normalization"] == norm
        accs[norm] = {(c.raw["vqa_pred_answer"], c.raw["vqa_acc_score"])
                      for q in read_rl_json(out, shot_num=1, num_items=10).queries.values() for c in q.candidates}
    # ten identical GTs "blue": official normalises nothing -> "red" 0 and "Blue" 0 ("Blue" != "blue");
    # lever_plus: "Blue" -> "blue" matches all 10 -> 1
    assert accs["official"] == {("red", 0.0), ("Blue", 0.0)}
    assert accs["lever_plus"] == {("red", 0.0), ("Blue", 1.0)}
    with pytest.raises(LeverPlusInputError, match="vqa_normalization"):  # resume refuses another metric
        gr.run(_compose("rl_data", args + [f"output={tmp_path / 'official.json'}", "vqa_normalization=lever_plus"]),
               say=_quiet, scorer=scorer)


# ---------------------------------------------------------------------------------------------- embedded world


def test_shots_1_to_4_are_valid_files_the_trainer_trains_on(env, shot_files, tmp_path):
    w, fallback = env["world"], env["fallback"]
    for shot, path in shot_files.items():
        data = read_rl_json(path, shot_num=shot, num_items=SIM["num_train"])
        assert sorted(data.queries) == sorted(int(a) for a in w.anchors)
        assert data.meta["eval_mode_counts"] == {"vqaEval": data.eval_mode_counts().get("vqaEval", 0),
                                                 "fallback": data.eval_mode_counts().get("fallback", 0), "error": 0}
        assert sum(data.meta["eval_mode_percent"].values()) == pytest.approx(100.0, abs=0.02)
        assert data.meta["vqa_model"] == "sim-lvlm" and data.meta["generation"]["shot_num"] == shot
        for qid, q in data.queries.items():
            assert q.candidate_pool_ids == [int(i) for i in w.pool("train", qid)] and q.local_pointers
            modes = {c.raw["vqa_eval_mode"] for c in q.candidates}
            assert modes == ({"fallback"} if qid in fallback else {"vqaEval"})
            for c in q.candidates:
                assert set(c.raw) == RL_FIELDS and len(c.pointer) == shot
                assert c.raw["vqa_correct"] == int(c.raw["vqa_acc_score"] > 0)
    beam = env["root"] / "beam.json"
    gb.run(_compose("beam_data", env["base"] + [f"output={beam}"]), say=_quiet)
    rl = [f"+data.files.rl_json.{s}={p}" for s, p in shot_files.items()]
    cfg = compose_cfg(["data=files", "tracking.enabled=false", *rl, f"data.files.embeddings={_world_embeddings(env)}",
                       f"data.files.beam_json={beam}", "data.shot_nums=[1,2,3,4]", "sft.epochs=1", "rce.epochs=1",
                       "model.hidden_dim=32", "data.batch_size=32", f"data.cache_dir={tmp_path / 'cache'}",
                       "eval.downstream=false", "objective=val/offline/top1_acc"])
    outcome = train_and_evaluate(cfg, load_data(cfg), tmp_path, say=_quiet)  # SFT on the beams, then RCE
    assert sorted(outcome.filter_stats) == [1, 2, 3, 4]
    assert all(st.queries_kept > 0 for st in outcome.filter_stats.values())
    assert math.isfinite(outcome.metrics["val/offline/top1_acc"]) and outcome.result.history


def _world_embeddings(env) -> Path:
    from leverplus.config.sim_params import params_hash

    return env["root"] / "cache" / "sim" / params_hash(SimParams(**SIM)) / simgen.EMBEDDINGS_FILE


def test_resume_after_an_interruption_is_byte_identical(env, shot_files, tmp_path):
    out = tmp_path / "resumed.json"

    def stop(msg):
        raise Stop(msg)

    with pytest.raises(Stop):
        _rl(env, out, "shot_num=2", "strict_eval=false", "save_interval=7", say=stop)
    interim = json.loads(out.read_text())
    assert "_partial" in interim and "_meta" not in interim and len(interim) == 1 + 7
    assert len(read_rl_json(out, shot_num=2).queries) == 7  # an interim save is already loadable
    assert "unfinished" in " ".join(inspect_data.inspect_rl(str(out)).problems)
    lines = []
    _rl(env, out, "shot_num=2", "strict_eval=false", "save_interval=7", say=lines.append)
    assert "7 of 20 queries done" in lines[0]
    assert out.read_bytes() == shot_files[2].read_bytes()
    # a finished file is left alone; other settings are refused
    mtime = out.stat().st_mtime_ns
    lines = []
    _rl(env, out, "shot_num=2", "strict_eval=false", say=lines.append)
    assert "already complete" in lines[0] and out.stat().st_mtime_ns == mtime
    with pytest.raises(LeverPlusInputError, match="seed"):
        _rl(env, out, "shot_num=2", "strict_eval=false", "seed=1")
    with pytest.raises(LeverPlusInputError, match="already exists"):
        _rl(env, out, "shot_num=2", "strict_eval=false", "resume=false")


def test_shards_merge_to_the_uninterrupted_file(env, shot_files, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    _rl(env, a, "shot_num=2", "strict_eval=false", "queries.end=11")
    _rl(env, b, "shot_num=2", "strict_eval=false", "queries.start=11", "queries.end=-1")
    assert json.loads(a.read_text())["_meta"]["shard"] == {"start": 0, "end": 11, "num_queries_total": 20}
    merged = tmp_path / "merged.json"
    gr.merge_main([str(merged), str(b), str(a)])
    assert merged.read_bytes() == shot_files[2].read_bytes()
    with pytest.raises(LeverPlusInputError, match="uncovered"):
        gr.merge(str(tmp_path / "m1.json"), [str(a)], say=_quiet)
    with pytest.raises(LeverPlusInputError, match="another shard"):
        gr.merge(str(tmp_path / "m2.json"), [str(a), str(a), str(b)], say=_quiet)
    with pytest.raises(LeverPlusInputError, match="other settings"):
        gr.merge(str(tmp_path / "m3.json"), [str(a), str(shot_files[3])], say=_quiet)
    partial = tmp_path / "p.json"
    with pytest.raises(Stop):
        _rl(env, partial, "shot_num=2", "strict_eval=false", "queries.start=11", "save_interval=3",
            say=lambda m: (_ for _ in ()).throw(Stop(m)))
    with pytest.raises(LeverPlusInputError, match="unfinished shard"):
        gr.merge(str(tmp_path / "m4.json"), [str(a), str(partial)], say=_quiet)


def test_beam_app_reproduces_the_simulator_and_its_shards_merge(env, tmp_path):
    full = tmp_path / "beam.json"
    meta = gb.run(_compose("beam_data", env["base"] + [f"output={full}"]), say=_quiet)
    ours = json.loads(full.read_text())
    assert list(ours)[0] == "_meta" and meta["num_queries"] == SIM["num_anchors"]
    paths = simgen.sim_data_paths(_world_embeddings(env).parent, SimParams(**SIM))
    reference = json.loads(paths.beam_json.read_text())
    assert {k: v for k, v in ours.items() if k != "_meta"} == reference  # same InfoScore beams, bit for bit
    assert read_beam_json(full, num_items=SIM["num_train"], shot_num=2)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    gb.run(_compose("beam_data", env["base"] + [f"output={a}", "queries.end=4"]), say=_quiet)
    gb.run(_compose("beam_data", env["base"] + [f"output={b}", "queries.start=4"]), say=_quiet)
    gb.merge_main([str(tmp_path / "m.json"), str(a), str(b)])
    assert (tmp_path / "m.json").read_bytes() == full.read_bytes()


def test_infoscore_beam_search_by_hand_and_the_reference_quirk():
    gain = {1: 0.3, 2: 0.2, 3: -0.1, 4: -0.2}  # additive: InfoScore(c) = gain[c] whatever was chosen

    def prob(qs, icds):
        return np.array([0.1 + sum(gain[int(c)] for c in row) for row in icds])

    rec = infoscore_beam_search(prob, np.array([0]), np.array([[1, 2, 3, 4]]), beam_size=2, max_shot=2)[0]
    # step 1: beams [1] (.3), [2] (.2). step 2: [1] -> 2 (.2), 3 (-.1); [2] -> 1 (.3), 3 (-.1)
    # beam_filter keeps .3 ([1] prepended to [2]) and .2 ([2] prepended to [1])
    assert rec["id_list"] == [[1, 2, 0], [2, 1, 0]] and rec["score_list"] == pytest.approx([0.3, 0.2])
    assert np.allclose(rec["shot_scores"], [[0.2, 0.3], [0.3, 0.2]])
    assert rec["beams"][0]["shots"] == [{"id": 2, "score": pytest.approx(0.2)}, {"id": 1, "score": pytest.approx(0.3)}]
    quirk = infoscore_beam_search(prob, np.array([0]), np.array([[1, 2, 3, 4]]), beam_size=2, max_shot=2,
                                  per_beam_largest=False)[0]
    # step 1: smallest two 4 (-.2), 3 (-.1); kept largest first: [3], [4]
    # step 2: [3] -> 4 (-.2), 2 (.2); [4] -> 3 (-.1), 2 (.2); beam_filter: .2 ([2,3]) and .2 ([2,4]), ties stable
    assert quirk["id_list"] == [[2, 3, 0], [2, 4, 0]]
    assert np.allclose(quirk["shot_scores"], [[-0.1, 0.2], [-0.2, 0.2]])


def test_beam_app_samples_anchors_and_pools_without_the_anchor():
    assert gb.sample_anchors(50, 5, 42) == gb.sample_anchors(50, 5, 42) != gb.sample_anchors(50, 5, 1)
    for a in (0, 7, 49):
        pool = gb.random_pool(a, 50, 49, 42)
        assert sorted(pool) == [i for i in range(50) if i != a]  # all 49 others, the anchor never
    with pytest.raises(LeverPlusInputError, match="pool.candidate_num"):
        gb.random_pool(3, 10, 10, 0)


def test_bad_inputs_fail_naming_the_field(env, tmp_path):
    with pytest.raises(LeverPlusInputError, match="selector.checkpoint"):
        gr.run(_compose("rl_data", env["base"] + [f"output={tmp_path / 'x.json'}"]), say=_quiet)
    torch.manual_seed(0)
    save_pointer_checkpoint(tmp_path / "d16.pt", PointerSelector(d_model=16, hidden_dim=32), phase="sft", epoch=0)
    with pytest.raises(LeverPlusInputError, match="d16.pt"):  # strict load: the input projection does not fit
        _rl(env, tmp_path / "y.json", f"selector.checkpoint={tmp_path / 'd16.pt'}")
    with pytest.raises(LeverPlusInputError, match="outside"):
        _rl(env, tmp_path / "z.json", "queries.ids=[0,999]")
    with pytest.raises(LeverPlusInputError, match="shard"):
        _rl(env, tmp_path / "w.json", "queries.start=40")
    with pytest.raises(LeverPlusInputError, match="unknown scorer"):
        _rl(env, tmp_path / "v.json", "scorer.name=nope")


def test_generate_configs_compose_with_every_scorer():
    for name in ("rl_data", "beam_data"):
        for scorer in ("sim", "hf"):
            cfg = _compose(name, [f"scorer={scorer}"])
            assert cfg.scorer.name == scorer and cfg.scorer.hf.max_new_tokens == 5 and cfg.scorer.hf.num_beams == 3
    assert _compose("rl_data", []).candidates.num_beams == 5 and _compose("rl_data", []).save_interval == 50


def test_cli_generates_then_reports(env, tmp_path):
    out = tmp_path / "cli.json"
    args = env["base"] + [env["selector"], f"output={out}", "shot_num=1", "queries.end=6", "strict_eval=false"]
    proc = subprocess.run([sys.executable, "-m", "leverplus.generate_rl_data", *args], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "eval modes over" in proc.stdout and read_rl_json(out, shot_num=1)
    assert not (tmp_path / "outputs").exists() and not (tmp_path / ".hydra").exists()


# ---------------------------------------------------------------------------------------------- inspect_data


def _cand(ptr, acc, mode="vqaEval", gen="beam", gt_prob=0.5):
    return {"pointer": ptr, "gen_method": gen, "vqa_correct": int(acc > 0), "vqa_acc_score": acc,
            "vqa_gt_prob": gt_prob, "vqa_rel_score": 0.0, "vqa_eval_mode": mode, "eval_failed": False}


def test_inspect_data_statistics_and_problems_by_hand(tmp_path, capsys):
    path = tmp_path / "hand.json"
    obj = {"_meta": {"eval_mode_counts": {"vqaEval": 7, "fallback": 1, "error": 0}},
           "1": {"query": {"query_id": 1}, "pointer_candidates": [_cand([2, 3], 1.0), _cand([2, 4], 0.3),
                                                                   _cand([3, 4], 0.0, gen="random")]},
           "5": {"query": {"query_id": 5}, "pointer_candidates": [_cand([2, 3], 0.0), _cand([3, 2], 0.0)]},
           "6": {"query": {"query_id": 6}, "pointer_candidates": [_cand([2, 3], 0.6), _cand([1, 2], 1.0, "fallback"),
                                                                   _cand([1, 3], 0.0, gen="sample")]}}
    path.write_text(json.dumps(obj))
    r = inspect_data.inspect_rl(str(path))
    assert (r.queries, r.candidates, r.shot_num) == (3, 8, 2)
    assert r.candidates_per_query == {"min": 2, "mean": 2.667, "median": 3.0, "max": 3}
    assert r.gen_methods == {"beam": 6, "random": 1, "sample": 1}
    assert r.eval_modes == {"fallback": 1, "vqaEval": 7} and r.eval_mode_share == {"fallback": 12.5, "vqaEval": 87.5}
    # positives: 1.0, .3 | - | .6, 1.0 -> 4 of 8; query 5 is all negative
    assert (r.positive_ratio, r.queries_all_positive, r.queries_all_negative) == (0.5, 0, 1)
    # training view (fallback dropped): q1 [2.0, 1.3, 0], q5 [0, 0], q6 [1.6, 0] under hard_plus_soft (h + s)
    hps = r.rewards["hard_plus_soft"]
    assert hps.histogram == {"0.0": 4, "1.3": 1, "1.6": 1, "2.0": 1} and not hps.binned
    assert hps.zero_variance_share == pytest.approx(1 / 3, abs=1e-4) and hps.groups == 3
    assert r.rewards["hard_only"].histogram == {"0.0": 4, "1.0": 3}
    assert r.training_view == {"queries": 3, "candidates": 7}
    text = " | ".join(r.problems)
    assert "12.5% of candidates are fallback-scored" in text
    assert "1 candidates repeat an ICD set" in text  # q5: [2,3] and [3,2]
    assert "zero reward variance" not in text  # 33 % < 50 %
    assert inspect_data.main([str(path), "--zero-variance-warn", "0.3"]) == 0
    assert "zero reward variance under hard_plus_soft" in capsys.readouterr().out
    assert inspect_data.main([str(path), "--strict"]) == 1
    capsys.readouterr()
    assert inspect_data.main([str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["rewards"]["soft_only"]["histogram"]["0.3"] == 1
    assert inspect_data.main([str(tmp_path / "missing.json")]) == 2


def test_inspect_bins_a_continuous_reward(shot_files):
    r = inspect_data.inspect_rl(str(shot_files[2]))
    gp = r.rewards["hard01_plus_gtprob"]
    assert gp.binned and len(gp.histogram) == 10 and sum(gp.histogram.values()) == r.training_view["candidates"]
    assert not r.rewards["hard_plus_soft"].binned and r.finished
