"""Where the repository and its config tree are, for test modules that need them outside a test function
(module-level helpers, parametrize lists). Tests themselves use the ``repo`` and ``compose_cfg`` fixtures
(tests/conftest.py), which return these."""

from pathlib import Path

from hydra import compose, initialize_config_dir

from leverplus.config.store import register_configs

REPO = Path(__file__).resolve().parents[1]


def compose_cfg(overrides=()):
    """Compose conf/train.yaml with overrides, exactly as `python -m leverplus.train` would (no Hydra run)."""
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose("train", overrides=list(overrides))
