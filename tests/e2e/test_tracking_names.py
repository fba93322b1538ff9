"""What the MLflow UI shows of a run: a name saying what it is, MLflow's system tags, the experiment's kind."""

import mlflow
import pytest

from leverplus.tracking.run import SOURCE_NAME, run_name
from leverplus.train import run


def test_run_names_say_what_the_run_is():
    assert run_name(arm="mode=hard_only|raw=true", shot_nums=[2], seed=1, data_source="sim") == \
        "mode=hard_only|raw=true/shot2/seed1"
    assert run_name(arm=None, shot_nums=[1, 2], seed=0, data_source="files") == "train/files/shot1+2/seed0"


@pytest.mark.slow
def test_a_tracked_run_is_named_tagged_and_opens_the_runs_view(tmp_path, compose_cfg):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run(compose_cfg(["data=sim_tiny", f"data.cache_dir={tmp_path / 'cache'}", f"tracking.uri={uri}",
                     f"tracking.artifact_root={tmp_path / 'art'}", f"output_dir={tmp_path / 'out'}",
                     "sft.epochs=1", "rce.epochs=1"]))
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("leverplus-sim")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.run_name == "train/sim/shot2/seed0"
    tags = r.data.tags
    assert tags["mlflow.source.name"] == SOURCE_NAME and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"] and tags["mlflow.source.git.commit"] == tags["git_commit"]
