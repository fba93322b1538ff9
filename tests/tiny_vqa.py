"""A real-data world small enough for tests: the tiny random Qwen2-VL model of the hf scorer tests (no download),
the simulated tiny world's Lever-Plus files (RL JSON, embeddings, beams), and official-format VQA questions and
annotations with generated COCO-named images for the train split (the ICD pool, one question per embedding row)
and a val split (with its own query embeddings)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from omegaconf import OmegaConf
from paths import compose_cfg

NUM_VAL = 5
NUM_IMAGES = 6


def _questions_and_annotations(folder: Path, split: str, n: int, qid0: int) -> None:
    from datagen.test_hf_scorer import ANSWERS, QUESTIONS

    qs = [{"question_id": qid0 + i, "image_id": i % NUM_IMAGES, "question": QUESTIONS[i % 2]} for i in range(n)]
    anns = [{"question_id": qid0 + i, "image_id": i % NUM_IMAGES,
             "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(ANSWERS[i % 2])]} for i in range(n)]
    (folder / f"{split}_questions.json").write_text(json.dumps({"questions": qs}))
    (folder / f"{split}_annotations.json").write_text(json.dumps({"annotations": anns}))


def build(root: Path) -> Dict[str, object]:
    """Everything under ``root``; returns the paths and the ``data=files`` overrides that use them."""
    from datagen.test_hf_scorer import build_tiny_model
    from PIL import Image

    from leverplus.config.sim_params import SimParams
    from leverplus.data.formats.embeddings import save_embeddings
    from leverplus.sim.generate import load_or_generate

    build_tiny_model(root / "model")
    sim = compose_cfg(["data=sim_tiny"]).data.sim
    paths = load_or_generate(SimParams.from_mapping(OmegaConf.to_container(sim)), root / "cache" / "sim")
    n_train = int(sim.num_train)
    for split in ("train2014", "val2014"):
        (root / split).mkdir()
        for i in range(NUM_IMAGES):
            rgb = (np.random.default_rng(i).random((56, 56, 3)) * 255).astype("uint8")
            Image.fromarray(rgb).save(root / split / f"COCO_{split}_{i:012d}.jpg")
    _questions_and_annotations(root, "train", n_train, 1000)
    _questions_and_annotations(root, "val", NUM_VAL, 5000)
    dim = int(sim.embedding_dim)
    # val questions in reverse question-id order in the file: the evaluation sorts them by question id
    qs = json.loads((root / "val_questions.json").read_text())
    qs["questions"] = qs["questions"][::-1]
    (root / "val_questions.json").write_text(json.dumps(qs))
    save_embeddings(root / "val_emb.pt", torch.randn(NUM_VAL, dim, generator=torch.Generator().manual_seed(0)))
    files: List[str] = [
        "data=files", f"+data.files.rl_json.2={paths.rl_json[2]}", f"data.files.embeddings={paths.embeddings}",
        f"data.files.beam_json={paths.beam_json}", f"data.cache_dir={root / 'cache'}", "model.hidden_dim=32",
    ]
    scorer = [
        f"data.files.scorer.model={root / 'model'}",
        f"+data.files.scorer.questions.train={root / 'train_questions.json'}",
        f"+data.files.scorer.annotations.train={root / 'train_annotations.json'}",
        f"+data.files.scorer.images.train={root / 'train2014'}",
        f"+data.files.scorer.questions.val={root / 'val_questions.json'}",
        f"+data.files.scorer.annotations.val={root / 'val_annotations.json'}",
        f"+data.files.scorer.images.val={root / 'val2014'}",
        f"+data.files.scorer.embeddings.val={root / 'val_emb.pt'}",
        "data.files.scorer.system_prompt=''", "data.files.scorer.num_beams=1", "data.files.scorer.max_new_tokens=3",
        "eval.downstream_splits=[val]", "eval.baseline_splits=[val]", "sft.epochs=1", "rce.epochs=1",
        "eval.bootstrap_samples=200",
    ]
    return {"root": root, "files": files, "scorer": scorer, "n_train": n_train, "sim_paths": paths}
