"""A tiny reward sweep against a REAL ``mlflow server`` on loopback, read back over plain HTTP (MLflow's REST API).

Needs: the ``mlflow`` CLI of this environment, a free TCP port on 127.0.0.1, ~1 minute. The server keeps its sqlite
store and its ``--artifacts-destination`` in a temp dir; the sweep is launched from ANOTHER temp dir with only
``MLFLOW_TRACKING_URI=http://127.0.0.1:<port>``, as on a worker machine. Checked: distinct run names, the
experiment's kind tag, MLflow's system tags, dataset inputs, the parent run's params, per-epoch series and final
values kept apart, and every artifact stored by the server and downloadable through its artifact proxy.
"""

import json
import os
import socket
import subprocess
import sys
import time
from urllib.parse import urlparse

import pytest
import requests

from leverplus.utils import git_info

pytestmark = [pytest.mark.slow, pytest.mark.mlflow_server]

SWEEP = ["+sweep=reward_grid", "data=sim_tiny", "sft.epochs=1", "rce.epochs=2", "model.hidden_dim=32",
         "hydra.sweeper.arm_overrides={grpo.epochs:1}", "reward.mode=hard_only,separated",
         "hydra.sweeper.factors.weights=[{reward.hard_weight:1.0,reward.soft_weight:1.0}]",
         "rce.use_raw_reward=false", "data.shot_nums=[2]", "seed=0", "eval.downstream_splits=[val,test]"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=root, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no GenAI job runner process
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900  # seconds when idle; minutes on a loaded shared machine
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("mlflow server did not start:\n" + (root / "server.log").read_text()[-3000:])
            time.sleep(0.3)
        yield {"url": url, "root": root}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def sweep(server, tmp_path_factory):
    work = tmp_path_factory.mktemp("worker")  # not the server's directory
    env = {**os.environ, "MLFLOW_TRACKING_URI": server["url"],
           "LEVERPLUS_CACHE": str(tmp_path_factory.mktemp("cache"))}
    for var in ("LEVERPLUS_PARENT_RUN_ID", "LEVERPLUS_LAUNCH_DIR"):
        env.pop(var, None)
    out = subprocess.run([sys.executable, "-m", "leverplus.train", "-m", *SWEEP], cwd=work, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return {"work": work, **server}


def api(server, method: str, endpoint: str, **kw) -> dict:
    r = requests.request(method, f"{server['url']}/api/2.0/mlflow/{endpoint}", timeout=30, **kw)
    assert r.status_code == 200, (endpoint, r.status_code, r.text[:500])
    return r.json()


def _tags(entity) -> dict:
    return {t["key"]: t["value"] for t in entity.get("tags", [])}


@pytest.fixture(scope="module")
def state(sweep):
    exp = api(sweep, "GET", "experiments/get-by-name", params={"experiment_name": "leverplus-sim"})["experiment"]
    runs = api(sweep, "POST", "runs/search", json={"experiment_ids": [exp["experiment_id"]], "max_results": 100})
    runs = runs["runs"]
    parents = [r for r in runs if _tags(r["data"]).get("role") == "parent"]
    kids = [r for r in runs if _tags(r["data"]).get("role") != "parent"]
    return {"exp": exp, "parents": parents, "kids": kids, **sweep}


def test_runs_are_named_and_the_experiment_opens_the_runs_view(state):
    assert _tags(state["exp"])["mlflow.experimentKind"] == "custom_model_development"
    assert len(state["parents"]) == 1 and len(state["kids"]) == 3  # baseline + two arms
    names = [r["info"]["run_name"] for r in state["kids"]]
    assert len(set(names)) == len(names) and all(n.endswith("/shot2/seed0") for n in names)


def test_system_tags_and_parent_params(state):
    commit = git_info()["commit"]
    for r in state["kids"]:
        tags = _tags(r["data"])
        assert tags["mlflow.source.name"] == "python -m leverplus.train" and tags["mlflow.user"]
        assert tags["mlflow.parentRunId"] == state["parents"][0]["info"]["run_id"]
        if commit != "unknown":  # a git checkout (the commit the job saw: HEAD may have moved since)
            assert tags["mlflow.source.git.commit"] == tags["git_commit"] and len(tags["git_commit"]) == 40
    params = {p["key"]: p["value"] for p in state["parents"][0]["data"]["params"]}
    assert params["sweep.name"] == "reward_grid"
    assert "reward.mode" in json.loads(params["sweep.factors"]) and params["sweep.baseline"] != "null"
    assert json.loads(params["sweep.paired_by"]) == ["data.shot_nums", "seed"]


def test_every_run_has_its_data_as_a_dataset_input(state):
    for r in state["kids"]:
        run = api(state, "GET", "runs/get", params={"run_id": r["info"]["run_id"]})["run"]
        (ds_input,) = run["inputs"]["dataset_inputs"]
        ds = ds_input["dataset"]
        assert ds["name"] == "sim" and ds["digest"] == _tags(run["data"])["data_fingerprint"]
        assert json.loads(ds["source"])["data_source"] == "sim" and json.loads(ds["source"])["files"]
        assert {t["key"]: t["value"] for t in ds_input["tags"]}["mlflow.data.context"] == "train"


def _history(state, run_id: str, key: str) -> list:
    return api(state, "GET", "metrics/get-history", params={"run_id": run_id, "metric_key": key}).get("metrics", [])


def test_per_epoch_series_and_final_values_are_kept_apart(state):
    for r in state["kids"]:
        rid = r["info"]["run_id"]
        grpo = int({p["key"]: p["value"] for p in r["data"]["params"]}["grpo.epochs"])
        series = _history(state, rid, "val/offline/top1_reward")
        # one point per RCE and GRPO epoch (steps after SFT's), none at the final step
        assert [m["step"] for m in series] == list(range(1, 1 + 2 + grpo))
        (final,) = _history(state, rid, "final/val/offline/top1_reward")
        assert final["step"] == 3 + grpo
        (objective,) = _history(state, rid, "objective")
        down = _history(state, rid, "val/downstream_acc")
        assert len(down) == 1 and objective["value"] == pytest.approx(down[0]["value"])  # the default objective


def _list(state, run_id: str, path: str = "") -> list:
    files = api(state, "GET", "artifacts/list", params={"run_id": run_id, "path": path}).get("files", [])
    out = []
    for f in files:
        out += _list(state, run_id, f["path"]) if f["is_dir"] else [f]
    return out


def test_every_artifact_is_on_the_server_and_downloadable_through_it(state):
    for r in state["kids"] + state["parents"]:
        info = r["info"]
        assert info["artifact_uri"].startswith("mlflow-artifacts:"), info["artifact_uri"]  # proxied by the server
        files = _list(state, info["run_id"])
        assert files
        base = urlparse(info["artifact_uri"]).path.strip("/")
        for f in files:
            url = f"{state['url']}/api/2.0/mlflow-artifacts/artifacts/{base}/{f['path']}"
            got = requests.get(url, timeout=30)
            assert got.status_code == 200 and len(got.content) == int(f["file_size"]), (url, got.status_code)
            assert (state["root"] / "artifacts" / base / f["path"]).is_file()
    kid_files = {f["path"] for f in _list(state, state["kids"][0]["info"]["run_id"])}
    assert {"config.yaml", "metrics.json", "per_query.jsonl", "checkpoints/best.pt"} <= kid_files
    # nothing stayed on the worker's disk
    assert not (state["work"] / "mlartifacts").exists() and not (state["work"] / "mlflow.db").exists()
