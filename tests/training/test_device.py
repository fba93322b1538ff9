"""``device``: the trainer and the evaluation run the pointer network on the resolved device; CPU runs are exactly what
they were; checkpoints and stage-cache entries hold CPU tensors; CUDA runs have run and stage keys of their own.
The CUDA tests run where a GPU exists and are skipped elsewhere."""

import math
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from paths import compose_cfg
from test_trainer import SMALL, make_groups

from leverplus.data.groups import Group
from leverplus.data.loading import prepare_groups
from leverplus.evaluation.ranking import validation_metrics
from leverplus.model.build import build_model
from leverplus.model.pointer import module_device
from leverplus.pipeline import load_data, train_and_evaluate
from leverplus.training.stage_cache import StageCache, stage_keys
from leverplus.training.trainer import Trainer
from leverplus.utils import cpu_tensors, device_kind

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
#: no dropout and the last epoch kept: a CUDA run then differs from the CPU run only by floating-point rounding (CUDA
#: kernels sum in another order), not by CUDA's own dropout masks or a choice between two nearly equal epochs
NO_NOISE = ["model.dropout=0.0", "model.attn_dropout=0.0", "eval.select=last"]

#: every phase for a few steps: SFT on the same groups, RCE, GRPO with its old-log-prob pass, validation each epoch
PHASES = ["sft.epochs=1", "rce.epochs=1", "grpo.epochs=1", "grpo.freeze_backbone=false"]


def train(tmp_path, overrides):
    cfg = compose_cfg(SMALL + PHASES + overrides)
    emb, groups = make_groups()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, emb.shape[1])
    trainer = Trainer(cfg, emb, groups[:32], groups[32:], tmp_path, say=lambda s: None,
                      validate=partial(validation_metrics, groups=groups[32:], embeddings=emb))
    return trainer.fit(model, sft_groups=groups[:32]), trainer


# ---------------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("device", ["cpu"] + ([] if CUDA else ["auto"]))
def test_device_cpu_trains_the_weights_of_the_default_bit_for_bit(tmp_path, device):
    default, t_default = train(tmp_path / "default", [])
    explicit, t_explicit = train(tmp_path / "explicit", [f"device={device}"])
    assert compose_cfg([]).device == "cpu"
    assert t_explicit.device.type == "cpu" and module_device(explicit.model).type == "cpu"
    a, b = default.model.state_dict(), explicit.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert t_default.memory.history == t_explicit.memory.history
    assert {"sft/loss", "rce/loss", "grpo/kl", "val/loss"} <= {name for _, name, _ in t_default.memory.history}


def test_module_device_is_where_the_parameters_are():
    assert module_device(torch.nn.Linear(2, 2)).type == "cpu"
    assert module_device(torch.nn.Identity()).type == "cpu"  # no parameters: inputs stay on the CPU


def test_cpu_tensors_keeps_the_structure_and_detaches():
    w = torch.ones(2, requires_grad=True)
    out = cpu_tensors({"a": w, "b": [torch.zeros(1), (torch.ones(1), 3)], "c": "x"})
    assert not out["a"].requires_grad and torch.equal(out["a"], torch.ones(2))
    assert isinstance(out["b"], list) and isinstance(out["b"][1], tuple) and out["b"][1][1] == 3 and out["c"] == "x"


# ---------------------------------------------------------------------------------------------- keys


def _stage_keys(overrides):
    cfg = compose_cfg(overrides)
    emb = torch.arange(12.0).reshape(3, 4)
    g = Group(0, 1, [1, 2], torch.tensor([[0], [1]]), torch.ones(2), torch.zeros(2), torch.ones(2), [0, 1])
    data = SimpleNamespace(embeddings=emb, fingerprint="fp")
    return stage_keys(cfg, data, SimpleNamespace(sft_train=[g]))


def test_stage_keys_of_cpu_runs_do_not_mention_the_device_and_cuda_runs_have_their_own():
    cpu = _stage_keys([])
    assert _stage_keys(["device=cpu"]) == cpu
    if not CUDA:
        assert _stage_keys(["device=auto"]) == cpu
    cuda = _stage_keys(["device=cuda"])
    assert cuda["sft"] != cpu["sft"] and cuda["rce"] != cpu["rce"]
    assert _stage_keys(["device=cuda:1"]) == cuda  # the same kind of device computes the same numbers
    assert device_kind("cuda:3") == "cuda" and device_kind("cpu") == "cpu"


# ---------------------------------------------------------------------------------------------- CUDA


@needs_cuda
def test_training_on_cuda_stays_on_the_gpu_writes_cpu_checkpoints_and_is_close_to_cpu(tmp_path):
    cpu, _ = train(tmp_path / "cpu", NO_NOISE)
    gpu, t_gpu = train(tmp_path / "gpu", NO_NOISE + ["device=cuda"])
    assert t_gpu.device.type == "cuda" and module_device(gpu.model).type == "cuda"
    for path in [*gpu.checkpoints, gpu.best_checkpoint]:
        state = torch.load(path, weights_only=True)["model_state_dict"]  # no map_location: the devices as saved
        assert all(t.device.type == "cpu" for t in state.values()), path
    for k, v in cpu.model.state_dict().items():
        torch.testing.assert_close(gpu.model.state_dict()[k].cpu(), v, rtol=1e-3, atol=1e-4)
    for key, value in cpu.last_val.items():
        assert math.isfinite(gpu.last_val[key])
        assert gpu.last_val[key] == pytest.approx(value, rel=1e-3, abs=1e-3), key
    # a checkpoint written on the GPU loads onto the CPU and gives the GPU model's numbers there
    again = build_model(compose_cfg(SMALL).model, 16)
    again.load_state_dict(torch.load(gpu.best_checkpoint, weights_only=True)["model_state_dict"])
    for k, v in again.state_dict().items():
        torch.testing.assert_close(v, gpu.model.state_dict()[k].cpu(), rtol=0, atol=0)


@needs_cuda
def test_a_run_on_cuda_evaluates_there_caches_cpu_stages_and_keeps_its_own_keys(tmp_path):
    def run(out, *overrides):
        cfg = compose_cfg(["data=sim_tiny", f"data.cache_dir={tmp_path}/world", "tracking.enabled=false",
                           "sft.epochs=2", "rce.epochs=1", "grpo.epochs=1", "rce.cache=true", *NO_NOISE, *overrides])
        return train_and_evaluate(cfg, load_data(cfg), tmp_path / out, say=lambda s: None), cfg

    gpu, gpu_cfg = run("gpu", "device=cuda")
    cpu, cpu_cfg = run("cpu")
    assert module_device(gpu.result.model).type == "cuda"
    assert not any(gpu.cache_hits.values()) and not any(cpu.cache_hits.values())  # no entry shared across devices
    data = load_data(cpu_cfg)
    groups = prepare_groups(cpu_cfg, data)
    gpu_keys, cpu_keys = stage_keys(gpu_cfg, data, groups), stage_keys(cpu_cfg, data, groups)
    assert gpu_keys["sft"] != cpu_keys["sft"] and gpu_keys["rce"] != cpu_keys["rce"]
    cache = StageCache(tmp_path / "world" / "stages")
    for stage in ("sft", "rce"):
        entry = torch.load(cache.path(stage, gpu_keys[stage]), weights_only=True)  # the devices as saved
        assert all(t.device.type == "cpu" for t in entry["state"].values())
        assert cache.get(stage, gpu_keys[stage]) is not None  # and it verifies against its sha256
    for key in ("val/offline/rce_loss", "val/kl_from_sft", "val/offline/mean_reward"):
        assert math.isfinite(gpu.metrics[key]) and gpu.metrics[key] == pytest.approx(cpu.metrics[key], rel=1e-3), key
    # accuracies of greedy picks: a near-tie may flip one query's pick under rounding, so a few points at most
    for key in ("val/offline/top1_acc", "val/downstream_acc"):
        assert math.isfinite(gpu.metrics[key]) and abs(gpu.metrics[key] - cpu.metrics[key]) <= 0.1, key
    again, _ = run("gpu_again", "device=cuda")
    assert again.cache_hits["sft"] and again.cache_hits["rce"]  # the CUDA entries serve the next CUDA run
