"""Structured configs: the single source of truth for every knob.

Each dataclass is registered in Hydra's ConfigStore, so a typo or an unknown enum value fails at compose time
with the valid choices named. Every number the reference hard-coded is a field here with the reference value as
its default; where our default differs from the reference (a quirk that changes results) the field says so.

Config tree (groups in ``conf/``): data, model, reward, sft, rce, grpo, eval, tracking; ``sweep`` (from
``sweeps/``) is *not* in the primary defaults list, so ``+sweep=NAME`` works."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Dict, List, Optional

from leverplus.config.reward_modes import REWARD_MODE_SPECS
from leverplus.config.sim_params import SimParams

#: field metadata of a knob that does not change results (speed, output, logging, the report's statistics): the run
#: key leaves it out (config/identity.py), so changing it neither re-runs a sweep job nor splits an arm
COSMETIC = {"cosmetic": True}


class DataSource(str, Enum):
    sim = "sim"  # the embedded simulated world (generated and cached on first use)
    files = "files"  # the user's Lever-Plus files


class NormalizeMethod(str, Enum):
    z_score = "z_score"
    z_score_clamp = "z_score_clamp"
    rank_normalize = "rank_normalize"
    none = "none"


#: the reward modes, one member per entry of REWARD_MODE_SPECS (config/reward_modes.py, the single declared list;
#: the formulas register against it in data/rewards.py), so an unknown mode fails at compose time naming the choices
RewardMode = Enum("RewardMode", {name: name for name in REWARD_MODE_SPECS}, type=str, module=__name__)


class CorrectnessMode(str, Enum):
    zero_one = "01"
    pm1 = "pm1"


class LRSchedule(str, Enum):
    warmup_cosine = "warmup_cosine"
    constant = "constant"  # the reference's behaviour (no schedule)


class OldLogpSource(str, Enum):
    sft = "sft"  # frozen starting checkpoint, before RCE (reference, as designed)
    post_rce = "post_rce"  # the model as GRPO starts


class GRPORewardSource(str, Enum):
    normalized = "normalized"  # dataset-normalised rewards, z-scored again for the advantage (reference)
    raw = "raw"  # the clipped formula output (what the reports claimed)


class VqaNormalization(str, Enum):
    """How ``metrics.vqa_accuracy`` normalises answers (leverplus/evaluation/vqa_metric.py)."""

    official = "official"  # vqaEval.py at a013f00 (2021-03-11): normalise both sides only when the GTs differ
    lever_plus = "lever_plus"  # the reference's copy (reference#correctness): always normalise prediction and GTs


class KLUpdate(str, Enum):
    """When the adaptive KL β adapts (reference#adaptive-kl)."""

    per_step = "per_step"  # once per optimiser step, on the batch's mean KL
    per_query = "per_query"  # once per query, on that query's KL, in batch order (the reference: one query per step)


class AdvantageMode(str, Enum):
    """The GRPO group advantage (reference#advantage)."""

    zscore = "zscore"  # clamp((r - mean) / max(std, adv_std_floor), ±adv_clip): the reference since 78592f6
    rank = "rank"  # 1 - 2·rank/(n - 1), best member +1, worst -1 (the reference's default in 9b68708 / 0500631)


class StepReduction(str, Enum):
    """How the top-1-only RCE loss combines the pointer steps of a sequence (reference#rce-loss)."""

    sum = "sum"  # Σ_t CE_t, the scale of the reward-weighted RCE loss
    mean = "mean"  # mean_t CE_t: the reference's plain CE on beam_labels[:, 0, :] (mean over B·S)


class OptimizerImpl(str, Enum):
    """Which AdamW kernel every phase steps with (the same update rule; the last bits of the weights differ)."""

    foreach = "foreach"  # one multi-tensor kernel per AdamW operation: the results the docs quote were made with it
    fused = "fused"  # one fused kernel per parameter: about 3x faster optimiser step (docs/benchmarks.md)


class SelectStrategy(str, Enum):
    """Which epoch's model a run keeps (reference#validation-best)."""

    metric = "metric"  # the best epoch by eval.select_metric / eval.select_mode
    last = "last"  # the last epoch (the reference's RCE-only model is rce_epoch{rce_epochs}.pt)


class EvalPool(str, Enum):
    query_pool = "query_pool"  # each test query's own 64-candidate pool (explicit, logged)
    train_pool = "train_pool"  # the whole train pool


class SummaryMode(str, Enum):
    """What a run prints at its end (``summary``)."""

    auto = "auto"  # the full metrics table for a single run; one ``[k/N] ...`` line per job in a multirun
    always = "always"  # the full table in a multirun too
    never = "never"  # the objective line only (a multirun job still prints its ``[k/N]`` line)


@dataclass
class FilesScorerConfig:
    """The LVLM that answers real VQA queries in downstream evaluation (``data=files``): the ``hf`` scorer's prompt,
    greedy generation and post-processing (leverplus.datagen.scorers.hf) on the official VQA files. No ``model`` = no
    downstream evaluation (the objective falls back to the offline proxy). Weights are never downloaded."""

    model: Optional[str] = None  # local model folder (or a hub id already in the local HF cache)
    # split -> official VQA questions JSON ({"questions": [{question_id, image_id, question}]}). train is the ICD
    # pool: its rows, in file order, are the embedding rows; val/test are evaluation queries
    questions: Dict[str, str] = field(default_factory=dict)
    annotations: Dict[str, str] = field(default_factory=dict)  # split -> official VQA annotations JSON
    images: Dict[str, str] = field(default_factory=dict)  # split -> COCO image folder (e.g. /coco/val2014)
    # file name of an image in its folder; {folder} = the folder's name, {image_id} = the question's image_id
    image_name: str = "COCO_{folder}_{image_id:012d}.jpg"
    # split (val/test) -> [M, d] query embeddings, rows in the order of that split's questions file
    embeddings: Dict[str, str] = field(default_factory=dict)
    system_prompt: Optional[str] = None  # None = the reference's Qwen2.5-VL system prompt; "" = none
    prompt_template: str = "Question:<Q> Short answer:<A>"
    max_new_tokens: int = 5
    num_beams: int = 3
    length_penalty: float = 0.0
    min_new_tokens: int = 0
    do_sample: bool = False
    batch_size: int = 8  # prompts per forward pass (a bf16 model's answers may depend on the batch)
    dtype: str = "auto"  # auto = bfloat16 on cuda, float32 on cpu
    attn_implementation: str = "auto"
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
    image_cache_size: int = 1000  # decoded images kept in memory


@dataclass
class FilesConfig:
    """Paths to existing Lever-Plus files (``data.source=files``). All paths may be relative to the launch dir."""

    rl_json: Dict[str, str] = field(default_factory=dict)  # shot_num -> RL JSON, e.g. {"2": /path/rl_data.json}
    embeddings: Optional[str] = None  # [N_train, d] .pt or .npy (query file = candidate file in the reference)
    beam_json: Optional[str] = None  # InfoScore beam JSON (SFT data; hybrid reward's InfoScores)
    sft_checkpoint: Optional[str] = None  # start RCE from here (any supported checkpoint format); None -> SFT
    scorer: FilesScorerConfig = field(default_factory=FilesScorerConfig)  # downstream evaluation on real data


@dataclass
class DiversityAugmentConfig:
    """Diversity augmentation (leverplus/datagen/augment.py, docs/rldata.md "Diversity augmentation"): new pointer
    candidates, searched in the query's pool and scored by the data's scorer, for the queries whose candidates all
    share one reward level (``vqa_acc_score``), until they have ``target_levels`` levels or the tries run out."""

    target_levels: int = 2  # distinct vqa_acc_score levels a query should reach (reference: 2)
    max_tries: int = 4  # search rounds per query; each proposes and scores up to candidates_per_try pointers
    candidates_per_try: int = 4
    # proposals: softmax(±cos(query, ICD) / temperature) over the pool, + towards similar ICDs for a query whose
    # one level is below 0.5 (all wrong: look for a right answer), - otherwise (all right: look for a wrong one)
    temperature: float = 0.1
    seed: int = 0
    # None = the file's _meta.strict_eval (true when absent): a candidate without official annotations is dropped
    strict_eval: Optional[bool] = None


@dataclass
class DataConfig:
    source: DataSource = DataSource.sim
    shot_nums: List[int] = field(default_factory=lambda: [2])  # >1 entry -> joint training over those shots
    sim: SimParams = field(default_factory=SimParams)
    files: FilesConfig = field(default_factory=FilesConfig)
    cache_dir: Optional[str] = None  # sim data + stage caches; default $LEVERPLUS_CACHE or ~/.cache/leverplus
    # Split of the RL queries (by sorted query id, before filtering, as the reference).
    train_fraction: float = 0.8
    split_file: Optional[str] = None  # JSON {"train": [ids], "val": [ids]} overrides the fraction
    # Filters (reference#dataset-rl).
    skip_fallback_reward: bool = True
    drop_eval_errors: bool = True  # drop vqa_eval_mode == "error" and eval_failed candidates
    filter_gen_methods: Optional[List[str]] = None
    require_positive_query: bool = False
    positive_reward_threshold: float = 1.0  # reference: any(r >= 1.0) on the *reward* (mode-dependent)
    # Curation (reference#data-surgery; leverplus/data/curation.py), on the candidates the filters keep; off = all.
    mixed_queries: bool = False  # keep only queries with >= 1 correct and >= 1 wrong candidate (the "balanced" filter)
    positive_ratio_min: float = 0.0  # keep queries whose share of correct candidates is in [min, max]
    positive_ratio_max: float = 1.0  # (VQAv2 "balanced" data: [0.4, 0.6])
    # add scored candidates to the single-level queries of each RL file when the run loads it (cached derived file)
    diversity_augment: bool = False
    augment: DiversityAugmentConfig = field(default_factory=DiversityAugmentConfig)
    max_pool_size: int = 64  # reference truncates pools to 64; a pointer outside the truncated pool is an error
    # Group normalisation (reference#reward-normalisation).
    normalize_method: NormalizeMethod = NormalizeMethod.z_score_clamp
    normalize_clamp: float = 3.0
    batch_size: int = 32  # queries per optimiser step (reference: forced to 1)


@dataclass
class ModelConfig:
    hidden_dim: int = 256
    num_heads: int = 1
    num_layers: int = 1
    dropout: float = 0.5  # reference hard-codes 0.5 in the RL trainer
    attn_dropout: float = 0.1
    temperature: float = 0.1  # cosine / 0.1 -> logits in [-10, 10]
    use_query_update_gate: bool = True  # on = reference HEAD (V4-1 gate); off = the 方案五 model
    mask_value: float = -100.0
    label_smoothing: float = 0.0
    # train mode: every group member draws its own dropout mask (the reference tiles the query over the group; G times
    # the encoder work after the input projection) instead of one mask per query shared by its members
    # (reference#defect-dropout-logp)
    per_member_dropout: bool = False
    strict_load: bool = True  # false = explicit opt-out: loads what fits and prints the mismatches


@dataclass
class RewardConfig:
    mode: RewardMode = RewardMode.hard_plus_soft
    hard_weight: float = 1.0
    soft_weight: float = 1.0
    rel_weight: float = 0.1
    reward_alpha: float = 0.0  # legacy mode
    reward_beta: float = 0.0  # legacy mode
    correctness_mode: CorrectnessMode = CorrectnessMode.zero_one  # legacy mode
    use_logprob: bool = False  # legacy mode
    info_weight: float = 0.5  # hybrid mode: weight of the (group min-max scaled) InfoScore
    clip: float = 5.0
    diversity_weight: float = 0.0  # innovation, off by default: + w * (1 - mean pairwise cosine of the ICDs)


@dataclass
class SFTConfig:
    """Cross-entropy on the InfoScore beams; runs only when no SFT checkpoint is given."""

    # Tuned on the embedded world (docs/sim.md): 15 epochs at 1e-3 take the selector past similarity top-k;
    # the reference's v2 SFT used lr 1e-4 with ~17 epochs on real data.
    epochs: int = 15
    lr: float = 1e-3
    weight_decay: float = 1e-3
    lr_schedule: LRSchedule = LRSchedule.warmup_cosine
    warmup_ratio: float = 0.05  # v2 train.py warm_steps
    grad_clip: float = 1.0
    batch_size: int = 64
    # The phase reseeds shuffling and dropout with seed * 10 + seed_offset (one offset per phase, so a phase's
    # result does not depend on whether the phases before it ran or came from a cache).
    seed_offset: int = 1


@dataclass
class RCEConfig:
    epochs: int = 5
    lr: float = 1e-4
    weight_decay: float = 0.01  # AdamW torch default, as the reference
    temp_start: float = 2.0
    temp_end: float = 0.5
    use_raw_reward: bool = False  # CLI default of the reference (its scripts pass true)
    use_top1_only: bool = False
    top1_compat_index0: bool = False  # reference quirk: "top1" = stored candidate 0, not the best one
    top1_step_reduction: StepReduction = StepReduction.sum  # use_top1_only loss over the steps; reference: mean
    use_rank_weights: bool = False
    cache: bool = False  # reuse the post-RCE weights from the stage cache (Optuna studies over GRPO knobs)
    grad_clip: float = 1.0
    lr_schedule: LRSchedule = LRSchedule.warmup_cosine  # reference: constant
    warmup_ratio: float = 0.1
    seed_offset: int = 2  # phase seed = seed * 10 + seed_offset (see SFTConfig)


@dataclass
class GRPOConfig:
    epochs: int = 0  # 0 = RCE-only (the reference default)
    lr: float = 1e-5
    weight_decay: float = 0.01
    clip_epsilon: float = 0.2
    kl_beta: float = 0.1
    adaptive_kl: bool = True
    kl_update: KLUpdate = KLUpdate.per_step  # reference: per_query (identical at data.batch_size=1)
    kl_target_min: float = 0.01
    kl_target_max: float = 0.1
    kl_factor: float = 1.5
    beta_min: float = 0.001
    beta_max: float = 10.0
    use_ppo_clip_only: bool = False
    # Curriculum top-k: [[num_epochs, k], ...]; num_epochs -1 = "the rest"; k -1 = all members.
    top_k_schedule: List[List[int]] = field(default_factory=lambda: [[1, 3], [-1, 5]])
    adv_std_floor: float = 0.1
    adv_clip: float = 5.0
    advantage: AdvantageMode = AdvantageMode.zscore  # rank ignores adv_std_floor and adv_clip (|A| <= 1)
    reward_source: GRPORewardSource = GRPORewardSource.normalized
    old_logp_source: OldLogpSource = OldLogpSource.sft
    freeze_backbone: bool = False  # freezes input_proj / query_proj / cand_proj
    grad_clip: float = 1.0
    lr_schedule: LRSchedule = LRSchedule.warmup_cosine  # reference: constant
    warmup_ratio: float = 0.1
    adaptive_temperature: bool = False  # innovation, off by default: KL-adaptive policy temperature
    # ... starting at policy_temperature_init, x/÷ policy_temperature_factor when the KL leaves
    # [kl_target_min, kl_target_max], clipped to [policy_temperature_min, policy_temperature_max]
    policy_temperature_init: float = 1.0
    policy_temperature_factor: float = 1.1
    policy_temperature_min: float = 0.5
    policy_temperature_max: float = 4.0
    seed_offset: int = 3  # phase seed = seed * 10 + seed_offset (see SFTConfig)


@dataclass
class EvalConfig:
    offline: bool = True  # rank held-out RL groups by the policy
    downstream: bool = True  # selector -> scorer -> VQA accuracy (sim scorer; needs a scorer for real data)
    downstream_splits: List[str] = field(default_factory=lambda: ["val", "test"])
    pool: EvalPool = EvalPool.query_pool
    # answer normalisation of the downstream VQA accuracy (the RL data's own scores: data.sim.vqa_normalization,
    # or generate_rl_data's vqa_normalization)
    vqa_normalization: VqaNormalization = VqaNormalization.official
    baselines: List[str] = field(default_factory=lambda: ["zero_shot", "random", "similarity"])
    baseline_splits: List[str] = field(default_factory=lambda: ["test"])  # model-free context; val needs none
    max_queries: Optional[int] = None  # cap on downstream queries per split (None = all)
    select: SelectStrategy = SelectStrategy.metric  # metric: best epoch by select_metric; last: the last epoch
    # shots every trained model is evaluated at (the reports' S1-S4), whatever shots it was trained on; the trained
    # shots are always evaluated too, and <split>/downstream_acc stays the mean over the trained shots
    shot_nums: List[int] = field(default_factory=lambda: [1, 2, 3, 4])
    select_metric: str = "val/offline/top1_reward"  # picks the best checkpoint across epochs
    select_mode: str = "max"
    # resamples of the per-query paired bootstraps of comparisons (python -m leverplus.compare, the sweep callback);
    # statistics of a report, not of the trained model
    bootstrap_samples: int = field(default=2000, metadata=COSMETIC)
    # answer every (query, ordered ICDs) prompt once and keep it in a persistent store shared by runs, processes and
    # sweeps (leverplus.evaluation.answer_cache): arms that pick the same ICDs cost no new LVLM call. Off by default:
    # a batched bf16 LVLM can answer a prompt differently depending on its batch, and a cached answer is the first one
    # ever stored, so turning it on is part of the run's identity.
    answer_cache: bool = False
    answer_cache_path: Optional[str] = field(default=None, metadata=COSMETIC)  # None = <cache dir>/answers.sqlite


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None  # default: sqlite:///<launch dir>/mlflow.db ; MLFLOW_TRACKING_URI overrides too
    artifact_root: Optional[str] = None  # default: beside a sqlite store (<db dir>/mlartifacts); a server: its own
    experiment: Optional[str] = None  # default: leverplus-<data source>
    run_name: Optional[str] = None
    log_checkpoints: bool = True
    sweep: Optional[str] = None  # set by sweep configs
    arm: Optional[str] = None
    role: str = "arm"  # "baseline" | "arm"
    parent_run_id: Optional[str] = None  # set by the sweep callback
    skip_finished: bool = False  # sweeps: skip a run whose key already has a FINISHED MLflow run
    # with skip_finished, concurrent invocations on one store claim each run key so it trains once
    # (leverplus/tracking/claims.py): the owner refreshes a heartbeat tag every claim_heartbeat_s seconds; an owner
    # silent for claim_grace_s seconds counts as dead and its key is claimed again
    claim_heartbeat_s: float = 30.0
    claim_grace_s: float = 180.0
    claim_poll_s: float = 5.0
    extra_tags: Dict[str, str] = field(default_factory=dict)
    # a single run on a sqlite store logs through a process of its own (leverplus/tracking/remote.py), which opens
    # the store on another core while the data loads and the model trains; false: in the training process
    worker_process: bool = True


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rce: RCEConfig = field(default_factory=RCEConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata=COSMETIC)
    seed: int = 0  # 0 is a real seed
    # the AdamW kernel of SFT, RCE and GRPO (see OptimizerImpl); fused changes the weights in the last bits, so it is
    # in the run and stage keys
    optimizer_impl: OptimizerImpl = OptimizerImpl.foreach
    objective: str = field(default="val/downstream_acc", metadata=COSMETIC)  # the float returned to sweepers (val only)
    output_dir: Optional[str] = field(default=None, metadata=COSMETIC)  # checkpoints etc.; default: Hydra's run dir
    # auto (cuda when present) | cpu | cuda | cuda:N, for training and evaluation. Out of the run key on the CPU, as it
    # always was; a CUDA run's numbers differ in the last bits, so its run and stage keys carry the kind "cuda"
    # (config/identity.py, training/stage_cache.py)
    device: str = field(default="cpu", metadata=COSMETIC)
    num_threads: int = field(default=0, metadata=COSMETIC)  # 0 = leave torch's default
    progress: Optional[bool] = field(default=None, metadata=COSMETIC)  # None = only when stdout is a TTY
    # as the reference; sweeps turn it off (best.pt is always written)
    checkpoint_every_epoch: bool = field(default=True, metadata=COSMETIC)
    # training_curves.png per run (~0.3 s of matplotlib). Sweeps turn it off: MLflow charts the same per-epoch
    # metrics for every run, and the sweep's own figures go to the parent run.
    plot_curves: bool = field(default=True, metadata=COSMETIC)
    # keep freed tensor memory in the heap (glibc mallopt; see leverplus.utils.tune_malloc): fewer page faults, ~10%
    # faster training steps on CPU, identical results
    tune_malloc: bool = field(default=True, metadata=COSMETIC)
    summary: SummaryMode = field(default=SummaryMode.auto, metadata=COSMETIC)  # the end-of-run table: see SummaryMode



@dataclass
class EvaluateConfig:
    """What ``python -m leverplus.evaluate`` evaluates: checkpoints (files, or folders of per-epoch checkpoints),
    MLflow runs (their logged checkpoints) and every arm of a finished sweep (its parent run), next to the baselines
    of ``eval.baselines``, at every shot of ``eval.shot_nums``."""

    checkpoints: List[str] = field(default_factory=list)  # checkpoint files, or folders (every *.pt inside)
    run_ids: List[str] = field(default_factory=list)  # MLflow runs: the checkpoints they logged
    parent_run_id: Optional[str] = None  # a finished sweep: the logged checkpoint of each FINISHED child run
    split: str = "val"  # val | test | train
    num_queries: Optional[int] = None  # the first n queries by question id (None = all)
    log: bool = True  # log the results to MLflow (to each evaluated run; checkpoint files get one new run)


@dataclass
class EvaluateAppConfig(TrainConfig):
    """The primary config of ``python -m leverplus.evaluate``: a training config (data, model, eval, device, ...)
    plus what to evaluate."""

    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
