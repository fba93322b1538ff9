"""Real downstream evaluation inputs: the official VQA files, a COCO image folder and the ``hf`` scorer (``data=files``).

``data.files.scorer`` names a local vision-language model, and per split the official VQA questions and
annotations JSON files, the image folder (COCO naming, ``COCO_val2014_000000123456.jpg``) and, for the evaluation
splits, the query embeddings. The train split is the ICD pool: its questions, in file order, are the embedding
rows. Everything is checked before any work (the model folder exists, every image the evaluation can touch exists,
every question has an annotation, row counts match); the model is loaded once, through the same
:class:`~leverplus.datagen.scorers.hf.HFScorer` that generates RL data (one implementation of the prompt, the greedy
generation and the post-processing).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from leverplus.data.eval_queries import EvalQuerySet
from leverplus.data.formats.embeddings import read_embeddings
from leverplus.data.formats.io import file_fingerprint, load_json
from leverplus.data.loading import LoadedData, load_files, resolve_input
from leverplus.datagen.scorers.hf import GEN_ARG_NAMES, HFScorer, resolve_model_dir
from leverplus.datagen.scorers.vqa_data import OfficialAnnotations, VQAItem, VQAItems, most_frequent
from leverplus.errors import LeverPlusInputError
from leverplus.utils import enum_value, resolve_device

FIELD = "data.files.scorer"


def _records(path: Path, key: str) -> List[dict]:
    obj = load_json(str(path))
    rows = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(rows, list):
        raise LeverPlusInputError(f"has no {key!r} list", file=str(path),
                                  fix=f"pass the official VQA {key} JSON file")
    return rows


def official_items(split: str, questions: Path, annotations: Path, image_dir: Path, image_name: str) -> VQAItems:
    """The items of one split from the official questions + annotations files, in the questions file's order; every
    image must exist (``image_dir / image_name.format(folder=image_dir.name, image_id=...)``)."""
    answers: Dict[str, List[str]] = {}
    for i, ann in enumerate(_records(annotations, "annotations")):
        if not isinstance(ann, dict) or "question_id" not in ann or not isinstance(ann.get("answers"), list):
            raise LeverPlusInputError("needs question_id and answers", file=str(annotations), record=f"annotation {i}")
        answers[str(ann["question_id"])] = [a.get("answer") if isinstance(a, dict) else a for a in ann["answers"]]
    items: List[VQAItem] = []
    for i, q in enumerate(_records(questions, "questions")):
        where = f"question {i}"
        if not isinstance(q, dict) or not all(k in q for k in ("question_id", "image_id", "question")):
            raise LeverPlusInputError("needs question_id, image_id and question", file=str(questions), record=where)
        got = answers.get(str(q["question_id"]))
        if not got or not all(isinstance(a, str) for a in got):
            raise LeverPlusInputError(f"question_id {q['question_id']} has no answers in the annotations",
                                      file=str(annotations), record=where, field=f"{FIELD}.annotations.{split}",
                                      fix="pass the annotations file of the same split as the questions")
        try:
            name = image_name.format(folder=image_dir.name, image_id=int(q["image_id"]))
        except (KeyError, ValueError, IndexError) as e:
            raise LeverPlusInputError(f"cannot name the image ({e})", field=f"{FIELD}.image_name",
                                      fix="e.g. COCO_{folder}_{image_id:012d}.jpg") from e
        image = image_dir / name
        if not image.is_file():
            raise LeverPlusInputError("image not found", file=str(image), record=f"question_id {q['question_id']}",
                                      field=f"{FIELD}.images.{split}",
                                      fix="check the image folder and data.files.scorer.image_name")
        items.append(VQAItem(q["question_id"], q["image_id"], image, str(q["question"]), most_frequent(got),
                             tuple(got)))
    out = VQAItems.__new__(VQAItems)
    out.path, out.items = str(questions), items
    return out


def _need_path(mapping: Any, split: str, what: str, key: str) -> Path:
    value = (mapping or {}).get(split)
    if not value:
        raise LeverPlusInputError(f"no {what} for split {split!r}", field=f"{FIELD}.{key}",
                                  fix=f"pass +{FIELD}.{key}.{split}=/path/...")
    return resolve_input(str(value), f"{what} ({split})", f"check {FIELD}.{key}.{split}")


def query_set(scorer: Any, split: str, embeddings: torch.Tensor, num_train: int,
              n: Optional[int] = None) -> EvalQuerySet:
    """The evaluation queries of ``split`` sorted by question id (the first ``n`` when given; ``embeddings``: the
    split's rows in file order), each with the whole train pool as its candidates (a train query never gets itself)."""
    qids = [scorer.item(split, i)["question_id"] for i in range(scorer.num_items(split))]
    order = sorted(range(len(qids)), key=qids.__getitem__)[:n]
    everything = list(range(num_train))
    pools = [[j for j in everything if j != i] for i in order] if split == "train" else [everything] * len(order)
    return EvalQuerySet(split, order, embeddings[order], pools)


def attach_scorer(cfg: Any, data: LoadedData) -> LoadedData:
    """``data`` with the real scorer and the evaluation query sets of ``data.files.scorer``; as is without a model."""
    s = cfg.data.files.scorer
    if not s.model:
        return data
    model_dir = resolve_model_dir(s.model, f"{FIELD}.model")  # before reading anything else: a missing model fails first
    splits = sorted(set(dict(s.questions or {})) | {"train"})
    wanted = list(cfg.eval.downstream_splits) if cfg.eval.downstream else []
    items, ann_files, extra = {}, {}, []
    for split in sorted(set(splits) | set(wanted)):
        qp = _need_path(s.questions, split, "questions file", "questions")
        ap = _need_path(s.annotations, split, "annotations file", "annotations")
        ip = _need_path(s.images, split, "image folder", "images")
        items[split] = official_items(split, qp, ap, ip, str(s.image_name))
        ann_files[split] = str(ap)
        extra += [qp, ap]
    n = data.embeddings.shape[0]
    if len(items["train"]) != n:
        raise LeverPlusInputError(f"the train questions file has {len(items['train'])} questions for {n} embedding "
                                  "rows", file=items["train"].path, field=f"{FIELD}.questions.train",
                                  fix="pass the questions file whose rows the embeddings were computed for")
    eval_sets: Dict[str, tuple] = {}
    for split in items:
        if split == "train":
            continue
        ep = _need_path(s.embeddings, split, "query embedding file", "embeddings")
        e = read_embeddings(ep)
        if e.shape[0] != len(items[split]) or e.shape[1] != data.embeddings.shape[1]:
            raise LeverPlusInputError(f"shape {tuple(e.shape)} does not fit {len(items[split])} questions of "
                                      f"dimension {data.embeddings.shape[1]}", file=str(ep),
                                      field=f"{FIELD}.embeddings.{split}")
        eval_sets[split] = (e, ep)
        extra.append(ep)
    device = resolve_device(str(cfg.device))
    scorer = HFScorer(str(model_dir), items, OfficialAnnotations(ann_files),
                      gen_args={k: s[k] for k in GEN_ARG_NAMES}, system_prompt=s.system_prompt,
                      prompt_template=s.prompt_template, batch_size=int(s.batch_size), device=str(device),
                      dtype=str(enum_value(s.dtype)), attn_implementation=s.attn_implementation,
                      min_pixels=s.min_pixels, max_pixels=s.max_pixels, image_cache_size=int(s.image_cache_size))
    files = list(data.files) + extra
    sets = {split: query_set(scorer, split, e, n) for split, (e, _) in eval_sets.items()}
    return replace(data, files=files, fingerprint=file_fingerprint(files), scorer=scorer, eval_sets=sets)


def load_files_with_scorer(cfg: Any) -> LoadedData:
    """``data=files``: the user's Lever-Plus files, plus the real scorer when ``data.files.scorer.model`` is set."""
    return attach_scorer(cfg, load_files(cfg))


__all__ = ["attach_scorer", "load_files_with_scorer", "official_items", "query_set"]
