"""Scorers: an LVLM plus the VQA data it answers about, behind one small interface (reference#rldata).

The generators (``generate_rl_data``, ``generate_beam_data``) and the evaluator only talk to a :class:`Scorer`.
A scorer implements five primitives; everything else is derived here, once, for every scorer:

=====================================  ===================================================================
primitive                               meaning
=====================================  ===================================================================
``num_items(split)``                    how many items the split has (train: one per embedding row)
``item(split, q)``                      the VQA item: question_id, image_id, question, answer, gt_answers_raw
``official_answers(split, q)``          the annotators' answers from official annotation files, with the
                                        split whose file had them (``vqaEval``), or None (→ fallback, reference#correctness)
``generate(split, qs, icds)``           raw decoded generations, one per prompt (before ``vqa_postprocess``)
``answer_probs(split, qs, icds, a)``    teacher-forced ``P(a | prompt) = exp(−mean CE over the answer
                                        tokens)`` (``get_cond_prob``, reference#formats-beam-json), one per prompt
=====================================  ===================================================================

``icds`` are global train ids in prompt order (the last one sits next to the query); ``split`` is the query's
split ("train" for RL/beam anchors). Same arguments -> same outputs.

Registered scorers (``build_scorer(cfg)``, keyed by ``cfg.name``): ``sim`` (the embedded simulated world,
:mod:`leverplus.sim.scorer`, built by ``leverplus.sim.generate:from_config``) and ``hf`` (a transformers
Qwen2-VL-family model, :mod:`leverplus.datagen.scorers.hf`, optional extra ``pip install -e .[lvlm]``). The registry
names modules by string and ``build_scorer`` imports the chosen one on demand: this module never imports the
simulator (a higher layer), and ``transformers`` is never needed for ``sim``."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from leverplus.errors import LeverPlusInputError
from leverplus.evaluation.vqa_metric import fallback_match, gt_prob_formula, vqa_postprocess


class Scorer(ABC):
    """An LVLM that answers VQA queries given ordered ICDs, and the data it answers about."""

    #: ``_meta.vqa_model`` of the files this scorer produces.
    name: str = "scorer"
    #: ``full_credit_count`` of :func:`gt_prob_formula` (reference 3: three matching annotators give full credit).
    gt_prob_full_credit: int = 3

    # ---------------------------------------------------------------------------------- primitives
    @abstractmethod
    def num_items(self, split: str) -> int:
        """Number of items of ``split`` (train: the ICD pool, one per embedding row)."""

    @abstractmethod
    def item(self, split: str, query_index: int) -> dict:
        """``{"question_id", "image_id", "question", "answer", "gt_answers_raw"}`` of one item. ``answer`` is the
        dataset's answer column (the most frequent annotator answer): the ICD label and the InfoScore target."""

    @abstractmethod
    def official_answers(self, split: str, query_index: int) -> Optional[Tuple[List[str], str]]:
        """(annotators' answers, split whose official annotation file has the question) or None (reference#correctness)."""

    @abstractmethod
    def generate(self, split: str, query_indices: Sequence[int], icd_lists: Sequence[Sequence[int]]) -> List[str]:
        """Raw generations (decoded new tokens, special tokens skipped), one per (query, ICDs) prompt."""

    @abstractmethod
    def answer_probs(self, split: str, query_indices: Sequence[int], icd_lists: Sequence[Sequence[int]],
                     answers: Sequence[str]) -> np.ndarray:
        """Teacher-forced ``P(answer_i | prompt_i)`` (``exp(−mean CE)`` over exactly the answer's tokens)."""

    # ---------------------------------------------------------------------------------- optional
    def candidate_pool(self, split: str, query_index: int) -> Optional[List[int]]:
        """The query's own candidate pool (global train ids) when the data defines one (the simulated
        RandSampler pools), else None."""
        return None

    def embeddings_path(self) -> Optional[str]:
        """The data's own ``[N_train, d]`` embedding file (the simulated world's), else None."""
        return None

    def query_ids(self, split: str) -> Optional[List[int]]:
        """The data's own query ids for ``split`` (the simulated anchors), else None."""
        return None

    def prompts(self, split: str, query_indices: Sequence[int],
                icd_lists: Sequence[Sequence[int]]) -> List[Tuple[str, int]]:
        """(prompt text, prompt length in tokens) of each generation prompt, for ``save_prompts``."""
        raise LeverPlusInputError(f"the {self.name!r} scorer has no text prompts to save", field="save_prompts",
                                  fix="set save_prompts=false")

    def describe(self) -> Dict[str, Any]:
        """``_meta`` fields of generated files: ``vqa_model``, ``task_gen_args`` and ``eval`` (annotation files)."""
        return {"vqa_model": self.name, "task_gen_args": {}, "eval": {}}

    def fallback_score(self, split: str, query_index: int, icd_ids: Sequence[int], prediction: str,
                       gt_answers: Sequence[str]) -> Tuple[int, float]:
        """String-match correctness when no official annotation has the question (reference#correctness fallback)."""
        return fallback_match(prediction, gt_answers)

    # ---------------------------------------------------------------------------------- derived
    def query_record(self, split: str, query_index: int) -> dict:
        """The reference#formats-rl-json ``query`` object: query_id, question_id, image_id, question, gt_answers_raw, gt_answers_norm."""
        it = self.item(split, query_index)
        raw = [str(a) for a in it["gt_answers_raw"]]
        return {"query_id": int(query_index), "question_id": it["question_id"], "image_id": it.get("image_id"),
                "question": it["question"], "gt_answers_raw": raw, "gt_answers_norm": [vqa_postprocess(a) for a in raw]}

    def gt_answers(self, split: str, query_index: int) -> List[str]:
        """The annotators' raw answers (the evaluator's ``Scorer`` protocol)."""
        return [str(a) for a in self.item(split, query_index)["gt_answers_raw"]]

    def answer_batch(self, split: str, query_indices: Sequence[int],
                     icd_lists: Sequence[Sequence[int]]) -> List[str]:
        """Post-processed answers (``vqa_postprocess`` of the raw generations): what the VQA metric scores."""
        return [vqa_postprocess(t) for t in self.generate(split, query_indices, icd_lists)]

    def answer(self, split: str, query_index: int, icd_ids: Sequence[int]) -> str:
        """One post-processed answer (the evaluator's ``Scorer`` protocol)."""
        return self.answer_batch(split, [query_index], [list(icd_ids)])[0]

    def info_score_batch(self, split: str, query_indices: Sequence[int],
                         icd_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """InfoScore of each prompt's ICDs: ``P(y | ICDs + query) − P(y | query)`` with ``y`` the item's ``answer``
        (the beam search's target), by :meth:`answer_probs`: one teacher-forced pass per prompt plus one zero-shot
        pass per distinct query. For an InfoScore beam this is the sum of its per-step ``shot_scores``."""
        qs = [int(q) for q in query_indices]
        if not qs:
            return np.zeros(0, dtype=np.float64)
        targets = {q: self.item(split, q)["answer"] for q in dict.fromkeys(qs)}
        distinct = list(targets)
        p0 = self.answer_probs(split, distinct, [[] for _ in distinct], [targets[q] for q in distinct])
        zero_shot = {q: float(p) for q, p in zip(distinct, p0)}
        p = self.answer_probs(split, qs, [[int(i) for i in icds] for icds in icd_lists], [targets[q] for q in qs])
        return np.asarray([float(pi) - zero_shot[q] for pi, q in zip(p, qs)], dtype=np.float64)

    def vqa_gt_prob_batch(self, split: str, query_indices: Sequence[int],
                          icd_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """reference#gt-prob for each prompt: the GT strings after ``vqa_postprocess``, each unique one scored once by
        :meth:`answer_probs` (one batch for all prompts), combined by :func:`gt_prob_formula`."""
        pairs_q, pairs_icds, pairs_a, owners = [], [], [], []
        norms = []
        for b, (q, icds) in enumerate(zip(query_indices, icd_lists)):
            norm = [vqa_postprocess(a) for a in self.gt_answers(split, q)]
            norms.append(norm)
            for a in dict.fromkeys(norm):
                pairs_q.append(int(q))
                pairs_icds.append(list(icds))
                pairs_a.append(a)
                owners.append(b)
        probs = self.answer_probs(split, pairs_q, pairs_icds, pairs_a) if pairs_q else np.zeros(0)
        per_prompt: List[Dict[str, float]] = [{} for _ in norms]
        for b, a, p in zip(owners, pairs_a, probs):
            per_prompt[b][a] = float(p)
        return np.asarray([gt_prob_formula(norm, per_prompt[b].__getitem__, self.gt_prob_full_credit)
                           for b, norm in enumerate(norms)], dtype=np.float64)


# ------------------------------------------------------------------------------------------------------
# Config and registry
# ------------------------------------------------------------------------------------------------------


#: scorer name -> "module:factory"; factories take the ScorerConfig and return a Scorer.
SCORERS: Dict[str, str] = {"sim": "leverplus.sim.generate:from_config",
                           "hf": "leverplus.datagen.scorers.hf:from_config"}


def build_scorer(cfg: Any) -> Scorer:
    """The scorer named ``cfg.name`` (a :class:`ScorerConfig` or an equivalent DictConfig)."""
    name = cfg.name
    if name not in SCORERS:
        raise LeverPlusInputError(f"unknown scorer {name!r}", field="scorer.name",
                                  fix=f"use one of: {', '.join(sorted(SCORERS))}")
    module, factory = SCORERS[name].split(":")
    return getattr(importlib.import_module(module), factory)(cfg)


__all__ = ["SCORERS", "Scorer", "build_scorer"]

