"""The generation apps leave the working directory alone: no Hydra log file, no output folder."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("app, args", [("leverplus.generate_rl_data", ["shot_num=1"]), ("leverplus.generate_beam_data", [])])
def test_generator_writes_nothing_into_the_working_directory(tmp_path, app, args):
    # a run that stops on bad input (no selector checkpoint / no output path) must not leave <app>.log behind
    proc = subprocess.run([sys.executable, "-m", app, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "[leverplus] error:" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
