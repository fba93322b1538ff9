"""Small shared helpers: seeding, stable hashing, code version, progress bars."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch

PACKAGE_ROOT = Path(__file__).resolve().parent


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (seed 0 is a real seed)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def stable_hash(obj: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys), truncated."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


@lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the package's source files: changes whenever the code that computes results changes."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        h.update(path.relative_to(PACKAGE_ROOT).as_posix().encode())
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
    return Path(os.environ.get("LEVERPLUS_CACHE", Path.home() / ".cache" / "leverplus")).expanduser().resolve()


def progress(iterable: Iterable, *, enabled: Optional[bool], **kwargs):
    """tqdm progress bar, quiet when stdout is not a TTY (unless forced on)."""
    from tqdm.auto import tqdm

    show = sys.stdout.isatty() if enabled is None else enabled
    return tqdm(iterable, disable=not show, dynamic_ncols=True, leave=False, **kwargs)
