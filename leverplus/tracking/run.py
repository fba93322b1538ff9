"""One MLflow run's lifecycle: params, metrics, tags, artifacts and status, plus finding a FINISHED run by its
run key and recording a reused one.
"""

from __future__ import annotations

import getpass
import json
import signal
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER

from leverplus.tracking.lifecycle import process_tags
from leverplus.tracking.store import with_retries
from leverplus.utils import code_version, git_info


def flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def find_finished_run(uri: str, experiment_id: str, key: str) -> Optional[str]:
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = with_retries(
        lambda: client.search_runs(
            [experiment_id], filter_string=f"tags.run_key = '{key}' and attributes.status = 'FINISHED'", max_results=1
        )
    )
    return runs[0].info.run_id if runs else None


def _param_batches(params: Mapping[str, Any]) -> List[List[Param]]:
    """Params in batches of 100 (MLflow's limit), values cut to 6000 characters."""
    items = [Param(_clean(k), str(v)[:6000]) for k, v in params.items()]
    return [items[i : i + 100] for i in range(0, len(items), 100)]


def _log_params(client, run_id: str, params: Mapping[str, Any]) -> None:
    for batch in _param_batches(params):
        with_retries(partial(client.log_batch, run_id, params=batch))


def record_reused_run(uri: str, experiment_id: str, done_run_id: str, *, tags: Mapping[str, Any],
                      params: Mapping[str, Any], parent_run_id: Optional[str],
                      run_name: Optional[str]) -> Dict[str, float]:
    """A job whose run key already has a FINISHED run is not trained again. Inside a sweep it still becomes a child
    of this invocation's parent run, as a FINISHED run tagged ``reused_run_id`` (the run that trained; pointers are
    followed) with that run's final metrics, so the parent lists every job and ``leverplus.compare`` sees a resumed
    sweep whole. Returns the final metrics plus ``_source_run_id``."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    src = with_retries(lambda: client.get_run(done_run_id))
    source_id = src.data.tags.get("reused_run_id") or done_run_id
    if source_id != done_run_id:
        src = with_retries(lambda: client.get_run(source_id))
    metrics = final_view(src.data.metrics)
    if parent_run_id:
        all_tags = {k: str(v) for k, v in tags.items() if v is not None}
        all_tags.update({"reused_run_id": source_id, "mlflow.parentRunId": parent_run_id})
        name = run_name or f"{tags.get('arm') or 'run'} (reused)"
        run = with_retries(lambda: client.create_run(experiment_id, run_name=name, tags=all_tags))
        rid = run.info.run_id
        now = int(time.time() * 1000)
        _log_params(client, rid, params)
        ms = [Metric(k, float(v), now, 0) for k, v in src.data.metrics.items()]
        for i in range(0, len(ms), 1000):
            with_retries(partial(client.log_batch, rid, metrics=ms[i : i + 1000]))
        if src.inputs and src.inputs.dataset_inputs:  # the Dataset column, as for the run that trained
            with_retries(partial(client.log_inputs, rid, datasets=list(src.inputs.dataset_inputs)))
        with_retries(lambda: client.set_terminated(rid, "FINISHED"))
    metrics["_source_run_id"] = source_id
    return metrics


def run_creation_tags(tags: Mapping[str, Any], *, run_name: Optional[str], parent_run_id: Optional[str],
                      owner: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The tags a run is created with: ``tags`` (None values left out), its parent and name, and the process that
    owns it (``owner``, default this process: a later sweep closes the run KILLED once that process is gone)."""
    all_tags = {k: str(v) for k, v in tags.items() if v is not None}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if run_name:
        all_tags["mlflow.runName"] = run_name
    all_tags.update(owner or process_tags())
    return all_tags


class MlflowRun:
    """One MLflow run; also a MetricLogger. Use as a context manager: an exception marks the run FAILED with the
    traceback attached, Ctrl-C or SIGTERM marks it KILLED.

    Every store call goes through :meth:`_call` (synchronous, with retries) or, for the per-epoch metrics,
    :meth:`_call_later` (a background thread of this run, so training does not wait on a sqlite commit; ``flush``
    confirms them); ``leverplus.tracking.remote.RemoteRun`` sends the same calls to another process instead."""

    def __init__(
        self,
        *,
        uri: str,
        experiment_id: str,
        run_name: Optional[str],
        tags: Mapping[str, Any],
        parent_run_id: Optional[str] = None,
    ) -> None:
        self.uri = uri
        self.experiment_id = experiment_id
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        all_tags = run_creation_tags(tags, run_name=run_name, parent_run_id=parent_run_id)
        run = with_retries(lambda: self.client.create_run(experiment_id, tags=all_tags, run_name=run_name))
        self.run_id = run.info.run_id
        self.artifact_uri = run.info.artifact_uri
        self.series_keys: Set[str] = set()  # metric keys logged per epoch (see log_final_metrics)
        # one thread, so batches reach the store in order; MLflow's own asynchronous queue is not used: ending a run
        # waits on its polling thread for up to a second
        self._writer: Optional[ThreadPoolExecutor] = None
        self._pending: List[Future] = []  # background batches not yet confirmed

    def _call(self, method: str, *args: Any, **kwargs: Any) -> None:
        """``client.<method>(run_id, *args, **kwargs)``, retried while sqlite is locked."""
        with_retries(partial(getattr(self.client, method), self.run_id, *args, **kwargs))

    def _call_later(self, method: str, *args: Any, **kwargs: Any) -> None:
        """:meth:`_call` in this run's background thread; :meth:`flush` waits for it and raises what it raised."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="leverplus-mlflow-writer")
        self._pending.append(self._writer.submit(self._call, method, *args, **kwargs))

    # MetricLogger
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Per-epoch metrics, logged in the background (:meth:`_call_later`) so training does not wait on the
        store; :meth:`flush` confirms them."""
        ts = int(time.time() * 1000)
        batch = [Metric(_clean(k), float(v), ts, int(step)) for k, v in metrics.items() if _finite(v)]
        self.series_keys.update(m.key for m in batch)
        for i in range(0, len(batch), 500):
            self._call_later("log_batch", metrics=batch[i : i + 500])

    def flush(self) -> None:
        """Wait for the background metric batches (each already retried on "database is locked"); the first
        failure is raised."""
        pending, self._pending = self._pending, []
        for op in pending:
            op.result()

    def log_batch(self, *, metrics: Sequence[Metric] = (), tags: Sequence[RunTag] = ()) -> None:
        """Metrics and tags in as few store round trips as MLflow's limits allow (1000 metrics, 100 tags a call)."""
        metrics, tags = list(metrics), list(tags)
        while metrics or tags:
            m, metrics = metrics[:900], metrics[900:]
            t, tags = tags[:100], tags[100:]
            self._call("log_batch", metrics=m, tags=t)

    def log_params(self, params: Mapping[str, Any]) -> None:
        for batch in _param_batches(params):
            self._call("log_batch", params=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._call("log_batch", tags=[RunTag(k, str(v)) for k, v in tags.items() if v is not None])

    def log_inputs(self, datasets: Sequence[DatasetInput]) -> None:
        self._call("log_inputs", datasets=list(datasets))

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self._call("log_artifact", str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self._call("log_text", text, name)

    def finish(self, status: str = "FINISHED") -> None:
        try:
            self.flush()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None
        self._call("set_terminated", status)

    def __enter__(self) -> "MlflowRun":
        self._previous_sigterm = None
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            self._end(exc_type, exc, tb)
        finally:
            if self._previous_sigterm is not None:
                signal.signal(signal.SIGTERM, self._previous_sigterm)
        if exc_type is not None and issubclass(exc_type, Terminated):
            signal.raise_signal(signal.SIGTERM)  # now that the run is KILLED: what SIGTERM would have done
        return False

    def _end(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            why = "terminated (SIGTERM)" if issubclass(exc_type, Terminated) else "interrupted (Ctrl-C)"
            self.set_tags({"error": why})
            self.finish("KILLED")
        else:
            text = "".join(traceback.format_exception(exc_type, exc, tb))
            try:
                self.set_tags({"error": f"{exc_type.__name__}: {exc}"[:5000]})
                self.log_text(text, "traceback.txt")
            finally:
                self.finish("FAILED")


class Terminated(KeyboardInterrupt):
    """SIGTERM during a tracked run (what Slurm and submitit send at a time limit or preemption): raised in the main
    thread so the run ends KILLED, like Ctrl-C, instead of staying RUNNING forever."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"signal {signum}")


def _clean(name: str) -> str:
    # MLflow allows alphanumerics, _ - . space : / ; keep others out
    return "".join(ch if ch.isalnum() or ch in "_-. :/" else "_" for ch in name)


def _finite(v: Any) -> bool:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return f == f and f not in (float("inf"), float("-inf"))


#: ``mlflow.source.name`` of every run: the command that produced it
SOURCE_NAME = "python -m leverplus.train"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name (some containers)
        return "unknown"


def run_name(*, arm: Optional[str], shot_nums, seed: int, data_source: str) -> str:
    """A run's name in MLflow, saying what it is: ``<arm>/shot<k>/seed<s>`` in a sweep, ``train/<data>/shot<k>/seed<s>``
    for a single run (MLflow's random names repeat across jobs because every job reseeds Python's ``random``)."""
    shots = "+".join(str(s) for s in shot_nums)
    return f"{arm or 'train/' + data_source}/shot{shots}/seed{seed}"


def standard_tags(*, sweep: Optional[str], arm: Optional[str], role: str, shot_nums, seed: int,
                  data_fingerprint: str, key: str, data_source: str) -> Dict[str, Any]:
    g = git_info()
    return {
        # MLflow's own system tags, so the runs table's Source, User and Version columns are filled
        MLFLOW_SOURCE_NAME: SOURCE_NAME,
        MLFLOW_SOURCE_TYPE: "LOCAL",
        MLFLOW_USER: _user(),
        MLFLOW_GIT_COMMIT: g["commit"],
        "sweep": sweep,
        "arm": arm,
        "role": role,
        "shot_num": ",".join(str(s) for s in shot_nums),
        "seed": seed,
        "git_commit": g["commit"],
        "git_dirty": g["dirty"],
        "data_fingerprint": data_fingerprint,
        "run_key": key,
        "code_version": code_version(),
        "data_source": data_source,
    }



#: prefix of a metric's end-of-run value when the same name is also a per-epoch series (``val/offline/*``)
FINAL_PREFIX = "final/"


def final_view(metrics: Mapping[str, float]) -> Dict[str, float]:
    """A run's metrics as its end-of-run values under their own names: ``final/<name>`` read as ``<name>`` (runs
    logged before final values had their own keys have the plain name, whose latest value was the final one)."""
    out = dict(metrics)
    out.update({k[len(FINAL_PREFIX):]: v for k, v in metrics.items() if k.startswith(FINAL_PREFIX)})
    return out


def log_final_metrics(mrun: MlflowRun, metrics: Mapping[str, float], step: int,
                      tags: Mapping[str, Any] = {}) -> None:  # noqa: B006 (read only)
    """End-of-run metrics and tags in one batch. A metric whose name is also a per-epoch series of this run (the
    validation metrics, e.g. ``val/offline/top1_reward``, measured on the selected checkpoint at the end) goes to
    ``final/<name>``, so the series holds epochs only; every other metric (``objective``, ``test/*``,
    ``val/downstream_acc``, timings) is logged once under its own name."""
    mrun.flush()
    ts = int(time.time() * 1000)
    ms = [Metric(FINAL_PREFIX + k if k in mrun.series_keys else k, float(v), ts, int(step))
          for k, v in ((_clean(k), v) for k, v in metrics.items()) if _finite(v)]
    mrun.log_batch(metrics=ms, tags=[RunTag(k, str(v)) for k, v in tags.items() if v is not None])


def dataset_input(*, data_source: str, fingerprint: str, files: Sequence[Path], num_embeddings: int,
                  shot_nums: Sequence[int], context: str = "train") -> DatasetInput:
    """The data a run trained on as an MLflow dataset input (the runs table's Dataset column): named for the data
    source (``sim``, ``files``), the data fingerprint as digest, the input files as source."""
    paths = [str(Path(f).resolve()) for f in files]
    roots = sorted({str(Path(p).parent) for p in paths})
    source = {"uri": Path(roots[0]).as_uri() if len(roots) == 1 else "", "data_source": data_source, "files": paths}
    profile = {"num_embeddings": int(num_embeddings), "shot_nums": [int(s) for s in shot_nums], "files": len(paths)}
    ds = Dataset(name=data_source, digest=fingerprint, source_type="local", source=json.dumps(source),
                 profile=json.dumps(profile))
    return DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])


def log_dataset_input(mrun: MlflowRun, dataset: DatasetInput) -> None:
    mrun.log_inputs([dataset])
