"""The ``sim`` scorer: the simulated LVLM of :mod:`leverplus.sim` behind the
:class:`~leverplus.datagen.scorers.base.Scorer` interface, so the generic generators produce the same kind of files on the embedded world as on real data.
Its ``build_scorer`` factories (``from_config``, ``from_world_dir``) live next to the world cache in
:mod:`leverplus.sim.generate`.

Correctness follows the simulator's own files (docs/sim.md): the anchors of ``fallback_anchor_set`` have no
official annotations (→ fallback, with the world's coin-flip noise unless ``noisy_fallback=False``); every other
query is scored by the official metric against its annotators' answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from leverplus.config.sim_params import params_hash
from leverplus.datagen.scorers.base import Scorer
from leverplus.errors import LeverPlusInputError
from leverplus.evaluation.vqa_metric import fallback_match, normalize_answer
from leverplus.sim.fallback import fallback_anchor_set, score_fallback
from leverplus.sim.files import EMBEDDINGS_FILE, VQA_MODEL_NAME
from leverplus.sim.lvlm import SimLVLM


class SimScorer(Scorer):
    """:class:`~leverplus.sim.lvlm.SimLVLM` as a scorer.

    fallback_queries: train query ids scored by the fallback (default: the world's ``fallback_anchor_set``).
    noisy_fallback: apply the world's fallback noise (``sim.fallback.score_fallback``) instead of plain
        ``fallback_match``.
    """

    def __init__(self, lvlm: SimLVLM, *, fallback_queries: Optional[Set[int]] = None, noisy_fallback: bool = True,
                 root: Optional[Path] = None) -> None:
        self.lvlm = lvlm
        self.world = lvlm.world
        self.name = VQA_MODEL_NAME
        self.fallback_queries = set(fallback_anchor_set(self.world) if fallback_queries is None else fallback_queries)
        self.noisy_fallback = bool(noisy_fallback)
        self.root = root

    # ---------------------------------------------------------------------------------- data
    def num_items(self, split: str) -> int:
        return len(self.world.items(split))

    def item(self, split: str, query_index: int) -> dict:
        items = self.world.items(split)
        q = int(query_index)
        if not 0 <= q < len(items):
            raise LeverPlusInputError(f"{split} query {q} is outside [0, {len(items)})", field="query_id",
                                      fix="use query ids of the simulated world")
        return {"question_id": int(items.question_id[q]), "image_id": int(items.image_id[q]),
                "question": items.questions[q], "answer": self.world.canonical_answer(split, q),
                "gt_answers_raw": list(items.gt_answers[q])}

    def official_answers(self, split: str, query_index: int) -> Optional[Tuple[List[str], str]]:
        if split == "train" and int(query_index) in self.fallback_queries:
            return None
        return self.gt_answers(split, query_index), split

    def candidate_pool(self, split: str, query_index: int) -> Optional[List[int]]:
        return [int(i) for i in self.world.pool(split, query_index)]

    def embeddings_path(self) -> Optional[str]:
        return str(self.root / EMBEDDINGS_FILE) if self.root is not None else None

    def query_ids(self, split: str) -> Optional[List[int]]:
        return [int(i) for i in self.world.query_ids(split)]

    def fallback_score(self, split: str, query_index: int, icd_ids: Sequence[int], prediction: str,
                       gt_answers: Sequence[str]) -> Tuple[int, float]:
        if not self.noisy_fallback:
            return fallback_match(prediction, gt_answers)
        return score_fallback(self.world, int(query_index), list(icd_ids), prediction, gt_answers)

    # ---------------------------------------------------------------------------------- model
    @staticmethod
    def _arrays(query_indices: Sequence[int], icd_lists: Sequence[Sequence[int]]) -> Tuple[np.ndarray, np.ndarray]:
        lengths = {len(x) for x in icd_lists}
        if len(lengths) > 1:
            raise LeverPlusInputError(f"one batch must have one ICD count, got {sorted(lengths)}", field="icd_lists")
        q = np.asarray(query_indices, dtype=np.int64).reshape(-1)
        icds = np.asarray([list(x) for x in icd_lists], dtype=np.int64).reshape(len(q), lengths.pop() if lengths else 0)
        return q, icds

    def generate(self, split: str, query_indices: Sequence[int], icd_lists: Sequence[Sequence[int]]) -> List[str]:
        q, icds = self._arrays(query_indices, icd_lists)
        return self.lvlm.raw_generation_batch(split, q, icds) if len(q) else []

    def answer_probs(self, split: str, query_indices: Sequence[int], icd_lists: Sequence[Sequence[int]],
                     answers: Sequence[str]) -> np.ndarray:
        """``SimLVLM.answer_prob`` (probability of the answer's class after the official normalisation); the
        canonical class's probability ``p_correct`` is computed in one vectorised call per ICD count."""
        out = np.zeros(len(answers), dtype=np.float64)
        items = self.world.items(split)
        by_len: Dict[int, List[int]] = {}
        for i, icds in enumerate(icd_lists):
            by_len.setdefault(len(icds), []).append(i)
        for idx in by_len.values():
            q, icds = self._arrays([query_indices[i] for i in idx], [icd_lists[i] for i in idx])
            pc = self.lvlm.p_correct_batch(split, q, icds)
            for j, i in enumerate(idx):
                cls = self.world.class_of.get(normalize_answer(answers[i]))
                if cls is None:
                    continue
                if cls == int(items.answer_class[q[j]]):
                    out[i] = pc[j]
                else:
                    out[i] = self.lvlm.answer_prob(split, int(q[j]), icds[j].tolist(), answers[i])
        return out

    def vqa_gt_prob_batch(self, split: str, query_indices: Sequence[int],
                          icd_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """Same numbers as the generic formula, vectorised by the simulator (``SimLVLM.vqa_gt_prob_batch``)."""
        q, icds = self._arrays(query_indices, icd_lists)
        return self.lvlm.vqa_gt_prob_batch(split, q, icds) if len(q) else np.zeros(0)

    def describe(self) -> Dict[str, Any]:
        h = params_hash(self.world.params)
        return {"vqa_model": self.name,
                "task_gen_args": {"answer_decoding": "hash of (seed, query, ICD tuple); see docs/sim.md",
                                  "noisy_fallback": self.noisy_fallback},
                "eval": {"train_ques_path": f"sim://{h}/train/questions",
                         "train_ann_path": f"sim://{h}/train/annotations",
                         "val_ques_path": f"sim://{h}/val/questions", "val_ann_path": f"sim://{h}/val/annotations"}}


__all__ = ["SimScorer"]
