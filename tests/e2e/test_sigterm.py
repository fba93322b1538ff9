"""SIGTERM (Slurm/submitit at a time limit) ends a tracked run KILLED, as Ctrl-C does, not RUNNING forever."""

import signal
import subprocess
import sys
import time

import mlflow
import pytest

from paths import store_built


@pytest.mark.slow
def test_sigterm_marks_the_run_killed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.Popen([sys.executable, "-m", "leverplus.train", "data=sim_tiny", "rce.epochs=100000",
                             f"data.cache_dir={tmp_path / 'cache'}", f"tracking.uri={uri}",
                             f"hydra.run.dir={tmp_path / 'run'}", "checkpoint_every_epoch=false"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client = mlflow.MlflowClient(tracking_uri=uri)
    deadline = time.time() + 240
    runs = []
    while time.time() < deadline and proc.poll() is None:
        time.sleep(1)
        if not store_built(tmp_path / "mlflow.db"):
            continue
        try:
            runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
        except Exception:  # the store is still being created
            continue
        if runs and runs[0].info.status == "RUNNING" and (tmp_path / "run").exists():
            break
    assert runs and proc.poll() is None, "the run never started"
    time.sleep(2)  # inside training
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGTERM  # SIGTERM's own outcome, after the run was closed
    run = client.get_run(runs[0].info.run_id)
    assert run.info.status == "KILLED" and run.data.tags["error"] == "terminated (SIGTERM)"
