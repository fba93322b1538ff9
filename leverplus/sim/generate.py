"""Writes a simulated world as Lever-Plus files (reference#formats-beam-json, reference#formats-rl-json, reference#formats-embeddings) and caches them by parameter hash.

Files under one world folder (docs/sim.md describes each):

* ``train_embeddings.pt``: ``[num_train, d]`` float32, row i = train item i (the reference's
  ``query_embeddings.pt`` = ``candidate_embeddings.pt``; one file serves both);
* the InfoScore beam JSON (reference#formats-beam-json), with the reference file name;
* ``rl_data_RandSampler_sim-lvlm_shot{S}.json``: one RL JSON (reference#formats-rl-json, K=64 variant) per shot count;
* ``eval_queries.json`` + ``val_embeddings.pt`` / ``test_embeddings.pt``: our own format for evaluation queries
  (questions, annotator answers, 64-pools), see :func:`load_eval_queries`;
* ``manifest.json``: parameters, hash, generator version, content hashes, counts. Written last: a folder with a
  manifest is complete.

Everything is deterministic for a given :class:`SimParams`; the JSON files are byte-identical across runs.
``.pt`` files embed a random torch serialisation id, so the manifest records their *tensor* hashes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from filelock import FileLock
from omegaconf import OmegaConf

from leverplus.config.sim_params import GENERATOR_VERSION, SimParams, params_dict, params_hash
from leverplus.data.formats.beam_json import write_beam_json
from leverplus.data.formats.embeddings import read_embeddings, save_embeddings
from leverplus.data.formats.io import atomic_write_json, load_json
from leverplus.data.formats.rl_json import write_rl_json
from leverplus.datagen.candidates import (
    CandidateSettings,
    QueryJob,
    build_candidates,
    query_generators,
    score_queries,
)
from leverplus.datagen.scorers.infoscore import infoscore_beam_search as shared_infoscore_beam_search
from leverplus.env import CACHE_VAR
from leverplus.errors import LeverPlusInputError
from leverplus.evaluation.vqa_metric import vqa_postprocess
from leverplus.sim.fallback import fallback_anchor_set, score_fallback
from leverplus.sim.files import (
    CREATED_AT,
    EMBEDDINGS_FILE,
    EVAL_FORMAT,
    EVAL_QUERIES_FILE,
    MANIFEST_FILE,
    VQA_MODEL_NAME,
    PathLike,
    SimDataPaths,
    beam_json_name,
    sim_data_paths,
    stale_temp_dirs,
    world_problem,
)
from leverplus.sim.lvlm import SimLVLM
from leverplus.sim.scorer import SimScorer
from leverplus.sim.world import World

log = logging.getLogger(__name__)


def _tensor_hash(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest()[:16]


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------
# InfoScore beam search (reference#formats-beam-json)
# ------------------------------------------------------------------------------------------------------


def infoscore_beam_search(lvlm: SimLVLM, anchors: np.ndarray, pools: np.ndarray, beam_size: int,
                          max_shot: int) -> dict[int, dict]:
    """InfoScore beam search (reference#formats-beam-json) with the simulated LVLM, vectorised over all anchors: the shared
    :func:`leverplus.datagen.scorers.infoscore.infoscore_beam_search` with ``P(y | prompt)`` = ``p_correct`` (the
    teacher-forced probability of the anchor's canonical answer, ``answer_prob``)."""
    return shared_infoscore_beam_search(lambda q, icds: lvlm.p_correct_batch("train", q, icds), anchors, pools,
                                        beam_size, max_shot)


# ------------------------------------------------------------------------------------------------------
# RL candidates (reference#rldata-candidates) and their scores (reference#rldata)
# ------------------------------------------------------------------------------------------------------


def proposal_logits(world: World, qidx: int, pool: np.ndarray, cos: Optional[np.ndarray] = None) -> np.ndarray:
    """The PROPOSAL policy over one anchor's pool: ``(cos(e_q, e_c) + ε_qc) / τ``.

    A stand-in for the SFT'd pointer net of the reference (which, by reference#defect-c3, was in fact random): static over
    steps like the reference's ``compute_step_logits``, with a fixed per-(query, candidate) Gaussian ``ε``
    (sd ``proposal_noise``) so that beam/sample candidates are not just the retrieval ones.
    ``cos`` (the visible cosines to the pool) is recomputed when not given.
    """
    p = world.params
    if cos is None:
        cos = world.visible_similarity("train", qidx, pool)
    noise = np.random.default_rng([p.seed, 1001, int(qidx)]).standard_normal(len(pool)) * p.proposal_noise
    return (cos + noise) / p.proposal_temperature


def candidate_settings(p: SimParams) -> CandidateSettings:
    """The reference#rldata-candidates generator counts of the world's parameters."""
    return CandidateSettings(num_beams=p.num_beams, temps=tuple(p.temps), num_samples_per_temp=p.num_samples_per_temp,
                             num_retrieval=p.num_retrieval, num_random=p.num_random)


def pointer_candidates(world: World, qidx: int, shot_num: int) -> list[dict]:
    """reference#rldata-candidates candidates for one anchor from the shared builder (:func:`leverplus.datagen.candidates.build_candidates`:
    beam, sample, retrieval, random; de-duplicated with priority beam > retrieval > sample > random) driven by the
    PROPOSAL policy. Pointers are LOCAL positions in the anchor's pool, prompt order.

    For ``shot_num != 2`` retrieval takes windows of ``shot_num`` consecutive neighbours
    ``(s_{r+1}, ..., s_{r+S})`` (most similar first, as the reference's pairs) and random draws ``shot_num``
    distinct items. Sampling and random draws use generators seeded by (seed, anchor, shot_num).
    """
    p = world.params
    pool = world.pool("train", qidx)
    cos = world.visible_similarity("train", qidx, pool)
    logits = torch.as_tensor(proposal_logits(world, qidx, pool, cos), dtype=torch.float32)

    def step(prefix: Sequence[int]) -> torch.Tensor:
        return logits

    sample_gen, random_rng = query_generators(p.seed, qidx, shot_num)
    return build_candidates(step, cos, shot_num, candidate_settings(p), sample_generator=sample_gen,
                            random_rng=random_rng)


def _query_block(world: World, split: str, qidx: int) -> dict:
    """The reference#formats-rl-json ``query`` object of one query."""
    items = world.items(split)
    raw = list(items.gt_answers[qidx])
    return {"query_id": int(qidx), "question_id": int(items.question_id[qidx]),
            "image_id": int(items.image_id[qidx]), "question": items.questions[qidx],
            "gt_answers_raw": raw, "gt_answers_norm": [vqa_postprocess(g) for g in raw]}


def rl_records(world: World, lvlm: SimLVLM, shot_num: int, fallback_anchors: set[int],
               cache: Optional[dict] = None) -> tuple[dict, dict]:
    """All RL-JSON query records for one shot count, plus the eval-mode counts.

    Candidates come from :func:`pointer_candidates`; answers, correctness (official metric, or the noisy
    fallback for ``fallback_anchors``), ``vqa_gt_prob`` and relevance from the shared
    :func:`leverplus.datagen.candidates.score_queries` with the ``sim`` scorer, in one vectorised batch over all anchors.
    ``cache`` (shared across shot counts) memoises the VQA accuracy and relevance of (anchor, prediction).
    """
    scorer = SimScorer(lvlm, fallback_queries=fallback_anchors)
    jobs = [QueryJob(int(a), [int(i) for i in world.pool("train", int(a))], pointer_candidates(world, int(a), shot_num))
            for a in world.anchors]
    records, counts = score_queries(scorer, "train", jobs, strict_eval=False, cache=cache,
                                    normalization=world.params.vqa_normalization)
    return records, counts.mode_counts()


def rl_meta(p: SimParams, shot_num: int, counts: dict) -> dict:
    """``_meta`` of an RL file: the reference's keys (reference#formats-rl-json) plus ``eval_mode_counts`` and ``sim``."""
    h = params_hash(p)
    return {
        "created_at": CREATED_AT,
        "vqa_model": VQA_MODEL_NAME,
        "task_gen_args": {"shot_num": shot_num, "num_beams": p.num_beams, "temps": list(p.temps),
                          "num_samples_per_temp": p.num_samples_per_temp, "num_retrieval": p.num_retrieval,
                          "num_random": p.num_random, "proposal": "softmax((cos(e_q, e_c) + noise) / tau)",
                          "proposal_temperature": p.proposal_temperature, "proposal_noise": p.proposal_noise,
                          "answer_decoding": "hash of (seed, query, ICD tuple); see docs/sim.md"},
        "eval": {"train_ques_path": f"sim://{h}/train/questions", "train_ann_path": f"sim://{h}/train/annotations",
                 "val_ques_path": f"sim://{h}/val/questions", "val_ann_path": f"sim://{h}/val/annotations"},
        # the reference reaches the fallback only in non-strict mode
        "strict_eval": p.fallback_fraction == 0,
        "save_prompts": False,
        "notes": (f"Simulated world (leverplus.sim, generator {GENERATOR_VERSION}, params {h}). "
                  f"{round(p.fallback_fraction * p.num_anchors)} anchors are scored by the noisy string-match "
                  f"fallback (fallback_noise={p.fallback_noise}). created_at is fixed so files are reproducible."),
        "eval_mode_counts": dict(counts),
        "sim": {"generator_version": GENERATOR_VERSION, "params_hash": h, "seed": p.seed},
    }


# ------------------------------------------------------------------------------------------------------
# Eval queries (our format)
# ------------------------------------------------------------------------------------------------------


def eval_queries_payload(world: World, paths: SimDataPaths) -> dict:
    """The eval-query JSON: per split, every query's text, answer type, canonical answer, annotator answers
    (raw and ``vqa_postprocess``-ed) and its ``candidate_num`` pool of train ids; embeddings live in the
    split's ``.pt`` file (row i = query i)."""
    p = world.params
    out: dict[str, Any] = {"_meta": {"format": EVAL_FORMAT, "generator_version": GENERATOR_VERSION,
                                     "params_hash": params_hash(p), "num_train": p.num_train,
                                     "candidate_num": p.candidate_num, "embedding_dim": p.embedding_dim}}
    for split in ("val", "test"):
        items = world.items(split)
        queries = []
        for q in range(len(items)):
            rec = _query_block(world, split, q)
            rec["answer_type"] = world.answer_types[int(items.answer_type[q])]
            rec["answer"] = world.canonical_answer(split, q)
            rec["candidate_pool_ids"] = [int(i) for i in world.pool(split, q)]
            queries.append(rec)
        out[split] = {"embeddings": paths.eval_embeddings[split].name, "queries": queries}
    return out


@dataclass
class EvalQueries:
    """Evaluation queries of one split, as read back from disk."""

    split: str
    query_index: list  # [n] ints (0..n-1)
    embeddings: torch.Tensor  # [n, d]
    pools: list  # [n] lists of candidate_num train ids
    records: list  # [n] dicts (question, answers, ...)

    def __len__(self) -> int:
        return len(self.query_index)


def _eval_pools(records: list, *, split: str, path: str, num_train: int, K: int) -> list[list[int]]:
    """Each record's ``candidate_pool_ids`` (``K`` distinct train ids); query ids must be positions."""
    pools = []
    for i, rec in enumerate(records):
        where = f"{split} query {i}"
        if rec.get("query_id") != i:
            raise LeverPlusInputError(f"query_id is {rec.get('query_id')!r}, expected its position {i}", file=path,
                                      record=where, field="query_id", fix="regenerate the simulated world")
        pool = rec.get("candidate_pool_ids")
        if (not isinstance(pool, list) or len(pool) != K or len(set(pool)) != K
                or not all(isinstance(x, int) and 0 <= x < num_train for x in pool)):
            raise LeverPlusInputError(f"must hold {K} distinct train ids in [0, {num_train})", file=path,
                                      record=where, field="candidate_pool_ids", fix="regenerate the simulated world")
        pools.append(list(pool))
    return pools


def load_eval_queries(paths: SimDataPaths, split: str) -> EvalQueries:
    """Read and check one split of the eval-query JSON and its embeddings."""
    if split not in ("val", "test"):
        raise LeverPlusInputError(f"unknown eval split {split!r}", field="split", fix="use 'val' or 'test'")
    path = str(paths.eval_queries)
    obj = load_json(path)
    meta = obj.get("_meta", {}) if isinstance(obj, dict) else {}
    if meta.get("format") != EVAL_FORMAT:
        raise LeverPlusInputError(f"format is {meta.get('format')!r}, expected {EVAL_FORMAT!r}", file=path,
                                  record="_meta", field="format", fix="regenerate the simulated world")
    block = obj.get(split)
    if not isinstance(block, dict) or not isinstance(block.get("queries"), list):
        raise LeverPlusInputError(f"has no '{split}' block with a 'queries' list", file=path, record=split,
                                  fix="regenerate the simulated world")
    records = block["queries"]
    emb = read_embeddings(Path(path).parent / block["embeddings"], expected_rows=len(records))
    pools = _eval_pools(records, split=split, path=path, num_train=meta["num_train"], K=meta["candidate_num"])
    return EvalQueries(split=split, query_index=list(range(len(records))), embeddings=emb, pools=pools,
                       records=records)


# ------------------------------------------------------------------------------------------------------
# Whole world: generate, cache, reload
# ------------------------------------------------------------------------------------------------------


def generate_world_data(params: SimParams, out_dir: PathLike) -> SimDataPaths:
    """Build the world and write every file into ``out_dir`` (created; existing files are overwritten)."""
    params.validate()
    world = World(params)
    lvlm = SimLVLM(world)
    paths = sim_data_paths(out_dir, params)
    paths.root.mkdir(parents=True, exist_ok=True)

    train_emb = world.items("train").embedding
    save_embeddings(paths.embeddings, torch.from_numpy(train_emb.copy()))
    for split in ("val", "test"):
        save_embeddings(paths.eval_embeddings[split], torch.from_numpy(world.items(split).embedding.copy()))

    beam = infoscore_beam_search(lvlm, world.anchors, world.pools["train"], params.beam_size, params.beam_max_shot)
    write_beam_json(paths.beam_json, beam)

    fallback = fallback_anchor_set(world)
    mode_counts, cache = {}, {}
    for shot in sorted(params.shot_nums):
        records, counts = rl_records(world, lvlm, shot, fallback, cache)
        write_rl_json(paths.rl_json[shot], records, rl_meta(params, shot, counts))
        mode_counts[str(shot)] = counts

    atomic_write_json(paths.eval_queries, eval_queries_payload(world, paths))

    manifest = {
        "generator_version": GENERATOR_VERSION,
        "params_hash": params_hash(params),
        "params": params_dict(params),
        "files": {
            "embeddings": {"name": paths.embeddings.name, "tensor_sha256": _tensor_hash(train_emb)},
            "beam_json": {"name": paths.beam_json.name, "sha256": _file_hash(paths.beam_json)},
            "rl_json": {str(s): {"name": paths.rl_json[s].name, "sha256": _file_hash(paths.rl_json[s])}
                        for s in sorted(paths.rl_json)},
            "eval_queries": {"name": paths.eval_queries.name, "sha256": _file_hash(paths.eval_queries)},
            "eval_embeddings": {s: {"name": paths.eval_embeddings[s].name,
                                    "tensor_sha256": _tensor_hash(world.items(s).embedding)}
                                for s in sorted(paths.eval_embeddings)},
        },
        "counts": {"num_train": params.num_train, "num_anchors": len(world.anchors), "num_val": params.num_val,
                   "num_test": params.num_test, "fallback_anchors": len(fallback)},
        "eval_mode_counts": mode_counts,
    }
    atomic_write_json(paths.manifest, manifest, indent=2)
    return paths


def default_cache_root() -> Path:
    """``$LEVERPLUS_CACHE/sim`` when the variable is set, else ``~/.cache/leverplus/sim``."""
    env = os.environ.get(CACHE_VAR)
    return (Path(env) if env else Path.home() / ".cache" / "leverplus") / "sim"


def _is_complete(paths: SimDataPaths) -> bool:
    return all(f.is_file() for f in paths.all_files())


def load_or_generate(params: SimParams, cache_root: Optional[PathLike] = None) -> SimDataPaths:
    """The world's files, generated once per parameter hash under ``cache_root/<params_hash>/``.

    Generation goes to a temp folder next to the target, which is renamed into place when complete; a
    ``filelock`` lock makes concurrent processes (sweep workers) wait for the first one instead of
    generating again. A cache hit touches nothing.
    """
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    h = params_hash(params)
    paths = sim_data_paths(root / h, params)
    if _is_complete(paths):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{h}.lock")):
        if _is_complete(paths):
            return paths
        tmp = Path(tempfile.mkdtemp(prefix=f".{h}.tmp-", dir=root))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the cache is an ordinary folder
        try:
            generate_world_data(params, tmp)
            if paths.root.exists():  # an incomplete leftover (e.g. files deleted by hand)
                shutil.rmtree(paths.root)
            os.replace(tmp, paths.root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return paths


def verified_world(params: SimParams, cache_root: Optional[PathLike] = None) -> SimDataPaths:
    """The world's files, generated on first use, with every file checked against its manifest's hash: what every
    reader of the cache goes through (``data=sim``, the ``sim`` scorer of the generators).

    Under the world's generation lock: temp folders left by a killed generation are removed, and a world whose
    files do not match their hashes is reported (a logging warning naming the file), deleted and generated again
    (same parameters, same files).
    """
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    h = params_hash(params)
    paths = sim_data_paths(root / h, params)
    problem = world_problem(paths) if paths.manifest.is_file() else None
    if problem is not None or stale_temp_dirs(root, h):
        with FileLock(str(root / f"{h}.lock")):  # the lock load_or_generate generates under
            for tmp in stale_temp_dirs(root, h):
                log.warning(f"removing {tmp}, left by an interrupted world generation")
                shutil.rmtree(tmp, ignore_errors=True)
            problem = world_problem(paths) if paths.manifest.is_file() else None
            if problem is not None:
                log.warning(f"simulated world {paths.root}: {problem}; deleting it and generating it again")
                shutil.rmtree(paths.root)
    return load_or_generate(params, root)


def _params_from(source: Union[SimParams, SimDataPaths, PathLike]) -> tuple[SimParams, Optional[SimDataPaths]]:
    if isinstance(source, SimParams):
        return source, None
    root = source.root if isinstance(source, SimDataPaths) else Path(source)
    manifest_path = root / MANIFEST_FILE
    manifest = load_json(manifest_path)
    if manifest.get("generator_version") != GENERATOR_VERSION:
        raise LeverPlusInputError(
            f"made by simulator version {manifest.get('generator_version')!r}, this code is {GENERATOR_VERSION!r}",
            file=str(manifest_path), field="generator_version", fix="delete the folder and regenerate it")
    params = SimParams.from_mapping(manifest["params"])
    if params_hash(params) != manifest.get("params_hash"):
        raise LeverPlusInputError("params_hash does not match the stored parameters", file=str(manifest_path),
                                  field="params_hash", fix="delete the folder and regenerate it")
    return params, sim_data_paths(root, params)


def load_world(source: Union[SimParams, SimDataPaths, PathLike]) -> World:
    """Rebuild the :class:`World` of a generated folder (or directly from parameters).

    From a folder, the parameters come from its manifest and the rebuilt train embeddings are checked against
    the stored hash, so the evaluator scores exactly the world the files describe.
    """
    params, paths = _params_from(source)
    world = World(params)
    if paths is not None:
        manifest = load_json(paths.manifest)
        want = manifest["files"]["embeddings"]["tensor_sha256"]
        if _tensor_hash(world.items("train").embedding) != want:
            raise LeverPlusInputError("the rebuilt world does not match the stored embeddings (numpy RNG change?)",
                                      file=str(paths.manifest), field="files.embeddings",
                                      fix="delete the folder and regenerate it")
    return world


def load_lvlm(source: Union[SimParams, SimDataPaths, PathLike]) -> SimLVLM:
    """The simulated LVLM (= downstream scorer) of a generated folder or of parameters."""
    return SimLVLM(load_world(source))


# ------------------------------------------------------------------------------------------------------
# The world as a scorer (``build_scorer`` factories of ``scorer.name=sim``)
# ------------------------------------------------------------------------------------------------------


def from_world_dir(root: PathLike, *, noisy_fallback: bool = True) -> SimScorer:
    """The scorer of a generated world folder (its manifest is checked, see :func:`load_world`)."""
    return SimScorer(load_lvlm(Path(root)), noisy_fallback=noisy_fallback, root=Path(root))


def world_paths(cfg: Any) -> SimDataPaths:
    """The world folder of a ``scorer.sim`` config (generated and cached on first use)."""
    params = cfg.params
    if not isinstance(params, SimParams):
        params = SimParams.from_mapping(OmegaConf.to_container(params, resolve=True) if OmegaConf.is_config(params)
                                        else dict(params))
    # the same layout as the trainer's data.cache_dir: <cache_dir>/sim/<params_hash>/
    root = Path(cfg.cache_dir).expanduser() / "sim" if cfg.cache_dir else default_cache_root()
    return verified_world(params, root)


def from_config(cfg: Any) -> SimScorer:
    """``build_scorer`` factory: the world of ``cfg.sim`` (generated/cached), as a scorer."""
    paths = world_paths(cfg.sim)
    return from_world_dir(paths.root, noisy_fallback=bool(cfg.sim.noisy_fallback))


__all__ = ["CREATED_AT", "EMBEDDINGS_FILE", "EVAL_FORMAT", "EVAL_QUERIES_FILE", "MANIFEST_FILE", "VQA_MODEL_NAME",
           "EvalQueries", "SimDataPaths", "beam_json_name", "candidate_settings", "default_cache_root",
           "eval_queries_payload", "fallback_anchor_set", "from_config", "from_world_dir", "generate_world_data",
           "infoscore_beam_search", "load_eval_queries", "load_lvlm", "load_or_generate", "load_world",
           "pointer_candidates", "proposal_logits", "rl_meta", "rl_records", "score_fallback", "sim_data_paths",
           "verified_world", "world_paths"]
