"""The simulated items: hidden factors, visible embeddings, answers with annotator surface variants, pools.

A :class:`World` is a pure function of :class:`~leverplus.config.sim_params.SimParams` (numpy ``SeedSequence``
streams; no global RNG). It holds three splits:

* ``"train"``: the ICD pool (row i = train item i = embedding row i); RL / beam anchors are drawn from it;
* ``"val"`` / ``"test"``: evaluation queries drawn from the same distribution, never ICDs.

Each item has hidden content factors ``z`` (what makes a demonstration useful), visible-only nuisance factors
``n``, an answer type, a canonical answer and 10 annotator answers. The visible embedding mixes them::

    e = normalize( w_lat·A z + w_nui·B n + w_type·T[type] + σ·ε ),   ε ~ N(0, I_d / d)

with ``A``, ``B``, ``T`` orthonormal blocks of one random rotation, so cosine retrieval on ``e`` is good
(it sees ``z`` and the type) but not optimal (it also chases ``n`` and noise), and a learned linear map can
do better. docs/sim.md has the full model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from leverplus.config.sim_params import SimParams
from leverplus.errors import LeverPlusInputError

SPLITS = ("train", "val", "test")

#: Canonical answers per answer type. Canonical strings are fixed points of the official VQA normalisation,
#: so a normalised prediction can match them (tests check this with ``metrics.normalize_answer``).
VOCABULARY: dict[str, tuple[str, ...]] = {
    "yes/no": ("yes", "no"),
    "number": ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10"),
    "color": ("red", "blue", "green", "white", "black", "yellow", "brown", "gray", "orange", "pink"),
    "object": ("dog", "cat", "horse", "pizza", "umbrella", "bus", "fire hydrant", "kite", "apple", "elephant",
               "train", "skateboard"),
    "other": ("surfing", "skiing", "tennis", "baseball", "sleeping", "eating", "winter", "wood", "can't tell",
              "don't know", "isn't working"),
}

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

#: Words naming the latent topics in question texts (cosmetic; cycled when there are more topics).
TOPIC_NOUNS = ("kitchen", "street", "beach", "field", "park", "table", "room", "road", "snow", "water", "sky",
               "market", "farm", "station", "court", "garden", "zoo", "shop", "bridge", "harbor", "forest",
               "stadium", "office", "airport")

QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "yes/no": ("Is this picture taken near the {t}?", "Is anyone standing by the {t}?"),
    "number": ("How many people are at the {t}?", "How many things are on the {t}?"),
    "color": ("What color is the thing by the {t}?", "What color dominates the {t}?"),
    "object": ("What animal or object is at the {t}?", "What is next to the {t}?"),
    "other": ("What is happening at the {t}?", "What season or activity does the {t} suggest?"),
}


def surface_variants(canonical: str, answer_type: str) -> tuple[str, ...]:
    """Raw spellings of one answer, canonical first; all normalise to ``canonical`` under the official VQA
    normalisation (number words, articles, punctuation, case, missing apostrophes of contractions)."""
    a = canonical
    if answer_type == "number":
        word = _NUMBER_WORDS[int(a)]
        return (a, word, f"{a}.", word.capitalize())
    if answer_type == "yes/no":
        return (a, a.capitalize(), f"{a}.", a.upper())
    if answer_type == "color":
        return (a, a.capitalize(), f"{a}.", f"{a}!")
    if answer_type == "object":
        article = "an" if a[0] in "aeiou" else "a"
        return (a, f"{article} {a}", f"the {a}", a.capitalize(), f"{a}.")
    # "other": contractions lose their apostrophe ("cant tell"), which the official table restores
    variants = [a]
    if "'" in a:
        variants.append(a.replace("'", ""))
    variants += [a.capitalize(), f"{a}.", f"{a}!"]
    return tuple(variants)


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class SplitItems:
    """All items of one split, as parallel arrays (index = item / query index within the split)."""

    latent: np.ndarray  # [N, L] float64, unit norm: hidden content factors z
    nuisance: np.ndarray  # [N, M] float64, unit norm: visible-only factors n
    embedding: np.ndarray  # [N, d] float32, unit norm: what selectors see
    topic: np.ndarray  # [N] int
    answer_type: np.ndarray  # [N] int, index into params.answer_types
    answer_class: np.ndarray  # [N] int, global class id (World.classes) of the canonical answer
    alt_class: np.ndarray  # [N] int, the most plausible wrong class (the annotators' alternative)
    num_alt: np.ndarray  # [N] int, how many annotators gave alt_class
    base: np.ndarray  # [N] float64, per-query difficulty base_q (logit of zero-shot correctness)
    gt_answers: list  # [N] list[str], the annotators' raw answers
    questions: list  # [N] str
    question_id: np.ndarray  # [N] int
    image_id: np.ndarray  # [N] int

    def __len__(self) -> int:
        return int(self.latent.shape[0])


class World:
    """The simulated dataset, built deterministically from ``params`` (see the module docstring)."""

    def __init__(self, params: SimParams) -> None:
        params.validate()
        self.params = params
        p = params
        root = np.random.SeedSequence(p.seed)
        geo_ss, train_ss, val_ss, test_ss, pool_ss = root.spawn(5)

        # --- answer classes ---------------------------------------------------------------------------
        self.answer_types: tuple[str, ...] = tuple(p.answer_types)
        self.classes: list[str] = []
        class_type = []
        for t_idx, t in enumerate(self.answer_types):
            self.classes += VOCABULARY[t]
            class_type += [t_idx] * len(VOCABULARY[t])
        self.class_type = np.asarray(class_type, dtype=np.int64)
        self.type_classes = [np.flatnonzero(self.class_type == t) for t in range(len(self.answer_types))]
        self.class_variants: list[tuple[str, ...]] = [
            surface_variants(c, self.answer_types[t]) for c, t in zip(self.classes, self.class_type)
        ]
        #: canonical (= normalised) answer string -> class id
        self.class_of: dict[str, int] = {c: i for i, c in enumerate(self.classes)}

        # --- shared geometry --------------------------------------------------------------------------
        geo = np.random.default_rng(geo_ss)
        L, M, d, nt = p.latent_dim, p.nuisance_dim, p.embedding_dim, len(self.answer_types)
        rotation, _ = np.linalg.qr(geo.standard_normal((d, d)))
        self.proj_latent = rotation[:, :L]  # A [d, L]
        self.proj_nuisance = rotation[:, L:L + M]  # B [d, M]
        self.type_directions = rotation[:, L + M:L + M + nt].T  # T [types, d]
        self.topic_centres = _normalize_rows(geo.standard_normal((p.num_topics, L)))
        self.class_prototypes = _normalize_rows(geo.standard_normal((len(self.classes), L)))

        self.splits: dict[str, SplitItems] = {
            "train": self._make_items(np.random.default_rng(train_ss), p.num_train, 0),
            "val": self._make_items(np.random.default_rng(val_ss), p.num_val, 1),
            "test": self._make_items(np.random.default_rng(test_ss), p.num_test, 2),
        }

        # --- RandSampler-style pools ------------------------------------------------------------------
        pools = np.random.default_rng(pool_ss)
        self.anchors = np.sort(pools.choice(p.num_train, size=p.num_anchors, replace=False)).astype(np.int64)
        self._anchor_row = {int(a): r for r, a in enumerate(self.anchors)}
        K = p.candidate_num
        anchor_pools = np.empty((p.num_anchors, K), dtype=np.int64)
        for r, a in enumerate(self.anchors):
            draw = pools.choice(p.num_train - 1, size=K, replace=False)
            anchor_pools[r] = draw + (draw >= a)  # skip the anchor itself
        self.pools: dict[str, np.ndarray] = {"train": anchor_pools}
        for split in ("val", "test"):
            n = len(self.splits[split])
            self.pools[split] = np.stack(
                [pools.choice(p.num_train, size=K, replace=False) for _ in range(n)]
            ).astype(np.int64) if n else np.empty((0, K), dtype=np.int64)

    # ------------------------------------------------------------------------------------------------
    def _make_items(self, rng: np.random.Generator, n: int, split_no: int) -> SplitItems:
        p = self.params
        L, M, d = p.latent_dim, p.nuisance_dim, p.embedding_dim
        topic = rng.integers(0, p.num_topics, size=n)
        latent = _normalize_rows(self.topic_centres[topic]
                                 + p.topic_spread * rng.standard_normal((n, L)) / np.sqrt(L))
        nuisance = _normalize_rows(rng.standard_normal((n, M)))
        answer_type = rng.choice(len(self.answer_types), size=n, p=np.asarray(p.answer_type_probs))
        noise = rng.standard_normal((n, d)) / np.sqrt(d)
        visible = (p.latent_weight * latent @ self.proj_latent.T
                   + p.nuisance_weight * nuisance @ self.proj_nuisance.T
                   + p.type_weight * self.type_directions[answer_type]
                   + p.embed_noise * noise)
        embedding = _normalize_rows(visible).astype(np.float32)

        # canonical answer = argmax over the type's classes of z·proto / T + Gumbel; alternative = runner-up
        gumbel = rng.gumbel(size=(n, len(self.classes)))
        scores = latent @ self.class_prototypes.T / p.answer_temperature + gumbel
        scores = np.where(self.class_type[None, :] == answer_type[:, None], scores, -np.inf)
        order = np.argsort(-scores, axis=1, kind="stable")
        answer_class, alt_class = order[:, 0], order[:, 1]
        num_alt = rng.choice(len(p.alt_annotator_probs), size=n, p=np.asarray(p.alt_annotator_probs))
        base = p.base_mean + p.base_sd * rng.standard_normal(n)

        gt_answers = []
        for i in range(n):
            k = int(num_alt[i])
            who = [int(alt_class[i])] * k + [int(answer_class[i])] * (p.num_annotators - k)
            who = [who[j] for j in rng.permutation(len(who))]
            variant_draw = rng.random(len(who))
            pick = rng.random(len(who))
            answers = []
            for c, v, u in zip(who, variant_draw, pick):
                forms = self.class_variants[c]
                answers.append(forms[1 + int(u * (len(forms) - 1))] if v < p.gt_variant_prob else forms[0])
            gt_answers.append(answers)

        template_pick = rng.integers(0, 2, size=n)
        questions = [
            QUESTION_TEMPLATES[self.answer_types[answer_type[i]]][template_pick[i]].format(
                t=TOPIC_NOUNS[topic[i] % len(TOPIC_NOUNS)])
            for i in range(n)
        ]
        offset = (split_no + 1) * 10_000_000
        ids = np.arange(n, dtype=np.int64)
        return SplitItems(latent=latent, nuisance=nuisance, embedding=embedding, topic=topic.astype(np.int64),
                          answer_type=answer_type.astype(np.int64), answer_class=answer_class.astype(np.int64),
                          alt_class=alt_class.astype(np.int64), num_alt=num_alt.astype(np.int64), base=base,
                          gt_answers=gt_answers, questions=questions, question_id=offset + ids,
                          image_id=offset // 10 + ids)

    # ------------------------------------------------------------------------------------------------
    def items(self, split: str) -> SplitItems:
        """The items of ``split`` ("train", "val" or "test")."""
        if split not in self.splits:
            raise LeverPlusInputError(f"unknown split {split!r}", field="split", fix=f"use one of {SPLITS}")
        return self.splits[split]

    def num_queries(self, split: str) -> int:
        """Number of queries of ``split`` that have a pool (train: the anchors)."""
        return len(self.anchors) if split == "train" else len(self.items(split))

    def query_ids(self, split: str) -> np.ndarray:
        """Query indices of ``split`` that have a pool: the sorted anchors for train, all items otherwise."""
        return self.anchors.copy() if split == "train" else np.arange(len(self.items(split)), dtype=np.int64)

    def pool(self, split: str, qidx: int) -> np.ndarray:
        """The query's RandSampler pool of ``candidate_num`` train ids (train anchors exclude themselves)."""
        self.items(split)
        qidx = int(qidx)
        if split == "train":
            row = self._anchor_row.get(qidx)
            if row is None:
                raise LeverPlusInputError(f"train item {qidx} is not an anchor query, so it has no pool",
                                          field="qidx", fix="use one of world.anchors")
            return self.pools["train"][row]
        if not 0 <= qidx < len(self.items(split)):
            raise LeverPlusInputError(f"{split} query {qidx} is outside [0, {len(self.items(split))})",
                                      field="qidx")
        return self.pools[split][qidx]

    def canonical_answer(self, split: str, qidx: int) -> str:
        """The dataset's ``answer`` column: the most frequent annotator answer, canonical spelling."""
        return self.classes[int(self.items(split).answer_class[int(qidx)])]

    def hidden_relevance(self, split: str, qidx: int, icds: Sequence[int]) -> np.ndarray:
        """cos(z_query, z_icd) for each ICD: the hidden relevance the LVLM responds to."""
        z_q = self.items(split).latent[int(qidx)]
        return self.splits["train"].latent[np.asarray(icds, dtype=np.int64)] @ z_q

    def visible_similarity(self, split: str, qidx: int, icds: Sequence[int]) -> np.ndarray:
        """cos(e_query, e_icd) on the visible embeddings: what a similarity retriever ranks by."""
        e_q = self.items(split).embedding[int(qidx)].astype(np.float64)
        return self.splits["train"].embedding[np.asarray(icds, dtype=np.int64)].astype(np.float64) @ e_q
