"""The simulated in-context-learning world: runs everything on a laptop, with no model weights or dataset,
and gives tests data whose ground truth is known (docs/sim.md).

* :class:`SimParams` (``params.py``): every knob; nested in the Hydra config as ``data.sim``.
* :class:`World` (``world.py``): train items (the ICD pool), val/test queries, hidden factors, visible
  embeddings, annotator answers with surface variants, RandSampler 64-pools.
* :class:`SimLVLM` (``lvlm.py``): answers a query given an ordered ICD sequence; ``p_correct``,
  ``answer_prob`` (teacher forcing), hash-seeded deterministic answers. It is also the downstream scorer.
* ``generate.py``: writes the Lever-Plus files (embeddings ``.pt``, InfoScore beam JSON, RL JSON per shot) plus
  our eval-query JSON; :func:`load_or_generate` caches them under ``<cache_root>/<params_hash>/``.

Scorer interface
----------------
The evaluator needs only two methods (``SimLVLM`` implements them; a real LVLM scorer would too)::

    answer(split, query_index, icd_ids) -> str       # post-processed answer, ready for vqa_accuracy
    gt_answers(split, query_index) -> list[str]      # the 10 annotators' raw answers

``split`` is ``"train"`` (the query is a train item, e.g. an RL anchor), ``"val"`` or ``"test"``;
``icd_ids`` are global train ids in prompt order (the last one sits next to the query). Same arguments ->
same answer.

Attributes are imported lazily, so ``import leverplus.sim.params`` (done by the config) stays light and free
of import cycles.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, List, Protocol, Sequence


class Scorer(Protocol):
    """Answers a VQA query given ordered ICDs (global train ids); see the module docstring."""

    def answer(self, split: str, query_index: int, icd_ids: Sequence[int]) -> str: ...

    def gt_answers(self, split: str, query_index: int) -> List[str]: ...


_EXPORTS = {
    "SimParams": "params", "params_hash": "params", "params_dict": "params", "GENERATOR_VERSION": "params",
    "World": "world", "VOCABULARY": "world", "surface_variants": "world",
    "SimLVLM": "lvlm", "gt_prob_formula": "lvlm", "hash_uniform": "lvlm",
    "SimDataPaths": "generate", "EvalQueries": "generate", "generate_world_data": "generate",
    "load_or_generate": "generate", "load_world": "generate", "load_lvlm": "generate",
    "load_eval_queries": "generate", "default_cache_root": "generate", "sim_data_paths": "generate",
}

__all__ = ["Scorer", "SimParams", "params_hash", "params_dict", "GENERATOR_VERSION", "World", "VOCABULARY",
           "surface_variants", "SimLVLM", "gt_prob_formula", "hash_uniform", "SimDataPaths", "EvalQueries",
           "generate_world_data", "load_or_generate", "load_world", "load_lvlm", "load_eval_queries",
           "default_cache_root", "sim_data_paths"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'leverplus.sim' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"leverplus.sim.{module}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from leverplus.sim.generate import (EvalQueries, SimDataPaths, default_cache_root, generate_world_data,
                                        load_eval_queries, load_lvlm, load_or_generate, load_world, sim_data_paths)
    from leverplus.sim.lvlm import SimLVLM, gt_prob_formula, hash_uniform
    from leverplus.sim.params import GENERATOR_VERSION, SimParams, params_dict, params_hash
    from leverplus.sim.world import VOCABULARY, World, surface_variants
