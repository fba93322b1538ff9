"""PNG plots people would rather look at than read: training curves (per run) and sweep figures (forest plots, Δ
heatmaps), sized to stay legible for the full grid.

Every sweep figure is sized from its content and stays within ``MAX_PX`` pixels on each side at the dpi it is
saved with, with text no smaller than ``MIN_FONT_PT``: a forest plot too tall for that is split into pages.
Deltas are drawn in percentage points (pp), like the comparison tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

from leverplus.data.formats.io import atomic_open  # noqa: E402

#: dpi of the sweep figures (forest plots, heatmaps)
SWEEP_DPI = 110
#: largest side of any sweep figure, in pixels at SWEEP_DPI
MAX_PX = 2400
#: smallest font size used on a sweep figure, in points
MIN_FONT_PT = 7.0
#: rows of one forest-plot page; more arms go on further pages
FOREST_MAX_ROWS = 60
#: inches per forest-plot row (label at MIN_FONT_PT + whisker)
FOREST_ROW_IN = 0.24
#: width of one character of a forest-plot label, in inches (DejaVu Sans at 7.5 pt, a little generous)
CHAR_IN = 0.065
#: smallest half-range of a Δ colour scale, in pp: differences below it never look saturated
COLOUR_FLOOR_PP = 1.0
#: hatch patterns of the heatmap cells without a number of their own
HATCH = {"aliased": "//", "n/a": "xx"}
#: series of one curve panel whose typical size differs from the panel's first series by more than this factor
#: go on a second y axis (a ratio near 1 is never squashed under a loss near 20)
TWIN_AXIS_FACTOR = 5.0

CURVE_PANELS = [
    ("loss", ["sft/loss", "rce/loss", "grpo/loss", "val/loss"]),
    ("validation ranking", ["val/offline/top1_reward", "val/offline/oracle_reward", "val/offline/mean_reward"]),
    ("GRPO KL / beta", ["grpo/kl", "grpo/beta"]),
    ("GRPO ratio / clip / zero-std", ["grpo/mean_ratio", "grpo/clip_ratio", "grpo/frac_reward_zero_std"]),
]
#: metric prefix -> the training phase whose epochs it marks (in training order)
PHASES = (("sft/", "SFT"), ("rce/", "RCE"), ("grpo/", "GRPO"))


def save_figure(fig, path, *, dpi: int) -> None:
    """Save a figure as PNG atomically (a reader never sees a half-written image)."""
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)


def fmt_pp(x: float) -> str:
    """A delta in pp with its sign and one decimal ("+0.3", "-1.2"); "n/a" when not finite."""
    return f"{x:+.1f}" if math.isfinite(x) else "n/a"


# ---------------------------------------------------------------------------------------------- training curves


def phase_starts(history: Iterable[Tuple[int, str, float]]) -> List[Tuple[str, int]]:
    """(phase, first step) of every phase present in the history, in step order (steps are global epochs)."""
    first: Dict[str, int] = {}
    for step, name, _ in history:
        for prefix, phase in PHASES:
            if name.startswith(prefix):
                first[phase] = min(first.get(phase, step), step)
    return sorted(first.items(), key=lambda kv: kv[1])


def _typical(values: Sequence[float]) -> float:
    finite = [abs(v) for v in values if math.isfinite(v)]
    return float(np.median(finite)) if finite else 0.0


def _split_scales(series: Dict[str, List[Tuple[int, float]]], names: Sequence[str]) -> Tuple[List[str], List[str]]:
    """The panel's series on the left axis (those within TWIN_AXIS_FACTOR of the largest typical size) and the
    smaller ones (right axis)."""
    present = [n for n in names if series.get(n)]
    if not present:
        return [], []
    typical = {n: _typical([v for _, v in series[n]]) for n in present}
    ref = max(typical.values())
    left, right = [], []
    for n in present:
        t = typical[n]
        lo, hi = sorted((max(t, 1e-12), max(ref, 1e-12)))
        (right if hi / lo > TWIN_AXIS_FACTOR else left).append(n)
    return left, right


def _draw_phases(ax, starts: Sequence[Tuple[str, int]]) -> None:
    """Dashed vertical line before every phase but the first, each phase named at the top of the panel."""
    trans = blended_transform_factory(ax.transData, ax.transAxes)
    for i, (phase, step) in enumerate(starts):
        x = step + 1  # epochs are drawn 1-based
        if i > 0:
            ax.axvline(x - 0.5, color="grey", ls="--", lw=0.9, gid=f"phase:{phase}")
        ax.text(x - 0.4, 0.02, phase, transform=trans, ha="left", va="bottom", fontsize=7, color="grey")


def training_curves_figure(history: Iterable[Tuple[int, str, float]]) -> Figure:
    """Four panels (losses, validation ranking metrics, KL/β, PPO statistics) against the epoch, phase boundaries
    marked; series much smaller than the panel's largest go on a second y axis (labelled on the right)."""
    history = list(history)
    series: Dict[str, List[Tuple[int, float]]] = {}
    for step, name, value in history:
        series.setdefault(name, []).append((step, value))
    starts = phase_starts(history)
    steps = [step for step, _, _ in history]
    xlim = (min(steps) + 0.5, max(steps) + 1.5) if steps else None  # every panel spans all phases
    fig = Figure(figsize=(11, 7))
    axes = fig.subplots(2, 2)
    for ax, (title, names) in zip(axes.flat, CURVE_PANELS):
        left, right = _split_scales(series, names)
        ax.set_title(title)
        ax.set_xlabel("epoch (all phases)")
        if not left:
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes, color="grey")
            continue
        handles = []
        for target, group, style in ((ax, left, "-"), (ax.twinx() if right else None, right, ":")):
            for name in group:
                pts = sorted(series[name])
                handles += target.plot([p[0] + 1 for p in pts], [p[1] for p in pts], ls=style, marker="o", ms=3,
                                       label=name + (" (right axis)" if target is not ax else ""),
                                       color=f"C{len(handles)}")
            if target is not None and target is not ax:  # two axes: say which series each one measures
                target.set_ylabel(", ".join(group), fontsize=7)
                ax.set_ylabel(", ".join(left), fontsize=7)
        ax.set_xlim(*xlim)
        _draw_phases(ax, starts)
        ax.legend(handles=handles, fontsize=7, loc="best", framealpha=0.7)  # off the data (~20% of the figure's cost)
    fig.subplots_adjust(left=0.07, right=0.93, bottom=0.08, top=0.95, hspace=0.3, wspace=0.3)  # tight_layout: 2x slower
    return fig


def training_curves(history: Iterable[Tuple[int, str, float]], path: str | Path) -> Path:
    """:func:`training_curves_figure` saved as PNG (built on a bare ``Figure``: no pyplot state, thread-safe)."""
    fig = training_curves_figure(history)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=80)  # one per run: keep it cheap
    return path


# ---------------------------------------------------------------------------------------------- forest plot


@dataclass(frozen=True)
class ForestRow:
    """One arm's Δ vs the baseline, in pp, with its CI (NaN bounds: no CI) and its BH-adjusted significance."""

    label: str
    delta: float
    lo: float
    hi: float
    significant: bool
    note: str = ""  # e.g. "+2 aliases", shown after the numbers


def _sorted_rows(rows: Sequence[ForestRow]) -> List[ForestRow]:
    """Largest Δ first; rows without a Δ last, by label."""
    return sorted(rows, key=lambda r: (not math.isfinite(r.delta), -r.delta if math.isfinite(r.delta) else 0.0,
                                       r.label))


def forest_figures(rows: Sequence[ForestRow], *, title: str, xlabel: str, margin_pp: Optional[float] = None,
                   alpha: float = 0.05, max_rows: int = FOREST_MAX_ROWS, dpi: int = SWEEP_DPI) -> List[Figure]:
    """Forest plot of arms vs the baseline: one row per arm sorted by Δ (largest at the top), CI whiskers, a zero
    line, the ±margin band shaded, filled markers for arms significant after Benjamini-Hochberg (q < ``alpha``),
    hollow ones otherwise, and each row's "Δ [lo, hi]" written at the right. Pages of ``max_rows`` rows."""
    ordered = _sorted_rows(rows)
    pages = [ordered[i:i + max_rows] for i in range(0, len(ordered), max_rows)] or [[]]
    finite = [v for r in ordered for v in (r.delta, r.lo, r.hi) if math.isfinite(v)]
    span = max([abs(v) for v in finite] + [margin_pp or 0.0, COLOUR_FLOOR_PP])
    xlim = (-1.1 * span, 1.1 * span)
    return [_forest_page(page, f"{title}" + (f" (page {k + 1}/{len(pages)})" if len(pages) > 1 else ""),
                         xlabel, xlim, margin_pp, alpha, dpi) for k, page in enumerate(pages)]


def _forest_page(rows: Sequence[ForestRow], title: str, xlabel: str, xlim: Tuple[float, float],
                 margin_pp: Optional[float], alpha: float, dpi: int) -> Figure:
    n = max(len(rows), 1)
    top_in, bottom_in, plot_in = 0.45, 0.95, 4.0  # title; x label + legend; the whiskers
    height = min(top_in + bottom_in + FOREST_ROW_IN * n, MAX_PX / dpi)
    value_in = CHAR_IN * max((len(r.note) for r in rows), default=0) + 1.5
    max_chars = int((MAX_PX / dpi - plot_in - value_in - 0.3) / CHAR_IN)  # longer labels are shortened with "…"
    labels = [r.label if len(r.label) <= max_chars else r.label[:max_chars - 1] + "…" for r in rows]
    label_in = CHAR_IN * max((len(lab) for lab in labels), default=10) + 0.3
    width = label_in + plot_in + value_in
    fig = Figure(figsize=(width, height))  # margins sized from the text: a layout engine costs more than the plot
    fig.subplots_adjust(left=label_in / width, right=1 - value_in / width, top=1 - top_in / height,
                        bottom=bottom_in / height)
    ax = fig.subplots()
    ys = np.arange(len(rows))[::-1]  # first row at the top
    if margin_pp:
        ax.axvspan(-margin_pp, margin_pp, color="0.92", zorder=0, gid="margin")
    ax.axvline(0.0, color="black", lw=0.9, zorder=1, gid="zero")
    for y, r in zip(ys, rows):
        if not math.isfinite(r.delta):
            ax.text(0.0, y, "no baseline pair", ha="center", va="center", fontsize=MIN_FONT_PT, color="grey")
            continue
        colour = ("#1a9850" if r.delta > 0 else "#d73027") if r.significant else "#4c72b0"
        if math.isfinite(r.lo) and math.isfinite(r.hi):
            ax.plot([r.lo, r.hi], [y, y], color=colour, lw=1.4, zorder=2)
        ax.plot([r.delta], [y], marker="D" if r.significant else "o", ms=5, zorder=3, color=colour,
                markerfacecolor=colour if r.significant else "white", gid="sig" if r.significant else "nonsig")
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=MIN_FONT_PT + 0.5)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlim(*xlim)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", color="0.85", lw=0.5)
    trans = blended_transform_factory(ax.transAxes, ax.transData)
    for y, r in zip(ys, rows):
        ci = f" [{fmt_pp(r.lo)}, {fmt_pp(r.hi)}]" if math.isfinite(r.lo) and math.isfinite(r.hi) else " (no CI)"
        text = (fmt_pp(r.delta) + ci if math.isfinite(r.delta) else "n/a") + (f"  {r.note}" if r.note else "")
        ax.text(1.01, y, text, transform=trans, ha="left", va="center", fontsize=MIN_FONT_PT, gid="value")
    handles = [plt.Line2D([], [], marker="D", ls="", color="#1a9850", label=f"BH q < {alpha:g} (better)"),
               plt.Line2D([], [], marker="D", ls="", color="#d73027", label=f"BH q < {alpha:g} (worse)"),
               plt.Line2D([], [], marker="o", ls="", color="#4c72b0", markerfacecolor="white",
                          label="not significant after BH")]
    if margin_pp:
        handles.append(Patch(color="0.92", label=f"±{margin_pp:g} pp equivalence margin"))
    fig.legend(handles=handles, loc="lower center", ncols=len(handles), fontsize=MIN_FONT_PT, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    return fig


def forest_plot(rows: Sequence[ForestRow], path: str | Path, **kwargs) -> List[Path]:
    """:func:`forest_figures` saved as ``path`` (one page) or ``<stem>_p<k><suffix>`` (several pages)."""
    path = Path(path)
    dpi = kwargs.setdefault("dpi", SWEEP_DPI)
    figs = forest_figures(rows, **kwargs)
    paths = [path] if len(figs) == 1 else [path.with_name(f"{path.stem}_p{k + 1}{path.suffix}")
                                            for k in range(len(figs))]
    for fig, p in zip(figs, paths):
        save_figure(fig, p, dpi=dpi)
    return paths


# ---------------------------------------------------------------------------------------------- Δ heatmap


@dataclass(frozen=True)
class HeatFacet:
    """One panel of a Δ heatmap: values in pp (NaN where there is no number), a status per cell ("" = a measured
    cell, "aliased", "n/a") and whether each measured cell is significant after BH."""

    name: str
    values: np.ndarray
    status: np.ndarray
    significant: np.ndarray


def colour_limit(values: Iterable[float], *, margin_pp: Optional[float] = None, mde_pp: Optional[float] = None,
                 floor_pp: float = COLOUR_FLOOR_PP) -> float:
    """Half-range of a symmetric Δ colour scale (pp): the largest of max |Δ|, the equivalence margin, the typical
    minimum detectable effect and ``floor_pp``. Differences the study cannot tell from noise stay pale."""
    finite = [abs(v) for v in values if math.isfinite(v)]
    return float(max(finite + [margin_pp or 0.0, mde_pp or 0.0, floor_pp]))


def heatmap_figure(facets: Sequence[HeatFacet], row_labels: Sequence[str], col_labels: Sequence[str], *,
                   title: str, cbar_label: str, limit: float, dpi: int = SWEEP_DPI) -> Figure:
    """Δ heatmap, one panel per facet sharing one symmetric colour scale ±``limit`` pp: cells read "+0.3" (a "*"
    and bold when significant after BH); aliased and missing cells are hatched grey and labelled, never white."""
    n_rows, n_cols = len(row_labels), len(col_labels)
    longest = max((len(r) for r in row_labels), default=5)
    width = min(1.2 + 0.075 * longest + len(facets) * (0.9 * n_cols + 0.4) + 1.2, MAX_PX / dpi)
    height = min(1.9 + 0.45 * n_rows, MAX_PX / dpi)
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(facets), sharey=True, squeeze=False)[0])
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit)
    im = None
    for ax, facet in zip(axes, facets):
        im = ax.imshow(np.ma.masked_invalid(facet.values), cmap="RdBu", norm=norm, aspect="auto")
        for i in range(n_rows):
            for j in range(n_cols):
                status, v = str(facet.status[i, j]), float(facet.values[i, j])
                if status or not math.isfinite(v):
                    label = status or "n/a"
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="0.85", edgecolor="0.55",
                                           hatch=HATCH.get(label, "xx"), lw=0.0, gid=f"hatch:{label}"))
                    ax.text(j, i, label, ha="center", va="center", fontsize=MIN_FONT_PT, color="0.25",
                            bbox={"facecolor": "0.85", "edgecolor": "none", "pad": 0.5})
                    continue
                sig = bool(facet.significant[i, j])
                dark = abs(v) > 0.6 * limit
                ax.text(j, i, fmt_pp(v) + ("*" if sig else ""), ha="center", va="center", fontsize=8,
                        fontweight="bold" if sig else "normal", color="white" if dark else "black")
        ax.set_xticks(range(n_cols))
        ax.set_xticklabels(col_labels, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(n_rows))
        ax.set_yticklabels(row_labels, fontsize=8)
        ax.set_title(facet.name, fontsize=9)
    fig.colorbar(im, ax=list(axes), label=cbar_label, shrink=0.9)
    fig.suptitle(title, fontsize=10)
    return fig


def delta_heatmap(facets: Sequence[HeatFacet], row_labels: Sequence[str], col_labels: Sequence[str],
                  path: str | Path, *, dpi: int = SWEEP_DPI, **kwargs) -> Path:
    """:func:`heatmap_figure` saved as PNG."""
    save_figure(heatmap_figure(facets, row_labels, col_labels, dpi=dpi, **kwargs), path, dpi=dpi)
    return Path(path)
