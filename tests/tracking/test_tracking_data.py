"""What leverplus writes into MLflow beside params: where artifacts go, final values apart from per-epoch series,
the data as a dataset input. On a real sqlite store in a temp dir."""

import json
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import Metric, RunTag

from leverplus.tracking.run import (FINAL_PREFIX, MlflowRun, dataset_input, final_view, log_dataset_input,
                                    log_final_metrics)
from leverplus.tracking.store import (default_artifact_root, get_or_create_experiment, is_server_uri,
                                      resolve_artifact_root)


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    """One sqlite store for the module (creating a store runs MLflow's schema migrations: seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"


def test_artifacts_go_beside_a_sqlite_store_and_to_a_server_s_own_root(tmp_path):
    assert default_artifact_root(f"sqlite:///{tmp_path}/sub/mlflow.db") == (tmp_path / "sub" / "mlartifacts").as_uri()
    for uri in ("http://127.0.0.1:5000", "HTTPS://mlflow.example.org"):
        assert is_server_uri(uri) and default_artifact_root(uri) is None
    assert not is_server_uri(f"sqlite:///{tmp_path}/mlflow.db")
    assert resolve_artifact_root(None) is None
    assert resolve_artifact_root(str(tmp_path / "art")) == (tmp_path / "art").as_uri()


def test_a_new_experiment_on_sqlite_keeps_its_artifacts_beside_the_db(tmp_path, monkeypatch, uri):
    monkeypatch.chdir(tmp_path)  # the launch dir is elsewhere: it must not matter
    store = Path(uri[len("sqlite:///"):]).parent
    exp_id = get_or_create_experiment("beside", uri)
    exp = mlflow.MlflowClient(tracking_uri=uri).get_experiment(exp_id)
    assert exp.artifact_location == (store / "mlartifacts").as_uri() + "/beside"
    assert get_or_create_experiment("beside", uri) == exp_id
    # tracking.artifact_root still wins
    other = get_or_create_experiment("elsewhere", uri, (tmp_path / "art").as_uri())
    assert mlflow.MlflowClient(tracking_uri=uri).get_experiment(other).artifact_location == \
        (tmp_path / "art").as_uri() + "/elsewhere"


def test_final_view_reads_final_keys_under_their_plain_names():
    m = {"val/offline/top1_reward": 0.2, "final/val/offline/top1_reward": 0.5, "objective": 0.7}
    assert final_view(m) == {**m, "val/offline/top1_reward": 0.5}
    assert final_view({"val/offline/top1_reward": 0.2}) == {"val/offline/top1_reward": 0.2}  # older runs


def test_final_values_of_per_epoch_series_get_their_own_keys(uri):
    exp = get_or_create_experiment("final", uri)
    with MlflowRun(uri=uri, experiment_id=exp, run_name="r", tags={}) as run:
        run.log_metrics({"val/offline/top1_reward": 0.1, "rce/loss": 2.0}, step=1)
        run.log_metrics({"val/offline/top1_reward": 0.3, "rce/loss": 1.0}, step=2)
        log_final_metrics(run, {"val/offline/top1_reward": 0.3, "test/downstream_acc": 0.6, "objective": 0.6,
                                "nan": float("nan")}, step=3, tags={"cache_hit_sft": False, "none": None})
    client = mlflow.MlflowClient(tracking_uri=uri)
    hist = client.get_metric_history(run.run_id, "val/offline/top1_reward")
    assert [(m.step, m.value) for m in hist] == [(1, 0.1), (2, 0.3)]  # epochs only
    (final,) = client.get_metric_history(run.run_id, FINAL_PREFIX + "val/offline/top1_reward")
    assert (final.step, final.value) == (3, 0.3)
    r = client.get_run(run.run_id)
    assert r.data.metrics["test/downstream_acc"] == 0.6 and r.data.metrics["objective"] == 0.6
    assert "final/test/downstream_acc" not in r.data.metrics and "nan" not in r.data.metrics
    assert r.data.tags["cache_hit_sft"] == "False" and "none" not in r.data.tags
    assert [m.step for m in client.get_metric_history(run.run_id, "rce/loss")] == [1, 2]


def test_the_data_is_a_dataset_input_with_the_fingerprint_as_digest(tmp_path, uri):
    files = [tmp_path / "emb.pt", tmp_path / "rl_2.json"]
    ds_in = dataset_input(data_source="sim", fingerprint="0123456789abcdef", files=files, num_embeddings=500,
                          shot_nums=[2])
    exp = get_or_create_experiment("data", uri)
    with MlflowRun(uri=uri, experiment_id=exp, run_name="r", tags={}) as run:
        log_dataset_input(run, ds_in)
    (got,) = mlflow.MlflowClient(tracking_uri=uri).get_run(run.run_id).inputs.dataset_inputs
    assert got.dataset.name == "sim" and got.dataset.digest == "0123456789abcdef"
    src = json.loads(got.dataset.source)
    assert src["data_source"] == "sim" and src["files"] == [str(f) for f in files]
    assert src["uri"] == Path(tmp_path).as_uri()
    assert json.loads(got.dataset.profile) == {"num_embeddings": 500, "shot_nums": [2], "files": 2}
    assert {t.key: t.value for t in got.tags} == {"mlflow.data.context": "train"}


@pytest.mark.parametrize("n", [0, 1200])
def test_log_batch_splits_at_mlflow_s_limits(uri, n):
    exp = get_or_create_experiment("batch", uri)
    with MlflowRun(uri=uri, experiment_id=exp, run_name=f"r{n}", tags={}) as run:
        run.log_batch(metrics=[Metric(f"m{i}", float(i), 0, 0) for i in range(n)],
                      tags=[RunTag(f"t{i}", "x") for i in range(n // 10)])
    r = mlflow.MlflowClient(tracking_uri=uri).get_run(run.run_id)
    assert len(r.data.metrics) == n and len([k for k in r.data.tags if k.startswith("t")]) == n // 10
