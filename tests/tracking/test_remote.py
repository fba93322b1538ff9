"""A run kept by the tracking worker process (``leverplus.tracking.remote``) stores exactly what an in-process
``MlflowRun`` stores, ends FAILED/KILLED the same way, and reports a corrupt store or a dead worker as errors in the
training process. Real worker processes on real sqlite stores in a temp dir."""

import os
import signal

import mlflow
import pytest
from mlflow.entities import Metric

from leverplus.errors import LeverPlusInputError
from leverplus.tracking.lifecycle import PID_TAG
from leverplus.tracking.remote import RemoteRun, TrackingWorker
from leverplus.tracking.run import MlflowRun, log_final_metrics
from leverplus.tracking.store import get_or_create_experiment


def _log_a_run(run, tmp_path):
    run.log_params({"grpo.lr": 1e-4, "seed": 3})
    run.log_metrics({"rce/loss": 2.0, "val/offline/top1_reward": 0.25, "bad": float("nan")}, step=1)
    run.log_metrics({"rce/loss": 1.5, "val/offline/top1_reward": 0.5}, step=2)
    log_final_metrics(run, {"val/offline/top1_reward": 0.5, "objective": 0.75}, step=3, tags={"cache_hit_sft": True})
    (tmp_path / "metrics.json").write_text("{}")
    run.log_artifact(tmp_path / "metrics.json")
    run.log_text("| a |", "downstream_tables.md")


def _stored(uri, run_id):
    client = mlflow.MlflowClient(tracking_uri=uri)
    r = client.get_run(run_id)
    history = {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in r.data.metrics}
    return r, history, sorted(f.path for f in client.list_artifacts(run_id))


def test_a_remote_run_stores_what_an_in_process_run_stores(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    opened = []
    worker = TrackingWorker(uri)
    with RemoteRun(worker, uri=uri, experiment="e", artifact_root=None, run_name="remote", tags={"arm": "a"},
                   on_open=lambda exp, rid: opened.append((exp, rid))) as remote:
        _log_a_run(remote, tmp_path)
    assert worker.proc.poll() is not None  # finishing the run ended the worker
    exp = get_or_create_experiment("e", uri)
    with MlflowRun(uri=uri, experiment_id=exp, run_name="local", tags={"arm": "a"}) as local:
        _log_a_run(local, tmp_path)
    assert opened == [(exp, remote.run_id)] and remote.experiment_id == exp
    r, history, artifacts = _stored(uri, remote.run_id)
    lr, lhistory, lartifacts = _stored(uri, local.run_id)
    assert r.info.status == "FINISHED" and r.info.run_name == "remote"
    assert r.data.params == lr.data.params == {"grpo.lr": "0.0001", "seed": "3"}
    assert history == lhistory == {"rce/loss": [(1, 2.0), (2, 1.5)], "val/offline/top1_reward": [(1, 0.25), (2, 0.5)],
                                   "final/val/offline/top1_reward": [(3, 0.5)], "objective": [(3, 0.75)]}
    assert artifacts == lartifacts == ["downstream_tables.md", "metrics.json"]
    tags = {k: v for k, v in r.data.tags.items() if k != "mlflow.runName"}
    assert tags == {k: v for k, v in lr.data.tags.items() if k != "mlflow.runName"}
    assert tags[PID_TAG] == str(os.getpid())  # the training process owns the run, not the worker


def test_an_exception_ends_the_remote_run_failed_and_ctrl_c_killed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = {}
    for name, exc in (("failed", ValueError("boom")), ("killed", KeyboardInterrupt())):
        with pytest.raises(type(exc)):
            with RemoteRun(TrackingWorker(uri), uri=uri, experiment="e", artifact_root=None, run_name=name,
                           tags={}) as run:
                run.log_metrics({"loss": 1.0}, step=0)
                raise exc
        runs[name] = run.run_id
    failed, _, artifacts = _stored(uri, runs["failed"])
    assert failed.info.status == "FAILED" and failed.data.tags["error"] == "ValueError: boom"
    assert artifacts == ["traceback.txt"]
    killed, history, _ = _stored(uri, runs["killed"])
    assert killed.info.status == "KILLED" and killed.data.tags["error"] == "interrupted (Ctrl-C)"
    assert history == {"loss": [(0, 1.0)]}


def test_a_corrupt_store_is_raised_in_the_training_process_naming_the_file(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not an sqlite file" * 300)
    uri = f"sqlite:///{db}"
    worker = TrackingWorker(uri)
    with pytest.raises(LeverPlusInputError, match="is not a readable MLflow sqlite store") as e:
        with RemoteRun(worker, uri=uri, experiment="e", artifact_root=None, run_name="r", tags={}) as run:
            run.log_params({"a": 1})
            run.log_batch(metrics=[Metric("m", 1.0, 0, 0)])
            run.flush()  # an epoch's end or the run's end, at the latest
    assert str(db) in str(e.value) and "mv " in str(e.value)
    assert worker.proc.poll() is not None


def test_a_dead_worker_is_reported_not_waited_for(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    worker = TrackingWorker(uri)
    run = RemoteRun(worker, uri=uri, experiment="e", artifact_root=None, run_name="r", tags={})
    worker.proc.send_signal(signal.SIGKILL)
    with pytest.raises(RuntimeError, match="tracking worker process ended"):
        run.log_metrics({"loss": 1.0}, step=0)
        run.flush()
    worker.close()
