"""What an Optuna study's MLflow parent run shows at the end: the best params and value, the best trial's test
figures (reported afterwards, labelled; they never reach Optuna), the optimisation-history, slice, contour and
parameter-importance plots labelled with the objective's name, and how often the RCE phase was computed vs reused.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # files only, never a window (before pyplot is imported)
import matplotlib.pyplot as plt  # noqa: E402
import optuna.visualization.matplotlib as ovm  # noqa: E402
import yaml  # noqa: E402

from leverplus.analysis.plots import save_figure  # noqa: E402
from leverplus.data.formats.io import atomic_write_text  # noqa: E402
from leverplus.tracking.study import StudyTracker  # noqa: E402
from leverplus.tracking.trials import (  # noqa: E402
    COUNTED_STATES,
    INTERRUPTED_ATTR,
    OUTPUT_DIR_ATTR,
    RUN_ID_ATTR,
    _state,
    n_counted,
    n_failed,
)

# ---------------------------------------------------------------------------------------------- report


log = logging.getLogger(__name__)


@dataclass
class StudyReport:
    best_trial: Optional[int]
    best_value: Optional[float]
    best_params: Dict[str, Any]
    best_test: Dict[str, float]  # the best trial's test figures (never used for selection)
    counts: Dict[str, int]
    files: List[Path]


def best_trial_test_metrics(trial: Any, test_prefix: str = "test/") -> Dict[str, float]:
    """The test figures of a trial, read from its ``metrics.json`` (written by every run)."""
    out_dir = trial.user_attrs.get(OUTPUT_DIR_ATTR)
    path = Path(out_dir) / "metrics.json" if out_dir else None
    if path is None or not path.exists():
        return {}
    metrics = json.loads(path.read_text())["metrics"]
    return {k: float(v) for k, v in metrics.items() if k.startswith(test_prefix)}


#: fewer completed trials than this: the parameter-importance plot says its ranking is only indicative
MIN_TRIALS_FOR_IMPORTANCE = 10
#: when nothing names the objective (a study created without metric names and no ``objective`` given)
DEFAULT_OBJECTIVE_NAME = "objective value"


def objective_name(study: Any, objective: Optional[str] = None) -> str:
    """The name the plots give the objective: ``objective``, else the study's metric name, else a generic one."""
    if objective:
        return str(objective)
    names = getattr(study, "metric_names", None)
    return str(names[0]) if names and names[0] else DEFAULT_OBJECTIVE_NAME


def _figure_of(axes: Any):
    return axes.figure if hasattr(axes, "figure") else axes.flat[0].figure


def study_figures(study: Any, objective: Optional[str] = None) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """The study's plots as figures, each labelled with the objective's name: optimization history, contour (a
    2-D search space gives one panel, more give one per pair), slice, and parameter importances (titled as only
    indicative under ``MIN_TRIALS_FOR_IMPORTANCE`` completed trials). Returns ({name: figure}, {name_error: why})."""
    name = objective_name(study, objective)
    n_complete = sum(_state(t) == "COMPLETE" for t in study.get_trials(deepcopy=False))
    n_params = len({p for t in study.get_trials(deepcopy=False) if _state(t) == "COMPLETE" for p in t.params})
    caveat = (f" (only {n_complete} trials: indicative, not a ranking)"
              if n_complete < MIN_TRIALS_FOR_IMPORTANCE else "")
    plans = [("optimization_history", ovm.plot_optimization_history, f"Optimization history: {name}", (8, 5)),
             ("slice", ovm.plot_slice, f"Slice plot: {name} against each parameter", (4 + 3.5 * n_params, 4.5))]
    if n_params >= 2:
        side = 6 if n_params == 2 else 3 * n_params
        plans.append(("contour", ovm.plot_contour, f"Contour of {name}", (side + 1.5, side)))
    plans.append(("param_importances", ovm.plot_param_importances,
                  f"Parameter importances for {name}{caveat}", (8, 5)))
    figures, errors = {}, {}
    for key, fn, title, size in plans:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = fn(study, target_name=name)
                fig = _figure_of(axes)
                fig.set_size_inches(*size)
                if hasattr(axes, "set_title"):
                    axes.set_title("", loc="left")  # optuna's own title of some plots sits there
                    axes.set_title(title, fontsize=10)
                else:
                    fig.suptitle(title, fontsize=10)
                if key not in ("slice", "contour"):  # optuna places their colour bars: a re-layout overlaps them
                    fig.tight_layout()
            figures[key] = fig
        except Exception as e:  # e.g. importances need >= 2 completed trials
            errors[f"{key}_error"] = f"{type(e).__name__}: {e}"
    return figures, errors


def _plots(study: Any, out_dir: Path, objective: Optional[str] = None) -> Tuple[List[Path], Dict[str, str]]:
    figures, errors = study_figures(study, objective)
    files = []
    for key, fig in figures.items():
        path = out_dir / f"{key}.png"
        save_figure(fig, path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files, errors


def report_study(study: Any, out_dir: Path, *, n_trials: int, counted_states: Sequence[str] = COUNTED_STATES,
                 tracker: Optional[StudyTracker] = None, test_prefix: str = "test/",
                 objective: Optional[str] = None) -> StudyReport:
    """Best params/value, plots and the best trial's test figures: to ``out_dir`` and to the MLflow parent.
    ``objective`` names the objective on the plots (default: the study's metric name, see :func:`objective_name`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    counts = _counts(trials, counted_states, n_trials)
    complete = [t for t in trials if _state(t) == "COMPLETE"]
    best = study.best_trial if complete else None
    best_test = best_trial_test_metrics(best, test_prefix) if best is not None else {}
    files = _write_tables(study, out_dir, best, best_test, counts)
    plot_files, plot_errors = (_plots(study, out_dir, objective) if complete
                               else ([], {"plots_error": "no COMPLETE trial"}))
    files += plot_files
    if best is not None:
        _log_best(study.study_name, best, best_test)
    if tracker is not None:
        step = max((t.number for t in trials), default=0)  # the per-trial series on the parent use the trial number
        tracker.log_metrics({**_parent_metrics(counts, best, best_test, test_prefix), **tracker.rce_reuse()},
                            step=step)
        tracker.set_tags(_parent_tags(plot_errors, best, best_test, test_prefix))
        for f in files:
            tracker.log_artifact(f)
    return StudyReport(best.number if best else None, best.value if best else None,
                       dict(best.params) if best else {}, best_test, counts, files)


def _counts(trials: Sequence[Any], counted_states: Sequence[str], n_trials: int) -> Dict[str, int]:
    """How many trials count towards ``n_trials``, completed, failed and were interrupted."""
    return {
        "trials_counted": n_counted(trials, counted_states),
        "trials_complete": sum(_state(t) == "COMPLETE" for t in trials),
        "trials_failed": n_failed(trials),
        "trials_interrupted": sum(bool(t.user_attrs.get(INTERRUPTED_ATTR)) for t in trials),
        "n_trials": int(n_trials),
    }


def _write_tables(study: Any, out_dir: Path, best: Any, best_test: Dict[str, float],
                  counts: Dict[str, int]) -> List[Path]:
    """optimization_results.yaml (best trial, params, value, its test figures, counts) and trials.csv."""
    results = {
        "name": "optuna",
        "study_name": study.study_name,
        "best_trial": best.number if best else None,
        "best_params": dict(best.params) if best else {},
        "best_value": best.value if best else None,
        "best_trial_test_metrics_not_used_for_selection": best_test,
        **counts,
    }
    results_path = out_dir / "optimization_results.yaml"
    atomic_write_text(results_path, yaml.safe_dump(results, sort_keys=False))
    trials_path = out_dir / "trials.csv"
    study.trials_dataframe().to_csv(trials_path, index=False)
    return [results_path, trials_path]


def _log_best(study_name: str, best: Any, best_test: Dict[str, float]) -> None:
    log.info(f"[{study_name}] best trial {best.number}: value {best.value} params {best.params}")
    if best_test:
        accs = {k: round(v, 4) for k, v in best_test.items() if k.endswith("_acc")}
        log.info(f"[{study_name}] best trial's test figures (not used for selection): {accs}")


def _parent_metrics(counts: Dict[str, int], best: Any, best_test: Dict[str, float],
                    test_prefix: str) -> Dict[str, float]:
    """The parent run's metrics: the counts, and the best value, numeric params and test figures when there is one."""
    metrics: Dict[str, float] = {k: float(v) for k, v in counts.items()}
    if best is not None:
        metrics["best_value"] = float(best.value)
        metrics.update({f"best_params/{k}": float(v) for k, v in best.params.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
        metrics.update({f"best_trial_test/{k[len(test_prefix):]}": v for k, v in best_test.items()})
    return metrics


def _parent_tags(plot_errors: Dict[str, str], best: Any, best_test: Dict[str, float],
                 test_prefix: str) -> Dict[str, Any]:
    """The parent run's tags: plot errors, and the best trial, its params and run id when there is one."""
    tags: Dict[str, Any] = dict(plot_errors)
    if best is not None:
        tags.update({"best_trial": best.number, "best_params": json.dumps(best.params, sort_keys=True),
                     "best_trial_run_id": best.user_attrs.get(RUN_ID_ATTR)})
        if not best_test:
            tags["best_trial_test"] = (f"not evaluated: add {test_prefix.rstrip('/')} to "
                                       "eval.downstream_splits")
    return tags
