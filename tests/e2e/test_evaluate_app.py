"""``python -m leverplus.evaluate`` end to end on real-format data (official VQA files, generated images, the tiny
random Qwen2-VL built in the test) and a REAL MLflow sqlite store: a tracked training run with downstream
evaluation, then its checkpoints (by run id, by folder, and every arm under a sweep's parent run through the CLI)
and the baselines at shots 1-4, a second evaluation served entirely from the answer cache, and the train split."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import pytest

pytest.importorskip("transformers")
pytest.importorskip("PIL.Image")

import tiny_vqa  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from paths import REPO  # noqa: E402

from leverplus.config.store import register_configs  # noqa: E402
from leverplus.errors import LeverPlusInputError  # noqa: E402
from leverplus.evaluate import run as evaluate  # noqa: E402
from leverplus.train import run as train  # noqa: E402

BASELINES = ("zero_shot", "random", "similarity")


def compose_evaluate(overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose("evaluate", overrides=list(overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tracked training run on the files, under a parent run (as a sweep's arm)."""
    from paths import compose_cfg

    root = tmp_path_factory.mktemp("evalapp")
    world = tiny_vqa.build(root)
    uri = f"sqlite:///{root}/mlflow.db"
    track = [f"tracking.uri={uri}", f"tracking.artifact_root={root / 'artifacts'}", "tracking.experiment=real",
             "eval.answer_cache=true", f"eval.answer_cache_path={root / 'answers.sqlite'}", "plot_curves=false"]
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("real", artifact_location=str(root / "artifacts"))
    parent = client.create_run(exp, tags={"role": "parent", "sweep": "real_grid"}).info.run_id
    train(compose_cfg([*world["files"], *world["scorer"], *track, f"output_dir={root / 'run'}",
                       f"tracking.parent_run_id={parent}", "tracking.arm=hps", "tracking.sweep=real_grid"]))
    client.set_terminated(parent, "FINISHED")
    (child,) = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    return {**world, "uri": uri, "track": track, "client": client, "run": child, "parent": parent, "root": root}


def test_the_training_run_optimised_the_vqa_accuracy_and_logged_every_shot(trained):
    run = trained["run"]
    assert run.info.status == "FINISHED" and run.data.tags["objective_source"] == "downstream"
    m = run.data.metrics
    assert m["objective"] == m["val/downstream_acc"] == m["val/downstream_acc_shot2"]
    assert all(f"val/downstream_acc_shot{s}" in m for s in (1, 2, 3, 4))
    assert m["answer_cache/generated"] > 0


def test_checkpoints_and_baselines_at_every_shot_then_all_from_the_cache(trained, capsys):
    rid = trained["run"].info.run_id
    ckpts = trained["root"] / "run" / "checkpoints"
    over = [*trained["files"], *trained["scorer"], *trained["track"], f"evaluate.run_ids=[{rid}]",
            f"evaluate.checkpoints=[{ckpts}]", "evaluate.split=val", "evaluate.num_queries=4",
            f"output_dir={trained['root'] / 'eval1'}"]
    res = evaluate(compose_evaluate(over))
    out = capsys.readouterr().out
    labels = [m for m in res.methods if m not in BASELINES]
    name = trained["run"].data.tags["mlflow.runName"]
    # every per-epoch checkpoint of the run's folder (best last), and the checkpoint the run logged
    assert labels == ["checkpoints/rce_epoch1", "checkpoints/best", f"{name}/best"]
    assert res.shots == [1, 2, 3, 4] and "| method | S1 | S2 | S3 | S4 | n |" in out
    for s in res.shots:
        assert all(res.summaries[(m, s)]["n"] == 4 for m in res.methods)
        # best.pt is the same weights in the folder and in the run: the same answers
        assert res.rows[("checkpoints/best", s)][0]["icds"] == res.rows[(f"{name}/best", s)][0]["icds"]
    assert len(res.pairs) == 4 * len(res.methods) * (len(res.methods) - 1) // 2
    logged = trained["client"].get_run(rid).data.metrics
    for s in (1, 2, 3, 4):  # attached to the evaluated run: its checkpoint, the baselines, their pairs
        assert logged[f"evaluate/val/shot{s}/{name}/best_n"] == 4
        assert f"evaluate/val/shot{s}/zero_shot_acc" in logged
        assert f"evaluate/val/shot{s}/{name}/best_minus_similarity_delta" in logged
    evaluation_runs = trained["client"].search_runs([trained["run"].info.experiment_id],
                                                    filter_string="tags.role = 'evaluation'")
    assert len(evaluation_runs) == 1  # the checkpoint files without a run of their own
    # the same evaluation again: every answer comes from the persistent answer cache
    evaluate(compose_evaluate([*over[:-1], f"output_dir={trained['root'] / 'eval2'}"]))
    out = capsys.readouterr().out
    total = sum(len(r) for r in res.rows.values())
    assert f"answers: 0 generated, {total} from the answer cache" in out
    logged = trained["client"].get_run(rid).data.metrics
    assert logged["evaluate/val/answer_cache/generated"] == 0 and logged["evaluate/val/answer_cache/cached"] == total


def test_every_arm_of_a_sweep_through_the_cli_and_the_train_split(trained):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    over = [*trained["files"], *trained["scorer"], *trained["track"], f"evaluate.parent_run_id={trained['parent']}",
            "evaluate.split=train", "evaluate.num_queries=3", "eval.shot_nums=[1,3]", "eval.baselines=[zero_shot]",
            f"output_dir={trained['root'] / 'eval3'}", f"hydra.run.dir={trained['root'] / 'hydra'}"]
    p = subprocess.run([sys.executable, "-m", "leverplus.evaluate", *over], capture_output=True, text=True, env=env,
                       cwd=trained["root"], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    name = trained["run"].data.tags["mlflow.runName"]
    assert f"| {name}/best |" in p.stdout and "| method | S1 | S3 | n |" in p.stdout
    rows = [json.loads(x) for x in (trained["root"] / "eval3" / "evaluate_train_per_query.jsonl").read_text()
            .splitlines()]
    assert len(rows) == 2 * 2 * 3  # (arm, zero_shot) x shots 1, 3 x the first 3 train queries (by question id)
    assert sorted({r["query_index"] for r in rows}) == [0, 1, 2]
    assert all(r["query_index"] not in r["icds"] for r in rows)  # a train query is never its own ICD
    logged = trained["client"].get_run(trained["run"].info.run_id).data.metrics
    assert logged[f"evaluate/train/shot3/{name}/best_n"] == 3


def test_bad_evaluate_inputs_fail_before_any_work(trained):
    base = [*trained["files"], *trained["scorer"], "tracking.enabled=false"]
    with pytest.raises(LeverPlusInputError, match="evaluate.split"):
        evaluate(compose_evaluate([*base, "evaluate.split=dev", f"evaluate.checkpoints=[{trained['root']}/run]"]))
    with pytest.raises(LeverPlusInputError, match="evaluate.checkpoints"):
        evaluate(compose_evaluate([*base, f"evaluate.checkpoints=[{trained['root']}/nope.pt]"]))
    with pytest.raises(LeverPlusInputError, match="nothing to evaluate"):
        evaluate(compose_evaluate(base))
