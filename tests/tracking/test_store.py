"""Opening an sqlite store (``leverplus.tracking.store.init_store``) while a client outside leverplus is still
migrating it waits for the migration; a store left at an older schema fails naming the file and the upgrade
command. Real sqlite stores built by MLflow, with the recorded Alembic revision moved by hand."""

import shutil
import sqlite3
import threading
import time

import mlflow
import pytest
from alembic.script import ScriptDirectory
from mlflow.store.db.utils import _get_alembic_config

from leverplus.errors import LeverPlusInputError
from leverplus.tracking.store import init_store


@pytest.fixture(scope="module")
def fresh_store(tmp_path_factory):
    db = tmp_path_factory.mktemp("built") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


def _revisions():
    """The head revision and the two before it."""
    script = ScriptDirectory.from_config(_get_alembic_config(db_url=""))
    head = script.get_current_head()
    one = script.get_revision(head).down_revision
    two = script.get_revision(one).down_revision
    return head, one, two


def _copy(fresh_store, tmp_path, revision):
    """A copy at a path this process has not opened (MLflow caches one store per URI)."""
    db = tmp_path / "mlflow.db"
    shutil.copy(fresh_store, db)
    _set(db, revision)
    return db


def _set(db, revision):
    with sqlite3.connect(db) as con:
        con.execute("UPDATE alembic_version SET version_num = ?", (revision,))


def test_a_store_another_client_is_still_migrating_is_waited_for(fresh_store, tmp_path):
    head, one, two = _revisions()
    db = _copy(fresh_store, tmp_path, two)

    def migrate():  # what a concurrent `mlflow ui` on a fresh file does: the revision moves, then reaches head
        time.sleep(0.6)
        _set(db, one)
        time.sleep(0.6)
        _set(db, head)

    t = threading.Thread(target=migrate)
    t0 = time.monotonic()
    t.start()
    init_store(f"sqlite:///{db}", settle_s=1.0, poll_s=0.05)  # each step stays put for less than settle_s
    t.join()
    assert time.monotonic() - t0 >= 1.2  # it did wait for the head revision
    assert mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()


def test_a_store_left_at_an_older_schema_names_the_file_and_the_upgrade(fresh_store, tmp_path):
    _, one, _ = _revisions()
    db = _copy(fresh_store, tmp_path, one)
    with pytest.raises(LeverPlusInputError) as e:
        init_store(f"sqlite:///{db}", settle_s=0.3, poll_s=0.05)
    msg = str(e.value)
    assert str(db) in msg and one in msg and f"mlflow db upgrade sqlite:///{db}" in msg
    assert "out-of-date database schema" in str(e.value.__cause__)
