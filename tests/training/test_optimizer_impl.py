"""``optimizer_impl``: the fused AdamW kernel takes the same steps as the default multi-tensor one up to the last bits,
is used by every phase when chosen, and has run and stage keys of its own; an unknown kernel fails at compose time.
The optimiser step clips the gradient exactly as ``clip_grad_norm_``."""

import pytest
import torch
from hydra.errors import ConfigCompositionException
from paths import compose_cfg
from test_device import _stage_keys, train

from leverplus.config.identity import run_key
from leverplus.config.schema import OptimizerImpl
from leverplus.training.trainer import Trainer


def test_fused_trains_the_same_weights_up_to_rounding(tmp_path, monkeypatch):
    built = []
    real = Trainer._optimizer

    def spy(self, model, phase_cfg, steps):
        opt, sched = real(self, model, phase_cfg, steps)
        built.append((opt.defaults["fused"], opt.defaults["foreach"]))
        return opt, sched

    monkeypatch.setattr(Trainer, "_optimizer", spy)
    foreach, _ = train(tmp_path / "foreach", ["model.dropout=0.0", "model.attn_dropout=0.0", "eval.select=last"])
    assert built == [(None, True)] * 3  # SFT, RCE, GRPO
    built.clear()
    fused, _ = train(tmp_path / "fused", ["model.dropout=0.0", "model.attn_dropout=0.0", "eval.select=last",
                                          "optimizer_impl=fused"])
    assert built == [(True, None)] * 3
    a, b = foreach.model.state_dict(), fused.model.state_dict()
    start = train(tmp_path / "none", ["sft.epochs=0", "rce.epochs=0", "grpo.epochs=0"])[0].model.state_dict()
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    gap = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-3  # training moved the weights ...
    assert gap < 1e-4 * moved  # ... and the two kernels agree far below that (float32 rounding)


def test_fused_has_its_own_run_and_stage_keys_and_foreach_keeps_the_default_ones():
    default = _stage_keys([])
    assert _stage_keys(["optimizer_impl=foreach"]) == default
    fused = _stage_keys(["optimizer_impl=fused"])
    assert fused["sft"] != default["sft"] and fused["rce"] != default["rce"]
    from leverplus.config.identity import to_container

    keys = {impl: run_key(to_container(compose_cfg([f"optimizer_impl={impl}"])), "fp") for impl in ("foreach", "fused")}
    assert keys["foreach"] == run_key(to_container(compose_cfg([])), "fp") != keys["fused"]
    assert compose_cfg([]).optimizer_impl == OptimizerImpl.foreach


def test_an_unknown_kernel_fails_at_compose_naming_the_choices():
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(["optimizer_impl=fast"])
    assert "foreach" in str(e.value.__cause__) and "fused" in str(e.value.__cause__)


@pytest.mark.parametrize("clip", [1e-3, 1e3])  # clipped, and far below the clip
def test_the_step_clips_exactly_as_clip_grad_norm(clip):
    """optimizer_step rescales only when the norm exceeds the clip; either way the weights equal those of
    clip_grad_norm_ + step, bit for bit."""
    from leverplus.training.schedules import make_lr_scheduler
    from leverplus.training.trainer import optimizer_step

    def setup():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        opt = torch.optim.AdamW(net.parameters(), lr=0.1, foreach=True)
        return net, opt, make_lr_scheduler(opt, 10, "constant", 0.0)

    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    a, opt_a, sched_a = setup()
    b, opt_b, sched_b = setup()
    for _ in range(3):
        optimizer_step(opt_a, sched_a, a(x).pow(2).sum(), clip, "test")
        opt_b.zero_grad()
        b(x).pow(2).sum().backward()
        norm = torch.nn.utils.clip_grad_norm_(list(b.parameters()), clip)
        opt_b.step()
        sched_b.step()
        if clip < 1:
            assert norm > clip  # this case does clip
            clipped = torch.nn.utils.get_total_norm([p.grad for p in a.parameters()])
            assert clipped == pytest.approx(clip, rel=1e-3)
        else:
            assert norm < clip
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
