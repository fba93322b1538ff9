"""The simulated in-context-learning world: runs everything on a laptop, with no model weights or dataset,
and gives tests data whose ground truth is known (docs/sim.md).

* :class:`SimParams` (``leverplus/config/sim_params.py``): every knob; nested in the Hydra config as ``data.sim``.
* :class:`World` (``world.py``): train items (the ICD pool), val/test queries, hidden factors, visible
  embeddings, annotator answers with surface variants, RandSampler 64-pools.
* :class:`SimLVLM` (``lvlm.py``): answers a query given an ordered ICD sequence; ``p_correct``,
  ``answer_prob`` (teacher forcing), hash-seeded deterministic answers. It is also the downstream scorer.
* ``generate.py``: writes the Lever-Plus files (embeddings ``.pt``, InfoScore beam JSON, RL JSON per shot) plus
  our eval-query JSON; :func:`load_or_generate` caches them under ``<cache_root>/<params_hash>/``; the
  ``scorer.name=sim`` factories (``from_config``, ``from_world_dir``) sit next to that cache.
* ``scorer.py``: :class:`SimScorer`, the LVLM behind the generic ``Scorer`` interface (``generate`` uses it for the
  RL records); ``fallback.py``: the fallback anchors and their noisy scoring; ``files.py``: file names and layout.
* ``source.py``: ``data=sim``, the world as a training run's inputs.
"""
