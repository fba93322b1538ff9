"""Cached stage results (post-SFT and post-RCE weights), keyed by everything that determines them, shared by the
runs of a sweep and across invocations.

Each entry stores the sha256 of its tensors next to them and is verified on load: an entry that cannot be read
(truncated, not a torch file) or whose content does not match its hash is reported, deleted and recomputed, so a
damaged cache never changes a result and never blocks later runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from omegaconf import OmegaConf

from leverplus.data.formats.io import atomic_torch_save, remove_stale_temps
from leverplus.data.loading import LoadedData, PreparedGroups
from leverplus.utils import code_version, cpu_tensors, device_kind, stable_hash

# ---------------------------------------------------------------------------------------------- stage cache


class StageCache:
    """Post-stage model states on disk, keyed by everything that determines them (shared by sweep runs)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / f"{key}.pt"

    def get(self, stage: str, key: str) -> Optional[dict]:
        """The cached state, or None on a miss (also when the entry was damaged: it is then deleted)."""
        p = self.path(stage, key)
        if not p.exists():
            return None
        try:
            entry = torch.load(p, weights_only=True, map_location="cpu")
        except Exception as e:  # truncated or overwritten files raise RuntimeError, EOFError, UnpicklingError, ...
            return self._discard(p, f"cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        ok = isinstance(entry, dict) and entry.get("format") == ENTRY_FORMAT and isinstance(entry.get("state"), dict)
        if not ok:
            return self._discard(p, "is not a stage-cache entry of this version")
        if content_sha256(entry["state"]) != entry.get("sha256"):
            return self._discard(p, "does not match its stored sha256 (the file was modified or damaged)")
        return entry["state"]

    def put(self, stage: str, key: str, state: dict) -> None:
        """Store ``state`` with the sha256 of its content (atomically: a reader sees the old entry or the new one).
        Tensors are stored on the CPU, whatever device they were computed on, so an entry loads anywhere."""
        state = cpu_tensors(state)
        remove_stale_temps(self.path(stage, key))  # left by a run killed while writing this entry
        atomic_torch_save(self.path(stage, key), {"format": ENTRY_FORMAT, "sha256": content_sha256(state),
                                                  "state": state})

    @staticmethod
    def _discard(path: Path, problem: str) -> None:
        warnings.warn(f"stage cache entry {path} {problem}: deleted, the stage is recomputed", stacklevel=3)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return None


#: the layout of a stage-cache file: {"format", "sha256", "state"}
ENTRY_FORMAT = "leverplus-stage-cache/1"


def content_sha256(state: Any) -> str:
    """sha256 over a (nested) state dict's keys, tensor dtypes, shapes and bytes, in sorted key order."""
    h = hashlib.sha256()

    def add(obj: Any, where: str) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"{where}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                add(obj[k], f"{where}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                add(v, f"{where}[{i}]")
        else:
            h.update(f"{where}|{obj!r}|".encode())

    add(state, "")
    return h.hexdigest()


def stage_keys(cfg, data: LoadedData, groups: PreparedGroups) -> Dict[str, str]:
    """Cache keys of the stages: everything that determines a stage's weights, nothing else.

    SFT depends on the embeddings, the beam targets (query, pool, labels), the model and SFT configs and the seed,
    not on which RL file (shot count) the run trains on afterwards, so all shots of a sweep share one SFT. A stage
    trained on CUDA has keys of its own (the device kind is in them; CPU keys do not mention the device).
    """
    c = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    h = hashlib.sha256(data.embeddings.numpy().tobytes())
    for g in groups.sft_train:
        h.update(str((g.query_id, g.pool_ids)).encode())
        h.update(g.labels.numpy().tobytes())
    common = {"code": code_version(), "model": c["model"], "seed": c["seed"], "d": int(data.embeddings.shape[1])}
    if c.get("optimizer_impl", "foreach") != "foreach":  # another AdamW kernel: other last bits (foreach keys unchanged)
        common["optimizer_impl"] = c["optimizer_impl"]
    kind = device_kind(str(c.get("device") or "cpu"))
    if kind != "cpu":  # CUDA stages differ from CPU stages in the last bits: their own entries (CPU keys unchanged)
        common["device"] = kind
    sft = stable_hash({**common, "sft": c["sft"], "sft_data": h.hexdigest()})
    data_cfg = {k: v for k, v in c["data"].items() if k not in ("cache_dir",)}
    rce = stable_hash({**common, "data": data.fingerprint, "sft_key": sft, "rce": c["rce"], "reward": c["reward"],
                       "data_cfg": data_cfg})
    return {"sft": sft, "rce": rce}

