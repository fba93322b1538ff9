"""Diversity augmentation: new scored candidates for the RL queries whose candidates all share one reward level.

The reference's offline script (reference#data-surgery, ``augment_rl_data_diversity.py``) added candidates until
each query had at least two reward levels: an all-0 query got a 0.6 or 1.0 candidate, an all-1.0 query a 0 or 0.6
one. Here, per query with fewer than ``target_levels`` distinct ``vqa_acc_score`` levels:

1. each try draws ``candidates_per_try`` pointers from the query's pool (``candidate_pool_ids``, cut at
   ``max_pool_size``; without it the whole train split minus the query) by temperature sampling
   (``leverplus.model.decoding.sample_sequences``) of ``softmax(sign · cos(query, ICD) / temperature)``: sign +1
   (similar ICDs) when the query's levels average below 0.5, as an all-wrong query needs a right answer, else −1;
   an ICD set (unordered) the query already has is not proposed again;
2. the drawn pointers are answered and scored by the scorer (``leverplus.datagen.candidates.score_queries``, the
   same code that writes the generator's candidates: every RL-JSON field, ``info_score`` included);
3. a scored candidate whose level the query lacks is added (``gen_method="aug_diverse"``, ``augmented: true``,
   ``augment_try``); the others are discarded;

until the query has ``target_levels`` levels or ``max_tries`` tries are spent. The original candidates are written
back unchanged and first; the file keeps its shape (local or global pointers) and gains ``_meta.augment``. The
draws are seeded by (seed, query, shot count) only, so the output is the same for a seed whatever else runs.

Two ways in: ``python -m leverplus.datagen.augment input=IN.json output=OUT.json [scorer=sim|hf]`` writes a new
file, and ``data.diversity_augment=true`` augments every RL file a training run loads (``leverplus.pipeline``),
caching the derived file under ``<cache dir>/augmented/`` keyed by the source file, the settings and the scorer.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from leverplus.config.schema import DiversityAugmentConfig, VqaNormalization
from leverplus.config.store import conf_dir
from leverplus.config.validation import check_augment
from leverplus.data.formats.embeddings import read_embeddings
from leverplus.data.formats.io import file_fingerprint
from leverplus.data.formats.rl_json import RLData, RLQuery, read_rl_json, write_rl_json
from leverplus.data.loading import LoadedData
from leverplus.datagen.candidates import QueryJob, score_queries
from leverplus.datagen.scorers.base import Scorer, build_scorer
from leverplus.datagen.scorers.config import ScorerConfig
from leverplus.errors import LeverPlusInputError, printed_input_errors
from leverplus.evaluation.answer_cache import scorer_identity
from leverplus.model.decoding import sample_sequences
from leverplus.utils import code_version, enum_value, stable_hash

LABEL = "augment"
#: ``gen_method`` of an added candidate (the reference's augmentation scripts used the same name)
AUG_METHOD = "aug_diverse"
#: the candidate field that marks an added candidate (``inspect_data`` counts them)
AUGMENTED_FIELD = "augmented"
#: seed-sequence stream id of the augmentation draws (the generator's streams are 2002 and 2003)
AUGMENT_STREAM = 2004


def reward_level(candidate: Mapping[str, Any]) -> float:
    """A candidate's reward level: its ``vqa_acc_score`` (missing or null counts as 0), rounded to 6 digits."""
    return round(float(candidate.get("vqa_acc_score") or 0.0), 6)


def level_set(candidates: Sequence[Mapping[str, Any]]) -> set:
    return {reward_level(c) for c in candidates}


@dataclass(frozen=True)
class AugmentSettings:
    """The numbers of one augmentation (``DiversityAugmentConfig``), checked like the config fields."""

    target_levels: int = 2
    max_tries: int = 4
    candidates_per_try: int = 4
    temperature: float = 0.1
    seed: int = 0
    strict_eval: Optional[bool] = None

    @classmethod
    def from_config(cls, cfg: Any, prefix: str = "augment") -> "AugmentSettings":
        check_augment(cfg, prefix)
        strict = cfg.strict_eval
        return cls(target_levels=int(cfg.target_levels), max_tries=int(cfg.max_tries),
                   candidates_per_try=int(cfg.candidates_per_try), temperature=float(cfg.temperature),
                   seed=int(cfg.seed), strict_eval=None if strict is None else bool(strict))


@dataclass
class AugmentStats:
    """What one augmentation did: queries below the target before/after, tries and candidates."""

    queries: int = 0
    single_level_before: int = 0  # queries whose candidates all share one level
    single_level_after: int = 0
    below_target_before: int = 0  # queries with fewer than target_levels levels (= single-level at target 2)
    below_target_after: int = 0
    queries_augmented: int = 0  # queries that gained at least one candidate
    candidates_added: int = 0
    candidates_scored: int = 0  # proposals answered and scored (added or not)
    candidates_dropped: int = 0  # proposals strict evaluation left out (no official annotation, metric error)
    tries_used: int = 0  # over all queries
    tries_per_query: Dict[str, int] = field(default_factory=dict)  # tries -> queries that used that many
    cpu_seconds: float = 0.0


@dataclass
class _Search:
    """One query's search state."""

    query_id: int
    pool: List[int]
    local: bool
    exclude: List[int]
    sign: float
    levels: set
    seen: set
    generator: torch.Generator
    tries: int = 0


def _generator(seed: int, query_id: int, shot_num: int) -> torch.Generator:
    state = int(np.random.SeedSequence([seed, AUGMENT_STREAM, int(query_id), int(shot_num)]).generate_state(1)[0])
    return torch.Generator().manual_seed(state)


def _search_pool(q: RLQuery, num_items: int, max_pool_size: int) -> Tuple[List[int], List[int]]:
    """(pool of global ids, excluded positions): the query's ``candidate_pool_ids`` cut at ``max_pool_size`` (the
    trainer's truncation, so every added pointer stays inside the training pool), else the whole train split with
    the query itself excluded."""
    if q.candidate_pool_ids is not None:
        return [int(i) for i in q.candidate_pool_ids[:max_pool_size]], []
    return list(range(num_items)), [int(q.query_id)]


def _proposals(s: _Search, embeddings: torch.Tensor, shot_num: int, settings: AugmentSettings) -> List[dict]:
    """Up to ``candidates_per_try`` new pointers (positions into ``s.pool``) the query has no ICD set of yet."""
    q_emb = torch.nn.functional.normalize(embeddings[s.query_id].double(), dim=-1)
    c_emb = torch.nn.functional.normalize(embeddings[torch.as_tensor(s.pool, dtype=torch.long)].double(), dim=-1)
    logits = (s.sign * (c_emb @ q_emb)).float()

    def step(prefix: Sequence[int]) -> torch.Tensor:
        return logits

    out = []
    for d in sample_sequences(step, len(s.pool), shot_num, settings.temperature, settings.candidates_per_try,
                              s.generator, exclude=s.exclude):
        key = tuple(sorted(s.pool[i] for i in d.pointer))
        if key in s.seen:
            continue
        s.seen.add(key)
        out.append({"gen_method": AUG_METHOD, "pointer": list(d.pointer), "beam_rank": None, "beam_score": None,
                    "logprob_score": d.logprob, "temperature": settings.temperature, "similarity_score": None})
    return out


def augment_rl(data: RLData, scorer: Scorer, embeddings: torch.Tensor, settings: AugmentSettings, *,
               normalization: str = "official", max_pool_size: int = 64,
               say: Callable[[str], None] = lambda _m: None) -> Tuple[Dict[int, dict], AugmentStats]:
    """The on-disk records of ``data`` with the added candidates (originals first and unchanged), and the stats.

    ``embeddings``: the ``[N_train, d]`` table the pools index (the proposals' similarities)."""
    t0 = time.process_time()
    n = int(embeddings.shape[0])
    strict = settings.strict_eval if settings.strict_eval is not None else bool(data.meta.get("strict_eval", True))
    records = {qid: q.to_json_dict() for qid, q in data.queries.items()}
    stats = AugmentStats(queries=len(records))
    searches: Dict[int, _Search] = {}
    for qid, q in data.queries.items():
        levels = level_set([c.raw for c in q.candidates])
        stats.single_level_before += len(levels) == 1
        if len(levels) >= settings.target_levels:
            continue
        pool, exclude = _search_pool(q, n, max_pool_size)
        bad = [i for i in pool if not 0 <= i < n]
        if bad:
            raise LeverPlusInputError(f"pool ids {bad[:5]} are outside the embedding table [0, {n})", file=data.path,
                                      record=f"query {qid}", field="candidate_pool_ids",
                                      fix="pass the embeddings of the dataset the file was generated on")
        sign = 1.0 if sum(levels) / len(levels) < 0.5 else -1.0
        searches[qid] = _Search(qid, pool, q.local_pointers, exclude, sign, set(levels),
                                {tuple(sorted(c.pointer)) for c in q.candidates},
                                _generator(settings.seed, qid, data.shot_num))
    stats.below_target_before = len(searches)
    cache: dict = {}
    for t in range(settings.max_tries):
        pending = [s for s in searches.values() if len(s.levels) < settings.target_levels]
        if not pending:
            break
        jobs = []
        for s in pending:
            s.tries += 1
            cands = _proposals(s, embeddings, data.shot_num, settings)
            if cands:
                jobs.append(QueryJob(s.query_id, s.pool, cands, local_pool=s.local))
        scored, counts = score_queries(scorer, "train", jobs, strict_eval=strict, cache=cache,
                                       normalization=normalization)
        stats.candidates_dropped += sum(counts.dropped_counts().values())
        for job in jobs:
            s, rec = searches[job.query_id], scored.get(job.query_id)
            for c in (rec or {}).get("pointer_candidates", []):
                stats.candidates_scored += 1
                level = reward_level(c)
                if level in s.levels or len(s.levels) >= settings.target_levels:
                    continue
                c[AUGMENTED_FIELD], c["augment_try"] = True, t
                records[s.query_id]["pointer_candidates"].append(c)
                s.levels.add(level)
                stats.candidates_added += 1
        say(f"[{LABEL}] try {t + 1}/{settings.max_tries}: {len(pending)} queries searched, "
            f"{sum(len(s.levels) < settings.target_levels for s in pending)} still below {settings.target_levels} "
            "levels")
    for qid, rec in records.items():
        levels = level_set(rec["pointer_candidates"])
        stats.single_level_after += len(levels) == 1
        stats.below_target_after += len(levels) < settings.target_levels
    for s in searches.values():
        stats.tries_used += s.tries
        grown = len(records[s.query_id]["pointer_candidates"]) - len(data.queries[s.query_id].candidates)
        stats.queries_augmented += grown > 0
        stats.tries_per_query[str(s.tries)] = stats.tries_per_query.get(str(s.tries), 0) + 1
    stats.tries_per_query = dict(sorted(stats.tries_per_query.items(), key=lambda kv: int(kv[0])))
    stats.cpu_seconds = round(time.process_time() - t0, 3)
    return records, stats


def file_normalization(data: RLData, default: str = "official") -> str:
    """The answer normalisation the file's scores used: ``_meta.generation.vqa_normalization`` (files written by
    ``generate_rl_data``), else ``default``."""
    gen = data.meta.get("generation") if isinstance(data.meta, dict) else None
    value = gen.get("vqa_normalization") if isinstance(gen, dict) else None
    return str(value) if value else default


def augment_meta(data: RLData, settings: AugmentSettings, stats: AugmentStats, scorer: Scorer, *,
                 normalization: str, embeddings: Optional[str] = None) -> dict:
    """``_meta`` of the output: the source's, plus ``augment`` (settings, source, scorer, statistics)."""
    meta = dict(data.meta)
    meta["augment"] = {
        "method": AUG_METHOD, "settings": asdict(settings), "vqa_normalization": normalization,
        "source": {"file": Path(data.path).name, "fingerprint": file_fingerprint(data.path)},
        "embeddings": ({"file": Path(embeddings).name, "fingerprint": file_fingerprint(embeddings)}
                       if embeddings else None),
        "scorer": scorer.describe(),
        "stats": {k: v for k, v in asdict(stats).items() if k != "cpu_seconds"},  # the file stays deterministic
    }
    return meta


def augment_file(source: str, output: str, scorer: Scorer, embeddings: torch.Tensor, settings: AugmentSettings, *,
                 shot_num: Optional[int] = None, normalization: Optional[str] = None, max_pool_size: int = 64,
                 embeddings_path: Optional[str] = None, overwrite: bool = False,
                 say: Callable[[str], None] = lambda _m: None) -> Tuple[dict, AugmentStats]:
    """Augment ``source`` into ``output`` (atomically, in the RL-JSON format); returns (its ``_meta``, stats)."""
    if Path(output).exists() and not overwrite:
        raise LeverPlusInputError("exists already", file=str(output),
                                  fix="choose another output or pass overwrite=true")
    if Path(output).resolve() == Path(source).resolve():
        raise LeverPlusInputError("is also the input", file=str(output), fix="write the augmented file elsewhere")
    data = read_rl_json(source, shot_num=shot_num, num_items=int(embeddings.shape[0]))
    norm = normalization or file_normalization(data)
    records, stats = augment_rl(data, scorer, embeddings, settings, normalization=norm, max_pool_size=max_pool_size,
                                say=say)
    meta = augment_meta(data, settings, stats, scorer, normalization=norm, embeddings=embeddings_path)
    write_rl_json(output, records, meta)
    return meta, stats


def augment_loaded(data: LoadedData, scorer: Scorer, settings: AugmentSettings, cache_root: Path, *,
                   normalization: Optional[str], max_pool_size: int,
                   say: Callable[[str], None] = lambda _m: None) -> LoadedData:
    """``data`` with every RL file augmented (``data.diversity_augment``). Each augmented file is derived data,
    written once under ``cache_root`` and keyed by the source file's fingerprint, the shot count, the settings,
    the normalisation, the pool cut, the scorer's identity, every input file of ``data`` (``data.fingerprint``:
    the embeddings among them) and the code version; the returned
    data's files and fingerprint include it, so nothing downstream confuses it with the plain parse.
    ``normalization``: of the new scores; None = each file's own (:func:`file_normalization`)."""
    ident = scorer_identity(scorer)
    rl, files = dict(data.rl), list(data.files)
    for shot, src in sorted(data.rl.items()):
        norm = normalization or file_normalization(src)
        key = stable_hash({"source": file_fingerprint(src.path), "shot": shot, "settings": asdict(settings),
                           "normalization": norm, "max_pool_size": max_pool_size, "scorer": ident,
                           "inputs": data.fingerprint, "code": code_version()})
        path = cache_root / f"{Path(src.path).stem}.aug-{key}.json"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            records, stats = augment_rl(src, scorer, data.embeddings, settings, normalization=norm,
                                        max_pool_size=max_pool_size, say=say)
            write_rl_json(path, records, augment_meta(src, settings, stats, scorer, normalization=norm))
            say(f"[{LABEL}] shot {shot}: single-level queries {stats.single_level_before} -> "
                f"{stats.single_level_after} of {stats.queries}, {stats.candidates_added} candidates added "
                f"({stats.tries_used} tries, {stats.cpu_seconds:.1f} CPU s); cached as {path}")
        rl[shot] = read_rl_json(path, shot_num=shot, num_items=int(data.embeddings.shape[0]))
        files.append(path)
    return replace(data, rl=rl, files=files, fingerprint=file_fingerprint(files), group_cache={})


# ------------------------------------------------------------------------------------------------------
# python -m leverplus.datagen.augment
# ------------------------------------------------------------------------------------------------------


@dataclass
class AugmentAppConfig:
    input: Optional[str] = None  # the RL JSON to augment (required)
    output: Optional[str] = None  # the augmented RL JSON to write (required; never the input)
    shot_num: Optional[int] = None  # expected pointer length (None = inferred from the file)
    embeddings: Optional[str] = None  # [N_train, d] table the pools index; default with scorer=sim: the world's
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    augment: DiversityAugmentConfig = field(default_factory=DiversityAugmentConfig)
    # answer normalisation of the new scores; None = the file's _meta.generation.vqa_normalization, else official
    vqa_normalization: Optional[VqaNormalization] = None
    max_pool_size: int = 64  # search only the first ids of candidate_pool_ids, as the trainer's data.max_pool_size
    overwrite: bool = False  # replace an existing output


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="augment_schema", node=AugmentAppConfig, replace=True)
    cs.store(group="scorer", name="scorer_schema", node=ScorerConfig, replace=True)


register_configs()


def run(cfg: DictConfig, say: Callable[[str], None] = print, scorer: Optional[Scorer] = None) -> AugmentStats:
    """Augment ``cfg.input`` into ``cfg.output``; returns the statistics (also printed)."""
    if not cfg.input or not cfg.output:
        raise LeverPlusInputError("needs an input and an output file", field="input",
                                  fix="pass input=/path/rl_data.json output=/path/rl_data_aug.json")
    if cfg.max_pool_size < 1:
        raise LeverPlusInputError(f"must be >= 1, got {cfg.max_pool_size}", field="max_pool_size", fix="e.g. 64")
    settings = AugmentSettings.from_config(cfg.augment)
    scorer = build_scorer(cfg.scorer) if scorer is None else scorer
    emb_path = cfg.embeddings or scorer.embeddings_path()
    if emb_path is None:
        raise LeverPlusInputError("no embedding file", field="embeddings", fix="pass embeddings=/path/emb.pt")
    embeddings = read_embeddings(emb_path)
    norm = enum_value(cfg.vqa_normalization) if cfg.vqa_normalization is not None else None
    _, stats = augment_file(str(cfg.input), str(cfg.output), scorer, embeddings, settings, shot_num=cfg.shot_num,
                            normalization=norm, max_pool_size=int(cfg.max_pool_size), embeddings_path=str(emb_path),
                            overwrite=bool(cfg.overwrite), say=say)
    say(f"[{LABEL}] wrote {cfg.output}: single-level queries {stats.single_level_before} -> "
        f"{stats.single_level_after} of {stats.queries}; {stats.candidates_added} candidates added to "
        f"{stats.queries_augmented} queries; {stats.tries_used} tries ({stats.candidates_scored} candidates scored); "
        f"{stats.cpu_seconds:.2f} CPU s")
    return stats


@hydra.main(config_path=str(conf_dir() / "generate"), config_name="augment")
def main(cfg: DictConfig) -> None:
    with printed_input_errors():
        run(cfg)


if __name__ == "__main__":
    main()
