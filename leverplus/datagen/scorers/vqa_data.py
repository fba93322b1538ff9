"""VQA items a real scorer answers about, and the official annotation files that score it (reference#lvlm-prompt, reference#correctness).

Items file (one per split; row i = item i, so train row i is embedding row i and id i in every JSON file): a JSON
list of objects, ``{"items": [...]}``, or JSONL. Each object::

    {"question_id": 2971475, "image_id": 297147, "image": "train2014/COCO_train2014_000000297147.jpg",
     "question": "What sport can you use this for?", "answers": ["racing", "racing", ...], "answer": "racing"}

``answers`` are the annotators' raw answers (strings, or VQA-style ``{"answer": ...}`` objects); ``answer`` (the
ICD label and InfoScore target, the reference's ``answer`` column) defaults to the most frequent of them (ties:
the first seen). ``image`` is resolved against ``image_root`` (default: the items file's folder).

Official annotations (``vqaEval``): the VQA ``*_annotations.json`` files, ``{"annotations": [{"question_id": ..,
"answers": [{"answer": ..}, ...]}, ...]}``, tried in the order train, val, then any other split (reference#correctness).
"""

from __future__ import annotations

import json
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from leverplus.data.formats.io import load_json
from leverplus.errors import LeverPlusInputError

PathLike = Union[str, Path]
#: Official annotation files are tried in this order (reference: train files first, then val).
ANNOTATION_ORDER = ("train", "val")


def _answer_strings(value: Any, *, path: str, record: str) -> List[str]:
    if not isinstance(value, list) or not value:
        raise LeverPlusInputError("must be a non-empty list of the annotators' answers", file=path, record=record,
                                  field="answers", fix='store e.g. ["red", "red", "dark red", ...]')
    out = []
    for a in value:
        if isinstance(a, dict):
            a = a.get("answer")
        if not isinstance(a, str):
            raise LeverPlusInputError(f"answer {a!r} is not a string", file=path, record=record, field="answers")
        out.append(a)
    return out


def most_frequent(answers: Sequence[str]) -> str:
    """The most frequent answer; ties go to the one seen first."""
    counts = Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


def _read_records(path: str) -> List[dict]:
    if path.endswith(".jsonl"):
        rows = []
        try:
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise LeverPlusInputError(f"line {n} is not JSON: {e.msg}", file=path) from e
        except FileNotFoundError as e:
            raise LeverPlusInputError("file not found", file=path, fix="check scorer.hf.data") from e
        return rows
    obj = load_json(path)
    if isinstance(obj, dict) and isinstance(obj.get("items"), list):
        return obj["items"]
    if isinstance(obj, list):
        return obj
    raise LeverPlusInputError("must be a JSON list of items, {\"items\": [...]} or JSONL", file=path)


@dataclass(frozen=True)
class VQAItem:
    question_id: Any
    image_id: Any
    image: Path
    question: str
    answer: str
    answers: Tuple[str, ...]


class VQAItems:
    """The items of one split, validated on load (images are opened lazily, see ``HFScorer``)."""

    def __init__(self, path: PathLike, image_root: Optional[PathLike] = None) -> None:
        self.path = str(path)
        root = Path(image_root) if image_root is not None else Path(self.path).parent
        self.items: List[VQAItem] = []
        for i, rec in enumerate(_read_records(self.path)):
            where = f"item {i}"
            if not isinstance(rec, dict):
                raise LeverPlusInputError(f"must be an object, got {type(rec).__name__}", file=self.path, record=where)
            for name in ("question_id", "question", "image"):
                if name not in rec:
                    raise LeverPlusInputError("is missing", file=self.path, record=where, field=name,
                                              fix="every item needs question_id, question, image and answers")
            if not isinstance(rec["question"], str) or not isinstance(rec["image"], str):
                raise LeverPlusInputError("question and image must be strings", file=self.path, record=where)
            answers = _answer_strings(rec.get("answers"), path=self.path, record=where)
            answer = rec.get("answer", most_frequent(answers))
            if not isinstance(answer, str):
                raise LeverPlusInputError(f"is {answer!r}, not a string", file=self.path, record=where, field="answer")
            image = Path(rec["image"])
            self.items.append(VQAItem(rec["question_id"], rec.get("image_id"), image if image.is_absolute()
                                      else root / image, rec["question"], answer, tuple(answers)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> VQAItem:
        if not 0 <= int(index) < len(self.items):
            raise LeverPlusInputError(f"item {index} is outside [0, {len(self.items)})", file=self.path,
                                      fix="ids must be rows of this items file (the embedding rows)")
        return self.items[int(index)]


class OfficialAnnotations:
    """question_id -> annotators' answers, from official VQA annotation files (``vqaEval``, reference#correctness)."""

    def __init__(self, files: Mapping[str, PathLike]) -> None:
        order = [s for s in ANNOTATION_ORDER if s in files] + sorted(s for s in files if s not in ANNOTATION_ORDER)
        self.files = OrderedDict((s, str(files[s])) for s in order)
        self._tables: Dict[str, Dict[str, List[str]]] = {}

    def _table(self, split: str) -> Dict[str, List[str]]:
        if split not in self._tables:
            path = self.files[split]
            obj = load_json(path)
            anns = obj.get("annotations") if isinstance(obj, dict) else None
            if not isinstance(anns, list):
                raise LeverPlusInputError("has no 'annotations' list", file=path,
                                          fix="pass the official VQA *_annotations.json file")
            table = {}
            for i, ann in enumerate(anns):
                if not isinstance(ann, dict) or "question_id" not in ann:
                    raise LeverPlusInputError("has no question_id", file=path, record=f"annotation {i}")
                table[str(ann["question_id"])] = _answer_strings(ann.get("answers"), path=path,
                                                                 record=f"annotation {i}")
            self._tables[split] = table
        return self._tables[split]

    def lookup(self, question_id: Any) -> Optional[Tuple[List[str], str]]:
        """(answers, split of the first file that has the question) or None."""
        for split in self.files:
            answers = self._table(split).get(str(question_id))
            if answers is not None:
                return list(answers), split
        return None


__all__ = ["ANNOTATION_ORDER", "OfficialAnnotations", "VQAItem", "VQAItems", "most_frequent"]
