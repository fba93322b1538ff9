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


def store_built(db: Path) -> bool:
    """Whether the sqlite MLflow store at ``db`` is fully built (its schema at this MLflow's head revision): a test
    polling a store a subprocess is creating reads it only then, as a user's `mlflow ui` opened a moment later
    would, instead of racing the subprocess's migration (tests/tracking/test_store.py covers that race)."""
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    from leverplus.tracking.store import _schema_revision

    head = ScriptDirectory.from_config(_get_alembic_config(db_url="")).get_current_head()
    return db.exists() and _schema_revision(str(db)) == head
