"""``python -m leverplus.generate_beam_data``: InfoScore beam search (reference#formats-beam-json) -> the beam JSON.

For each anchor query and its candidate pool, beam search keeps the ``beam_size`` ICD sequences with the largest
InfoScore ``P(y | [c] + chosen + query) − P(y | chosen + query)``, with ``y`` the anchor's answer and ``P`` the
scorer's teacher-forced answer probability (``hf``: exp(−mean CE) over exactly the answer tokens of the chat
sequence). Output: the reference's beam JSON (``id_list``, ``score_list``, ``shot_scores``, ``beams``,
``few_shot_num``) plus ``_meta`` (readers skip it). Resumable, saved every ``save_interval`` anchors, shardable by
index range, merged with ``python -m leverplus.generate_beam_data merge OUT.json SHARD...``.

Anchors and pools: the scorer's own (the simulated RandSampler anchors and 64-pools), explicit ids or a pool
file, or a seeded uniform sampler (``queries.sample_num`` anchors, ``pool.candidate_num`` ids each, the query
excluded), like the reference's RandSampler but with per-anchor seeds (so shards agree), not its exact draws.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Dict, List, Optional

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from leverplus.config.store import conf_dir
from leverplus.data.formats.beam_json import read_beam_json
from leverplus.data.formats.io import atomic_write_json, file_fingerprint, temp_prefix
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
from leverplus.datagen.scorers.infoscore import infoscore_beam_search
from leverplus.errors import LeverPlusInputError, printed_input_errors

LABEL = "generate_beam_data"
#: Seed-sequence streams of the uniform anchor / pool sampler.
ANCHOR_STREAM, POOL_STREAM = 4004, 4005


class BeamPoolSource(str, Enum):
    auto = "auto"  # the scorer's pools when it has them (sim), else random
    scorer = "scorer"
    file = "file"  # {"<qid>": [ids]} or an RL JSON with candidate_pool_ids
    random = "random"  # candidate_num uniform train ids per anchor, the anchor excluded


@dataclass
class BeamQueriesConfig:
    ids: Optional[List[int]] = None  # explicit anchors
    sample_num: Optional[int] = None  # or this many anchors drawn uniformly from the train split (OKVQA 800)
    start: int = 0  # shard: index range [start, end) into the sorted anchors
    end: Optional[int] = None


@dataclass
class BeamPoolConfig:
    source: BeamPoolSource = BeamPoolSource.auto
    file: Optional[str] = None
    candidate_num: int = 64  # random pools (reference candidate_num)


@dataclass
class GenerateBeamConfig:
    output: Optional[str] = None  # the beam JSON to write (required)
    queries: BeamQueriesConfig = field(default_factory=BeamQueriesConfig)
    pool: BeamPoolConfig = field(default_factory=BeamPoolConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    beam_size: int = 5  # reference 5
    max_shot: int = 2  # reference few_shot_num 2
    per_beam_largest: bool = True  # [QUIRK reference#formats-beam-json] reference Qwen path: false (keeps each beam's most negative scores)
    seed: int = 42  # the uniform anchor/pool sampler (reference RandSampler: random.seed(42))
    save_interval: int = 50
    resume: bool = True
    created_at: Optional[str] = None  # None = fixed (byte-identical files); "now" = wall clock
    notes: str = ""


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="generate_beam_schema", node=GenerateBeamConfig, replace=True)
    cs.store(group="scorer", name="scorer_schema", node=ScorerConfig, replace=True)


register_configs()


def sample_anchors(num_items: int, sample_num: int, seed: int) -> list[int]:
    """``sample_num`` distinct train ids, uniformly, sorted."""
    if not 1 <= sample_num <= num_items:
        raise LeverPlusInputError(f"cannot draw {sample_num} anchors from {num_items} items",
                                  field="queries.sample_num")
    rng = np.random.default_rng([seed, ANCHOR_STREAM])
    return sorted(int(i) for i in rng.choice(num_items, size=sample_num, replace=False))


def random_pool(anchor: int, num_items: int, candidate_num: int, seed: int) -> list[int]:
    """``candidate_num`` distinct train ids other than ``anchor``, seeded by (seed, anchor) only."""
    if not 1 <= candidate_num <= num_items - 1:
        raise LeverPlusInputError(f"a pool of {candidate_num} needs more than {num_items} items",
                                  field="pool.candidate_num")
    draw = np.random.default_rng([seed, POOL_STREAM, int(anchor)]).choice(num_items - 1, size=candidate_num,
                                                                         replace=False)
    return [int(i) for i in draw + (draw >= anchor)]


def resolve_anchors(cfg, scorer: Scorer, n: int) -> tuple[list[int], dict]:
    q = cfg.queries
    if q.ids is not None and q.sample_num is not None:
        raise LeverPlusInputError("both queries.ids and queries.sample_num are set", field="queries",
                                  fix="pass one of them")
    if q.ids is not None:
        ids, desc = [int(i) for i in q.ids], {"source": "ids"}
    elif q.sample_num is not None:
        ids, desc = sample_anchors(n, int(q.sample_num), int(cfg.seed)), {"source": "sample"}
    else:
        ids = scorer.query_ids("train")
        if ids is None:
            raise LeverPlusInputError("no anchors", field="queries",
                                      fix="pass queries.sample_num=800 or queries.ids=[...]")
        desc = {"source": "scorer"}
    bad = [i for i in ids if not 0 <= i < n]
    if bad:
        raise LeverPlusInputError(f"anchor ids {bad[:5]} are outside [0, {n})", field="queries")
    ids = sorted(set(ids))
    if not ids:
        raise LeverPlusInputError("the anchor list is empty", field="queries")
    return ids, {**desc, "count": len(ids), "ids_fingerprint": ids_fingerprint(ids)}


def make_pool_fn(cfg, scorer: Scorer, n: int, first: int) -> tuple[Callable[[int], list[int]], dict]:
    source = BeamPoolSource(cfg.pool.source)
    if source == BeamPoolSource.auto:
        source = BeamPoolSource.scorer if scorer.candidate_pool("train", first) is not None else BeamPoolSource.random
    if source == BeamPoolSource.scorer:
        def from_scorer(a: int) -> list[int]:
            pool = scorer.candidate_pool("train", a)
            if pool is None:
                raise LeverPlusInputError(f"the {scorer.name!r} scorer has no pool for anchor {a}",
                                          field="pool.source", fix="use pool.source=random or file")
            return pool

        return from_scorer, {"source": "scorer"}
    if source == BeamPoolSource.random:
        K, seed = int(cfg.pool.candidate_num), int(cfg.seed)
        return (lambda a: random_pool(a, n, K, seed)), {"source": "random", "candidate_num": K}
    if not cfg.pool.file:
        raise LeverPlusInputError("pool.source=file needs pool.file", field="pool.file")
    pools = read_pool_file(cfg.pool.file)

    def from_file(a: int) -> list[int]:
        if a not in pools:
            raise LeverPlusInputError(f"has no pool for anchor {a}", file=cfg.pool.file, record=f"query {a}")
        return pools[a]

    return from_file, {"source": "file", "file": Path(cfg.pool.file).name,
                       "fingerprint": file_fingerprint(cfg.pool.file)}


def anchor_beams(scorer: Scorer, anchor: int, pool: list[int], beam_size: int, max_shot: int, *,
                 per_beam_largest: bool = True) -> dict:
    """The beam-JSON record of one anchor: InfoScore beam search with the scorer's probability of its answer."""
    y = scorer.item("train", anchor)["answer"]

    def prob_fn(qs: np.ndarray, icds: np.ndarray) -> np.ndarray:
        return scorer.answer_probs("train", [int(q) for q in qs], [[int(i) for i in row] for row in icds],
                                   [y] * len(qs))

    return infoscore_beam_search(prob_fn, np.asarray([anchor]), np.asarray([pool]), beam_size, max_shot,
                                 per_beam_largest=per_beam_largest)[anchor]


def write_final(path: str, records: Dict[int, dict], meta: dict) -> None:
    """Beam JSON with ``_meta`` first, validated by ``read_beam_json`` before it replaces ``path``."""
    target = Path(path)
    tmp = target.with_name(f"{temp_prefix(target)}final.tmp")  # removed by remove_stale_temps if the run is killed
    atomic_write_json(tmp, {"_meta": meta, **{str(k): records[k] for k in sorted(records)}})
    try:
        read_beam_json(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)


def recount(records: Dict[int, dict]) -> dict:
    return {"num_queries": len(records)}


def run(cfg: DictConfig, say: Callable[[str], None] = print, scorer: Optional[Scorer] = None) -> dict:
    """Generate (or resume, or confirm complete) one beam JSON; returns its ``_meta``."""
    if not cfg.output:
        raise LeverPlusInputError("no output file", field="output", fix="pass output=/path/beam.json")
    if cfg.save_interval < 1:
        raise LeverPlusInputError("save_interval must be >= 1", field="save_interval")
    scorer = build_scorer(cfg.scorer) if scorer is None else scorer  # a library caller may pass its own
    n = scorer.num_items("train")
    all_ids, query_desc = resolve_anchors(cfg, scorer, n)
    ids, shard = shard_range(all_ids, int(cfg.queries.start), cfg.queries.end)
    pool_fn, pool_desc = make_pool_fn(cfg, scorer, n, all_ids[0])
    described = scorer.describe()
    generation = {"generator": f"leverplus.{LABEL}", "beam_size": int(cfg.beam_size), "max_shot": int(cfg.max_shot),
                  "per_beam_largest": bool(cfg.per_beam_largest), "seed": int(cfg.seed), "queries": query_desc,
                  "pool": pool_desc, "scorer": described}
    out = ResumableOutput(cfg.output, generation, shard, write_final, resume=cfg.resume, created_at=cfg.created_at)
    if out.complete:
        say(f"[{LABEL}] {cfg.output} is already complete ({len(out.records)} anchors).")
        return out.meta
    done = out.done()
    pending = [a for a in ids if a not in done]
    finished = len(ids) - len(pending)
    for block in chunks(pending, int(cfg.save_interval)):
        for a in block:
            out.add(a, anchor_beams(scorer, a, pool_fn(a), int(cfg.beam_size), int(cfg.max_shot),
                                    per_beam_largest=bool(cfg.per_beam_largest)))
        out.save_partial()
        finished += len(block)
        say(f"[{LABEL}] {finished}/{len(ids)} anchors")
    meta = {"vqa_model": described["vqa_model"], "task_gen_args": described["task_gen_args"],
            "notes": cfg.notes or f"leverplus {LABEL}", **recount(out.records)}
    meta = out.finalize(meta)
    say(f"[{LABEL}] wrote {cfg.output} ({len(out.records)} anchors)")
    return meta


def merge(output: str, inputs: List[str], allow_gaps: bool = False, say: Callable[[str], None] = print) -> dict:
    meta = merge_outputs(output, inputs, final_writer=write_final, recount=recount, allow_gaps=allow_gaps)
    say(f"[{LABEL}] merged {len(inputs)} shards into {output} ({meta['num_queries']} anchors)")
    return meta


def merge_main(argv: List[str]) -> None:
    merge_cli(LABEL, "beam-data", merge, argv)


@hydra.main(config_path=str(conf_dir() / "generate"), config_name="beam_data")
def main(cfg: DictConfig) -> None:
    with printed_input_errors():
        run(cfg)


if __name__ == "__main__":
    dispatch_cli(merge_main, main)
