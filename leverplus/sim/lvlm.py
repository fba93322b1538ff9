"""The simulated LVLM: answers a query given an ORDERED sequence of ICDs (train ids, prompt order).

Probability of answering right (docs/sim.md has the derivation and the tuned values)::

    rel_i     = cos(z_q, z_ci)                                 hidden relevance (not the visible cosine)
    u_i       = a_fmt + a_rel·rel_i + a_type·[type_ci == type_q]
    red_i     = max_{j≠i} clip((cos(z_ci, z_cj) − s0) / (1 − s0), 0, 1)     near-duplicate ICDs
    novelty_i = 1 − ρ·red_i
    w_i       = λ^(S−1−i)                                      recency: the ICD next to the query weighs 1
    H         = Σ_i w_i · novelty_i · u_i
    p_correct = σ( base_q + H_max·tanh(H / H_max) )            diminishing returns in the total help

A wrong answer is drawn from plausible distractors: the annotators' alternative answer (weight
``distractor_alt_weight``), the ICDs' own answers (``distractor_copy_weight``, split evenly), the rest
uniformly over the query type's vocabulary. Every random choice is a hash of (seed, split, query, ICD tuple,
stream), never global RNG state, so the same prompt always gets the same answer.

The class also serves as the downstream *scorer* (``answer`` + ``gt_answers``, see ``leverplus.sim.Scorer``).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

import numpy as np

from leverplus.errors import LeverPlusInputError
from leverplus.evaluation.vqa_metric import gt_prob_formula, normalize_answer, vqa_accuracy, vqa_postprocess
from leverplus.sim.world import World

_SPLIT_CODE = {"train": 1, "val": 2, "test": 3}

# Hash streams: one independent uniform per purpose.
STREAM_CORRECT, STREAM_DISTRACTOR, STREAM_SURFACE, STREAM_JUNK, STREAM_JUNK_KIND = 1, 2, 3, 4, 5
STREAM_FALLBACK_NOISE, STREAM_FALLBACK_COIN = 6, 7

_MASK64 = (1 << 64) - 1


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_uniform(seed: int, stream: int, split_code: int, qidx: np.ndarray, icds: np.ndarray) -> np.ndarray:
    """Uniforms in [0, 1), one per row: a SplitMix64 chain over (seed, stream, split, query, S, icd_1..icd_S).

    ``qidx`` [B] ints, ``icds`` [B, S] ints (order matters). Pure function of its arguments.
    """
    qidx = np.asarray(qidx, dtype=np.int64).reshape(-1)
    icds = np.asarray(icds, dtype=np.int64).reshape(len(qidx), -1)
    with np.errstate(over="ignore"):
        h = _splitmix(np.full(len(qidx), (int(seed) * 0x100000001B3 + int(stream)) & _MASK64, dtype=np.uint64))
        h = _splitmix(h ^ np.uint64(split_code))
        h = _splitmix(h ^ qidx.astype(np.uint64))
        h = _splitmix(h ^ np.uint64(icds.shape[1]))
        for i in range(icds.shape[1]):
            h = _splitmix(h ^ (icds[:, i].astype(np.uint64) + np.uint64(1)))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))



class SimLVLM:
    """Answers, answer probabilities and correctness probabilities of the simulated LVLM over a World."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.params = world.params
        self._train = world.splits["train"]
        self._class_acc_cache: dict[tuple[str, int, str], dict[int, float]] = {}
        self._gt_weight_cache: dict[tuple[str, int], dict[int, float]] = {}
        self._wrong_cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    # --- validation -------------------------------------------------------------------------------------
    def _check(self, split: str, qidx: np.ndarray, icds: np.ndarray) -> None:
        n_q = len(self.world.items(split))
        if qidx.size and (qidx.min() < 0 or qidx.max() >= n_q):
            raise LeverPlusInputError(f"query index out of [0, {n_q}) for split {split!r}", field="qidx")
        if icds.size and (icds.min() < 0 or icds.max() >= len(self._train)):
            raise LeverPlusInputError(f"ICD id out of [0, {len(self._train)})", field="icds",
                                      fix="ICDs are train-item ids (rows of the embedding table)")
        if split == "train" and icds.size and (icds == qidx[:, None]).any():
            raise LeverPlusInputError("a train query is among its own ICDs", field="icds",
                                      fix="exclude the query from its candidates")

    @staticmethod
    def _as_batch(qidx, icds) -> tuple[np.ndarray, np.ndarray]:
        qidx = np.atleast_1d(np.asarray(qidx, dtype=np.int64))
        icds = np.asarray(icds, dtype=np.int64)
        if icds.ndim == 1 and len(qidx) == 1:
            icds = icds[None, :]
        if icds.ndim != 2 or icds.shape[0] != len(qidx):
            raise LeverPlusInputError(f"icds must have shape [B, S] with B = {len(qidx)}, got {icds.shape}",
                                      field="icds")
        return qidx, icds

    # --- the correctness model ----------------------------------------------------------------------------
    def help_terms(self, split: str, qidx, icds) -> dict[str, np.ndarray]:
        """Every intermediate of the p_correct formula for a batch ([B, S] or [B] arrays)."""
        p = self.params
        qidx, icds = self._as_batch(qidx, icds)
        self._check(split, qidx, icds)
        items = self.world.items(split)
        S = icds.shape[1]
        z_q = items.latent[qidx]  # [B, L]
        z_c = self._train.latent[icds]  # [B, S, L]
        rel = np.einsum("bl,bsl->bs", z_q, z_c)
        match = (self._train.answer_type[icds] == items.answer_type[qidx][:, None]).astype(np.float64)
        utility = p.format_gain + p.relevance_gain * rel + p.type_gain * match
        if S > 1:
            pair = np.einsum("bsl,btl->bst", z_c, z_c)
            pair[:, np.arange(S), np.arange(S)] = -np.inf
            red = np.clip((pair.max(axis=2) - p.redundancy_threshold) / (1.0 - p.redundancy_threshold), 0.0, 1.0)
        else:
            red = np.zeros_like(rel)
        novelty = 1.0 - p.redundancy_weight * red
        weights = p.recency ** np.arange(S - 1, -1, -1, dtype=np.float64)
        total = (weights[None, :] * novelty * utility).sum(axis=1)
        logit = items.base[qidx] + p.saturation * np.tanh(total / p.saturation)
        return {"relevance": rel, "type_match": match, "utility": utility, "redundancy": red,
                "novelty": novelty, "weights": np.broadcast_to(weights, rel.shape), "help": total,
                "logit": logit, "p_correct": 1.0 / (1.0 + np.exp(-logit))}

    def p_correct_batch(self, split: str, qidx, icds) -> np.ndarray:
        """P(answer is the canonical class) for B prompts: ``qidx`` [B], ``icds`` [B, S] (S may be 0)."""
        return self.help_terms(split, qidx, icds)["p_correct"]

    def p_correct(self, split: str, qidx: int, icds: Sequence[int]) -> float:
        """P(answer is the canonical class) for one prompt (ICDs in prompt order, query last)."""
        return float(self.p_correct_batch(split, [qidx], [list(icds)])[0])

    # --- the answer distribution --------------------------------------------------------------------------
    def _wrong_distribution(self, split: str, qidx: int, icds: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(class ids, probabilities summing to 1) of a wrong answer, classes sorted ascending."""
        items = self.world.items(split)
        gold = int(items.answer_class[qidx])
        copies = tuple(sorted({int(self._train.answer_class[c]) for c in icds} - {gold}))
        key = (split, int(qidx), copies)
        if key not in self._wrong_cache:
            p = self.params
            alt = int(items.alt_class[qidx])
            pool = self.world.type_classes[int(items.answer_type[qidx])]
            rest = pool[pool != gold]
            w_alt = p.distractor_alt_weight
            w_copy = p.distractor_copy_weight if copies else 0.0
            w_rest = 1.0 - w_alt - w_copy
            probs: dict[int, float] = {alt: w_alt}
            for c in copies:
                probs[c] = probs.get(c, 0.0) + w_copy / len(copies)
            for c in rest.tolist():
                probs[c] = probs.get(c, 0.0) + w_rest / len(rest)
            classes = sorted(probs)
            self._wrong_cache[key] = (np.asarray(classes, dtype=np.int64), np.asarray([probs[c] for c in classes]))
        return self._wrong_cache[key]

    def answer_distribution(self, split: str, qidx: int, icds: Sequence[int]) -> dict[int, float]:
        """Class id -> probability of the (normalised) answer; the canonical class has ``p_correct``."""
        qidx = int(qidx)
        pc = self.p_correct(split, qidx, icds)
        classes, probs = self._wrong_distribution(split, qidx, icds)
        dist = {int(c): float((1.0 - pc) * q) for c, q in zip(classes, probs)}
        dist[int(self.world.items(split).answer_class[qidx])] = pc
        return dict(sorted(dist.items()))

    def answer_prob(self, split: str, qidx: int, icds: Sequence[int], answer: str) -> float:
        """Teacher-forced P(answer | ICDs + query): the probability that the model's answer equals ``answer``
        after the official VQA normalisation (so "Two", "two" and "2" share one probability). Strings outside
        the vocabulary get 0."""
        cls = self.world.class_of.get(normalize_answer(answer))
        if cls is None:
            return 0.0
        return self.answer_distribution(split, qidx, icds).get(cls, 0.0)

    def vqa_gt_prob(self, split: str, qidx: int, icds: Sequence[int]) -> float:
        """reference#gt-prob expected-accuracy probability of the prompt, with :meth:`answer_prob` as ``p(a)``."""
        dist = self.answer_distribution(split, qidx, icds)
        norm = [vqa_postprocess(g) for g in self.gt_answers(split, qidx)]
        return gt_prob_formula(norm, lambda a: dist.get(self.world.class_of.get(normalize_answer(a), -1), 0.0))

    def _gt_class_weights(self, split: str, qidx: int) -> dict[int, float]:
        """Class id -> Σ over unique post-processed GT strings of that class of min(count/3, 1). Cached."""
        key = (split, int(qidx))
        if key not in self._gt_weight_cache:
            counts = Counter(vqa_postprocess(g) for g in self.gt_answers(split, qidx))
            weights: dict[int, float] = {}
            for a, c in counts.items():
                cls = self.world.class_of.get(normalize_answer(a))
                if cls is not None:
                    weights[cls] = weights.get(cls, 0.0) + min(c / 3, 1.0)
            self._gt_weight_cache[key] = weights
        return self._gt_weight_cache[key]

    def vqa_gt_prob_batch(self, split: str, qidx, icds) -> np.ndarray:
        """:meth:`vqa_gt_prob` for B prompts (same numbers; p_correct vectorised, GT weights cached)."""
        qidx, icds = self._as_batch(qidx, icds)
        pc = self.p_correct_batch(split, qidx, icds)
        gold = self.world.items(split).answer_class[qidx]
        out = np.empty(len(qidx))
        for b in range(len(qidx)):
            q = int(qidx[b])
            weights = self._gt_class_weights(split, q)
            classes, probs = self._wrong_distribution(split, q, icds[b])
            wrong = dict(zip(classes.tolist(), probs.tolist()))
            out[b] = sum(w * (pc[b] if c == gold[b] else (1.0 - pc[b]) * wrong.get(c, 0.0))
                         for c, w in weights.items())
        return out

    # --- generation ----------------------------------------------------------------------------------------
    def raw_generation_batch(self, split: str, qidx, icds) -> list[str]:
        """Raw decoded text for B prompts (before ``vqa_postprocess``)."""
        p = self.params
        qidx, icds = self._as_batch(qidx, icds)
        pc = self.p_correct_batch(split, qidx, icds)
        code = _SPLIT_CODE[split]
        u = {s: hash_uniform(p.seed, s, code, qidx, icds)
             for s in (STREAM_CORRECT, STREAM_DISTRACTOR, STREAM_SURFACE, STREAM_JUNK, STREAM_JUNK_KIND)}
        items = self.world.items(split)
        out = []
        for b in range(len(qidx)):
            q = int(qidx[b])
            if u[STREAM_CORRECT][b] < pc[b]:
                cls = int(items.answer_class[q])
            else:
                classes, probs = self._wrong_distribution(split, q, icds[b])
                k = int(np.searchsorted(np.cumsum(probs), u[STREAM_DISTRACTOR][b] * probs.sum(), side="right"))
                cls = int(classes[min(k, len(classes) - 1)])
            forms = self.world.class_variants[cls]
            us = u[STREAM_SURFACE][b]
            if us < p.pred_variant_prob and len(forms) > 1:
                text = forms[1 + min(int(us / p.pred_variant_prob * (len(forms) - 1)), len(forms) - 2)]
            else:
                text = forms[0]
            if u[STREAM_JUNK][b] < p.raw_junk_prob:
                kind = int(u[STREAM_JUNK_KIND][b] * 3)
                if kind == 0:
                    text += "\nQuestion:"
                elif kind == 1:
                    text += " Short answer:"
                else:  # a second guess after ", " (cut by vqa_postprocess)
                    text += ", " + self.world.classes[int(items.alt_class[q])]
            out.append(text)
        return out

    def raw_generation(self, split: str, qidx: int, icds: Sequence[int]) -> str:
        """Raw decoded text of one prompt (before ``vqa_postprocess``)."""
        return self.raw_generation_batch(split, [qidx], [list(icds)])[0]

    def answer_batch(self, split: str, qidx, icds) -> list[str]:
        """Post-processed answers (``vqa_postprocess`` of the raw generation) for B prompts."""
        return [vqa_postprocess(t) for t in self.raw_generation_batch(split, qidx, icds)]

    def answer(self, split: str, qidx: int, icds: Sequence[int]) -> str:
        """The post-processed answer to ``query`` with ``icds`` (train ids, prompt order): what the VQA
        metric scores. Deterministic: same (seed, split, query, ICD tuple) -> same string."""
        return self.answer_batch(split, [qidx], [list(icds)])[0]

    def gt_answers(self, split: str, qidx: int) -> list[str]:
        """The 10 annotators' raw answers (surface variants included)."""
        return list(self.world.items(split).gt_answers[int(qidx)])

    # --- exact expectations (for baselines and docs) -------------------------------------------------------
    def surface_form_probs(self, cls: int) -> list[tuple[str, float]]:
        """(spelling, probability) of the answer text the LVLM writes for class ``cls``: canonical with
        probability ``1 - pred_variant_prob``, else a uniform pick among the other spellings (as in
        :meth:`raw_generation_batch`)."""
        forms = self.world.class_variants[int(cls)]
        pv = self.params.pred_variant_prob
        if len(forms) == 1 or pv == 0:
            return [(forms[0], 1.0)]
        return [(forms[0], 1.0 - pv)] + [(f, pv / (len(forms) - 1)) for f in forms[1:]]

    def class_accuracy(self, split: str, qidx: int, normalization: str = "official") -> dict[int, float]:
        """E[VQA accuracy of the answer | its class] against the query's GT answers, over the spelling the LVLM
        writes (:meth:`surface_form_probs`); classes with a non-zero score only. With ``"lever_plus"``, or
        ``"official"`` and GTs that are not all identical, every spelling normalises to the canonical one and
        scores the same; with ten identical GTs, ``"official"`` normalises nothing, so only the GT's own
        spelling scores. The run-on text that ``vqa_postprocess`` leaves is trailing whitespace, which the
        metric strips. Cached per (query, normalization)."""
        key = (split, int(qidx), normalization)
        if key not in self._class_acc_cache:
            gts = self.gt_answers(split, qidx)
            classes = {self.world.class_of.get(normalize_answer(g)) for g in gts} - {None}
            accs = {cls: sum(w * vqa_accuracy(f, gts, normalization=normalization)
                             for f, w in self.surface_form_probs(cls)) for cls in sorted(classes)}
            self._class_acc_cache[key] = {c: a for c, a in accs.items() if a > 0}
        return dict(self._class_acc_cache[key])

    def expected_accuracy(self, split: str, qidx: int, icds: Sequence[int], normalization: str = "official") -> float:
        """E[VQA accuracy of ``answer``] over the LVLM's randomness (exact, no sampling); ``normalization`` as
        in ``metrics.vqa_accuracy``."""
        acc = self.class_accuracy(split, qidx, normalization)
        dist = self.answer_distribution(split, qidx, icds)
        return float(sum(dist.get(c, 0.0) * a for c, a in acc.items()))

    def expected_accuracy_many(self, split: str, pairs: Iterable[tuple[int, Sequence[int]]],
                               normalization: str = "official") -> np.ndarray:
        """:meth:`expected_accuracy` over (qidx, icds) pairs."""
        return np.asarray([self.expected_accuracy(split, q, icds, normalization) for q, icds in pairs],
                          dtype=np.float64)
