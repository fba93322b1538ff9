"""Cached stage results (post-SFT and post-RCE weights), keyed by everything that determines them, shared by the
runs of a sweep and across invocations.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, Optional

import torch
from omegaconf import OmegaConf

from leverplus.data.formats.io import atomic_torch_save
from leverplus.data.loading import LoadedData, PreparedGroups
from leverplus.utils import code_version, stable_hash

# ---------------------------------------------------------------------------------------------- stage cache


class StageCache:
    """Post-stage model states on disk, keyed by everything that determines them (shared by sweep runs)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / f"{key}.pt"

    def get(self, stage: str, key: str) -> Optional[dict]:
        p = self.path(stage, key)
        if not p.exists():
            return None
        return torch.load(p, weights_only=True, map_location="cpu")

    def put(self, stage: str, key: str, state: dict) -> None:
        atomic_torch_save(self.path(stage, key), state)


def stage_keys(cfg, data: LoadedData, groups: PreparedGroups) -> Dict[str, str]:
    """Cache keys of the stages: everything that determines a stage's weights, nothing else.

    SFT depends on the embeddings, the beam targets (query, pool, labels), the model and SFT configs and the seed,
    not on which RL file (shot count) the run trains on afterwards, so all shots of a sweep share one SFT.
    """
    c = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    h = hashlib.sha256(data.embeddings.numpy().tobytes())
    for g in groups.sft_train:
        h.update(str((g.query_id, g.pool_ids)).encode())
        h.update(g.labels.numpy().tobytes())
    common = {"code": code_version(), "model": c["model"], "seed": c["seed"], "d": int(data.embeddings.shape[1])}
    sft = stable_hash({**common, "sft": c["sft"], "sft_data": h.hexdigest()})
    data_cfg = {k: v for k, v in c["data"].items() if k not in ("cache_dir",)}
    rce = stable_hash({**common, "data": data.fingerprint, "sft_key": sft, "rce": c["rce"], "reward": c["reward"],
                       "data_cfg": data_cfg})
    return {"sft": sft, "rce": rce}

