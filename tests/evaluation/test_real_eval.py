"""Downstream evaluation on real-format data: official VQA files, COCO-named images and the tiny random Qwen2-VL
model (built in the test, no download) answering through the hf scorer; input errors before any work; the
per-shot metrics; the proxy objective without a scorer; the device setting."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL.Image")

import tiny_vqa  # noqa: E402

from leverplus.config.validation import validate_config  # noqa: E402
from leverplus.data.formats.embeddings import save_embeddings  # noqa: E402
from leverplus.datagen.scorers.hf import HFScorer  # noqa: E402
from leverplus.errors import LeverPlusInputError  # noqa: E402
from leverplus.evaluation.head_to_head import format_accuracy_table, head_to_head  # noqa: E402
from leverplus.pipeline import load_data  # noqa: E402
from leverplus.train import run  # noqa: E402
from leverplus.utils import resolve_device  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_vqa.build(tmp_path_factory.mktemp("realvqa"))


def _cfg(compose_cfg, world, *extra):
    return compose_cfg([*world["files"], *world["scorer"], "tracking.enabled=false", "plot_curves=false", *extra])


def test_official_files_become_the_scorers_items_and_sorted_val_queries(world, compose_cfg):
    data = load_data(_cfg(compose_cfg, world))
    s = data.scorer
    assert isinstance(s, HFScorer) and s.num_items("train") == world["n_train"]
    # train row i = question i of the file; the ICD label is the most frequent annotator answer
    assert s.item("train", 1)["question_id"] == 1001 and s.item("train", 1)["answer"] == "green"
    assert s.gt_answers("train", 0) == ["red"] * 6 + ["dark red"] * 4
    assert s._split_items("val")[0].image.name == "COCO_val2014_000000000004.jpg"  # file row 0 = qid 5004
    qset = data.eval_sets["val"]
    # the file lists val questions in reverse id order: the query set is sorted by question id
    assert [s.item("val", q)["question_id"] for q in qset.query_index] == [5000, 5001, 5002, 5003, 5004]
    assert qset.query_index == [4, 3, 2, 1, 0] and all(p == list(range(world["n_train"])) for p in qset.pools)


def test_a_missing_model_or_image_fails_before_any_work(world, compose_cfg, tmp_path):
    with pytest.raises(LeverPlusInputError, match="scorer.model"):
        load_data(_cfg(compose_cfg, world, f"data.files.scorer.model={tmp_path / 'no_model'}"))
    empty = tmp_path / "val2014"
    empty.mkdir()
    with pytest.raises(LeverPlusInputError, match="COCO_val2014_000000000004.jpg") as e:
        load_data(_cfg(compose_cfg, world, f"++data.files.scorer.images.val={empty}"))
    assert "data.files.scorer.images.val" in str(e.value)
    save_embeddings(tmp_path / "short.pt", torch.randn(3, 32))  # 3 rows for 5 val questions
    with pytest.raises(LeverPlusInputError, match="embeddings.val"):
        load_data(_cfg(compose_cfg, world, f"++data.files.scorer.embeddings.val={tmp_path / 'short.pt'}"))


def test_training_on_files_evaluates_every_shot_and_optimises_the_vqa_accuracy(world, compose_cfg, tmp_path, capsys):
    value = run(_cfg(compose_cfg, world, f"output_dir={tmp_path}/out"))
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["objective"] == "val/downstream_acc" and m["objective_value"] == pytest.approx(value)
    got = m["metrics"]
    for shot in (1, 2, 3, 4):  # eval.shot_nums default: S1-S4 of one model trained at shot 2
        assert f"val/downstream/shot{shot}/selector_acc" in got
        assert got[f"val/downstream_acc_shot{shot}"] == got[f"val/downstream/shot{shot}/selector_acc"]
        assert got[f"val/downstream/shot{shot}/random_n"] == tiny_vqa.NUM_VAL
    assert got["val/downstream_acc"] == got["val/downstream_acc_shot2"]  # the trained shot
    rows = [json.loads(x) for x in (tmp_path / "out" / "per_query.jsonl").read_text().splitlines()]
    sel = [r for r in rows if r.get("kind") == "downstream" and r["method"] == "selector" and r["shot_num"] == 3]
    assert len(sel) == tiny_vqa.NUM_VAL and all(len(r["icds"]) == 3 for r in sel)
    assert "falls back" not in capsys.readouterr().out


def test_without_a_scorer_the_objective_is_the_offline_proxy_and_says_so(world, compose_cfg, tmp_path, capsys):
    value = run(compose_cfg([*world["files"], "tracking.enabled=false", "plot_curves=false", "rce.epochs=1",
                             "sft.epochs=1", f"output_dir={tmp_path}/out"]))
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["objective"] == "val/offline/top1_acc" and m["objective_value"] == pytest.approx(value)
    assert "falls back to the offline proxy val/offline/top1_acc" in capsys.readouterr().out


def test_head_to_head_pairs_every_two_methods_on_the_same_queries(world, compose_cfg):
    data = load_data(_cfg(compose_cfg, world))
    qset = data.eval_sets["val"].head(3)
    res = head_to_head(data.scorer, qset, data.embeddings, [1, 2], {}, ["zero_shot", "random", "similarity"],
                       n_boot=100)
    assert set(res.pairs) == {(a, b, s) for s in (1, 2) for a, b in
                              (("zero_shot", "random"), ("zero_shot", "similarity"), ("random", "similarity"))}
    for (a, b, s), p in res.pairs.items():
        accs_a = [r["acc"] for r in res.rows[(a, s)]]
        accs_b = [r["acc"] for r in res.rows[(b, s)]]
        assert p.n == 3 and p.delta == pytest.approx(sum(accs_a) / 3 - sum(accs_b) / 3)
    # zero-shot prompts have no ICDs, so S1 and S2 give the same answers
    assert [r["prediction"] for r in res.rows[("zero_shot", 1)]] == [r["prediction"] for r in res.rows[("zero_shot", 2)]]
    assert "| method | S1 | S2 | n |" in format_accuracy_table(res)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda:99"])
def test_device_is_validated(compose_cfg, device):
    with pytest.raises(LeverPlusInputError, match="device"):
        validate_config(compose_cfg(["data=sim_tiny", f"device={device}"]))


def test_auto_device_is_cuda_exactly_when_present(compose_cfg):
    validate_config(compose_cfg(["data=sim_tiny", "device=auto"]))
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_scorer_runs_on_the_gpu_in_bfloat16(world, compose_cfg, tmp_path):
    data = load_data(_cfg(compose_cfg, world, "device=cuda"))
    assert data.scorer.device.type == "cuda" and data.scorer.dtype == torch.bfloat16
    assert next(data.scorer.model.parameters()).is_cuda
    value = run(_cfg(compose_cfg, world, "device=cuda", f"output_dir={tmp_path}/out"))
    assert 0.0 <= value <= 1.0
