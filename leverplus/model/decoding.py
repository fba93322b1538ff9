"""Model-free decoding of pointer sequences: beam search and temperature sampling (reference#rldata-candidates).

Both decoders only see a *step function*: given the positions chosen so far it returns the raw logits
``[K]`` for the next pick. ``PointerSelector.step_logits_fn`` builds one from the pointer net; tests use
hand-made ones. Chosen and excluded positions are masked to ``-inf`` here, whatever the step function
returns for them, so a decoded pointer never repeats an item and never contains an excluded one.

Reference behaviour kept (``rl_data_generation.py:L20-324``):
- beam: step 1 keeps the top ``num_beams`` of ``log_softmax``; later steps expand every beam over every
  allowed id, sort by cumulative log-prob and keep ``num_beams``. ``score`` is the cumulative sum of the
  per-step softmax probabilities (the reference ``beam_score``).
- sample: ``multinomial(softmax(logits / temperature))``; ``logprob = Σ log(p + eps)`` of the
  *temperature-scaled* probabilities (not the policy's); if the probabilities sum below ``eps`` (or are not
  finite), the pick is uniform over the allowed ids and adds ``log(1 / n_allowed)``.

Differences from the reference, all deliberate:
- ties are broken deterministically: lower id first at step 1, then enumeration order (parent beam rank,
  then lower id) through a stable sort — the reference's Python sort is stable too, but its ``torch.topk``
  at step 1 is not;
- the uniform fallback draws from the caller's ``generator`` (the reference used unseeded ``random``);
- an out-of-range ``exclude`` id or a ``length`` longer than the allowed pool raises instead of being
  ignored / crashing deep inside torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from leverplus.errors import LeverPlusInputError

StepFn = Callable[[Sequence[int]], torch.Tensor]
"""prefix (positions chosen so far, in order) -> raw logits ``[K]`` for the next step."""


@dataclass(frozen=True)
class Decoded:
    """One decoded pointer sequence.

    pointer: item positions in prompt order.
    logprob: cumulative log-prob (policy log-probs for beam; temperature-scaled ``log(p+eps)`` for sampling).
    score:   cumulative sum of the per-step softmax probabilities of the chosen items (reference ``beam_score``).
    rank:    beam: rank after the final sort (0 = best); sample: draw index.
    """

    pointer: tuple[int, ...]
    logprob: float
    score: float
    rank: int


def _check_common(num_items: int, length: int, exclude: Iterable[int]) -> frozenset[int]:
    """Validate the shared arguments; return the excluded ids as a set."""
    if num_items < 1:
        raise LeverPlusInputError(f"num_items must be >= 1, got {num_items}", field="num_items")
    excluded = frozenset(int(i) for i in exclude)
    bad = sorted(i for i in excluded if not 0 <= i < num_items)
    if bad:
        raise LeverPlusInputError(
            f"exclude ids {bad} are outside the pool [0, {num_items})",
            field="exclude",
            fix="pass only positions inside the candidate pool",
        )
    allowed = num_items - len(excluded)
    if length < 1 or length > allowed:
        raise LeverPlusInputError(
            f"length must be in [1, {allowed}] (pool of {num_items} minus {len(excluded)} excluded), got {length}",
            field="length",
            fix="lower the shot number or enlarge the candidate pool",
        )
    return excluded


def _masked_logits(
    step_logits: StepFn, prefix: Sequence[int], num_items: int, excluded: frozenset[int]
) -> torch.Tensor:
    """Call the step function, check its shape, and set chosen + excluded ids to ``-inf``."""
    logits = step_logits(list(prefix))
    if not isinstance(logits, torch.Tensor) or logits.shape != (num_items,):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise LeverPlusInputError(
            f"step function returned {shape}, expected a tensor of shape ({num_items},)",
            field="step_logits",
        )
    logits = logits.detach().clone()
    banned = list(excluded.union(prefix))
    if banned:
        logits[banned] = float("-inf")
    return logits


def beam_search(
    step_logits: StepFn,
    num_items: int,
    length: int,
    num_beams: int = 5,
    exclude: Iterable[int] = (),
) -> list[Decoded]:
    """Beam search over pointer sequences of ``length`` distinct items (reference ``beam_search_pointer``).

    Returns at most ``num_beams`` sequences sorted by cumulative log-prob (best first, ``rank`` 0).
    Log-probs are accumulated in float64, as the reference's Python-float sums.
    """
    if num_beams < 1:
        raise LeverPlusInputError(f"num_beams must be >= 1, got {num_beams}", field="num_beams")
    excluded = _check_common(num_items, length, exclude)

    # beams: (pointer, cumulative logprob, cumulative score), kept in rank order
    beams: list[tuple[tuple[int, ...], float, float]] = [((), 0.0, 0.0)]
    for _ in range(length):
        cand_logp, cand_score = [], []
        for pointer, logp, score in beams:
            logits = _masked_logits(step_logits, pointer, num_items, excluded)
            cand_logp.append(logp + torch.log_softmax(logits, dim=-1).double())
            cand_score.append(score + torch.softmax(logits, dim=-1).double())
        flat_logp = torch.cat(cand_logp)  # enumeration order: parent beam rank, then item id
        flat_score = torch.cat(cand_score)
        order = torch.sort(flat_logp, descending=True, stable=True).indices
        order = order[torch.isfinite(flat_logp[order])][:num_beams]  # drop chosen/excluded (-inf)
        beams = [
            (beams[j // num_items][0] + (j % num_items,), float(flat_logp[j]), float(flat_score[j]))
            for j in order.tolist()
        ]
    return [Decoded(pointer=p, logprob=lp, score=s, rank=r) for r, (p, lp, s) in enumerate(beams)]


def sample_sequences(
    step_logits: StepFn,
    num_items: int,
    length: int,
    temperature: float,
    num_samples: int,
    generator: torch.Generator,
    exclude: Iterable[int] = (),
    eps: float = 1e-8,
) -> list[Decoded]:
    """Draw ``num_samples`` pointer sequences from ``softmax(logits / temperature)`` (reference
    ``sample_pointer_with_temperature``), without replacement inside a sequence.

    ``eps`` (reference 1e-8) is both the ``log(p + eps)`` guard and the "probabilities vanished" threshold.
    Deterministic for a given ``generator`` state.
    """
    if not temperature > 0:
        raise LeverPlusInputError(f"temperature must be > 0, got {temperature}", field="temperature")
    if num_samples < 0:
        raise LeverPlusInputError(f"num_samples must be >= 0, got {num_samples}", field="num_samples")
    excluded = _check_common(num_items, length, exclude)

    draws = []
    for draw in range(num_samples):
        pointer: list[int] = []
        logprob, score = 0.0, 0.0
        for _ in range(length):
            logits = _masked_logits(step_logits, pointer, num_items, excluded)
            probs = torch.softmax(logits / temperature, dim=-1)
            total = float(probs.sum())
            if not math.isfinite(total) or total < eps:
                allowed = [i for i in range(num_items) if i not in excluded and i not in pointer]
                idx = allowed[int(torch.randint(len(allowed), (1,), generator=generator))]
                p = 1.0 / len(allowed)
                logprob += math.log(p)
            else:
                idx = int(torch.multinomial(probs, 1, generator=generator))
                p = float(probs[idx])
                logprob += float(torch.log(probs[idx] + eps))
            score += p
            pointer.append(idx)
        draws.append(Decoded(pointer=tuple(pointer), logprob=logprob, score=score, rank=draw))
    return draws
