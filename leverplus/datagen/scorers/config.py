"""Scorer configs: which LVLM answers the VQA queries (``sim`` or ``hf``), as Hydra structured configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

from leverplus.config.sim_params import SimParams


@dataclass
class SimScorerConfig:
    """The embedded simulated world (``leverplus.sim``): parameters as in ``data.sim`` of the trainer."""

    params: SimParams = field(default_factory=SimParams)
    # as the trainer's data.cache_dir (the world lives in <cache_dir>/sim/<hash>); None = $LEVERPLUS_CACHE
    cache_dir: Optional[str] = None
    noisy_fallback: bool = True  # fallback correctness gets the world's coin-flip noise (as the sim's own files)


@dataclass
class HFScorerConfig:
    """A Hugging Face transformers LVLM of the Qwen2-VL family (reference#lvlm-prompt, reference#postprocess). Reference values in comments."""

    model: Optional[str] = None  # local folder, or a hub id already in the local HF cache (never downloaded)
    data: Dict[str, str] = field(default_factory=dict)  # split -> items file (JSON/JSONL, see docs/rldata.md)
    annotations: Dict[str, str] = field(default_factory=dict)  # split -> official VQA annotation JSON (reference#correctness)
    image_root: Optional[str] = None  # relative image paths in the items files are resolved against it
    system_prompt: Optional[str] = None  # None = the reference's Qwen2.5-VL system prompt; "" = none
    prompt_template: str = "Question:<Q> Short answer:<A>"  # configs/task/vqa.yaml
    max_new_tokens: int = 5
    num_beams: int = 3
    length_penalty: float = 0.0
    min_new_tokens: int = 0
    do_sample: bool = False  # generate_rl_data adds do_sample=False
    # Where the answer sits when teacher forcing (InfoScore, vqa_gt_prob): "assistant" = the model's reply after
    # the generation prompt (ours: the probability the model would generate it); "user_turn" = appended to the
    # query text inside the user turn, no generation prompt (the reference's transfer_prompts).
    answer_placement: str = "assistant"
    batch_size: int = 8  # prompts per forward pass (the reference capped its batch at 8)
    device: str = "auto"  # auto = cuda when available, else cpu
    dtype: str = "auto"  # auto = bfloat16 on cuda (reference precision), float32 on cpu
    attn_implementation: str = "auto"  # auto = flash_attention_2 if installed and on cuda, else sdpa
    min_pixels: Optional[int] = None  # image resizing bounds passed to the image processor (None = its own)
    max_pixels: Optional[int] = None
    image_cache_size: int = 1000  # decoded images kept in memory (the reference's LRU-ish pool cache held 1000)


@dataclass
class ScorerConfig:
    name: str = "sim"  # a key of SCORERS
    sim: SimScorerConfig = field(default_factory=SimScorerConfig)
    hf: HFScorerConfig = field(default_factory=HFScorerConfig)
