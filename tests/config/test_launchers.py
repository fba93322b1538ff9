"""The shipped Slurm launcher config composes against submitit's schema, and its values are plain overrides."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from leverplus.config.store import conf_dir, register_configs


def _hydra_cfg(overrides):
    register_configs()
    with initialize_config_dir(str(conf_dir()), version_base=None):
        return compose("train", overrides=overrides, return_hydra_config=True).hydra


def test_slurm_gpu_launcher_composes_with_gpu_defaults():
    launcher = _hydra_cfg(["hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu",
                           "hydra.launcher.array_parallelism=4"]).launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_task == 1
    assert launcher.array_parallelism == 4 and launcher.timeout_min == 120


def test_slurm_launcher_typo_fails_at_compose():
    with pytest.raises(ConfigCompositionException):
        _hydra_cfg(["hydra/launcher=slurm_gpu", "hydra.launcher.gpus_per_tsk=2"])
