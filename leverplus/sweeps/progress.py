"""One console line per finished job of a multirun: ``[k/N] arm shot seed objective=... run_id=... elapsed ... ETA``."""

from __future__ import annotations

import os
import time
from typing import Optional, Tuple

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from leverplus.env import SWEEP_JOBS_VAR, SWEEP_START_VAR


def duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``2h03m``."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def eta_seconds(elapsed: float, done: int, total: int) -> float:
    """Time left if the remaining jobs take as long on average as the ``done`` ones did."""
    if done <= 0:
        return float("nan")
    return elapsed / done * max(total - done, 0)


def job_position() -> Optional[Tuple[int, Optional[int]]]:
    """(k, N) of this job in a multirun (k from 1; N when the sweep said how many jobs it launches), else None."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    n = os.environ.get(SWEEP_JOBS_VAR)
    return int(HydraConfig.get().job.num) + 1, (int(n) if n and n.isdigit() else None)


def job_line(k: int, n: Optional[int], *, arm: str, shot: str, seed: int, objective: str, value: float,
             run_id: Optional[str], now: Optional[float] = None) -> str:
    """The job's line; elapsed and ETA count from the sweep's start (``SWEEP_START_VAR``) when known."""
    head = f"[{k}/{n}]" if n else f"[{k}]"
    line = f"{head} {arm} shot{shot} seed{seed} {objective}={value:.4f} run_id={run_id or '-'}"
    start = os.environ.get(SWEEP_START_VAR)
    if start:
        elapsed = (time.time() if now is None else now) - float(start)
        line += f" elapsed {duration(elapsed)}"
        if n:
            eta = eta_seconds(elapsed, min(k, n), n)
            line += f" ETA {duration(eta)}"
    return line
