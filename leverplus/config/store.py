"""Registration of the structured configs in Hydra's ConfigStore, and where the config tree lives.

Config tree (groups in ``conf/``): data, model, reward, sft, rce, grpo, eval, tracking; ``sweep`` (from
``sweeps/``) is *not* in the primary defaults list, so ``+sweep=NAME`` works. The sweepers register their own
configs (``hydra/sweeper=ablation`` / ``leverplus_optuna``) when Hydra loads them as plugins.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from leverplus.config.schema import (
    DataConfig,
    EvalConfig,
    EvaluateAppConfig,
    GRPOConfig,
    ModelConfig,
    RCEConfig,
    RewardConfig,
    SFTConfig,
    TrackingConfig,
    TrainConfig,
)


def register_configs() -> None:
    """Register the schemas; the YAML files in conf/ extend them (``defaults: [<name>_schema]``)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig, replace=True)
    cs.store(name="evaluate_schema", node=EvaluateAppConfig, replace=True)
    for group, node in [
        ("data", DataConfig),
        ("model", ModelConfig),
        ("reward", RewardConfig),
        ("sft", SFTConfig),
        ("rce", RCEConfig),
        ("grpo", GRPOConfig),
        ("eval", EvalConfig),
        ("tracking", TrackingConfig),
    ]:
        cs.store(group=group, name=f"{group}_schema", node=node, replace=True)

    register_sweeps()


_PACKAGE = Path(__file__).resolve().parents[1]


def _shipped(source_name: str, packaged_name: str) -> Path:
    """A top-level folder of the source tree (``conf/``, ``sweeps/``), or its copy inside an installed wheel
    (``leverplus/_conf``, ``leverplus/_sweeps``; see setup.py). The source tree wins, so edits there take effect."""
    in_source_tree = (_PACKAGE.parent / "pyproject.toml").is_file()
    return _PACKAGE.parent / source_name if in_source_tree else _PACKAGE / packaged_name


def conf_dir() -> Path:
    """The Hydra config tree (``conf/``)."""
    return _shipped("conf", "_conf")


def sweeps_dir() -> Path:
    """The sweep definitions (``sweeps/``), the config group ``sweep``."""
    return _shipped("sweeps", "_sweeps")


def register_sweeps() -> None:
    """Expose every ``sweeps/*.yaml`` as an option of the config group ``sweep`` (package ``_global_``); the shared
    bases ``sweeps/_<name>.yaml`` go to the group ``sweep_base`` instead (not sweeps themselves)."""
    cs = ConfigStore.instance()
    for path in sorted(sweeps_dir().glob("*.yaml")):
        group, name = ("sweep_base", path.stem[1:]) if path.stem.startswith("_") else ("sweep", path.stem)  # bases
        cs.store(group=group, name=name, node=OmegaConf.load(path), package="_global_", replace=True)

