import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def compose_cfg(overrides=()):
    """Compose conf/train.yaml with overrides, exactly as `python -m leverplus.train` would (no Hydra run)."""
    from hydra import compose, initialize_config_dir

    from leverplus.config.store import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose("train", overrides=list(overrides))
