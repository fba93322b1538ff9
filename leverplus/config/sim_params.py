"""Every knob of the simulated world, with defaults sized for a laptop (docs/sim.md explains each one).

``SimParams`` is nested in the Hydra config as ``data.sim``, so it holds plain types only
(int / float / bool / str / list). ``params_hash`` names the on-disk cache folder of a world: it changes when
any parameter or :data:`GENERATOR_VERSION` changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, List, Mapping

from leverplus.errors import LeverPlusInputError

#: the answer normalisations of the VQA metric (``evaluation.vqa_metric.vqa_accuracy``), shared with ``eval``
NORMALIZATION_MODES = ("official", "lever_plus")

#: Bump whenever generated files would change for the same parameters (invalidates every cache entry).
#: "2": the official VQA accuracy follows vqaEval.py at a013f00 (vqa_acc_score / vqa_correct of the RL files moved).
#: "3": every RL candidate carries ``info_score`` (its ICDs' InfoScore, for the ``hybrid`` reward).
GENERATOR_VERSION = "3"

#: Answer types the world knows (their vocabularies live in ``leverplus.sim.world.VOCABULARY``).
KNOWN_ANSWER_TYPES = ("yes/no", "number", "color", "object", "other")

#: parameters checked by ``SimParams.validate``, by kind (the check order follows these tuples)
POSITIVE_INTS = ("num_train", "num_anchors", "num_val", "num_test", "candidate_num", "embedding_dim", "latent_dim",
                 "nuisance_dim", "num_topics", "num_annotators", "beam_size", "beam_max_shot", "num_beams")
NON_NEGATIVE_INTS = ("seed", "num_samples_per_temp", "num_retrieval", "num_random")
UNIT_INTERVAL = ("gt_variant_prob", "pred_variant_prob", "raw_junk_prob", "fallback_fraction", "fallback_noise",
                 "recency", "redundancy_weight", "distractor_alt_weight", "distractor_copy_weight")
POSITIVE_FLOATS = ("saturation", "answer_temperature", "proposal_temperature")
NON_NEGATIVE_FLOATS = ("base_sd", "topic_spread", "embed_noise", "proposal_noise", "latent_weight")


def _bad(name: str, problem: str, fix: str) -> None:
    """Raise the error of one inconsistent parameter ``data.sim.<name>``."""
    raise LeverPlusInputError(problem, field=f"data.sim.{name}", fix=fix)


@dataclass
class SimParams:
    """Parameters of the simulated in-context-learning world (items, hidden factors, LVLM, data generation)."""

    seed: int = 0

    # --- sizes (RandSampler: anchors drawn from the train items, one 64-pool per query) --------------------
    num_train: int = 3000  # train items = the ICD pool; row i of the embedding table
    num_anchors: int = 800  # RL / beam anchor queries drawn from the train items (OKVQA sample_num=800)
    # Eval sets sized so that a 5-point paired difference is resolved (the answer draw is a Bernoulli per query;
    # with 500 test queries the paired CI half-width was ~5 points).
    num_val: int = 1000  # eval queries for model selection (the objective)
    num_test: int = 2000  # eval queries for the final numbers
    candidate_num: int = 64  # per-query candidate pool size (RandSampler candidate_num)

    # --- hidden factors and the visible embedding ------------------------------------------------------
    embedding_dim: int = 64  # d of the visible embedding (the reference's CLIP d is 512)
    latent_dim: int = 8  # hidden content factors z (what makes an ICD relevant)
    nuisance_dim: int = 8  # visible-only factors n (style; irrelevant to the answer)
    num_topics: int = 24  # latent mixture centres
    topic_spread: float = 0.8  # within-topic spread of z around its centre
    latent_weight: float = 1.0  # weight of A·z in the visible embedding
    nuisance_weight: float = 1.5  # weight of B·n in the visible embedding
    type_weight: float = 0.5  # weight of the answer-type direction (the question wording reveals the type)
    embed_noise: float = 0.6  # isotropic noise in the visible embedding (total norm)

    # --- answers ---------------------------------------------------------------------------------------
    answer_types: List[str] = field(default_factory=lambda: list(KNOWN_ANSWER_TYPES))
    answer_type_probs: List[float] = field(default_factory=lambda: [0.35, 0.15, 0.15, 0.2, 0.15])
    answer_temperature: float = 0.3  # Gumbel temperature of answer = argmax_a z·proto_a (low = answers follow z)
    num_annotators: int = 10
    alt_annotator_probs: List[float] = field(default_factory=lambda: [0.35, 0.25, 0.2, 0.12, 0.08])
    gt_variant_prob: float = 0.15  # an annotator writes a raw surface variant ("two", "a dog", "Dog.")
    pred_variant_prob: float = 0.4  # the LVLM writes a surface variant of its answer
    raw_junk_prob: float = 0.1  # the raw generation runs on ("dog\nQuestion:", "2, 3") and needs vqa_postprocess

    # --- the LVLM: logit p = base_q + H_max·tanh(H / H_max),  H = Σ_i w_i · novelty_i · u_i ---------------
    base_mean: float = -1.2  # per-query difficulty base_q ~ N(base_mean, base_sd)
    base_sd: float = 1.2
    format_gain: float = 0.15  # a_fmt: any demonstration helps a little (shows the answer format)
    relevance_gain: float = 1.1  # a_rel: multiplies the hidden relevance cos(z_q, z_c)
    type_gain: float = 0.35  # a_type: bonus when the ICD's answer type matches the query's
    recency: float = 0.7  # w_i = recency^(S-1-i): the ICD next to the query weighs 1
    redundancy_weight: float = 0.6  # rho: novelty_i = 1 - rho·red_i
    redundancy_threshold: float = 0.6  # s0: hidden cos between two ICDs above which they start to be redundant
    saturation: float = 2.0  # H_max: diminishing returns of the total help
    distractor_alt_weight: float = 0.35  # share of a wrong answer that is the annotators' alternative answer
    distractor_copy_weight: float = 0.3  # share of a wrong answer copied from the ICDs' answers

    # --- scoring: official metric vs the noisy string-match fallback (reference#correctness) ------------------------
    fallback_fraction: float = 0.1  # anchors whose candidates are scored by fallback_match
    fallback_noise: float = 0.3  # prob. a fallback-scored correctness is corrupted (see fallback_noise_kind)
    fallback_noise_kind: str = "coin"  # "coin": replaced by a fair coin flip; "flip": inverted (a planted, harmful bias)
    # answer normalisation of the official metric behind vqa_acc_score / vqa_correct (metrics.vqa_accuracy):
    # "official" (vqaEval.py a013f00) or "lever_plus" (the reference's copy, reference#correctness)
    vqa_normalization: str = "official"

    # --- InfoScore beam JSON (reference#formats-beam-json) ----------------------------------------------------------------
    beam_size: int = 5
    beam_max_shot: int = 2

    # --- RL JSON (reference#rldata-candidates) ---------------------------------------------------------------------------
    shot_nums: List[int] = field(default_factory=lambda: [1, 2, 3, 4])
    num_beams: int = 5
    temps: List[float] = field(default_factory=lambda: [1.0, 1.3])
    num_samples_per_temp: int = 2
    num_retrieval: int = 5
    num_random: int = 1
    proposal_temperature: float = 0.1  # proposal logits = (cos(q,c) + noise) / τ (the pointer net's 0.1)
    proposal_noise: float = 0.05  # sd of the fixed per-(query, candidate) noise: an imperfect SFT'd policy

    def __post_init__(self) -> None:
        # Hydra / YAML may give 1 for a float knob: coerce, so the hash does not depend on how it was written.
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "float" and isinstance(v, int) and not isinstance(v, bool):
                setattr(self, f.name, float(v))
            elif f.type == "List[float]" and isinstance(v, (list, tuple)):
                setattr(self, f.name, [float(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in v])
            elif isinstance(v, tuple):
                setattr(self, f.name, list(v))
        self.validate()

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "SimParams":
        """Build from a plain mapping (e.g. ``OmegaConf.to_container(cfg.data.sim)``); unknown keys raise."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise LeverPlusInputError(
                f"unknown simulation parameter(s) {unknown}",
                field="data.sim",
                fix=f"use only {sorted(names)}",
            )
        kwargs = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in values.items()}
        return cls(**kwargs)

    def validate(self) -> None:
        """Raise LeverPlusInputError naming the first inconsistent parameter."""
        self._validate_counts()
        self._validate_sizes()
        self._validate_answers()
        self._validate_ranges()
        self._validate_generation()

    def _validate_counts(self) -> None:
        for name in POSITIVE_INTS:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                _bad(name, f"must be a positive integer, got {v!r}", "set a positive integer")
        for name in NON_NEGATIVE_INTS:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                _bad(name, f"must be a non-negative integer, got {v!r}", "set 0 or more")

    def _validate_sizes(self) -> None:
        if self.num_anchors > self.num_train:
            _bad("num_anchors", f"{self.num_anchors} anchors cannot be drawn from {self.num_train} train items",
                 "lower num_anchors or raise num_train")
        if self.candidate_num > self.num_train - 1:
            _bad("candidate_num", f"a pool of {self.candidate_num} needs more than {self.num_train} train items",
                 "lower candidate_num or raise num_train")
        needed = self.latent_dim + self.nuisance_dim + len(self.answer_types)
        if self.embedding_dim < needed:
            _bad("embedding_dim", f"{self.embedding_dim} < latent_dim + nuisance_dim + #answer types = {needed}",
                 "raise embedding_dim (the three parts live in orthogonal subspaces)")

    def _validate_answers(self) -> None:
        unknown = [t for t in self.answer_types if t not in KNOWN_ANSWER_TYPES]
        if unknown or not self.answer_types or len(set(self.answer_types)) != len(self.answer_types):
            _bad("answer_types", f"must be distinct names from {KNOWN_ANSWER_TYPES}, got {self.answer_types}",
                 "pick a subset of the known types")
        for name, probs, n in (("answer_type_probs", self.answer_type_probs, len(self.answer_types)),
                               ("alt_annotator_probs", self.alt_annotator_probs, None)):
            if (n is not None and len(probs) != n) or not probs or any(p < 0 for p in probs) \
                    or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
                _bad(name, f"must be {n or 'some'} non-negative probabilities summing to 1, got {probs}",
                     "fix the list")
        if len(self.alt_annotator_probs) > self.num_annotators // 2:
            _bad("alt_annotator_probs", "an alternative answer must stay a minority of the annotators",
                 f"use at most {self.num_annotators // 2} entries (k_alt = 0..len-1)")

    def _validate_ranges(self) -> None:
        for name in UNIT_INTERVAL:
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                _bad(name, f"must lie in [0, 1], got {v}", "use a probability / fraction")
        if self.distractor_alt_weight + self.distractor_copy_weight > 1.0:
            _bad("distractor_copy_weight", "distractor_alt_weight + distractor_copy_weight exceeds 1",
                 "lower one of them")
        if self.vqa_normalization not in NORMALIZATION_MODES:
            _bad("vqa_normalization", f"must be one of {NORMALIZATION_MODES}, got {self.vqa_normalization!r}",
                 "use official or lever_plus")
        if self.fallback_noise_kind not in ("coin", "flip"):
            _bad("fallback_noise_kind", f"must be 'coin' or 'flip', got {self.fallback_noise_kind!r}",
                 "use coin or flip")
        if not -1.0 <= self.redundancy_threshold < 1.0:
            _bad("redundancy_threshold", f"must lie in [-1, 1), got {self.redundancy_threshold}", "use a cosine")
        for name in POSITIVE_FLOATS:
            if not getattr(self, name) > 0:
                _bad(name, f"must be > 0, got {getattr(self, name)}", "use a positive value")
        for name in NON_NEGATIVE_FLOATS:
            if getattr(self, name) < 0:
                _bad(name, f"must be >= 0, got {getattr(self, name)}", "use a non-negative value")

    def _validate_generation(self) -> None:
        if not self.shot_nums or any((not isinstance(s, int) or s < 1 or s > self.candidate_num)
                                     for s in self.shot_nums) or len(set(self.shot_nums)) != len(self.shot_nums):
            _bad("shot_nums", f"must be distinct shot counts in [1, {self.candidate_num}], got {self.shot_nums}",
                 "e.g. [1, 2, 3, 4]")
        if self.beam_max_shot > self.candidate_num:
            _bad("beam_max_shot", f"{self.beam_max_shot} ICDs cannot come from a pool of {self.candidate_num}",
                 "lower beam_max_shot")
        if not self.temps or any(t <= 0 for t in self.temps):
            _bad("temps", f"must be positive sampling temperatures, got {self.temps}", "e.g. [1.0, 1.3]")


def params_dict(p: SimParams) -> dict:
    """The parameters as a plain JSON-able dict (lists stay lists, floats stay floats)."""
    return json.loads(json.dumps(dataclasses.asdict(p)))


def params_hash(p: SimParams) -> str:
    """16 hex chars of sha256 over the canonical JSON of the parameters plus :data:`GENERATOR_VERSION`."""
    payload = json.dumps({"generator_version": GENERATOR_VERSION, "params": params_dict(p)},
                         sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
