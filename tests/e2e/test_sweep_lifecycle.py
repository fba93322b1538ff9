"""A sweep's life in MLflow, with REAL Hydra multiruns (subprocesses) against REAL sqlite stores: a plain multirun
gets its parent run and comparison, SIGTERM of the launcher ends the parent KILLED with what finished compared, runs
a SIGKILLed invocation left RUNNING are closed KILLED when the sweep starts again, two sweeps started together on a
fresh store both get their parent and comparison, a corrupt store stops the sweep with one message, and a parent run
the store refuses stops it before any job.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import ViewType

from leverplus.sweeps.plain import arm_label, plain_sweep, plain_sweep_name
from leverplus.tracking.lifecycle import DEAD_RUN_REASON, HOST_TAG, PID_TAG, close_dead_sweep_runs
from leverplus.tracking.run import MlflowRun
from leverplus.tracking.store import get_or_create_experiment
from paths import store_built

TINY = ["data=sim_tiny", "sft.epochs=1", "model.hidden_dim=16", "grpo.epochs=0", "eval.downstream_splits=[val,test]",
        "checkpoint_every_epoch=false", "plot_curves=false"]


def _env(work: Path, cache: Path) -> dict:
    env = {**os.environ, "LEVERPLUS_CACHE": str(cache), "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}
    for var in ("LEVERPLUS_PARENT_RUN_ID", "LEVERPLUS_SWEEP", "LEVERPLUS_SWEEP_ARM_KEYS", "LEVERPLUS_LAUNCH_DIR"):
        env.pop(var, None)
    return env


def _start(work: Path, cache: Path, *args, name: str = "m") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "leverplus.train", "-m", *TINY, *args,
                             f"hydra.sweep.dir=multirun/{name}"], cwd=work, env=_env(work, cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _runs(work: Path, filt: str = ""):
    """The store's runs, read like `mlflow ui` would once the sweep has built the store (a reader that built it
    concurrently would race the sweep's migration: tests/tracking/test_store.py covers that)."""
    if not store_built(work / "mlflow.db"):
        return []
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db")
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, filter_string=filt, max_results=1000) if exps else []


def _wait_for(work: Path, ok, proc: subprocess.Popen, timeout: float = 400):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            runs = _runs(work)
        except Exception:  # a writer holds sqlite's lock for a moment
            runs = []
        if ok(runs):
            return runs
        time.sleep(0.5)
    out, err = proc.communicate(timeout=60) if proc.poll() is not None else ("", "")
    raise AssertionError(f"condition never met (rc={proc.poll()}): {out[-2000:]} {err[-3000:]}")


# ---------------------------------------------------------------------------------------------- pure pieces


def test_plain_sweep_counts_jobs_and_takes_the_first_values_as_baseline():
    spec = plain_sweep(["data=sim_tiny", "grpo.lr=1e-5,1e-4", "seed=0,1,2", "+x=a,b"])
    assert spec.n_jobs == 12 and spec.arm_keys == ["grpo.lr", "+x"]  # seed pairs arms, it does not name them
    assert spec.baseline_arm == "grpo.lr=1e-05|x=a"
    assert arm_label(["data=sim_tiny", "grpo.lr=0.0001", "seed=2", "+x=b"], spec.arm_keys) == "grpo.lr=0.0001|x=b"
    assert plain_sweep(["seed=0,1"]).baseline_arm == "default"
    assert plain_sweep_name("outputs/multirun/2026-12-02/05-26-09") == "multirun-2026-12-02-05-26-09"


def test_only_runs_of_gone_processes_are_closed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = get_or_create_experiment("e", uri, (tmp_path / "art").as_uri())
    gone = subprocess.Popen(["true"])
    gone.wait()
    client = mlflow.MlflowClient(tracking_uri=uri)

    def run(owner_pid=None, host=None, parent=None, sweep="s"):
        r = MlflowRun(uri=uri, experiment_id=exp, run_name=None, tags={"sweep": sweep}, parent_run_id=parent)
        if owner_pid is not None:
            client.set_tag(r.run_id, PID_TAG, str(owner_pid))
        if host is not None:
            client.set_tag(r.run_id, HOST_TAG, host)
        return r.run_id

    dead_parent = run(owner_pid=gone.pid)
    dead_child = run(owner_pid=gone.pid, parent=dead_parent)
    record = client.create_run(exp, tags={"sweep": "s", "mlflow.parentRunId": dead_parent}).info.run_id  # no owner
    alive = run(owner_pid=os.getppid())  # pytest's parent process: alive, not this process
    elsewhere = run(owner_pid=gone.pid, host="another-host")
    other_sweep = run(owner_pid=gone.pid, sweep="t")
    closed = close_dead_sweep_runs(uri, exp, "s")
    assert set(closed) == {dead_parent, dead_child, record}
    status = {rid: client.get_run(rid).info.status for rid in (dead_parent, dead_child, record, alive, elsewhere,
                                                                other_sweep)}
    assert status == {dead_parent: "KILLED", dead_child: "KILLED", record: "KILLED", alive: "RUNNING",
                      elsewhere: "RUNNING", other_sweep: "RUNNING"}
    assert client.get_run(dead_child).data.tags["error"] == DEAD_RUN_REASON


# ---------------------------------------------------------------------------------------------- real multiruns


@pytest.mark.slow
def test_plain_multirun_gets_a_parent_run_and_a_comparison(tmp_path):
    cache = tmp_path / "cache"
    proc = _start(tmp_path, cache, "rce.epochs=1,2")
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    parents = _runs(tmp_path, "tags.role = 'parent'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    sweep = parent.data.tags["sweep"]
    assert sweep.startswith("multirun-") and parent.data.params["sweep.baseline"] == "rce.epochs=1"
    kids = _runs(tmp_path, f"tags.sweep = '{sweep}' and tags.role != 'parent'")
    assert sorted((r.data.tags["arm"], r.data.tags["role"]) for r in kids) == [("rce.epochs=1", "baseline"),
                                                                                ("rce.epochs=2", "arm")]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in kids)
    assert "compare_error" not in parent.data.tags
    assert (tmp_path / "multirun" / "m" / "comparison").is_dir()
    arts = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").list_artifacts(parent.info.run_id,
                                                                                               "comparison")
    assert arts, "the comparison is logged to the parent run"


@pytest.mark.slow
def test_sigterm_of_the_launcher_ends_the_parent_killed_with_what_finished_compared(tmp_path):
    cache = tmp_path / "cache"
    proc = _start(tmp_path, cache, "tracking.sweep=lc", "rce.epochs=1,2,100000")

    def third_running(runs):
        kids = [r for r in runs if r.data.tags.get("role") != "parent"]
        return len(kids) == 3 and sum(r.info.status == "FINISHED" for r in kids) == 2

    _wait_for(tmp_path, third_running, proc)
    time.sleep(2)  # inside training
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGTERM
    parent = _runs(tmp_path, "tags.role = 'parent'")[0]
    assert parent.info.status == "KILLED" and parent.data.tags["error"].startswith("terminated (SIGTERM)")
    assert "compare_error" not in parent.data.tags
    report = (tmp_path / "multirun" / "m" / "comparison")
    assert report.is_dir() and any("rce.epochs=2" in p.read_text() for p in report.glob("*.md"))
    kids = {r.data.tags["arm"]: r.info.status for r in _runs(tmp_path, "tags.role != 'parent'")}
    assert kids == {"rce.epochs=1": "FINISHED", "rce.epochs=2": "FINISHED", "rce.epochs=100000": "KILLED"}


@pytest.mark.slow
def test_runs_left_running_by_a_sigkilled_sweep_are_killed_when_it_starts_again(tmp_path):
    cache = tmp_path / "cache"
    proc = _start(tmp_path, cache, "tracking.sweep=again", "rce.epochs=100000", "seed=0,1", name="a")
    _wait_for(tmp_path, lambda runs: len(runs) == 2 and all(r.info.status == "RUNNING" for r in runs), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert {r.info.status for r in _runs(tmp_path)} == {"RUNNING"}  # nobody closed them
    # the same sweep again (its one job stops at once on a bad value: only the start of the sweep matters here)
    again = _start(tmp_path, cache, "tracking.sweep=again", "grpo.lr=-1", "seed=0,1", name="b")
    again.communicate(timeout=600)
    runs = _runs(tmp_path, "tags.sweep = 'again'")
    old_parent = next(r for r in runs if r.data.tags.get("sweep_dir") == "multirun/a")
    old = [r for r in runs if r.info.run_id == old_parent.info.run_id
           or r.data.tags.get("mlflow.parentRunId") == old_parent.info.run_id]
    assert len(old) == 2 and all(r.info.status == "KILLED" for r in old)
    assert all(r.data.tags["error"] == DEAD_RUN_REASON for r in old)
    assert any(r.data.tags.get("sweep_dir") == "multirun/b" for r in runs)  # the new invocation has its own parent


@pytest.mark.slow
def test_two_sweeps_started_together_on_a_fresh_store_both_get_a_parent_and_a_comparison(tmp_path):
    cache = tmp_path / "cache"
    procs = [_start(tmp_path, cache, f"tracking.sweep=race{i}", "rce.epochs=1,2", name=f"race{i}") for i in (0, 1)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-2000:] + err[-3000:]
        assert "already exists" not in err
    parents = _runs(tmp_path, "tags.role = 'parent'")
    assert sorted(r.data.tags["sweep"] for r in parents) == ["race0", "race1"]
    assert all(r.info.status == "FINISHED" and "compare_error" not in r.data.tags for r in parents)
    for i in (0, 1):
        assert (tmp_path / "multirun" / f"race{i}" / "comparison").is_dir()


def test_a_corrupt_store_stops_a_sweep_with_one_message_and_exit_2(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(os.urandom(4096))
    proc = _start(tmp_path, tmp_path / "cache", "seed=0,1")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-2000:] + err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("[leverplus]")]
    assert len(lines) == 1 and str(db) in lines[0] and "not a readable MLflow sqlite store" in lines[0]
    assert "mv " in lines[0] and "Traceback" not in err
    assert not (tmp_path / "multirun" / "m" / "0").exists()  # no job was launched


def test_a_parent_run_that_cannot_be_created_stops_the_sweep_before_any_job(tmp_path):
    """A store error that is not bad input (here MLflow refuses runs in a deleted experiment): the reason, exit 1."""
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    client.delete_experiment(client.create_experiment("leverplus-sim"))
    proc = _start(tmp_path, tmp_path / "cache", "seed=0,1")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-2000:] + err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("[leverplus]")]
    assert len(lines) == 1 and "the sweep's MLflow parent run could not be created (MlflowException: " in lines[0]
    assert "deleted" in lines[0] and lines[0].endswith("; no job was launched") and "Traceback" not in err
    assert not (tmp_path / "multirun" / "m" / "0").exists()
    assert not client.search_runs([e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)])


def test_a_corrupt_store_stops_a_single_run_with_one_message_and_exit_2(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(os.urandom(4096))
    proc = subprocess.run([sys.executable, "-m", "leverplus.train", *TINY, "rce.epochs=1", f"hydra.run.dir={tmp_path}/r"],
                          cwd=tmp_path, env=_env(tmp_path, tmp_path / "cache"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("[leverplus]")]
    assert len(lines) == 1 and str(db) in lines[0]
