"""Config checks that run before any work: each bad value fails at once, naming the field and a valid fix."""

import pytest

from leverplus.config.validation import validate_config
from leverplus.errors import LeverPlusInputError

CASES = [
    (["rce.lr=inf"], "rce.lr", "finite", "rce.lr=1e-4"),
    (["grpo.lr=nan"], "grpo.lr", "finite", "grpo.lr=1e-4"),
    (["rce.temp_end=0"], "rce.temp_end", "> 0", "rce.temp_end=0.5"),
    (["num_threads=-1"], "num_threads", ">= 0", "0 keeps"),
    (["data.train_fraction=1.5"], "data.train_fraction", "(0, 1)", "data.train_fraction=0.8"),
    (["eval.downstream_splits=[bogus]"], "eval.downstream_splits", "bogus", "val, test"),
    (["eval.baseline_splits=[train]"], "eval.baseline_splits", "train", "val, test"),
    (["eval.downstream=false"], "objective", "eval.downstream=false", "objective=val/offline/top1_acc"),
]


@pytest.mark.parametrize("overrides, field, problem, fix", CASES, ids=[c[0][0] for c in CASES])
def test_bad_value_fails_naming_field_and_fix(compose_cfg, overrides, field, problem, fix):
    with pytest.raises(LeverPlusInputError) as info:
        validate_config(compose_cfg(overrides))
    assert info.value.field == field and problem in info.value.problem and fix in info.value.fix


def test_valid_configs_pass(compose_cfg):
    validate_config(compose_cfg([]))
    validate_config(compose_cfg(["data=files"]))  # offline objective without downstream evaluation
    validate_config(compose_cfg(["eval.downstream=false", "objective=val/offline/top1_acc"]))


def test_a_bad_value_trains_nothing(tmp_path):
    """Through the app: exit status 2 before any checkpoint or MLflow store is written."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "leverplus.train", "eval.downstream_splits=[bogus]",
                           f"hydra.run.dir={tmp_path / 'run'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "eval.downstream_splits" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("override, name, suggestion", [
    ("+grpo.lrr=1e-5", "grpo.lrr", "grpo.lr"),
    ("+data.sim.num_tran=10", "data.sim.num_tran", "data.sim.num_train"),
    ("+bogus_top=1", "bogus_top", ""),
])
def test_unknown_keys_are_refused_even_with_plus(compose_cfg, override, name, suggestion):
    with pytest.raises(LeverPlusInputError) as info:
        validate_config(compose_cfg([override]))
    assert info.value.field == name and "unknown config key" in info.value.problem
    assert suggestion in info.value.fix


def test_free_form_maps_take_any_key(compose_cfg):
    validate_config(compose_cfg(["data=files", "+data.files.rl_json.3=/x/rl3.json", "+tracking.extra_tags.team=vqa"]))
