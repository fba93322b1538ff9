"""The string-match fallback of the simulated world (reference#correctness): which anchors take it and how it
is scored, noise included (docs/sim.md). Shared by the RL-file writer and the ``sim`` scorer."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from leverplus.evaluation.vqa_metric import fallback_match
from leverplus.sim.lvlm import STREAM_FALLBACK_COIN, STREAM_FALLBACK_NOISE, hash_uniform
from leverplus.sim.world import World


def fallback_anchor_set(world: World) -> set[int]:
    """Anchors scored by the string-match fallback: ``round(fallback_fraction · num_anchors)`` of them, drawn
    with a seeded permutation (the same anchors in every shot file, as a question missing from the annotation
    files would be)."""
    p = world.params
    n = int(round(p.fallback_fraction * len(world.anchors)))
    perm = np.random.default_rng([p.seed, 3003]).permutation(len(world.anchors))
    return {int(world.anchors[i]) for i in perm[:n]}


def score_fallback(world: World, qidx: int, pointer_global: Sequence[int], prediction: str,
                   gt_answers: Sequence[str]) -> tuple[int, float]:
    """Noisy fallback scoring: ``fallback_match``, then with prob ``fallback_noise`` the correctness is
    replaced by a fair coin flip unrelated to the answer (``fallback_noise_kind="coin"``) or inverted ("flip");
    score 1.0 if correct else 0.0. Hash-seeded."""
    p = world.params
    correct, score = fallback_match(prediction, gt_answers)
    q, icds = np.asarray([qidx]), np.asarray([list(pointer_global)])
    if hash_uniform(p.seed, STREAM_FALLBACK_NOISE, 1, q, icds)[0] < p.fallback_noise:
        if p.fallback_noise_kind == "flip":
            correct = 1 - int(correct)
        else:
            correct = int(hash_uniform(p.seed, STREAM_FALLBACK_COIN, 1, q, icds)[0] < 0.5)
        score = 1.0 if correct else 0.0
    return correct, float(score)
