"""Small shared helpers: seeding, stable hashing, code version, progress bars."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from leverplus.env import CACHE_VAR, launch_dir  # noqa: F401 (launch_dir: re-exported, its home is leverplus.env)

PACKAGE_ROOT = Path(__file__).resolve().parent


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (seed 0 is a real seed)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


_MALLOC_TUNED = False


def tune_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Keep freed tensor memory in the process heap instead of handing it back to the kernel (glibc ``mallopt``).

    With glibc's defaults a multi-MB tensor (a ``[32, 64, 256]`` activation is 2 MB) often gets fresh pages from
    the kernel, and their first-touch page faults were ~10% of a training step on the 2-core container (871 faults
    per step; 241 with these thresholds). It changes no result, only where memory comes from; the heap may keep up
    to ``trim_threshold`` bytes of freed memory. Linux with glibc only (a no-op elsewhere); idempotent.
    Returns whether it is in effect.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        ok = libc.mallopt(m_mmap_threshold, int(mmap_threshold)) == 1
        ok = libc.mallopt(m_trim_threshold, int(trim_threshold)) == 1 and ok
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    _MALLOC_TUNED = ok
    return ok


def stable_hash(obj: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys), truncated."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


#: the parts of the package whose code computes results (run keys and cached stages depend on them). Editing
#: anything else (tracking, analysis and figures, sweepers, entry points, error texts) changes no number, so it must
#: not invalidate finished runs or cached SFT/RCE stages.
RESULT_CODE = ("config", "data", "model", "training", "evaluation", "datagen", "sim", "pipeline.py", "utils.py")


def code_version(root: Optional[Path] = None) -> str:
    """Hash of the source files that compute results (``RESULT_CODE`` under ``root``, default this package): it
    changes whenever the code that computes results changes, and only then. Computed once per process for the
    installed package."""
    return _package_code_version() if root is None else _hash_result_code(Path(root))


@lru_cache(maxsize=1)
def _package_code_version() -> str:
    return _hash_result_code(PACKAGE_ROOT)


def _hash_result_code(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] not in RESULT_CODE:
            continue
        h.update(rel.as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def git_info(cwd: Optional[Path] = None) -> dict:
    """{'commit': sha or 'unknown', 'dirty': bool} for the repository holding the package."""
    cwd = cwd or PACKAGE_ROOT
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout.strip()
        )
        return {"commit": sha, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": False}


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_VAR, Path.home() / ".cache" / "leverplus")).expanduser().resolve()


def progress(iterable: Iterable, *, enabled: Optional[bool], **kwargs):
    """tqdm progress bar, quiet when stdout is not a TTY (unless forced on); a finished bar keeps its final state."""
    show = sys.stdout.isatty() if enabled is None else enabled
    return tqdm(iterable, disable=not show, dynamic_ncols=True, leave=True, **kwargs)


def enum_value(x):
    """The string value of a config enum (OmegaConf gives Enum members), or ``x`` unchanged."""
    return x.value if hasattr(x, "value") else x


def plain_config(node: Any) -> Any:
    """A config node as a plain object for reads in a training loop: its dataclass (a structured node) or a
    namespace. An OmegaConf attribute read costs microseconds of validation, and a training step reads a dozen."""
    if not isinstance(node, DictConfig):
        return node
    obj = OmegaConf.to_object(node)
    return SimpleNamespace(**obj) if isinstance(obj, dict) else obj


#: values of the root ``device`` field
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"


def resolve_device(device: str) -> torch.device:
    """``device`` (auto | cpu | cuda | cuda:N) as a torch device; ``auto`` = CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def device_kind(device: str) -> str:
    """The kind of device ``device`` resolves to on this machine: ``cpu`` or ``cuda`` (every ``cuda:N`` is ``cuda``).
    Run keys and stage-cache keys carry it when it is not ``cpu``."""
    return resolve_device(device).type


def cpu_tensors(obj: Any) -> Any:
    """``obj`` (a tensor, or dicts / lists / tuples of them) with every tensor detached and on the CPU; a tensor
    already there is returned as it is. What checkpoints and cache entries store, so they load onto any device."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return type(obj)((k, cpu_tensors(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_tensors(v) for v in obj)
    return obj


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
