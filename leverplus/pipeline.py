"""One training run end to end: inputs -> (SFT) -> RCE -> (GRPO) -> evaluation.

This is the one interface the apps and the sweepers use: :func:`load_data` reads and validates every input
before anything is trained, :func:`train_and_evaluate` runs the stages and returns metrics, and
:func:`reward_signature` tells a sweeper which arms would train bit-identical models. The real-file path and the
simulated path differ only in where the files come from; everything after the readers is shared.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
from omegaconf import OmegaConf

from leverplus.config.identity import canonical_config, to_container
from leverplus.data.groups import FilterStats, Group
from leverplus.data.loading import LoadedData, PreparedGroups, file_state, prepare_groups
from leverplus.datagen.augment import AugmentSettings, augment_loaded
from leverplus.datagen.scorers.vqa_files import load_files_with_scorer
from leverplus.errors import LeverPlusInputError
from leverplus.evaluation.answer_cache import AnswerCache, CachedScorer, scorer_identity
from leverplus.evaluation.downstream import evaluate_splits
from leverplus.evaluation.ranking import offline_metrics, validation_metrics
from leverplus.evaluation.policy_kl import KL_METRIC, first_step_log_probs, mean_kl
from leverplus.model.build import build_model, load_model
from leverplus.model.pointer import PointerSelector
from leverplus.sim.lvlm import SimLVLM
from leverplus.sim.scorer import SimScorer
from leverplus.sim.source import load_sim
from leverplus.training.consumed import hash_consumed_rewards
from leverplus.training.stage_cache import StageCache, stage_keys
from leverplus.training.trainer import Trainer, TrainResult
from leverplus.utils import default_cache_dir, enum_value, resolve_device, seed_everything, stable_hash, tune_malloc

#: ``eval.select_metric`` values that are not a mean reward, so not invariant to a positive reward scale
_SCALE_DEPENDENT_SELECT_METRICS = ("val/loss", "val/offline/rce_loss")

#: data source (``data.source``) -> loader
SOURCES: Dict[str, Callable[..., LoadedData]] = {"sim": load_sim, "files": load_files_with_scorer}
#: the objective of a run whose data has no scorer for the downstream objective it asks for (the offline proxy)
PROXY_OBJECTIVE = "val/offline/top1_acc"

_DATA_MEMO: "Dict[str, Tuple[tuple, LoadedData]]" = {}


def load_data(cfg) -> LoadedData:
    """Read and validate every input of the run. Memoised per process: jobs of a sequential sweep that read the
    same, unchanged files (same paths, sizes and mtimes) share one parse."""
    c = OmegaConf.to_container(cfg.data, resolve=True, enum_to_str=True)
    key = stable_hash({k: c[k] for k in ("source", "shot_nums", "sim", "files", "cache_dir", "diversity_augment",
                                         "augment", "max_pool_size")}
                      | {"strict": bool(cfg.model.strict_load), "model": OmegaConf.to_container(cfg.model)})
    hit = _DATA_MEMO.get(key)
    if hit is not None:
        try:
            if file_state(hit[1].files) == hit[0]:
                return hit[1]
        except OSError:
            pass
    data = SOURCES[enum_value(cfg.data.source)](cfg)
    if cfg.data.diversity_augment:
        data = _augmented(cfg, data)
    if data.sft_checkpoint:  # fail now, not after data prep, if the checkpoint does not fit
        load_model(cfg.model, data.sft_checkpoint, data.embeddings.shape[1])
    _DATA_MEMO.clear()  # keep one dataset in memory
    _DATA_MEMO[key] = (file_state(data.files), data)
    return data


def _augmented(cfg, data: LoadedData) -> LoadedData:
    """``data.diversity_augment``: every RL file with candidates added to its single-level queries, answered by the
    data's own scorer (the simulated LVLM, or ``data.files.scorer``); the derived files are cached."""
    if data.scorer is None:
        raise LeverPlusInputError(
            "data.diversity_augment=true needs a scorer to answer the new candidates, and this data has none",
            field="data.diversity_augment",
            fix="set data.files.scorer.model (with its train questions, annotations and images), augment the file "
                "once with python -m leverplus.datagen.augment, or set data.diversity_augment=false")
    scorer = SimScorer(data.scorer) if isinstance(data.scorer, SimLVLM) else data.scorer
    sim = enum_value(cfg.data.source) == "sim"
    root = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else default_cache_dir()
    return augment_loaded(data, scorer, AugmentSettings.from_config(cfg.data.augment, "data.augment"),
                          root / "augmented", normalization=str(cfg.data.sim.vqa_normalization) if sim else None,
                          max_pool_size=int(cfg.data.max_pool_size), say=logging.getLogger(__name__).info)


@dataclass
class RunOutcome:
    metrics: Dict[str, float]
    summary_table: str
    per_query: List[dict]
    result: TrainResult
    cache_hits: Dict[str, bool]
    output_dir: Path
    filter_stats: Dict[int, FilterStats]
    history: List[tuple] = field(default_factory=list)


def _stage_cache(cfg) -> StageCache:
    root = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else default_cache_dir()
    return StageCache(root / "stages")


def _initial_model(cfg, data: LoadedData, groups: PreparedGroups, cache: StageCache, key: str, output_dir: Path,
                   logger, say) -> Tuple[PointerSelector, bool, List[tuple]]:
    """The weights RCE starts from: the given SFT checkpoint, the cached SFT stage, or SFT trained now.
    Returns (model, cache hit, SFT history)."""
    d = int(data.embeddings.shape[1])
    if data.sft_checkpoint:
        say(f"Loaded SFT checkpoint {data.sft_checkpoint}")
        return load_model(cfg.model, data.sft_checkpoint, d), False, []
    model = build_model(cfg.model, d)
    state = cache.get("sft", key)
    if state is not None:
        model.load_state_dict(state)
        say("SFT reused from the cache.")
        return model, True, []
    if not groups.sft_train:
        say("No SFT checkpoint and no beam JSON: RCE starts from random initialisation.")
        return model, False, []
    sft_trainer = Trainer(cfg, data.embeddings, groups.sft_train, [], output_dir, logger, say)
    sft_trainer.run_sft(model, groups.sft_train)
    cache.put("sft", key, model.state_dict())
    return model, False, list(sft_trainer.memory.history)


def _post_train(cfg, data: LoadedData, groups: PreparedGroups, model: PointerSelector, cache: StageCache,
                key: str, output_dir: Path, logger, say) -> Tuple[TrainResult, bool]:
    """RCE (its end state cached when ``rce.cache``) and GRPO. Returns (result, RCE cache hit)."""
    # an RCE-only run selects among its RCE epochs, which the cached end state cannot replay: it trains (and caches)
    post_rce = cache.get("rce", key) if cfg.rce.cache and cfg.grpo.epochs > 0 else None
    # epoch steps continue after SFT whether it ran now or came from the cache (same steps either way)
    start = int(cfg.sft.epochs) if (not data.sft_checkpoint and groups.sft_train) else 0
    trainer = Trainer(cfg, data.embeddings, groups.train, groups.val, output_dir, logger, say, start_step=start,
                      validate=partial(validation_metrics, groups=groups.val, embeddings=data.embeddings))
    try:
        result = trainer.fit(model, post_rce_state=post_rce)
    finally:  # the post-RCE state is final once RCE ends: keep it even if GRPO then fails (a diverging trial)
        if cfg.rce.cache and post_rce is None and getattr(trainer, "post_rce_state", None) is not None:
            cache.put("rce", key, trainer.post_rce_state)
    return result, post_rce is not None


def train_and_evaluate(
    cfg,
    data: LoadedData,
    output_dir: Path,
    logger=None,
    say: Callable[[str], None] = logging.getLogger(__name__).info,
) -> RunOutcome:
    """Train (SFT if needed, RCE, GRPO) and evaluate on ``cfg.device``. Deterministic for a given config and seed on
    CPU."""
    seed_everything(int(cfg.seed))
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    if cfg.tune_malloc:
        tune_malloc()
    groups = prepare_groups(cfg, data)
    keys = stage_keys(cfg, data, groups)
    cache = _stage_cache(cfg)
    model, sft_hit, sft_history = _initial_model(cfg, data, groups, cache, keys["sft"], output_dir, logger, say)
    model.to(resolve_device(str(cfg.device)))  # built (initialised) on the CPU, then trained and evaluated there
    sft_first_step = first_step_log_probs(model, groups.val, data.embeddings) if groups.val else None
    result, rce_hit = _post_train(cfg, data, groups, model, cache, keys["rce"], output_dir, logger, say)
    metrics, per_query, tables = _evaluate(cfg, data, groups, result.model, say)
    if sft_first_step is not None:  # how far RCE/GRPO moved the policy (leverplus.evaluation.policy_kl)
        metrics[KL_METRIC] = mean_kl(first_step_log_probs(result.model, groups.val, data.embeddings), sft_first_step)
    metrics.update({f"train/{k}": v for k, v in result.timings.items()})
    if result.best:
        metrics["best/epoch"] = float(result.best.get("global_epoch", -1))
    return RunOutcome(
        metrics=metrics,
        summary_table="\n\n".join(tables),
        per_query=per_query,
        result=result,
        cache_hits={"sft": sft_hit, "rce": rce_hit},
        output_dir=output_dir,
        filter_stats=groups.stats,
        history=sft_history + result.history,
    )


def _evaluate(cfg, data: LoadedData, groups: PreparedGroups, model: PointerSelector,
              say: Callable[[str], None]) -> Tuple[Dict[str, float], List[dict], List[str]]:
    """Offline ranking of the held-out groups, then the downstream evaluation when the data has a scorer."""
    metrics: Dict[str, float] = {}
    per_query: List[dict] = []
    tables: List[str] = []
    if cfg.eval.offline and groups.val:
        off, rows = offline_metrics(model, groups.val, data.embeddings)
        metrics.update({f"val/offline/{k}": v for k, v in off.items()})
        per_query += [{"kind": "offline", **r} for r in rows]
    if cfg.eval.downstream and data.scorer is None:
        say("Downstream evaluation skipped: this data source has no scorer (eval.downstream=false to silence).")
    elif cfg.eval.downstream:
        scorer = _answering_scorer(cfg, data)
        shots = sorted(set(data.rl) | {int(s) for s in cfg.eval.shot_nums})
        down = evaluate_splits(model, scorer, data.eval_sets, data.embeddings, shots, cfg.eval,
                               seed=int(cfg.seed), data_key=data.fingerprint, headline_shots=sorted(data.rl))
        metrics.update(down.metrics)
        if isinstance(scorer, CachedScorer):  # how many LVLM answers this run generated vs took from the store
            metrics.update({f"answer_cache/{k}": float(v) for k, v in scorer.stats().items() if k != "identity_hash"})
        per_query += down.per_query
        tables += down.tables
    return metrics, per_query, tables


def resolve_objective(cfg, data: LoadedData, say: Callable[[str], None] = print) -> str:
    """Where the run's objective comes from: ``downstream`` (a downstream VQA accuracy), ``offline`` (an offline
    metric chosen as such), or ``proxy``: the objective asks for a downstream accuracy but the data has no scorer
    (``data=files`` without ``data.files.scorer.model``), so ``cfg.objective`` is switched to the offline proxy."""
    if "/downstream" not in str(cfg.objective):
        return "offline"
    if data.scorer is not None:
        return "downstream"
    say(f"[leverplus] no scorer for this data: the objective {cfg.objective} falls back to the offline proxy "
        f"{PROXY_OBJECTIVE} (set data.files.scorer.model=/path/to/model for the VQA accuracy).")
    cfg.objective = PROXY_OBJECTIVE
    return "proxy"


def _answering_scorer(cfg, data: LoadedData):
    """The scorer downstream evaluation asks: the data's own, or (``eval.answer_cache``) the same scorer answering
    through the persistent answer store. The simulated LVLM is wrapped in its ``SimScorer`` first, which gives the
    same answers and has the ``generate`` the store needs."""
    if not cfg.eval.answer_cache:
        return data.scorer
    base = SimScorer(data.scorer) if isinstance(data.scorer, SimLVLM) else data.scorer
    path = Path(cfg.eval.answer_cache_path).expanduser() if cfg.eval.answer_cache_path else None
    return CachedScorer(base, AnswerCache(path), scorer_identity(base))


#: the scorer downstream evaluation asks (for ``leverplus.evaluate``, which evaluates outside a training run)
answering_scorer = _answering_scorer


def reward_signature(cfg, memo: Dict[str, Any]) -> str:
    """A hash of everything a run consumes that a sweep's arms may vary, for a job config without ``hydra``.

    Two configs with equal signatures are the same computation: equal canonical configs outside the reward section,
    and bit-identical consumed rewards on the loaded data. What a run consumes from its rewards: RCE the raw or the
    group-normalised rewards (``rce.use_raw_reward``), GRPO the normalised or raw ones (``grpo.reward_source``),
    checkpoint selection the validation rewards up to a positive scale (argmax over epochs of a mean reward), plus
    which queries and candidates survive the filters. E.g. ``separated`` ≡ ``hard_plus_soft_v2`` for binary
    correctness, and with normalised rewards (1, 0.5) ≡ (2, 1) for ``hard_plus_soft``, since z-scores ignore a
    positive power-of-two scale exactly. Only metrics in reward units differ.

    ``memo`` caches the loaded data and the prepared groups across calls (pass the same dict for a whole sweep).
    Raises whatever :func:`load_data` raises for bad inputs.
    """
    plain = to_container(cfg)
    rest = canonical_config(plain)
    rest.pop("reward", None)
    data_key = ("data", stable_hash({"data": rest.get("data"), "model": rest.get("model")}))
    groups_key = ("groups", stable_hash({"data_key": data_key[1], "reward": plain["reward"]}))
    if data_key not in memo:
        memo[data_key] = load_data(cfg)
    if groups_key not in memo:
        memo[groups_key] = prepare_groups(cfg, memo[data_key], with_sft=False)
    groups: PreparedGroups = memo[groups_key]
    h = hashlib.sha256(stable_hash(rest).encode())
    hash_consumed_rewards(h, groups.train, cfg)
    if groups.val:
        _hash_validation_rewards(h, groups.val, scale_free=str(cfg.eval.select_metric)
                                 not in _SCALE_DEPENDENT_SELECT_METRICS)
    return h.hexdigest()


def _hash_validation_rewards(h: Any, val: Sequence[Group], scale_free: bool) -> None:
    """Feed ``h`` the validation rewards checkpoint selection sees: divided by their largest magnitude when the
    selection metric is a mean reward (picked by its argmax, so scale-free); as they are otherwise (a loss)."""
    scale = (max(float(g.rewards_raw.abs().max()) for g in val) or 1.0) if scale_free else 1.0
    for g in val:
        h.update(str((g.query_id, g.shot_num)).encode())
        h.update(g.labels.numpy().tobytes())
        h.update((g.rewards_raw / torch.tensor(scale, dtype=g.rewards_raw.dtype)).numpy().tobytes())


__all__ = ["PROXY_OBJECTIVE", "SOURCES", "RunOutcome", "answering_scorer", "load_data", "resolve_objective", "reward_signature",
           "train_and_evaluate"]
