"""The ``hf`` scorer, for real, on a tiny randomly initialised Qwen2-VL model built here (no download): a WordLevel
tokenizer with the Qwen chat special tokens and template, a Qwen2VLImageProcessor, small synthetic PNG images. The
scorer loads everything from the saved folder through ``build_scorer`` / ``from_pretrained(local_files_only)``,
the same path a real Qwen2.5-VL checkpoint takes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
PIL_Image = pytest.importorskip("PIL.Image")

from hydra import compose, initialize_config_dir  # noqa: E402
from paths import REPO  # noqa: E402

from leverplus.data.formats.beam_json import read_beam_json
from leverplus.data.formats.embeddings import save_embeddings
from leverplus.data.formats.rl_json import read_rl_json, write_rl_json
from leverplus.datagen import augment as aug  # noqa: E402
from leverplus.datagen import generate_beam_data as gb  # noqa: E402
from leverplus.datagen import generate_rl_data as gr  # noqa: E402
from leverplus.datagen.candidates import QueryJob, score_queries  # noqa: E402
from leverplus.datagen.scorers.base import build_scorer
from leverplus.datagen.scorers.config import HFScorerConfig, ScorerConfig
from leverplus.datagen.scorers.hf import REFERENCE_SYSTEM_PROMPT, resolve_model_dir
from leverplus.datagen.scorers.vqa_data import OfficialAnnotations, VQAItems
from leverplus.errors import LeverPlusInputError  # noqa: E402
from leverplus.model.checkpoint import save_pointer_checkpoint
from leverplus.model.pointer import PointerSelector

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
WORDS = ["system", "user", "assistant", "Question", "Short", "answer", ":", " ", "\n", "?", ",", ".", "what", "color",
         "is", "the", "dog", "cat", "red", "blue", "dark", "green", "You", "are", "a", "helpful"]
# The Qwen2-VL / Qwen2.5-VL chat template (vision ids off), as shipped with the real checkpoints.
TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != "
    "'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] "
    "}}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in "
    "message['content'] %}{% if content['type'] == 'image' or 'image' in content %}{% set image_count.value = "
    "image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
SYSTEM = "You are a helpful assistant."
QUESTIONS = ["what color is the dog?", "what color is the cat?"]
ANSWERS = [["red"] * 6 + ["dark red"] * 4, ["blue"] * 3 + ["green"] * 7]
N = 6


def build_tiny_model(folder: Path) -> None:
    """Tokenizer, image processor and a 2-layer Qwen2-VL with random weights, saved like a hub checkpoint."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS + ["[UNK]"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=Regex(r"\w+|[^\w\s]|\s"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="[UNK]",
        additional_special_tokens=SPECIAL[1:], chat_template=TEMPLATE)
    image_processor = transformers.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14,
                                                         merge_size=2, temporal_patch_size=2)
    config = transformers.Qwen2VLConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e4},
                         bos_token_id=None, eos_token_id=vocab["<|im_end|>"], pad_token_id=0),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"])
    torch.manual_seed(0)
    transformers.Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    build_tiny_model(root / "model")
    items = []
    for i in range(N):
        rgb = (np.random.default_rng(i).random((56, 56, 3)) * 255).astype("uint8")
        PIL_Image.fromarray(rgb).save(root / f"img{i}.png")
        items.append({"question_id": 500 + i, "image_id": 50 + i, "image": f"img{i}.png",
                      "question": QUESTIONS[i % 2], "answers": ANSWERS[i % 2]})
    (root / "train.json").write_text(json.dumps(items))
    # official annotations for even items only (in the val file, to check the train -> val order)
    ann = {"annotations": [{"question_id": 500 + i, "answers": [{"answer": a} for a in ANSWERS[i % 2]]}
                           for i in range(0, N, 2)]}
    (root / "val_ann.json").write_text(json.dumps(ann))
    (root / "train_ann.json").write_text(json.dumps({"annotations": []}))
    hf = [f"scorer.hf.model={root / 'model'}", f"+scorer.hf.data.train={root / 'train.json'}",
          f"+scorer.hf.annotations.val={root / 'val_ann.json'}",
          f"+scorer.hf.annotations.train={root / 'train_ann.json'}", f"scorer.hf.system_prompt='{SYSTEM}'",
          "scorer.hf.batch_size=4"]
    cfg = ScorerConfig(name="hf", hf=HFScorerConfig(model=str(root / "model"), data={"train": str(root / "train.json")},
                                                    annotations={"val": str(root / "val_ann.json")},
                                                    system_prompt=SYSTEM, batch_size=4))
    return {"root": root, "scorer": build_scorer(cfg), "hf": hf}


def _compose(name, overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf" / "generate"), version_base=None):
        return compose(name, overrides=list(overrides))


# ---------------------------------------------------------------------------------------------- prompt


def test_prompt_is_the_reference_chat_layout(setup):
    s = setup["scorer"]
    assert s.dtype == (torch.bfloat16 if s.device.type == "cuda" else torch.float32)
    text, span = s.render("train", 0, [1, 2])
    assert span is None
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Question:what color is the cat? Short answer:green"
                    "<|vision_start|><|image_pad|><|vision_end|>Question:what color is the dog? Short answer:red"
                    "<|vision_start|><|image_pad|><|vision_end|>Question:what color is the dog? Short answer:"
                    "<|im_end|>\n<|im_start|>assistant\n")
    # ICD labels are the most frequent annotator answer (item 1: 7 x "green" against 3 x "blue")
    assert s.item("train", 1)["answer"] == "green"


def test_reference_system_prompt_is_the_default(setup):
    cfg = HFScorerConfig()
    assert cfg.system_prompt is None and cfg.answer_placement == "assistant"
    assert "four sets of dialogues" in REFERENCE_SYSTEM_PROMPT and "three tokens" in REFERENCE_SYSTEM_PROMPT
    assert (cfg.max_new_tokens, cfg.num_beams, cfg.length_penalty, cfg.min_new_tokens, cfg.do_sample) == \
        (5, 3, 0.0, 0, False)


# ---------------------------------------------------------------------------------------------- answer mask


@pytest.mark.parametrize("placement", ["assistant", "user_turn"])
def test_answer_mask_is_exactly_the_answer_tokens(setup, placement):
    s = setup["scorer"]
    s.answer_placement = placement
    try:
        for answer in ("red", "dark red"):
            ids, mask = s.answer_token_mask("train", 0, [3, 1], answer)
            tok = s.tokenizer
            want = tok(answer, add_special_tokens=False)["input_ids"]  # "dark red" -> dark, " ", red
            pos = mask.nonzero().flatten().tolist()
            assert ids[mask].tolist() == want and tok.decode(ids[mask]) == answer
            assert pos == list(range(pos[0], pos[0] + len(want)))  # one contiguous span
            pads = (ids == s.image_token_id).nonzero().flatten()
            assert len(pads) == 3 * 4 and pos[0] > int(pads.max())  # 3 images x 4 merged patches, answer after them
            rest = tok.convert_ids_to_tokens(ids[pos[-1] + 1:].tolist())
            if placement == "assistant":  # the model's reply: after "<|im_start|>assistant\n", nothing after it
                assert tok.convert_ids_to_tokens(ids[pos[0] - 3:pos[0]].tolist()) == ["<|im_start|>", "assistant",
                                                                                       "\n"]
                assert rest == []
            else:  # the reference: "...Short answer:<a>" then the end of the user turn, no generation prompt
                assert tok.convert_ids_to_tokens(ids[pos[0] - 2:pos[0]].tolist()) == ["answer", ":"]
                assert rest == ["<|im_end|>", "\n"]
    finally:
        s.answer_placement = "assistant"


def test_answer_probs_equal_a_manual_teacher_forced_forward(setup):
    s = setup["scorer"]
    qs, icds, answers = [0, 1, 2, 3, 4], [[1], [2, 3], [], [5, 0], [1]], ["red", "dark red", "blue", "green", ""]
    got = s.answer_probs("train", qs, icds, answers)
    assert got[4] == 0.0  # an empty answer has no tokens
    for b in range(4):
        inputs, mask, _ = s._encode("train", [qs[b]], [icds[b]], [answers[b]])
        with torch.no_grad():
            logits = s.model(**inputs).logits[0].float()  # full logits, no logits_to_keep
        ids = inputs["input_ids"][0]
        pos = mask[0].nonzero().flatten()
        # P = exp(mean over answer tokens t of log softmax(logits[t-1])[ids[t]])
        logp = torch.log_softmax(logits[pos - 1], dim=-1).gather(1, ids[pos][:, None])[:, 0]
        assert got[b] == pytest.approx(float(torch.exp(logp.mean())), rel=1e-4)
    s.batch_size = 1  # the same numbers one prompt at a time (padding does not leak into the scores)
    try:
        assert s.answer_probs("train", qs, icds, answers) == pytest.approx(got, rel=1e-4)
    finally:
        s.batch_size = 4


def test_gt_prob_combines_the_answer_probabilities(setup):
    s = setup["scorer"]
    p = s.answer_probs("train", [0, 0], [[1], [1]], ["red", "dark red"])
    # item 0: "red" x6 -> min(6/3, 1) = 1 ; "dark red" x4 -> 1
    assert s.vqa_gt_prob_batch("train", [0], [[1]])[0] == pytest.approx(p[0] + p[1], rel=1e-5)


def test_generate_decodes_only_new_tokens_deterministically(setup):
    s = setup["scorer"]
    a = s.generate("train", [0, 1, 2], [[1, 3], [5, 0], [4, 2]])
    assert a == s.generate("train", [0, 1, 2], [[1, 3], [5, 0], [4, 2]])
    assert [s.generate("train", [q], [ic])[0] for q, ic in ((0, [1, 3]), (1, [5, 0]), (2, [4, 2]))] == a
    assert all(isinstance(t, str) and "<|im_end|>" not in t and "Question" not in t for t in a)
    text, n = s.prompts("train", [0], [[1, 3]])[0]
    assert text.startswith("<|im_start|>system") and n == len(s._encode("train", [0], [[1, 3]])[0]["input_ids"][0])


# ---------------------------------------------------------------------------------------------- data and loading


def test_official_annotations_train_then_val(setup):
    s = setup["scorer"]
    assert s.official_answers("train", 2) == (ANSWERS[0], "val")  # not in the (empty) train file -> val
    assert s.official_answers("train", 1) is None  # odd items have no annotation -> fallback
    both = OfficialAnnotations({"val": setup["root"] / "val_ann.json", "train": setup["root"] / "val_ann.json"})
    assert list(both.files) == ["train", "val"] and both.lookup(500)[1] == "train"


def test_items_file_errors_name_the_record(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([{"question_id": 1, "image": "a.png", "question": "q",
                                                     "answers": []}]))
    with pytest.raises(LeverPlusInputError, match="item 0.*answers"):
        VQAItems(tmp_path / "bad.json")
    (tmp_path / "ok.jsonl").write_text(json.dumps({"question_id": 1, "image": "a.png", "question": "q",
                                                   "answers": [{"answer": "x"}, {"answer": "y"}, {"answer": "y"}]}))
    items = VQAItems(tmp_path / "ok.jsonl")
    assert items[0].answer == "y" and items[0].image == tmp_path / "a.png"


def test_weights_are_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-home"))
    with pytest.raises(LeverPlusInputError, match="never downloads"):
        resolve_model_dir("leverplus-test/does-not-exist")
    with pytest.raises(LeverPlusInputError, match="scorer.hf.model"):
        resolve_model_dir(None)


# ---------------------------------------------------------------------------------------------- generators


def test_rl_generation_through_the_hf_config(setup, tmp_path):
    torch.manual_seed(0)
    save_embeddings(tmp_path / "emb.pt", torch.randn(N, 8))
    save_pointer_checkpoint(tmp_path / "sel.pt", PointerSelector(d_model=8, hidden_dim=8), phase="sft", epoch=0)
    out = tmp_path / "rl.json"
    cfg = _compose("rl_data", ["scorer=hf", *setup["hf"], f"embeddings={tmp_path / 'emb.pt'}",
                               f"selector.checkpoint={tmp_path / 'sel.pt'}", "queries.ids=[0,1,2]", "shot_num=1",
                               "candidates.num_beams=2", "candidates.temps=[1.0]", "candidates.num_samples_per_temp=1",
                               "candidates.num_retrieval=1", "candidates.num_random=0", "strict_eval=false",
                               "save_prompts=true", f"output={out}"])
    meta = gr.run(cfg, say=lambda m: None)
    data = read_rl_json(out, shot_num=1, num_items=N)
    assert sorted(data.queries) == [0, 1, 2]
    for qid, q in data.queries.items():
        assert q.query["question_id"] == 500 + qid and q.query["gt_answers_raw"] == ANSWERS[qid % 2]
        for c in q.candidates:
            assert c.eval_mode == ("vqaEval" if qid % 2 == 0 else "fallback")
            assert c.raw["eval_split_used"] == ("val" if qid % 2 == 0 else "fallback")
            assert c.raw["vqa_prompt_text"].startswith("<|im_start|>system") and c.raw["vqa_prompt_len"] > 12
            assert 0.0 <= c.raw["vqa_gt_prob"] and qid not in c.pointer
    assert meta["vqa_model"] == "model" and meta["task_gen_args"]["num_beams"] == 3
    assert meta["eval"]["val_ann_path"].endswith("val_ann.json")
    assert meta["eval_mode_counts"]["vqaEval"] + meta["eval_mode_counts"]["fallback"] == data.num_candidates


def test_beam_generation_scores_infoscore_with_the_model(setup, tmp_path):
    out = tmp_path / "beam.json"
    cfg = _compose("beam_data", ["scorer=hf", *setup["hf"], "queries.ids=[0,3]", "pool.candidate_num=3",
                                 "beam_size=2", "max_shot=2", f"output={out}"])
    gb.run(cfg, say=lambda m: None)
    beams = read_beam_json(out, num_items=N, shot_num=2)
    s = setup["scorer"]
    for a, rec in beams.items():
        y = s.item("train", a)["answer"]
        first = rec.id_list[0][-2]  # the first chosen ICD sits next to the query
        p0, p1 = s.answer_probs("train", [a, a], [[], [first]], [y, y])
        # step-1 InfoScore = P(y | [c] + query) - P(y | query)
        assert rec.shot_scores[0][0] == pytest.approx(p1 - p0, rel=1e-4, abs=1e-7)
        assert all(a not in ids[:-1] for ids in rec.id_list)


def test_every_rl_candidate_gets_its_infoscore_from_one_teacher_forced_pass(setup):
    s = setup["scorer"]
    got = s.info_score_batch("train", [0, 1, 0], [[2], [3], [4]])
    y0, y1 = s.item("train", 0)["answer"], s.item("train", 1)["answer"]
    p = s.answer_probs("train", [0, 1, 0, 0, 1], [[2], [3], [4], [], []], [y0, y1, y0, y0, y1])
    # InfoScore = P(y | ICDs + query) − P(y | query)
    assert got == pytest.approx([p[0] - p[3], p[1] - p[4], p[2] - p[3]], rel=1e-4, abs=1e-7)
    cands = [{"gen_method": "random", "pointer": [i], "beam_rank": None, "beam_score": None, "logprob_score": None,
              "temperature": None, "similarity_score": None} for i in (0, 1)]
    recs, _ = score_queries(s, "train", [QueryJob(0, [2, 4], cands)], strict_eval=False)
    assert [c["info_score"] for c in recs[0]["pointer_candidates"]] == pytest.approx([got[0], got[2]], rel=1e-4,
                                                                                      abs=1e-7)


def test_diversity_augmentation_through_the_hf_config(setup, tmp_path):
    torch.manual_seed(0)
    save_embeddings(tmp_path / "emb.pt", torch.randn(N, 8))
    # query 0 (official annotations: "red" x6, "dark red" x4): both candidates fully right; query 1: mixed
    right = {"gen_method": "beam", "vqa_correct": 1, "vqa_acc_score": 1.0, "vqa_eval_mode": "vqaEval"}
    wrong = {"gen_method": "beam", "vqa_correct": 0, "vqa_acc_score": 0.0, "vqa_eval_mode": "vqaEval"}
    write_rl_json(tmp_path / "rl.json", {0: {"query": {"query_id": 0}, "pointer_candidates": [
        {"pointer": [2], **right}, {"pointer": [4], **right}]}, 1: {"query": {"query_id": 1}, "pointer_candidates": [
            {"pointer": [3], **right}, {"pointer": [5], **wrong}]}}, {"strict_eval": True})
    out = tmp_path / "aug.json"
    aug.register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf" / "generate"), version_base=None):
        cfg = compose("augment", overrides=["scorer=hf", *setup["hf"], f"embeddings={tmp_path / 'emb.pt'}",
                                            f"input={tmp_path / 'rl.json'}", f"output={out}", "augment.max_tries=2",
                                            "augment.candidates_per_try=2", "augment.temperature=1.0"])
    stats = aug.run(cfg, say=lambda m: None)
    data = read_rl_json(out, shot_num=1, num_items=N)
    assert stats.below_target_before == 1 and 1 <= stats.tries_used <= 2 and stats.candidates_scored >= 1
    assert len(data.queries[1].candidates) == 2  # already two levels: untouched
    added = data.queries[0].candidates[2:]
    assert len(added) == stats.candidates_added == 1 and stats.single_level_after == 0  # the random model is wrong
    s = setup["scorer"]
    for c in added:  # a level the query lacked, answered and scored by the model (pool: every train item but 0)
        assert c.raw["vqa_acc_score"] != 1.0 and c.raw["augmented"] is True and 0 not in c.pointer
        assert c.raw["vqa_raw_generation"] == s.generate("train", [0], [list(c.pointer)])[0]
        assert c.raw["info_score"] == pytest.approx(s.info_score_batch("train", [0], [list(c.pointer)])[0],
                                                    rel=1e-4, abs=1e-7)
