"""``python -m leverplus.evaluate``: downstream VQA accuracy of trained checkpoints and the baselines (Hydra app).

What to evaluate (``evaluate.*``): checkpoint files or folders of per-epoch checkpoints, MLflow run ids (the
checkpoints they logged) and every arm of a finished sweep (``evaluate.parent_run_id``), next to the model-free
baselines of ``eval.baselines``, at every shot of ``eval.shot_nums``, on the first ``evaluate.num_queries`` queries
(by question id) of ``evaluate.split``. Prints the accuracies with n and 95% CIs and the paired difference of every
two methods; logs them to MLflow, to each evaluated run (checkpoint files get one new run).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import hydra
import mlflow
from mlflow.entities import Metric
from omegaconf import DictConfig

from leverplus.config.schema import EvaluateAppConfig
from leverplus.config.store import conf_dir, register_configs
from leverplus.config.validation import validate_config
from leverplus.data.formats.io import atomic_open, atomic_write_text
from leverplus.datagen.scorers.vqa_files import query_set
from leverplus.errors import LeverPlusInputError, printed_input_errors
from leverplus.evaluation.answer_cache import CachedScorer
from leverplus.evaluation.head_to_head import HeadToHead, format_accuracy_table, format_pairs_table, head_to_head
from leverplus.model.build import load_model
from leverplus.pipeline import answering_scorer, load_data
from leverplus.tracking.run import MlflowRun
from leverplus.tracking.store import get_or_create_experiment, resolve_artifact_root, resolve_tracking_uri, with_retries
from leverplus.utils import enum_value, resolve_device, seed_everything

register_configs()

#: the splits ``evaluate.split`` may name
SPLITS = ("val", "test", "train")


@dataclass
class Target:
    """One checkpoint to evaluate: its label in the tables, its file, and the MLflow run it belongs to (if any)."""

    label: str
    path: Path
    run_id: Optional[str] = None


def _epoch_order(p: Path) -> tuple:
    """Checkpoints in training order: phase, then epoch number (``rce_epoch10`` after ``rce_epoch9``), best last."""
    m = re.match(r"(.*?)(\d+)$", p.stem)
    return (p.stem == "best", m.group(1) if m else p.stem, int(m.group(2)) if m else -1)


def _checkpoint_files(path: Path, field: str) -> List[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.pt"), key=_epoch_order)
        if files:
            return files
    raise LeverPlusInputError("no checkpoint file (or folder of *.pt checkpoints) here", file=str(path), field=field,
                              fix="pass a checkpoint file or a run's checkpoints/ folder")


def _run_checkpoints(client: Any, run_id: str, dest: Path) -> List[Path]:
    """The checkpoints an MLflow run logged (artifact folder ``checkpoints``), downloaded to ``dest``."""
    try:
        local = Path(with_retries(lambda: client.download_artifacts(run_id, "checkpoints", str(dest))))
    except Exception as e:  # MlflowException (no such run / artifact), OSError
        raise LeverPlusInputError(f"run {run_id} has no logged checkpoints ({type(e).__name__})",
                                  field="evaluate.run_ids",
                                  fix="pass a run trained with tracking.log_checkpoints=true, or its checkpoint "
                                      "files via evaluate.checkpoints") from None
    return _checkpoint_files(local, "evaluate.run_ids")


def collect_targets(cfg: Any, uri: Optional[str], dest: Path) -> List[Target]:
    """Every checkpoint ``evaluate.*`` names, labelled: file stem, or ``<run name>/<stem>`` for MLflow runs."""
    e = cfg.evaluate
    out: List[Target] = []
    for p in e.checkpoints:
        path = Path(str(p)).expanduser()
        files = _checkpoint_files(path, "evaluate.checkpoints")
        out += [Target(f.stem if len(files) == 1 and path.is_file() else f"{path.name}/{f.stem}", f) for f in files]
    run_ids = list(e.run_ids)
    client = mlflow.MlflowClient(tracking_uri=uri) if (run_ids or e.parent_run_id) else None
    if e.parent_run_id:
        kids = with_retries(lambda: client.search_runs(
            [with_retries(lambda: client.get_run(e.parent_run_id)).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{e.parent_run_id}' and attributes.status = 'FINISHED'"))
        if not kids:
            raise LeverPlusInputError(f"run {e.parent_run_id} has no FINISHED child runs",
                                      field="evaluate.parent_run_id", fix="pass the parent run id of a finished sweep")
        run_ids += [r.data.tags.get("reused_run_id") or r.info.run_id for r in kids]
    for rid in dict.fromkeys(run_ids):
        run = with_retries(lambda: client.get_run(rid))
        name = run.data.tags.get("mlflow.runName") or rid[:8]
        out += [Target(f"{name}/{f.stem}", f, rid) for f in _run_checkpoints(client, rid, dest / rid)]
    if not out:
        raise LeverPlusInputError("nothing to evaluate", field="evaluate.checkpoints",
                                  fix="pass evaluate.checkpoints=[...], evaluate.run_ids=[...] or "
                                      "evaluate.parent_run_id=ID (the baselines alone: evaluate.checkpoints=[] is "
                                      "not enough, name at least one checkpoint)")
    labels = [t.label for t in out]
    for t in out:  # equal labels (two folders with the same name) get their run id or a counter
        if labels.count(t.label) > 1:
            t.label = f"{t.label}@{t.run_id[:8] if t.run_id else labels.index(t.label)}"
    return out


def _query_set(cfg: Any, data: Any, split: str):
    n = cfg.evaluate.num_queries
    if split in data.eval_sets:
        qset = data.eval_sets[split]
        return qset.head(int(n)) if n else qset
    if split == "train" and data.scorer is not None and hasattr(data.scorer, "item"):
        return query_set(data.scorer, "train", data.embeddings, data.embeddings.shape[0], n)
    raise LeverPlusInputError(f"this data has no evaluation queries for split {split!r}", field="evaluate.split",
                              fix=f"choose one of {sorted(data.eval_sets) or ['(none: configure a scorer)']}")


def metric_dict(res: HeadToHead, split: str, methods: List[str], prefix: str = "evaluate") -> Dict[str, float]:
    """``evaluate/<split>/shot<k>/<method>_{acc,ci_lo,ci_hi,n}`` for ``methods``, and
    ``evaluate/<split>/shot<k>/<a>_minus_<b>_{delta,lo,hi,p}`` for every pair among them."""
    out: Dict[str, float] = {}
    for (m, s), x in res.summaries.items():
        if m in methods:
            out.update({f"{prefix}/{split}/shot{s}/{m}_{k}": v for k, v in x.items()})
    for (a, b, s), p in res.pairs.items():
        if a in methods and b in methods:
            out.update({f"{prefix}/{split}/shot{s}/{a}_minus_{b}_{k}": v
                        for k, v in (("delta", p.delta), ("lo", p.lo), ("hi", p.hi), ("p", p.p_value))})
    return out


def _log(cfg: Any, uri: str, data: Any, targets: List[Target], res: HeadToHead, split: str, report: str,
         counts: Dict[str, float], out_dir: Path) -> None:
    """Per evaluated run: its checkpoints' metrics (``selector`` = the run's checkpoint, or ``<stem>`` when the run
    logged several) with the baselines and their pairs, and the report as ``evaluate_<split>.md``. Checkpoint files
    without a run: one new run ``evaluate/<split>`` holding everything."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    baselines = list(cfg.eval.baselines)
    by_run: Dict[Optional[str], List[Target]] = {}
    for t in targets:
        by_run.setdefault(t.run_id, []).append(t)
    for rid, ts in by_run.items():
        methods = [t.label for t in ts] + baselines
        metrics = {k: v for k, v in metric_dict(res, split, methods).items()}
        metrics.update({f"evaluate/{split}/answer_cache/{k}": v for k, v in counts.items()})
        if rid is None:
            exp = get_or_create_experiment(cfg.tracking.experiment or f"leverplus-{data.source}", uri,
                                           resolve_artifact_root(cfg.tracking.artifact_root))
            with MlflowRun(uri=uri, experiment_id=exp, run_name=f"evaluate/{split}",
                           tags={"role": "evaluation", "data_fingerprint": data.fingerprint,
                                 "checkpoints": ",".join(str(t.path) for t in ts)[:5000]}) as run:
                run.log_metrics({_safe_key(k): v for k, v in metrics.items()}, step=0)
                run.log_text(report, f"evaluate_{split}.md")
            continue
        _log_into(client, rid, metrics)  # the finished run gets the metrics; its status stays as it is
        path = out_dir / rid / f"evaluate_{split}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, report)
        with_retries(lambda: client.log_artifact(rid, str(path)))


def _safe_key(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-/ ]", "_", key)


def _log_into(client: Any, run_id: str, metrics: Dict[str, float]) -> None:
    """Finite ``metrics`` logged at step 0 into an existing run (NaN CIs of a single query are left out)."""
    now = int(time.time() * 1000)
    batch = [Metric(_safe_key(k), float(v), now, 0) for k, v in metrics.items() if math.isfinite(float(v))]
    for i in range(0, len(batch), 500):
        with_retries(lambda: client.log_batch(run_id, metrics=batch[i : i + 500]))


def run(cfg: DictConfig) -> HeadToHead:
    """The whole evaluation; usable without Hydra's decorator (tests compose a config and call this)."""
    validate_config(cfg, EvaluateAppConfig)
    split = str(cfg.evaluate.split)
    if split not in SPLITS:
        raise LeverPlusInputError(f"unknown split {split!r}", field="evaluate.split",
                                  fix=f"evaluate.split={SPLITS[0]} (one of {', '.join(SPLITS)})")
    if cfg.evaluate.num_queries is not None and int(cfg.evaluate.num_queries) < 1:
        raise LeverPlusInputError(f"must be >= 1, got {cfg.evaluate.num_queries}", field="evaluate.num_queries",
                                  fix="evaluate.num_queries=null evaluates every query")
    seed_everything(int(cfg.seed))
    uri = resolve_tracking_uri(cfg.tracking.uri) if (cfg.tracking.enabled or cfg.evaluate.run_ids
                                                     or cfg.evaluate.parent_run_id) else None
    out_dir = Path(cfg.output_dir or tempfile.mkdtemp(prefix="leverplus-evaluate-")).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = collect_targets(cfg, uri, out_dir / "downloads")
    data = load_data(cfg)  # every input checked (model folder, images, annotations) before any answer is generated
    if data.scorer is None:
        raise LeverPlusInputError("this data has no scorer to answer the queries", field="data.files.scorer.model",
                                  fix="data.files.scorer.model=/path/to/model (see docs/usage.md)")
    d = int(data.embeddings.shape[1])
    device = resolve_device(str(cfg.device))  # the selectors decode there; checkpoints load onto any device
    selectors = {t.label: load_model(cfg.model, str(t.path), d).to(device).eval() for t in targets}
    qset = _query_set(cfg, data, split)
    scorer = answering_scorer(cfg, data)
    shots = sorted({int(s) for s in cfg.eval.shot_nums})
    res = head_to_head(scorer, qset, data.embeddings, shots, selectors, list(cfg.eval.baselines),
                       pool_mode=enum_value(cfg.eval.pool), seed=int(cfg.seed),
                       normalization=enum_value(cfg.eval.vqa_normalization), n_boot=int(cfg.eval.bootstrap_samples))
    counts = ({k: float(v) for k, v in scorer.stats().items() if k != "identity_hash"}
              if isinstance(scorer, CachedScorer) else {})
    report = "\n\n".join([format_accuracy_table(res, f"{split}: VQA accuracy (%) [95% CI], first {len(qset)} "
                                                     "queries by question id"),
                          format_pairs_table(res)])
    atomic_write_text(out_dir / f"evaluate_{split}.md", report)
    with atomic_open(out_dir / f"evaluate_{split}_per_query.jsonl", "w") as fh:
        for rows in res.rows.values():
            for r in rows:
                fh.write(json.dumps(r, default=float) + "\n")
    if cfg.evaluate.log and uri is not None:
        _log(cfg, uri, data, targets, res, split, report, counts, out_dir)
    print(report)
    if counts:
        print(f"\nanswers: {int(counts['generated'])} generated, {int(counts['cached'])} from the answer cache")
    print(f"\n(outputs: {out_dir})")
    return res


@hydra.main(config_path=str(conf_dir()), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with printed_input_errors():
        run(cfg)


if __name__ == "__main__":
    main()
