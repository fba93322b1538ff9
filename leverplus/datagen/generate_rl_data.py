"""``python -m leverplus.generate_rl_data``: RL data generation (reference#rldata, reference#formats-rl-json), one shot count per run.

For each query: pointer candidates from a selector checkpoint (beam search, temperature sampling, retrieval,
random; de-duplicated beam > retrieval > sample > random, reference#rldata-candidates), answers from a scorer (``sim`` or ``hf``),
correctness by the official VQA metric (``vqa_eval_mode="vqaEval"``) or the string-match fallback
(``"fallback"``), ``vqa_gt_prob`` and relevance; every reference#formats-rl-json candidate field is written. The final ``_meta``
records (and the run prints) the count and percentage of each eval mode.

Resumable (finished query ids are skipped), saved atomically every ``save_interval`` queries, shardable by
index range (``queries.start`` / ``queries.end``) and merged with::

    python -m leverplus.generate_rl_data merge OUT.json SHARD_0.json SHARD_1.json ...

Examples (docs/rldata.md)::

    python -m leverplus.generate_rl_data scorer=sim shot_num=2 selector.checkpoint=sft.pt output=rl_shot2.json
    python -m leverplus.generate_rl_data scorer=hf scorer.hf.model=/models/Qwen2.5-VL-3B-Instruct \\
        scorer.hf.data.train=train_items.json scorer.hf.annotations.train=mscoco_train2014_annotations.json \\
        embeddings=query_embeddings.pt queries.beam_json=beam.json selector.checkpoint=sft.ckpt output=rl.json
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Dict, List, Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from leverplus.config.schema import VqaNormalization
from leverplus.config.store import conf_dir
from leverplus.data.formats.beam_json import read_beam_json
from leverplus.data.formats.embeddings import read_embeddings
from leverplus.data.formats.io import file_fingerprint
from leverplus.data.formats.rl_json import write_rl_json
from leverplus.datagen.candidates import (
    EVAL_MODES,
    CandidateSettings,
    QueryJob,
    build_candidates,
    eval_mode_percent,
    query_generators,
    score_queries,
)
from leverplus.datagen.generation import (
    ResumableOutput,
    chunks,
    dispatch_cli,
    ids_fingerprint,
    merge_cli,
    merge_outputs,
    read_pool_file,
    shard_range,
)
from leverplus.datagen.scorers.base import Scorer, build_scorer
from leverplus.datagen.scorers.config import ScorerConfig
from leverplus.errors import LeverPlusInputError, printed_input_errors
from leverplus.model.checkpoint import load_pointer_checkpoint
from leverplus.utils import enum_value

LABEL = "generate_rl_data"


class PoolSource(str, Enum):
    auto = "auto"  # the scorer's own per-query pools when it has them (sim), else the whole train split
    all = "all"  # the whole train split minus the query (reference reference#rldata-driver); pointers are global ids
    scorer = "scorer"  # the scorer's per-query pools (sim: the RandSampler 64-pools) -> K=64 variant
    file = "file"  # pools from pool.file: {"<qid>": [ids]} or an RL JSON with candidate_pool_ids -> K=64 variant


@dataclass
class QueriesConfig:
    beam_json: Optional[str] = None  # query ids = the beam JSON's keys (the reference)
    ids: Optional[List[int]] = None  # or an explicit list; neither -> the scorer's own queries (sim anchors)
    start: int = 0  # shard: index range [start, end) into the sorted query ids (reference --start_idx/--end_idx)
    end: Optional[int] = None  # None or -1 = to the end


@dataclass
class PoolConfig:
    source: PoolSource = PoolSource.auto
    file: Optional[str] = None


@dataclass
class SelectorConfig:
    checkpoint: Optional[str] = None  # any reference#checkpoints format (SFT .ckpt, trainer .pt, v2format, raw state dict)
    strict_load: bool = True  # the reference loaded non-strictly and ran a random net (reference#defect-c3)
    static_query: bool = False  # [QUIRK reference#rldata-candidates] reference True: no gate update between steps
    policy_temperature: float = 1.0  # extra division of the pointer logits (1.0 = the model's own)


@dataclass
class CandidatesConfig:
    """Reference CLI defaults (reference#rldata-driver)."""

    num_beams: int = 5
    temps: List[float] = field(default_factory=lambda: [1.0, 1.3])
    num_samples_per_temp: int = 2
    num_retrieval: int = 5
    num_random: int = 1


@dataclass
class GenerateRLConfig:
    output: Optional[str] = None  # the RL JSON to write (required)
    shot_num: int = 2  # ICDs per candidate; run once per shot count for 1-4-shot files
    embeddings: Optional[str] = None  # [N_train, d] table; default with scorer=sim: the world's table
    queries: QueriesConfig = field(default_factory=QueriesConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    candidates: CandidatesConfig = field(default_factory=CandidatesConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    strict_eval: bool = True  # reference default: candidates without official annotations are dropped
    # answer normalisation of vqa_acc_score (vqa_metric.vqa_accuracy); lever_plus reproduces the reference's files
    vqa_normalization: VqaNormalization = VqaNormalization.official
    save_prompts: bool = False  # store vqa_prompt_text / vqa_prompt_len (hf scorer)
    save_interval: int = 50  # queries between atomic interim saves (reference 50)
    seed: int = 0  # sampling / random candidates, per (seed, query, shot_num)
    resume: bool = True  # skip queries already in the output (false: refuse an existing output)
    created_at: Optional[str] = None  # None = fixed (byte-identical files); "now" = wall clock
    notes: str = ""
    device: str = "cpu"  # selector device
    num_threads: int = 0  # 0 = torch default


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="generate_rl_schema", node=GenerateRLConfig, replace=True)
    cs.store(group="scorer", name="scorer_schema", node=ScorerConfig, replace=True)


register_configs()


# ------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------


def resolve_query_ids(cfg, scorer: Scorer, num_items: int) -> tuple[list[int], dict]:
    """Sorted unique query ids and a description of where they came from."""
    q = cfg.queries
    if q.ids is not None and q.beam_json:
        raise LeverPlusInputError("both queries.ids and queries.beam_json are set", field="queries",
                                  fix="pass one of them")
    if q.ids is not None:
        ids, source = [int(i) for i in q.ids], {"source": "ids"}
    elif q.beam_json:
        ids = list(read_beam_json(q.beam_json, num_items=num_items))
        source = {"source": "beam_json", "file": Path(q.beam_json).name,
                  "fingerprint": file_fingerprint(q.beam_json)}
    else:
        ids = scorer.query_ids("train")
        if ids is None:
            raise LeverPlusInputError("no query ids", field="queries",
                                      fix="pass queries.beam_json=/path/beam.json or queries.ids=[...]")
        source = {"source": "scorer"}
    bad = [i for i in ids if not 0 <= i < num_items]
    if bad:
        raise LeverPlusInputError(f"query ids {bad[:5]} are outside [0, {num_items})", field="queries",
                                  fix="query ids are train rows (embedding rows)")
    ids = sorted(set(ids))
    if not ids:
        raise LeverPlusInputError("the query list is empty", field="queries", fix="pass at least one query id")
    return ids, {**source, "count": len(ids), "ids_fingerprint": ids_fingerprint(ids)}


def make_pool_fn(cfg, scorer: Scorer, num_items: int,
                 first_query: int) -> tuple[Callable[[int], list[int]], bool, dict]:
    """(query id -> pool of global ids, pools are per-query (K=64 variant), description)."""
    source = PoolSource(cfg.pool.source)
    if source == PoolSource.auto:
        has_pools = scorer.candidate_pool("train", first_query) is not None
        source = PoolSource.scorer if has_pools else PoolSource.all
    if source == PoolSource.all:
        everything = list(range(num_items))
        return (lambda q: everything), False, {"source": "all", "num_items": num_items}
    if source == PoolSource.scorer:
        def from_scorer(q: int) -> list[int]:
            pool = scorer.candidate_pool("train", q)
            if pool is None:
                raise LeverPlusInputError(f"the {scorer.name!r} scorer has no pool for query {q}",
                                          field="pool.source", fix="use pool.source=all or pool.source=file")
            return pool

        return from_scorer, True, {"source": "scorer"}
    if not cfg.pool.file:
        raise LeverPlusInputError("pool.source=file needs pool.file", field="pool.file",
                                  fix="pass pool.file=/path/pools.json")
    pools = read_pool_file(cfg.pool.file)

    def from_file(q: int) -> list[int]:
        if q not in pools:
            raise LeverPlusInputError(f"has no pool for query {q}", file=cfg.pool.file, record=f"query {q}",
                                      fix="add the query's pool or drop the query")
        return pools[q]

    return from_file, True, {"source": "file", "file": Path(cfg.pool.file).name,
                             "fingerprint": file_fingerprint(cfg.pool.file)}


def load_selector(cfg, d_model: int):
    """The pointer selector that proposes candidates (any reference#checkpoints format), in eval mode."""
    if not cfg.selector.checkpoint:
        raise LeverPlusInputError("no selector checkpoint", field="selector.checkpoint",
                                  fix="pass selector.checkpoint=/path/sft.ckpt (SFT or RL; any reference#checkpoints format)")
    model = load_pointer_checkpoint(cfg.selector.checkpoint, strict=cfg.selector.strict_load, d_model=d_model)
    return model.to(cfg.device).eval()


# ------------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------------


def query_job(q: int, pool: list[int], local: bool, embeddings: torch.Tensor, model, cfg,
              settings: CandidateSettings) -> QueryJob:
    """The reference#rldata-candidates candidates of one query (positions into ``pool``)."""
    if local and q in pool:
        raise LeverPlusInputError(f"query {q} is in its own candidate pool", field="pool",
                                  fix="remove each query from its pool (an example is never its own ICD)")
    exclude = [q] if not local else []  # pool "all" holds every train row: the query is excluded by position
    pool_t = torch.as_tensor(pool, dtype=torch.long)
    q_emb, c_emb = embeddings[q], embeddings[pool_t]
    step = model.step_logits_fn(q_emb.to(cfg.device), c_emb.to(cfg.device),
                                static_query=cfg.selector.static_query,
                                policy_temperature=cfg.selector.policy_temperature)
    sim = (torch.nn.functional.normalize(c_emb.double(), dim=-1)
           @ torch.nn.functional.normalize(q_emb.double(), dim=-1)).numpy()
    sample_gen, rng = query_generators(int(cfg.seed), q, int(cfg.shot_num))

    def cpu_step(prefix):
        return step(prefix).cpu()

    cands = build_candidates(cpu_step, sim, int(cfg.shot_num), settings, sample_generator=sample_gen,
                             random_rng=rng, exclude=exclude)
    return QueryJob(q, pool, cands, local_pool=local)


def recount(records: Dict[int, dict]) -> dict:
    """The record-derived ``_meta`` fields: count and percentage of each eval mode among written candidates."""
    counts = {m: 0 for m in EVAL_MODES}
    for rec in records.values():
        for c in rec["pointer_candidates"]:
            mode = c.get("vqa_eval_mode")
            counts[mode] = counts.get(mode, 0) + 1
    return {"eval_mode_counts": counts, "eval_mode_percent": eval_mode_percent(counts)}


def write_final(path: str, records: Dict[int, dict], meta: dict) -> None:
    write_rl_json(path, records, meta)


def summary(meta: dict) -> str:
    """The eval-mode lines printed at the end of a run (and of a merge)."""
    counts, pct = meta["eval_mode_counts"], meta["eval_mode_percent"]
    total = sum(counts.values())
    lines = [f"eval modes over {total} written candidates:"]
    lines += [f"  {m:<9} {n:>8}  {pct[m]:6.2f}%" for m, n in counts.items()]
    dropped = {k: v for k, v in meta.get("dropped_candidates", {}).items() if v}
    if dropped:
        lines.append("  dropped (strict_eval): " + ", ".join(f"{k} {v}" for k, v in dropped.items()))
    if meta.get("empty_queries"):
        lines.append(f"  queries left without candidates (not written): {len(meta['empty_queries'])}")
    return "\n".join(lines)


def _check_run_cfg(cfg: DictConfig) -> None:
    if not cfg.output:
        raise LeverPlusInputError("no output file", field="output", fix="pass output=/path/rl_data_shot2.json")
    if cfg.shot_num < 1 or cfg.save_interval < 1:
        raise LeverPlusInputError("shot_num and save_interval must be >= 1", field="shot_num")


def _candidate_settings(cfg: DictConfig) -> CandidateSettings:
    c = cfg.candidates
    return CandidateSettings(num_beams=c.num_beams, temps=tuple(c.temps), num_samples_per_temp=c.num_samples_per_temp,
                             num_retrieval=c.num_retrieval, num_random=c.num_random)


def _load_embeddings(cfg: DictConfig, scorer: Scorer) -> tuple[torch.Tensor, str]:
    """The train embeddings (``cfg.embeddings`` or the scorer's own file), one row per scorer train item."""
    emb_path = cfg.embeddings or scorer.embeddings_path()
    if emb_path is None:
        raise LeverPlusInputError("no embedding file", field="embeddings", fix="pass embeddings=/path/emb.pt")
    embeddings = read_embeddings(emb_path)
    n = embeddings.shape[0]
    if scorer.num_items("train") != n:
        raise LeverPlusInputError(f"has {n} rows but the scorer's train split has {scorer.num_items('train')} items",
                                  file=str(emb_path), fix="use the embeddings exported for this dataset")
    return embeddings, emb_path


def _generation_block(cfg: DictConfig, *, query_desc: dict, pool_desc: dict, settings: CandidateSettings, model,
                      emb_path: str, described: dict, norm: str) -> dict:
    """``_meta.generation``: every setting the file depends on (shards of one run must agree on it)."""
    return {
        "generator": f"leverplus.{LABEL}", "shot_num": int(cfg.shot_num), "seed": int(cfg.seed),
        "strict_eval": bool(cfg.strict_eval), "save_prompts": bool(cfg.save_prompts), "queries": query_desc,
        "vqa_normalization": norm,
        "info_score": "P(answer | ICDs + query) - P(answer | query)",  # written for every candidate
        "pool": pool_desc, "candidates": settings.as_dict(),
        "selector": {"checkpoint": Path(cfg.selector.checkpoint).name,
                     "fingerprint": file_fingerprint(cfg.selector.checkpoint),
                     "format": model.checkpoint_info["format"], "static_query": bool(cfg.selector.static_query),
                     "policy_temperature": float(cfg.selector.policy_temperature)},
        "embeddings": {"file": Path(emb_path).name, "fingerprint": file_fingerprint(emb_path)},
        "scorer": described,
    }


def _generate_pending(cfg: DictConfig, out: ResumableOutput, ids: list[int], pending: list[int], make_job,
                      scorer: Scorer, norm: str, say: Callable[[str], None]) -> None:
    """Score the ``pending`` queries in blocks of ``save_interval``, saving the partial file after each block."""
    cache: dict = {}
    finished = len(ids) - len(pending)
    for block in chunks(pending, int(cfg.save_interval)):
        for q in block:
            records, counts = score_queries(scorer, "train", [make_job(q)], strict_eval=bool(cfg.strict_eval),
                                            save_prompts=bool(cfg.save_prompts), cache=cache, normalization=norm)
            out.add(q, records[q], {k: v for k, v in counts.dropped_counts().items() if v})
        out.save_partial()
        finished += len(block)
        say(f"[{LABEL}] shot {cfg.shot_num}: {finished}/{len(ids)} queries")


def run(cfg: DictConfig, say: Callable[[str], None] = print, scorer: Optional[Scorer] = None) -> dict:
    """Generate (or resume, or confirm complete) one RL file; returns its ``_meta``."""
    _check_run_cfg(cfg)
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    settings = _candidate_settings(cfg)
    scorer = build_scorer(cfg.scorer) if scorer is None else scorer  # a library caller may pass its own
    embeddings, emb_path = _load_embeddings(cfg, scorer)
    n = embeddings.shape[0]
    all_ids, query_desc = resolve_query_ids(cfg, scorer, n)
    ids, shard = shard_range(all_ids, int(cfg.queries.start), cfg.queries.end)
    pool_fn, local, pool_desc = make_pool_fn(cfg, scorer, n, all_ids[0])
    model = load_selector(cfg, embeddings.shape[1])
    described = scorer.describe()
    norm = enum_value(cfg.vqa_normalization)
    generation = _generation_block(cfg, query_desc=query_desc, pool_desc=pool_desc, settings=settings, model=model,
                                   emb_path=emb_path, described=described, norm=norm)
    out = ResumableOutput(cfg.output, generation, shard, write_final, resume=cfg.resume, created_at=cfg.created_at)
    if out.complete:
        say(f"[{LABEL}] {cfg.output} is already complete ({len(out.records)} queries).")
        say(summary(out.meta))
        return out.meta
    done = out.done()
    pending = [q for q in ids if q not in done]
    if done:
        say(f"[{LABEL}] resuming {cfg.output}: {len(ids) - len(pending)} of {len(ids)} queries done.")

    def make_job(q: int) -> QueryJob:
        return query_job(q, list(pool_fn(q)), local, embeddings, model, cfg, settings)

    _generate_pending(cfg, out, ids, pending, make_job, scorer, norm, say)
    meta = {"vqa_model": described["vqa_model"], "task_gen_args": described["task_gen_args"],
            "eval": described["eval"], "strict_eval": bool(cfg.strict_eval), "save_prompts": bool(cfg.save_prompts),
            "notes": cfg.notes or f"leverplus {LABEL}, shot_num={cfg.shot_num}", **recount(out.records)}
    meta = out.finalize(meta)
    say(f"[{LABEL}] wrote {cfg.output} ({len(out.records)} queries)")
    say(summary(meta))
    return meta


def merge(output: str, inputs: List[str], allow_gaps: bool = False, say: Callable[[str], None] = print) -> dict:
    """Merge finished shards into ``output`` (byte-identical to an uninterrupted run over the same range)."""
    meta = merge_outputs(output, inputs, final_writer=write_final, recount=recount, allow_gaps=allow_gaps)
    say(f"[{LABEL}] merged {len(inputs)} shards into {output}")
    say(summary(meta))
    return meta


def merge_main(argv: List[str]) -> None:
    merge_cli(LABEL, "RL-data", merge, argv)


@hydra.main(config_path=str(conf_dir() / "generate"), config_name="rl_data", version_base=None)
def main(cfg: DictConfig) -> None:
    with printed_input_errors():
        run(cfg)


if __name__ == "__main__":
    dispatch_cli(merge_main, main)
