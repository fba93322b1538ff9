"""``python -m leverplus.train``: one training run (Hydra app); ``-m +sweep=NAME`` for sweeps.

Returns the objective (``objective=`` names a metric, validation data only) as a float, so Hydra sweepers
(BasicSweeper, Optuna) can use it. Logs one MLflow run per training run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import hydra
import mlflow
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from leverplus.analysis.plots import training_curves
from leverplus.config.identity import run_key, to_container
from leverplus.config.store import conf_dir, register_configs
from leverplus.config.validation import validate_config
from leverplus.data.formats.io import atomic_open, atomic_write_json, atomic_write_text
from leverplus.data.loading import LoadedData, prepare_groups
from leverplus.env import PARENT_RUN_ID_VAR, SWEEP_ARM_KEYS_VAR, SWEEP_BASELINE_ARM_VAR, SWEEP_VAR
from leverplus.errors import LeverPlusInputError, printed_input_errors
from leverplus.pipeline import RunOutcome, load_data, resolve_objective, train_and_evaluate
from leverplus.sweeps.plain import arm_label
from leverplus.sweeps.progress import job_line, job_position
from leverplus.tracking.claims import HEARTBEAT_TAG, Heartbeat, claim_or_wait
from leverplus.tracking.lifecycle import run_url
from leverplus.tracking.pruning import trial_reporter
from leverplus.tracking.remote import RemoteRun, TrackingWorker
from leverplus.tracking.run import MlflowRun, find_finished_run, flatten, record_reused_run, run_name, standard_tags
from leverplus.tracking.run import dataset_input, log_dataset_input, log_final_metrics
from leverplus.tracking.store import get_or_create_experiment, resolve_artifact_root, resolve_tracking_uri
from leverplus.tracking.store import prefetch_store
from leverplus.utils import enum_value

register_configs()

log = logging.getLogger("leverplus.train")  # not __main__ under python -m

# Hydra 1.4 warns on every instantiate() of a config target when no execution whitelist is active; the sweep
# callback registered in conf/train.yaml is leverplus's own code, so that warning is silenced for leverplus targets
# only (other targets still warn)
warnings.filterwarnings("ignore", message=r"hydra\.utils\.instantiate\(\) resolved _target_='leverplus\.",
                        category=UserWarning)

#: offline metrics (``val/offline/<name>``) in the printed summary, besides the objective and downstream accuracies
SUMMARY_OFFLINE = ("top1_acc", "oracle_acc", "mean_acc", "top1_reward")
#: headline metrics in the printed summary
SUMMARY_HEADLINES = ("val/downstream_acc", "test/downstream_acc")


def _output_dir(cfg) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir).expanduser().resolve()
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # no Hydra run (a test calling run() on a composed config)
        return Path(tempfile.mkdtemp(prefix="leverplus-"))


def objective_value(metrics: Dict[str, float], name: str) -> float:
    if name not in metrics:
        raise LeverPlusInputError(
            f"objective metric {name!r} was not produced by this run",
            field="objective",
            fix=f"choose one of: {', '.join(sorted(metrics))}",
        )
    return float(metrics[name])


def _in_summary(key: str) -> bool:
    return ((key.startswith("val/offline/") and key.split("/")[-1] in SUMMARY_OFFLINE)
            or (key.endswith("_acc") and "/downstream/" in key) or key in SUMMARY_HEADLINES)


def summary_lines(metrics: Dict[str, float], objective: str) -> str:
    """A markdown table: the objective first, then the summary metrics in name order (those the run produced)."""
    keys = dict.fromkeys([objective] + sorted(k for k in metrics if _in_summary(k)))
    rows = [f"| {k}{' (objective)' if k == objective else ''} | {metrics[k]:.4f} |" for k in keys if k in metrics]
    return "\n".join(["| metric | value |", "|---|---|"] + rows)


def _execute(cfg: DictConfig, data: LoadedData, out_dir: Path, logger: Any = None) -> Tuple[RunOutcome, float]:
    outcome = train_and_evaluate(cfg, data, out_dir, logger=trial_reporter(cfg, logger))
    return outcome, objective_value(outcome.metrics, cfg.objective)


def run(cfg: DictConfig) -> float:
    """The whole run; usable without Hydra's decorator (tests compose a config and call this)."""
    validate_config(cfg)
    out_dir = _output_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    worker = None
    if cfg.tracking.enabled:  # MLflow's store opens while the data loads
        uri = resolve_tracking_uri(cfg.tracking.uri)
        worker = _tracking_worker(cfg, uri)
        if worker is None:
            prefetch_store(uri)
    try:
        data = load_data(cfg)  # validates every input before anything is trained or tracked
        prepare_groups(cfg, data, with_sft=False)  # reward fields and reward contrast, before a run is opened
        objective_source = resolve_objective(cfg, data)  # the offline proxy when the data has no scorer
        cfg.tracking.extra_tags = {**(cfg.tracking.extra_tags or {}), "objective_source": objective_source}
        if cfg.tracking.enabled:
            return _tracked_run(cfg, data, out_dir, worker)
    finally:
        if worker is not None:  # already closed when the run ended; else (bad input) no run was opened
            worker.close()
    outcome, value = _execute(cfg, data, out_dir)
    _write_artifacts(cfg, outcome, value, out_dir)
    _report(cfg, outcome, value, run_id=None)
    return value


def _tracking_worker(cfg: DictConfig, uri: str) -> Optional[TrackingWorker]:
    """A tracking worker process for a single run on a sqlite store (``leverplus.tracking.remote``), started before
    the data loads; None: the run is tracked in this process (a tracking server, reached over HTTP without the SQL
    store; a sweep's jobs, which share this process's open store and claim their run keys)."""
    t = cfg.tracking
    if not t.worker_process or not uri.startswith("sqlite:") or t.skip_finished or job_position() is not None:
        return None
    return TrackingWorker(uri)


def _sweep_identity(cfg: DictConfig) -> Tuple[Optional[str], Optional[str], str]:
    """(sweep, arm, role) of the run: from ``tracking``, or for a job of a plain multirun (no ``tracking.sweep``)
    from the sweep callback's name, the job's swept overrides and the baseline arm (``leverplus.sweeps.plain``)."""
    t = cfg.tracking
    keys = os.environ.get(SWEEP_ARM_KEYS_VAR)
    if t.arm is not None or keys is None or job_position() is None:
        return t.sweep, t.arm, t.role
    arm = arm_label(list(HydraConfig.get().overrides.task), json.loads(keys))
    role = "baseline" if arm == os.environ.get(SWEEP_BASELINE_ARM_VAR) else "arm"
    return t.sweep or os.environ.get(SWEEP_VAR), arm, role


def _run_tags(cfg: DictConfig, data: LoadedData, key: str) -> Dict[str, Any]:
    t = cfg.tracking
    sweep, arm, role = _sweep_identity(cfg)
    tags = standard_tags(sweep=sweep, arm=arm, role=role, shot_nums=list(cfg.data.shot_nums),
                         seed=int(cfg.seed), data_fingerprint=data.fingerprint, key=key, data_source=data.source)
    tags.update(t.extra_tags or {})
    return tags


def _tracked_run(cfg: DictConfig, data: LoadedData, out_dir: Path, worker: Optional[TrackingWorker] = None) -> float:
    """The run as one MLflow run (kept by ``worker`` when given); with ``tracking.skip_finished``, a run key that
    already has a FINISHED run is recorded as reused instead of trained again."""
    t = cfg.tracking
    resolved = to_container(cfg)
    key = run_key(resolved, data.fingerprint)
    uri = resolve_tracking_uri(t.uri)
    experiment, artifact_root = t.experiment or f"leverplus-{data.source}", resolve_artifact_root(t.artifact_root)
    tags = _run_tags(cfg, data, key)
    name = t.run_name or run_name(arm=tags["arm"], shot_nums=list(cfg.data.shot_nums), seed=int(cfg.seed),
                                  data_source=data.source)
    parent = t.parent_run_id or os.environ.get(PARENT_RUN_ID_VAR)

    def announce(exp_id: str, run_id: str) -> None:
        log.info(f"MLflow run {run_id} ({name}): {run_url(uri, exp_id, run_id)}")

    if worker is not None:  # a single run: nothing here waits on the store until the run ends
        mrun = RemoteRun(worker, uri=uri, experiment=experiment, artifact_root=artifact_root, run_name=name,
                         tags={**tags, HEARTBEAT_TAG: f"{time.time():.3f}"}, parent_run_id=parent, on_open=announce)
        return _train_tracked(cfg, data, out_dir, mrun, resolved, tags, contextlib.nullcontext())
    exp_id = get_or_create_experiment(experiment, uri, artifact_root)
    done = find_finished_run(uri, exp_id, key) if t.skip_finished else None
    if done is not None:
        metrics = record_reused_run(uri, exp_id, done, tags=tags, params=flatten(resolved), parent_run_id=parent,
                                    run_name=name)
        source = metrics.pop("_source_run_id")
        log.info(f"run key {key} already FINISHED as MLflow run {source}: skipped.")
        value = objective_value(metrics, cfg.objective)
        _log_job_line(cfg, tags, value, source)
        return value

    def open_run() -> MlflowRun:
        return MlflowRun(uri=uri, experiment_id=exp_id, run_name=name,
                         tags={**tags, HEARTBEAT_TAG: f"{time.time():.3f}"}, parent_run_id=parent)

    if not t.skip_finished:
        mrun = open_run()
    else:  # a sweep: claim the key, so concurrent invocations on this store train the arm once
        mrun, done = claim_or_wait(open_run, mlflow.MlflowClient(tracking_uri=uri), exp_id, key, t.claim_grace_s,
                                   t.claim_poll_s)
        if done is not None:
            metrics = record_reused_run(uri, exp_id, done, tags=tags, params=flatten(resolved), parent_run_id=parent,
                                        run_name=name)
            source = metrics.pop("_source_run_id")
            log.info(f"run key {key} was trained by MLflow run {source} (another invocation): reused.")
            value = objective_value(metrics, cfg.objective)
            _log_job_line(cfg, tags, value, source)
            return value
    announce(exp_id, mrun.run_id)
    beats = Heartbeat(uri, mrun.run_id, t.claim_heartbeat_s) if t.skip_finished else contextlib.nullcontext()
    return _train_tracked(cfg, data, out_dir, mrun, resolved, tags, beats)


def _train_tracked(cfg: DictConfig, data: LoadedData, out_dir: Path, mrun: MlflowRun, resolved: Dict[str, Any],
                   tags: Dict[str, Any], beats: Any) -> float:
    with mrun, beats:
        mrun.log_params(flatten(resolved))
        log_dataset_input(mrun, _dataset(cfg, data))
        outcome, value = _execute(cfg, data, out_dir, logger=mrun)
        _log_outcome(mrun, cfg, outcome, value, out_dir)
    _report(cfg, outcome, value, run_id=mrun.run_id, tags=tags)
    log.info(f"MLflow run {mrun.run_id} FINISHED: {run_url(mrun.uri, mrun.experiment_id, mrun.run_id)}")
    return value


def _log_outcome(mrun: MlflowRun, cfg: DictConfig, outcome: RunOutcome, value: float, out_dir: Path) -> None:
    """Final metrics (at the step after the last epoch), cache and size tags, and the run's files."""
    final_step = max([s for s, _, _ in outcome.history], default=-1) + 1
    log_final_metrics(mrun, {**outcome.metrics, "objective": value}, final_step,
                      tags={**{f"cache_hit_{k}": v for k, v in outcome.cache_hits.items()},
                            "trainable_params": outcome.result.param_counts.get("trainable"),
                            "total_params": outcome.result.param_counts.get("total")})
    _write_artifacts(cfg, outcome, value, out_dir)
    names = ["config.yaml", "metrics.json", "per_query.jsonl"] + (["training_curves.png"] if cfg.plot_curves else [])
    for name in names:
        mrun.log_artifact(out_dir / name)
    if cfg.tracking.log_checkpoints and outcome.result.best_checkpoint is not None:
        mrun.log_artifact(outcome.result.best_checkpoint, "checkpoints")
    if outcome.summary_table:
        mrun.log_text(outcome.summary_table, "downstream_tables.md")


def _dataset(cfg: DictConfig, data: LoadedData):
    return dataset_input(data_source=data.source, fingerprint=data.fingerprint, files=data.files,
                         num_embeddings=int(data.embeddings.shape[0]), shot_nums=list(cfg.data.shot_nums))


def _write_artifacts(cfg, outcome, value: float, out_dir: Path) -> None:
    atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    stats = {str(s): {"queries_in": st.queries_in, "queries_kept": st.queries_kept, "candidates_in": st.candidates_in,
                      "candidates_kept": st.candidates_kept, "dropped": st.dropped}
             for s, st in outcome.filter_stats.items()}
    atomic_write_json(out_dir / "metrics.json", {"objective": cfg.objective, "objective_value": value,
                                                  "metrics": outcome.metrics, "best": outcome.result.best,
                                                  "filter_stats": stats, "cache_hits": outcome.cache_hits}, indent=2)
    with atomic_open(out_dir / "per_query.jsonl", "w") as fh:
        for row in outcome.per_query:
            fh.write(json.dumps(row, default=float) + "\n")
    if cfg.plot_curves:
        training_curves(outcome.history, out_dir / "training_curves.png")


def _log_job_line(cfg: DictConfig, tags: Dict[str, Any], value: float, run_id: Optional[str]) -> None:
    """In a multirun: the job's ``[k/N] arm shot seed objective run_id elapsed ETA`` line."""
    pos = job_position()
    if pos is not None:
        log.info(job_line(pos[0], pos[1], arm=str(tags.get("arm") or "-"), shot=str(tags.get("shot_num")),
                          seed=int(cfg.seed), objective=cfg.objective, value=value, run_id=run_id))


def _report(cfg: DictConfig, outcome: RunOutcome, value: float, run_id: Optional[str],
            tags: Optional[Dict[str, Any]] = None) -> None:
    """The end of a run on the console and in ``train.log``: the full table for a single run (``summary``: auto), or
    on request; a multirun job's one line; the objective and where the outputs are."""
    mode, single = str(enum_value(cfg.summary)), job_position() is None
    if mode == "always" or (mode == "auto" and single):
        tables = "\n\n".join(x for x in (summary_lines(outcome.metrics, cfg.objective), outcome.summary_table) if x)
        log.info("\n" + tables)
    if single or mode == "always":
        log.info(f"objective {cfg.objective} = {value:.4f}   (outputs: {outcome.output_dir})")
    if tags is None:
        _, arm, _ = _sweep_identity(cfg)
        tags = {"arm": arm, "shot_num": ",".join(str(s) for s in cfg.data.shot_nums)}
    _log_job_line(cfg, tags, value, run_id)


@hydra.main(config_path=str(conf_dir()), config_name="train")
def main(cfg: DictConfig) -> Optional[float]:
    with printed_input_errors():
        return run(cfg)


if __name__ == "__main__":
    main()
