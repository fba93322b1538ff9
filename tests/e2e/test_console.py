"""What a run says, through the ``leverplus`` loggers: one line per epoch in ``train.log`` and on the console (off a
TTY too), the MLflow run id and UI address, the full table for a single run and one ``[k/N]`` line per job in a
multirun; an input error is one message, exit status 2, and no Hydra ``version_base`` warning."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from leverplus.sweeps.progress import duration, eta_seconds
from leverplus.training.trainer import epoch_line

TINY = ["data=sim_tiny", "sft.epochs=1", "rce.epochs=1", "grpo.epochs=1", "model.hidden_dim=16",
        "eval.downstream_splits=[val,test]", "checkpoint_every_epoch=false", "plot_curves=false"]


def _train(tmp_path: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "LEVERPLUS_CACHE": str(tmp_path / "cache"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    for var in ("LEVERPLUS_PARENT_RUN_ID", "LEVERPLUS_SWEEP", "LEVERPLUS_SWEEP_ARM_KEYS", "LEVERPLUS_LAUNCH_DIR",
                "HYDRA_FULL_ERROR"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "leverplus.train", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)


def test_epoch_line_names_phase_epoch_loss_kl_beta_and_the_validation_metric():
    m = {"grpo/loss": 0.5, "grpo/kl": 0.01234, "grpo/beta": 0.05, "val/offline/top1_reward": 0.8, "grpo/lr": 1e-4}
    assert epoch_line("grpo", 1, 4, m, "val/offline/top1_reward") == \
        "GRPO epoch 2/4  loss 0.5000  KL 0.0123  beta 0.0500  val/offline/top1_reward 0.8000"
    assert epoch_line("rce", 0, 5, {"rce/loss": 2.0, "rce/tau": 0.3}, "val/x") == "RCE epoch 1/5  loss 2.0000"
    assert epoch_line("sft", 2, 3, {"sft/loss": 1.25}, None) == "SFT epoch 3/3  loss 1.2500"


def test_duration_and_eta():
    assert [duration(s) for s in (0, 45.4, 185, 7380)] == ["0s", "45s", "3m05s", "2h03m"]
    assert eta_seconds(60.0, 2, 10) == 240.0  # 30 s a job, 8 jobs left
    assert eta_seconds(60.0, 10, 10) == 0.0


def test_an_input_error_is_one_line_exit_2_and_no_version_base_warning(tmp_path):
    proc = _train(tmp_path, "tracking.enabled=false", "grpo.lr=-1", f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "[leverplus] error: field 'grpo.lr': learning rate must be a finite number > 0, got -1.0. Fix: e.g. grpo.lr=1e-4"]


@pytest.mark.slow
def test_a_single_run_logs_epochs_run_id_and_table_to_console_and_train_log(tmp_path):
    proc = _train(tmp_path, *TINY, f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "r" / "train.log").read_text()
    for text in (log, proc.stdout):  # stdout is a pipe here: off a TTY the epoch lines still come
        assert "[leverplus.pipeline][INFO] - SFT epoch 1/1  loss " in text
        assert "RCE epoch 1/1  loss " in text and "val/offline/top1_reward" in text
        assert "GRPO epoch 1/1  loss " in text and "  KL " in text and "  beta " in text
        assert text.count("MLflow run ") == 2 and "#/experiments/" in text  # start and end, with the UI address
        assert "| val/downstream_acc (objective) |" in text and "objective val/downstream_acc = " in text
    assert "it/s" not in proc.stderr  # no progress bars off a TTY
    assert "version_base" not in proc.stderr and "Warning" not in proc.stderr


@pytest.mark.slow
def test_a_multirun_prints_one_line_per_job_and_no_table(tmp_path):
    proc = _train(tmp_path, "-m", *TINY, "tracking.enabled=false", "seed=0,1", "hydra.sweep.dir=m")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln.split(" - ", 1)[1] for ln in proc.stdout.splitlines() if "[leverplus.train]" in ln]
    jobs = [ln for ln in lines if ln.startswith("[")]
    assert [ln.split()[0] for ln in jobs] == ["[1/2]", "[2/2]"]
    assert "default shot2 seed0 val/downstream_acc=" in jobs[0] and " elapsed " in jobs[0] and " ETA " in jobs[0]
    assert "| metric | value |" not in proc.stdout
    assert "RCE epoch 1/1" in (tmp_path / "m" / "1" / "train.log").read_text()
