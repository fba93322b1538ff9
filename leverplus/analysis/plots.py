"""PNG plots people would rather look at than read: training curves (per run) and sweep figures."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from leverplus.data.formats.io import atomic_open  # noqa: E402

CURVE_PANELS = [
    ("loss", ["sft/loss", "rce/loss", "grpo/loss", "val/loss"]),
    ("validation ranking", ["val/offline/top1_reward", "val/offline/oracle_reward", "val/offline/mean_reward"]),
    ("GRPO KL / beta", ["grpo/kl", "grpo/beta"]),
    ("GRPO ratio / clip / zero-std", ["grpo/mean_ratio", "grpo/clip_ratio", "grpo/frac_reward_zero_std"]),
]


def save_figure(fig, path, *, dpi: int) -> None:
    """Save a figure as PNG atomically (a reader never sees a half-written image)."""
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)


def training_curves(history: Iterable[Tuple[int, str, float]], path: str | Path) -> Path:
    """One figure, four panels (losses, validation ranking metrics, KL/β, PPO statistics) against the epoch.

    Built on a bare ``Figure`` (no pyplot state: nothing to close, safe in any thread)."""
    series: Dict[str, List[Tuple[int, float]]] = {}
    for step, name, value in history:
        series.setdefault(name, []).append((step, value))
    fig = Figure(figsize=(11, 7))
    axes = fig.subplots(2, 2)
    for ax, (title, names) in zip(axes.flat, CURVE_PANELS):
        drawn = False
        for name in names:
            pts = sorted(series.get(name, []))
            if pts:
                ax.plot([p[0] + 1 for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("epoch (all phases)")
        if drawn:
            ax.legend(fontsize=7, loc="upper right")  # loc="best" searches placements: 20% of the figure's cost
        else:
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.08, top=0.95, hspace=0.3, wspace=0.15)  # tight_layout: 2x slower
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=80)  # one per run: keep it cheap
    return path


def bar_with_ci(labels: Sequence[str], means: Sequence[float], los: Sequence[float], his: Sequence[float],
                path: str | Path, title: str = "", ylabel: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(labels) + 2), 4.5))
    err = [[m - lo for m, lo in zip(means, los)], [hi - m for m, hi in zip(means, his)]]
    ax.bar(range(len(labels)), means, yerr=err, capsize=3, color="#4c72b0")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return Path(path)


def heatmap(matrix, row_labels: Sequence[str], col_labels: Sequence[str], path: str | Path, title: str = "",
            cbar_label: str = "") -> Path:
    m = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(max(5, 1.0 * len(col_labels) + 3), max(3, 0.5 * len(row_labels) + 1.5)))
    lim = np.nanmax(np.abs(m)) if np.isfinite(m).any() else 1.0
    im = ax.imshow(m, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(col_labels)))
    ax.set_xticklabels(col_labels, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(row_labels)))
    ax.set_yticklabels(row_labels, fontsize=8)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if np.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:+.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label=cbar_label)
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return Path(path)
