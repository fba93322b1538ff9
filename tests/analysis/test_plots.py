"""Tests for leverplus.analysis.plots and the figures of write_report / report_study: forest plots, Δ heatmaps,
training curves and Optuna plots, checked on the matplotlib objects (labels, rows, cell texts, hatches, colour
limits, sizes) for small inputs and for a synthetic full reward grid (444 jobs)."""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import replace

import numpy as np
import optuna
import pandas as pd
import pytest
from matplotlib.figure import Figure
from omegaconf import OmegaConf
from PIL import Image

from leverplus.analysis import compare as cmp
from leverplus.analysis.compare import compare_runs, write_report
from leverplus.analysis.plots import (
    MAX_PX,
    MIN_FONT_PT,
    SWEEP_DPI,
    ForestRow,
    HeatFacet,
    colour_limit,
    fmt_pp,
    forest_figures,
    forest_plot,
    heatmap_figure,
    phase_starts,
    training_curves_figure,
)
from leverplus.analysis.study_report import objective_name, study_figures
from leverplus.sweeps.study_loop import load_study

MODES = ["hard_plus_soft", "hard_plus_soft_v2", "separated", "hard_only", "soft_only", "hybrid"]
WEIGHTS = [("1.0", "1.0"), ("2.0", "1.0"), ("1.0", "0.5")]
RAWS = ["true", "false"]
BASE = "rce_only_baseline"


def _label(mode, hw, sw, raw):
    return f"mode={mode}|hard_weight={hw}|soft_weight={sw}|raw={raw}"


def full_grid():
    """The shipped reward grid: 6 modes x 3 weight pairs x 2 raw x 4 shots x 3 seeds + the baseline per (shot,
    seed) = 444 jobs; hard_only ignores the soft weight and soft_only the hard weight, so (1.0, 0.5) of hard_only and
    (2.0, 1.0) of soft_only are aliases of their (1.0, 1.0) arm (not run). Accuracies are seeded noise plus a small
    per-arm effect; hybrid is clearly better."""
    rng = np.random.default_rng(0)
    rows, aliases = [], {}
    for mode, (hw, sw), raw in itertools.product(MODES, WEIGHTS, RAWS):
        label = _label(mode, hw, sw, raw)
        if (mode == "hard_only" and sw == "0.5") or (mode == "soft_only" and hw == "2.0"):
            aliases[label] = _label(mode, "1.0", "1.0", raw)
    effect = {m: 0.004 * i for i, m in enumerate(MODES)}
    effect["hybrid"] = 0.03
    n_jobs = 0
    for shot, seed in itertools.product([1, 2, 3, 4], [0, 1, 2]):
        base = 0.5 + 0.01 * seed
        rows.append({"run_id": f"b/{shot}/{seed}", "arm": BASE, "role": "baseline", "shot_num": shot, "seed": seed,
                     "acc": base, "objective": base, cmp.MODE_COL: "hard_plus_soft", cmp.HARD_WEIGHT_COL: "1.0",
                     cmp.SOFT_WEIGHT_COL: "1.0", cmp.RAW_COL: "false"})
        n_jobs += 1
        for mode, (hw, sw), raw in itertools.product(MODES, WEIGHTS, RAWS):
            n_jobs += 1
            label = _label(mode, hw, sw, raw)
            if label in aliases:
                continue
            acc = base + effect[mode] + rng.normal(0, 0.004)
            rows.append({"run_id": f"{label}/{shot}/{seed}", "arm": label, "role": "arm", "shot_num": shot,
                         "seed": seed, "acc": acc, "objective": acc, cmp.MODE_COL: mode, cmp.HARD_WEIGHT_COL: hw,
                         cmp.SOFT_WEIGHT_COL: sw, cmp.RAW_COL: raw})
    assert n_jobs == 444
    return pd.DataFrame(rows), aliases


@pytest.fixture(scope="module")
def grid_report():
    df, aliases = full_grid()
    return compare_runs(df, aliases=aliases, n_boot=50)


@pytest.fixture(scope="module")
def grid_files(grid_report, tmp_path_factory):
    """write_report of the full grid's shot-1 cells (every shot's figures have the same shape; one keeps it fast)."""
    shot1 = replace(grid_report, cells=[c for c in grid_report.cells if c.shot_num == 1])
    return write_report(shot1, tmp_path_factory.mktemp("grid"))


def _px(fig: Figure, dpi: int = SWEEP_DPI):
    w, h = fig.get_size_inches()
    return w * dpi, h * dpi


def _texts(fig: Figure):
    return [t for ax in fig.axes for t in ax.texts]


# ---------------------------------------------------------------------------------------------- small pieces


def test_fmt_pp_one_decimal_with_sign():
    assert fmt_pp(0.3) == "+0.3" and fmt_pp(-1.25) == "-1.2" and fmt_pp(0.0) == "+0.0" and fmt_pp(math.nan) == "n/a"


def test_colour_limit_takes_the_largest_meaningful_range():
    # max |Δ| 0.2 pp: the 1 pp floor wins, so noise stays pale
    assert colour_limit([0.1, -0.2]) == 1.0
    assert colour_limit([0.1, -0.2], margin_pp=1.5) == 1.5
    assert colour_limit([0.1, -0.2], margin_pp=0.5, mde_pp=2.5) == 2.5
    assert colour_limit([3.2, -0.2, math.nan], margin_pp=0.5, mde_pp=2.5) == 3.2


def test_forest_rows_sorted_by_delta_with_ci_text_and_bh_markers():
    rows = [ForestRow("a", -1.0, -2.0, 0.0, False), ForestRow("b", 2.5, 1.0, 4.0, True, "+1 alias"),
            ForestRow("c", 0.4, math.nan, math.nan, False), ForestRow("d", math.nan, math.nan, math.nan, False)]
    (fig,) = forest_figures(rows, title="Δacc vs base, shot 1", xlabel="Δacc (percentage points)", margin_pp=0.5)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    ys = list(ax.get_yticks())
    top_down = [lab for _, lab in sorted(zip(ys, labels), reverse=True)]
    assert top_down == ["b", "c", "a", "d"]  # largest Δ at the top, no Δ last
    assert ax.get_xlabel() == "Δacc (percentage points)"
    values = [t.get_text() for t in ax.texts if t.get_gid() == "value"]
    assert "+2.5 [+1.0, +4.0]  +1 alias" in values and "+0.4 (no CI)" in values and "n/a" in values
    assert "no baseline pair" in [t.get_text() for t in ax.texts]
    gids = [ln.get_gid() for ln in ax.lines]
    assert gids.count("sig") == 1 and gids.count("nonsig") == 2 and "zero" in gids
    sig = next(ln for ln in ax.lines if ln.get_gid() == "sig")
    assert sig.get_xdata()[0] == 2.5 and sig.get_marker() == "D"
    assert any(p.get_gid() == "margin" for p in ax.patches)
    lo, hi = ax.get_xlim()
    assert lo == pytest.approx(-hi) and hi >= 4.0  # symmetric, every whisker inside


def test_forest_pages_when_rows_exceed_the_page(tmp_path):
    rows = [ForestRow(f"arm{i:03d}", float(i), i - 1.0, i + 1.0, False) for i in range(130)]
    figs = forest_figures(rows, title="t", xlabel="x", max_rows=60)
    assert [len(f.axes[0].get_yticks()) for f in figs] == [60, 60, 10]
    assert figs[0].axes[0].get_yticklabels()[0].get_text() == "arm129"  # the top row of page 1: largest Δ
    assert "page 1/3" in figs[0].axes[0].get_title()
    for f in figs:
        w, h = _px(f)
        assert w <= MAX_PX and h <= MAX_PX
    paths = forest_plot(rows[:5], tmp_path / "f.png", title="t", xlabel="x", max_rows=2)
    assert [p.name for p in paths] == ["f_p1.png", "f_p2.png", "f_p3.png"] and all(p.exists() for p in paths)


def test_forest_long_labels_are_shortened_to_keep_the_width():
    rows = [ForestRow("x" * 400, 1.0, 0.0, 2.0, False), ForestRow("short", 0.5, 0.0, 1.0, False)]
    (fig,) = forest_figures(rows, title="t", xlabel="x")
    w, _ = _px(fig)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert w <= MAX_PX and labels[0].endswith("…") and len(labels[0]) < 400 and labels[1] == "short"


def test_heatmap_cells_hatches_and_norm():
    vals = np.array([[0.34, np.nan], [-2.0, np.nan]])
    status = np.array([["", "aliased"], ["", "n/a"]], dtype=object)
    sig = np.array([[False, False], [True, False]])
    fig = heatmap_figure([HeatFacet("raw", vals, status, sig), HeatFacet("normalised", vals, status, sig)],
                         ["m1", "m2"], ["1×1", "2×1"], title="Δacc", cbar_label="Δacc (pp)", limit=2.5)
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert texts.count("+0.3") == 1 and "-2.0*" in texts and "aliased" in texts and "n/a" in texts
    bold = next(t for t in ax.texts if t.get_text() == "-2.0*")
    assert bold.get_fontweight() == "bold"
    hatches = {p.get_gid(): p.get_hatch() for p in ax.patches}
    assert hatches == {"hatch:aliased": "//", "hatch:n/a": "xx"}
    norm = ax.images[0].norm
    assert (norm.vmin, norm.vmax) == (-2.5, 2.5)
    assert [a.get_title() for a in fig.axes[:2]] == ["raw", "normalised"]


# ---------------------------------------------------------------------------------------------- the full grid


def test_full_grid_forest_one_page_per_shot_legible(grid_report, grid_files):
    assert sorted(p.name for p in grid_files if p.name.startswith("delta_")) == ["delta_forest_shot1.png",
                                                                                 "delta_heatmap_shot1.png"]
    cells = [c for c in grid_report.cells if c.arm != BASE and c.shot_num == 1]
    rows = [ForestRow(c.arm, 100 * c.delta.delta, 100 * c.delta.lo, 100 * c.delta.hi, cmp._significant(c, 0.05),
                      "+1 alias" if c.aliases else "") for c in cells]
    assert len(rows) == 32  # 36 arms, four of them aliases (two per raw level)
    (fig,) = forest_figures(rows, title="t", xlabel="Δacc (percentage points)", margin_pp=0.5)
    w, h = _px(fig)
    assert w <= MAX_PX and h <= MAX_PX and h >= 34 * 0.2 * SWEEP_DPI  # grows with the rows, within the cap
    assert min(t.get_fontsize() for t in _texts(fig) + list(fig.axes[0].get_yticklabels())) >= MIN_FONT_PT
    top = max(zip(fig.axes[0].get_yticks(), [t.get_text() for t in fig.axes[0].get_yticklabels()]))[1]
    assert top.startswith("mode=hybrid")  # the clearly better arms sort to the top
    assert sum(ln.get_gid() == "sig" for ln in fig.axes[0].lines) >= 4  # the hybrid arms survive BH


def test_full_grid_pngs_within_bounds(grid_files):
    pngs = [p for p in grid_files if p.suffix == ".png"]
    for p in pngs:
        w, h = Image.open(p).size
        assert w <= MAX_PX and h <= MAX_PX, (p.name, w, h)
    assert not (grid_files[0].parent / "delta_bars.png").exists()


def test_full_grid_heatmap_facets_aliases_and_scale(grid_report):
    arms = [c for c in grid_report.cells if c.arm != BASE and c.shot_num == 2]
    facets, rows, cols, most = cmp._heatmap_grid(arms)
    assert [f.name for f in facets] == ["raw reward (rce.use_raw_reward=true)",
                                        "normalised reward (rce.use_raw_reward=false)"]
    assert rows == sorted(MODES) and cols == ["1.0×0.5", "1.0×1.0", "2.0×1.0"] and most == 1
    for f in facets:
        assert f.status[rows.index("hard_only"), cols.index("1.0×0.5")] == "aliased"
        assert f.status[rows.index("soft_only"), cols.index("2.0×1.0")] == "aliased"
        assert (f.status == "").sum() == 16 and np.isfinite(f.values[f.status == ""]).all()
        i, j = rows.index("hybrid"), cols.index("1.0×1.0")
        assert f.values[i, j] == pytest.approx(100 * grid_report.cell(
            _label("hybrid", "1.0", "1.0", "true" if "raw reward" in f.name else "false"), 2).delta.delta)
        assert f.significant[i, j]
    limit = colour_limit([100 * c.delta.delta for c in arms], margin_pp=0.5)
    fig = heatmap_figure(facets, rows, cols, title="t", cbar_label="c", limit=limit)
    w, h = _px(fig)
    assert w <= MAX_PX and h <= MAX_PX
    assert sum(p.get_gid() == "hatch:aliased" for ax in fig.axes for p in ax.patches) == 4
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert all(t in ("aliased", "n/a") or t.rstrip("*")[0] in "+-" and len(t.rstrip("*").split(".")[1]) == 1
               for t in texts)


def test_heatmap_facets_join_mlflow_and_label_spellings_of_raw(grid_report):
    """Measured cells carry rce.use_raw_reward as MLflow reads params back ("True"/"False"), alias labels say
    "true"/"false": still one facet per level, with the aliased cells inside it (not extra all-aliased facets)."""
    arms = [replace(c, levels={**c.levels, cmp.RAW_COL: c.levels[cmp.RAW_COL].capitalize()})
            for c in grid_report.cells if c.arm != BASE and c.shot_num == 2]
    assert {c.levels[cmp.RAW_COL] for c in arms} == {"True", "False"}
    facets, rows, cols, _ = cmp._heatmap_grid(arms)
    assert [f.name for f in facets] == ["raw reward (rce.use_raw_reward=true)",
                                        "normalised reward (rce.use_raw_reward=false)"]
    for f in facets:
        assert (f.status == "").sum() == 16 and (f.status == "aliased").sum() == 2


# ---------------------------------------------------------------------------------------------- training curves


def _history():
    h = []
    for e in range(2):
        h.append((e, "sft/loss", 2.0 - e))
    for e in range(2, 5):
        h += [(e, "rce/loss", 20.0 - e), (e, "val/loss", 1.0 + 0.01 * e)]
    for e in range(5, 7):
        h += [(e, "grpo/loss", 0.1), (e, "grpo/mean_ratio", 1.0), (e, "grpo/clip_ratio", 0.1), (e, "grpo/kl", 0.02),
              (e, "grpo/beta", 0.04)]
    return h


def test_phase_starts_in_order():
    assert phase_starts(_history()) == [("SFT", 0), ("RCE", 2), ("GRPO", 5)]


def test_training_curves_phase_lines_and_twin_axis():
    fig = training_curves_figure(_history())
    loss_ax = fig.axes[0]
    assert loss_ax.get_title() == "loss"
    # boundaries between epochs 2|3 (RCE starts at epoch 3) and 5|6, on every drawn panel
    for ax in (fig.axes[0], fig.axes[2], fig.axes[3]):
        lines = {ln.get_gid(): ln.get_xdata()[0] for ln in ax.lines if (ln.get_gid() or "").startswith("phase:")}
        assert lines == {"phase:RCE": 2.5, "phase:GRPO": 5.5}
        assert {"SFT", "RCE", "GRPO"} <= {t.get_text() for t in ax.texts}
    # rce/loss ~17 keeps the left axis; sft ~1.5, grpo 0.1 and val ~1 (over 5x smaller) go on a second axis
    twins = [a for a in fig.axes if a is not loss_ax and a.bbox.bounds == loss_ax.bbox.bounds]
    assert len(twins) == 1
    assert {ln.get_label() for ln in twins[0].lines} == {"sft/loss (right axis)", "grpo/loss (right axis)",
                                                          "val/loss (right axis)"}
    assert [ln.get_label() for ln in loss_ax.lines if not ln.get_gid()] == ["rce/loss"]
    assert loss_ax.get_ylabel() == "rce/loss" and twins[0].get_ylabel() == "sft/loss, grpo/loss, val/loss"
    # the ratio panel: mean_ratio ~1 on the left, the clip fraction 0.1 on the right
    ratio_twin = [a for a in fig.axes[4:] if a.bbox.bounds == fig.axes[3].bbox.bounds]
    assert [ln.get_label() for ln in ratio_twin[0].lines] == ["grpo/clip_ratio (right axis)"]
    assert "not run" in [t.get_text() for t in fig.axes[1].texts]  # validation ranking not logged


# ---------------------------------------------------------------------------------------------- Optuna plots


def _study(n_trials: int, metric_name=None):
    """A real in-memory study over the lr x epochs space (value: a smooth function of both)."""
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    if metric_name:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            study.set_metric_names([metric_name])
    study.optimize(lambda t: -abs(math.log10(t.suggest_float("grpo.lr", 1e-6, 1e-3, log=True)) + 4.5)
                   + 0.1 * t.suggest_int("grpo.epochs", 1, 4), n_trials=n_trials)
    return study


def test_study_figures_named_for_the_objective_with_importance_caveat():
    figures, errors = study_figures(_study(4, "val/downstream_acc"))
    assert not errors
    assert set(figures) == {"optimization_history", "slice", "contour", "param_importances"}
    hist = figures["optimization_history"].axes[0]
    assert hist.get_title() == "Optimization history: val/downstream_acc"
    assert hist.get_ylabel() == "val/downstream_acc"
    contour = figures["contour"].axes[0]  # 2-D space: one panel, lr x epochs
    assert {contour.get_xlabel(), contour.get_ylabel()} == {"grpo.lr", "grpo.epochs"}
    assert "Contour of val/downstream_acc" == figures["contour"].axes[0].get_title()
    assert "val/downstream_acc" in figures["slice"]._suptitle.get_text()
    assert figures["slice"].axes[0].get_ylabel() == "val/downstream_acc"
    imp = figures["param_importances"].axes[0].get_title()
    assert imp.startswith("Parameter importances for val/downstream_acc") and "only 4 trials: indicative" in imp
    for fig in figures.values():
        assert all("Objective Value" not in t.get_text() for ax in fig.axes
                   for t in [ax.title, ax._left_title, ax.xaxis.label, ax.yaxis.label])
        assert all(ax.get_title(loc="left") in ("", ) for ax in fig.axes)  # no second, generic title


def test_study_figures_no_caveat_with_enough_trials_and_explicit_name_wins():
    study = _study(10)
    assert objective_name(study) == "objective value"
    figures, _ = study_figures(study, objective="val/offline/top1_reward")
    imp = figures["param_importances"].axes[0].get_title()
    assert imp == "Parameter importances for val/offline/top1_reward"


def test_load_study_stores_the_metric_name(tmp_path):
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    load_study("s", storage, ["maximize"], {"objective": "val/downstream_acc"}, storage,
               metric_name="val/downstream_acc")
    again = optuna.load_study(study_name="s", storage=storage)  # what optuna-dashboard reads
    assert again.metric_names == ["val/downstream_acc"]
