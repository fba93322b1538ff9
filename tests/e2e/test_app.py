"""The single-run app: one tiny training per reward mode logged to a REAL MLflow sqlite store, a failing run marked
FAILED, bad input failing before training, and the CLI itself. (Composition of the config tree: tests/config.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore

from leverplus.config.schema import RewardMode
from leverplus.config.store import register_configs, sweeps_dir
from leverplus.errors import LeverPlusInputError
from leverplus.train import run

TINY = ["data=sim_tiny", "rce.epochs=1", "sft.epochs=1", "model.hidden_dim=32", "eval.downstream_splits=[val]"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One real sqlite store for the module (creating one costs ~5 s)."""
    root = tmp_path_factory.mktemp("mlflow")
    cache = tmp_path_factory.mktemp("cache")
    return {"uri": f"sqlite:///{root}/mlflow.db", "artifacts": str(root / "artifacts"), "cache": str(cache),
            "root": root}


def tracked(store, name, *extra):
    return TINY + [f"tracking.uri={store['uri']}", f"tracking.artifact_root={store['artifacts']}",
                   f"data.cache_dir={store['cache']}", f"output_dir={store['root'] / name}",
                   f"tracking.run_name={name}", *extra]


# ---------------------------------------------------------------------------------------------- configs


ABLATION = "leverplus.sweeps.ablation.AblationSweeper"
OPTUNA = "leverplus.sweeps.optuna.ResumableOptunaSweeper"
CALLBACK = "leverplus.sweeps.callbacks.SweepTrackingCallback"
PAIRS = {"data.shot_nums", "seed"}
#: sweep -> (sweeper, its factors (ablation) or search-space params (Optuna))
SWEEPS = {
    "reward_grid": (ABLATION, {"reward.mode", "weights", "rce.use_raw_reward"} | PAIRS),
    "reward_grid_rce": (ABLATION, {"reward.mode", "weights", "rce.use_raw_reward"} | PAIRS),
    "reward_grid_grpo_stage": (ABLATION, {"grpo.epochs", "grpo.lr", "grpo.advantage"} | PAIRS),
    "seeds": (ABLATION, PAIRS),
    "skip_fallback": (ABLATION, {"data.skip_fallback_reward"} | PAIRS),
    "freeze_backbone": (ABLATION, {"grpo.freeze_backbone"} | PAIRS),
    "rce_vs_grpo_epochs": (ABLATION, {"rce.epochs", "grpo.epochs"} | PAIRS),
    "data_curation": (ABLATION, {"data_variant"} | PAIRS),
    "grpo_optuna": (OPTUNA, {"grpo.lr", "grpo.epochs"}),
}


def _compose_with_hydra(repo, overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(repo / "conf"), version_base=None):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_the_sweep_group_holds_the_sweeps_and_not_their_bases():
    assert sorted(p.stem for p in sweeps_dir().glob("[!_]*.yaml")) == sorted(SWEEPS)
    register_configs()
    options = {name.removesuffix(".yaml") for name in ConfigStore.instance().list("sweep")}
    assert options == set(SWEEPS)
    assert {n.removesuffix(".yaml") for n in ConfigStore.instance().list("sweep_base")} == {"ablation", "common"}


@pytest.mark.parametrize("sweep", sorted(SWEEPS))
def test_every_sweep_composes_with_plus(sweep, repo):
    """``+sweep=NAME`` selects the sweep's sweeper with its factors, named once (``tracking.sweep``); every sweep
    gets the shared base (no per-epoch checkpoints, no curve PNGs); ablations get the tracking callback."""
    target, keys = SWEEPS[sweep]
    cfg = _compose_with_hydra(repo, [f"+sweep={sweep}"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == target
    assert cfg.tracking.sweep == sweep
    assert cfg.checkpoint_every_epoch is False and cfg.plot_curves is False
    callbacks = cfg.hydra.callbacks or {}
    if target == ABLATION:
        assert sweeper.sweep_name == sweep and set(sweeper.factors) == keys
        assert all(len(v) > 0 for v in sweeper.factors.values())
        assert set(sweeper.paired_by) == PAIRS and sweeper.baseline
        assert callbacks["leverplus_sweep"]._target_ == CALLBACK and callbacks["leverplus_sweep"].sweep_name == sweep
    else:
        assert sweeper.study_name == sweep and set(sweeper.params) == keys
        # registered for every multirun, but it leaves an Optuna study alone (the study's own parent run, StudyTracker)
        assert callbacks["leverplus_sweep"]._target_ == CALLBACK


def test_a_sweep_renamed_on_the_command_line_is_renamed_everywhere(repo):
    cfg = _compose_with_hydra(repo, ["+sweep=seeds", "tracking.sweep=seeds_v2"])
    assert cfg.hydra.sweeper.sweep_name == "seeds_v2" and cfg.hydra.callbacks.leverplus_sweep.sweep_name == "seeds_v2"


def test_negative_lr_fails_before_training_naming_the_field(tmp_path, compose_cfg):
    with pytest.raises(LeverPlusInputError, match="grpo.lr"):
        run(compose_cfg(TINY + ["grpo.lr=-1e-5", "tracking.enabled=false", f"output_dir={tmp_path}"]))


def test_files_source_with_a_missing_file_fails_before_training(tmp_path, compose_cfg):
    cfg = compose_cfg(["data=files", "tracking.enabled=false", f"data.files.embeddings={tmp_path}/nope.pt",
                       f"output_dir={tmp_path}/out"])
    with pytest.raises(LeverPlusInputError) as e:
        run(cfg)
    assert "nope.pt" in str(e.value) and "data.files.embeddings" in str(e.value)
    assert not (tmp_path / "out" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------- runs


def _client(store):
    return mlflow.MlflowClient(tracking_uri=store["uri"])


def _find(store, name):
    runs = _client(store).search_runs(
        [e.experiment_id for e in _client(store).search_experiments()],
        filter_string=f"tags.mlflow.runName = '{name}'",
    )
    assert len(runs) == 1, runs
    return runs[0]


def test_default_run_logs_params_metrics_tags_artifacts(store, compose_cfg):
    value = run(compose_cfg(tracked(store, "default", "grpo.epochs=1", "seed=3")))
    r = _find(store, "default")
    assert r.info.status == "FINISHED"
    assert r.data.metrics["objective"] == pytest.approx(value)
    assert r.data.metrics["val/downstream_acc"] == pytest.approx(value)
    # params: the resolved config flattened to dotted keys
    assert r.data.params["reward.mode"] == "hard_plus_soft"
    assert r.data.params["grpo.epochs"] == "1" and r.data.params["seed"] == "3"
    assert r.data.params["data.sim.num_train"] == "400"
    # tags
    for tag in ("git_commit", "git_dirty", "data_fingerprint", "run_key", "code_version"):
        assert r.data.tags[tag]
    assert r.data.tags["seed"] == "3" and r.data.tags["shot_num"] == "2" and r.data.tags["role"] == "arm"
    # per-epoch metrics with steps: sft (1) -> rce (1) -> grpo (1)
    hist = _client(store).get_metric_history(r.info.run_id, "grpo/kl")
    assert [m.step for m in hist] == [2]
    assert [m.step for m in _client(store).get_metric_history(r.info.run_id, "rce/loss")] == [1]
    # artifacts
    names = {a.path for a in _client(store).list_artifacts(r.info.run_id)}
    assert {"config.yaml", "metrics.json", "per_query.jsonl", "training_curves.png", "checkpoints"} <= names
    local = Path(_client(store).download_artifacts(r.info.run_id, "metrics.json"))
    metrics = json.loads(local.read_text())
    assert metrics["objective_value"] == pytest.approx(value)
    cfg_yaml = yaml.safe_load(Path(_client(store).download_artifacts(r.info.run_id, "config.yaml")).read_text())
    assert cfg_yaml["grpo"]["epochs"] == 1
    ckpts = {a.path for a in _client(store).list_artifacts(r.info.run_id, "checkpoints")}
    assert ckpts == {"checkpoints/best.pt"}
    # the store and artifacts are where we said, absolute
    assert r.info.artifact_uri.startswith(Path(store["artifacts"]).resolve().as_uri())


def test_same_config_and_seed_give_the_same_metrics(store, compose_cfg):
    a = run(compose_cfg(tracked(store, "det_a", "tracking.enabled=false")))
    b = run(compose_cfg(tracked(store, "det_b", "tracking.enabled=false")))
    ma = json.loads((store["root"] / "det_a" / "metrics.json").read_text())["metrics"]
    mb = json.loads((store["root"] / "det_b" / "metrics.json").read_text())["metrics"]
    drop = lambda m: {k: v for k, v in m.items() if not k.startswith("train/")}  # noqa: E731 (wall times)
    assert a == b and drop(ma) == drop(mb)


def test_plot_curves_off_skips_the_png_and_changes_nothing_else(store, compose_cfg):
    """Sweeps set plot_curves=false: no training_curves.png (run dir and MLflow), same metrics, same run key."""
    from leverplus.config.identity import run_key

    a = run(compose_cfg(tracked(store, "curves_on")))
    b = run(compose_cfg(tracked(store, "curves_off", "plot_curves=false")))
    ra, rb = _find(store, "curves_on"), _find(store, "curves_off")
    assert a == b and ra.data.tags["run_key"] == rb.data.tags["run_key"]
    assert (store["root"] / "curves_on" / "training_curves.png").exists()
    assert not (store["root"] / "curves_off" / "training_curves.png").exists()
    names = {x.path for x in _client(store).list_artifacts(rb.info.run_id)}
    assert "training_curves.png" not in names and {"metrics.json", "per_query.jsonl"} <= names
    from leverplus.config.identity import to_container

    cfg = to_container(compose_cfg(["plot_curves=false"]))
    assert run_key(cfg, "fp") == run_key(to_container(compose_cfg([])), "fp")


@pytest.mark.parametrize("mode", [m.value for m in RewardMode])
def test_one_tiny_training_per_reward_mode(store, mode, compose_cfg):
    extra = ["reward.reward_alpha=1.0", "reward.reward_beta=1.0"] if mode == "legacy" else []
    value = run(compose_cfg(tracked(store, f"mode_{mode}", f"reward.mode={mode}", "eval.downstream=false",
                                    "objective=val/offline/top1_acc", *extra)))
    r = _find(store, f"mode_{mode}")
    assert r.info.status == "FINISHED" and r.data.params["reward.mode"] == mode
    assert 0.0 <= value <= 1.0 and r.data.metrics["final/val/offline/top1_acc"] == pytest.approx(value)


def test_failing_run_is_failed_in_mlflow_with_traceback(store, compose_cfg):
    from leverplus.training.trainer import NonFiniteLossError

    cfg = compose_cfg(tracked(store, "diverges", "rce.epochs=3", "rce.lr=1e30", "rce.lr_schedule=constant",
                              "rce.grad_clip=1e30"))
    with pytest.raises(NonFiniteLossError):
        run(cfg)
    r = _find(store, "diverges")
    assert r.info.status == "FAILED"
    assert "NonFiniteLossError" in r.data.tags["error"]
    assert "traceback.txt" in {a.path for a in _client(store).list_artifacts(r.info.run_id)}
    # no half-written checkpoint: every file in the checkpoint folder loads
    import torch

    for p in (store["root"] / "diverges" / "checkpoints").glob("*"):
        assert p.suffix == ".pt"
        torch.load(p, weights_only=True)


def test_cli_runs_and_prints_the_objective(store, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"], "LEVERPLUS_CACHE": store["cache"]}
    out = subprocess.run(
        [sys.executable, "-m", "leverplus.train", *TINY, f"tracking.artifact_root={store['artifacts']}",
         "tracking.run_name=cli", f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "objective val/downstream_acc =" in out.stdout
    assert _find(store, "cli").info.status == "FINISHED"  # MLFLOW_TRACKING_URI was honoured
    assert not (tmp_path / "mlflow.db").exists()


def test_real_lever_plus_files_load_and_train(store, tmp_path, compose_cfg):
    """data=files on files in the Lever-Plus formats (made by the simulator) and a Lightning SFT checkpoint."""
    import torch

    from leverplus.config.sim_params import SimParams
    from leverplus.model.pointer import PointerSelector
    from leverplus.sim.generate import load_or_generate

    sim = compose_cfg(["data=sim_tiny"]).data.sim
    from omegaconf import OmegaConf

    paths = load_or_generate(SimParams.from_mapping(OmegaConf.to_container(sim)), Path(store["cache"]) / "sim")
    model = PointerSelector(32, hidden_dim=32)
    ckpt = {"state_dict": {**{f"lever_lm.pointer_selector.{k}": v for k, v in model.state_dict().items()},
                           "lever_lm.img_model.vision.weight": torch.zeros(2, 2)},
            "epoch": 3, "global_step": 10}
    torch.save(ckpt, tmp_path / "sft.ckpt")
    value = run(compose_cfg([
        "data=files", "rce.epochs=1", "model.hidden_dim=32", "tracking.enabled=false", f"output_dir={tmp_path}/out",
        f"+data.files.rl_json.2={paths.rl_json[2]}", f"data.files.embeddings={paths.embeddings}",
        f"data.files.beam_json={paths.beam_json}", f"data.files.sft_checkpoint={tmp_path / 'sft.ckpt'}"]))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["objective"] == "val/offline/top1_acc" and metrics["objective_value"] == pytest.approx(value)
    assert "test/downstream_acc" not in metrics["metrics"]  # no scorer for real files
    # a checkpoint that does not fit (hidden 64 weights into a hidden-32 config) fails before training
    torch.save({"state_dict": {f"lever_lm.pointer_selector.{k}": v
                               for k, v in PointerSelector(32, hidden_dim=64).state_dict().items()}},
               tmp_path / "bad.ckpt")
    with pytest.raises(LeverPlusInputError, match="bad.ckpt"):
        run(compose_cfg(["data=files", "model.hidden_dim=32", "tracking.enabled=false",
                         f"output_dir={tmp_path}/out2", f"+data.files.rl_json.2={paths.rl_json[2]}",
                         f"data.files.embeddings={paths.embeddings}", f"data.files.sft_checkpoint={tmp_path / 'bad.ckpt'}"]))
    assert not (tmp_path / "out2" / "checkpoints").exists()


def test_ctrl_c_marks_the_run_killed(store, tmp_path):
    """SIGINT during training: the MLflow run ends KILLED and no temp/half-written checkpoint is left."""
    import signal
    import time

    import torch

    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"], "LEVERPLUS_CACHE": store["cache"]}
    proc = subprocess.Popen(
        [sys.executable, "-m", "leverplus.train", *TINY, "rce.epochs=400", f"tracking.artifact_root={store['artifacts']}",
         "tracking.run_name=interrupted", f"hydra.run.dir={tmp_path}/run", f"output_dir={tmp_path}/out"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    ckpt_dir = tmp_path / "out" / "checkpoints"
    while time.time() < deadline and not (ckpt_dir.exists() and any(ckpt_dir.glob("rce_epoch*.pt"))):
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    r = _find(store, "interrupted")
    assert r.info.status == "KILLED"
    for p in ckpt_dir.iterdir():  # only complete checkpoints, no temp files
        assert p.suffix == ".pt" and not p.name.startswith(".")
        torch.load(p, weights_only=True)


def test_joint_training_over_several_shot_files(store, tmp_path, compose_cfg):
    run(compose_cfg(TINY + ["data.shot_nums=[1,2]", "tracking.enabled=false", f"data.cache_dir={store['cache']}",
                            f"output_dir={tmp_path}"]))
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert {"1", "2"} == set(m["filter_stats"])  # both RL files were loaded and filtered
    for shot in (1, 2):
        assert f"val/downstream/shot{shot}/selector_acc" in m["metrics"]
    # the headline is the mean over the shots
    per_shot = [m["metrics"][f"val/downstream/shot{s}/selector_acc"] for s in (1, 2)]
    assert m["metrics"]["val/downstream_acc"] == pytest.approx(sum(per_shot) / 2)
