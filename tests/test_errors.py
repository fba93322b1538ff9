from leverplus.errors import LeverPlusInputError


def test_message_names_file_record_field_and_fix():
    err = LeverPlusInputError("pointer has 3 items, expected 2", file="rl.json", record="query 7, candidate 2",
                              field="pointer", fix="pass data.shot_nums=[3]")
    assert str(err) == "rl.json: record query 7, candidate 2: field 'pointer': pointer has 3 items, expected 2. Fix: pass data.shot_nums=[3]"
    assert isinstance(err, ValueError)


def test_message_without_location():
    assert str(LeverPlusInputError("bad")) == "bad"


def _train(*overrides, env=None):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "leverplus.train", "tracking.enabled=false", *overrides],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def test_input_error_prints_one_message_and_exits_2(tmp_path):
    proc = _train("grpo.lr=-1", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln and "version_base" not in ln
             and not ln.startswith("  ")]
    assert lines == ["[leverplus] error: field 'grpo.lr': learning rate must be a finite number > 0, got -1.0. "
                     "Fix: e.g. grpo.lr=1e-4"]
    assert "Traceback" not in proc.stderr


def test_hydra_full_error_keeps_the_traceback(tmp_path):
    proc = _train("grpo.lr=-1", f"hydra.run.dir={tmp_path}", env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "LeverPlusInputError" in proc.stderr
