"""``+preset=reference`` on a small learnable dataset: each behaviour the preset switches, checked in the trainer
(one optimiser step per query, constant learning rate, one dropout mask per member, the last epoch kept, β adapted
per query, the top-1 loss averaged over the steps), plus the rank advantage and ``grpo/max_advantage`` by hand."""

from functools import partial

import pytest
import torch
from paths import compose_cfg
from torch.optim.optimizer import register_optimizer_step_post_hook

from leverplus.data.batching import collate
from leverplus.data.groups import Group
from leverplus.evaluation.ranking import validation_metrics
from leverplus.model.build import build_model
from leverplus.model.checkpoint import load_pointer_checkpoint
from leverplus.training.losses import GRPOEpochStats, grpo_loss, rank_advantages
from leverplus.training.trainer import Trainer, member_log_probs

SMALL = ["model.hidden_dim=16", "tracking.enabled=false", "model.dropout=0.5"]
PRESET = ["+preset=reference", *SMALL]
N_TRAIN, N_VAL = 12, 6


def make_groups(n_queries=N_TRAIN + N_VAL, pool=8, members=4, d=16, seed=0):
    """Reward of a member = cosine(query, its second ICD) > 0, plus the clipped cosine (learnable)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(n_queries + pool * n_queries, d, generator=g), dim=-1)
    groups = []
    for q in range(n_queries):
        pool_ids = list(range(n_queries + q * pool, n_queries + (q + 1) * pool))
        labels = torch.stack([torch.randperm(pool, generator=g)[:2] for _ in range(members)])
        sims = emb[[pool_ids[i] for i in labels[:, 1].tolist()]] @ emb[q]
        raw = (sims > 0).float() + sims.clamp(min=0)
        norm = (raw - raw.mean()) / raw.std()
        groups.append(Group(q, 2, pool_ids, labels, raw, norm, (sims > 0).float(), list(range(members))))
    return emb, groups


class StepRecorder:
    """Every optimiser step of the run (a torch optimizer hook): the learning rate it used."""

    def __init__(self) -> None:
        self.lrs = []
        self.handle = register_optimizer_step_post_hook(
            lambda opt, args, kwargs: self.lrs.append(opt.param_groups[0]["lr"]))

    def close(self) -> None:
        self.handle.remove()


def run(tmp_path, overrides, *, hook_dropout=False):
    cfg = compose_cfg(overrides)
    emb, groups = make_groups()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, emb.shape[1])
    rows = []
    if hook_dropout:  # the batch dimension every train-mode dropout call sees
        model.dropout.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]) if m.training else None)
    trainer = Trainer(cfg, emb, groups[:N_TRAIN], groups[N_TRAIN:], tmp_path, say=lambda s: None,
                      validate=partial(validation_metrics, groups=groups[N_TRAIN:], embeddings=emb))
    steps = StepRecorder()
    try:
        result = trainer.fit(model)
    finally:
        steps.close()
    return result, trainer, steps.lrs, rows, cfg


def test_the_preset_sets_the_reference_behaviours():
    cfg = compose_cfg(["+preset=reference"])
    assert cfg.data.batch_size == 1 and cfg.model.per_member_dropout is True
    assert cfg.rce.lr_schedule.value == cfg.grpo.lr_schedule.value == "constant"
    assert cfg.eval.select.value == "last" and cfg.grpo.kl_update.value == "per_query"
    assert cfg.rce.top1_step_reduction.value == "mean" and cfg.rce.top1_compat_index0 is True
    assert cfg.eval.vqa_normalization.value == "lever_plus"
    assert compose_cfg(["+preset=reference", "data.batch_size=8"]).data.batch_size == 8  # later overrides win


def test_one_step_per_query_at_a_constant_learning_rate(tmp_path):
    _, trainer, lrs, _, cfg = run(tmp_path, [*PRESET, "rce.epochs=2", "grpo.epochs=2", "rce.lr=1e-3", "grpo.lr=2e-4"])
    assert len(lrs) == 2 * N_TRAIN + 2 * N_TRAIN  # steps per epoch = train queries, in both phases
    assert lrs == [1e-3] * (2 * N_TRAIN) + [2e-4] * (2 * N_TRAIN)  # no warmup, no decay
    assert [v for _, v in trainer.memory.series("rce/lr")] == [1e-3, 1e-3]
    # the defaults: 16 queries per step -> one step per epoch, warmup-cosine (lr decays after the warmup step)
    _, _, default_lrs, _, _ = run(tmp_path / "d", [*SMALL, "rce.epochs=4", "data.batch_size=16", "rce.lr=1e-3"])
    assert len(default_lrs) == 4 and default_lrs[3] < default_lrs[2] < default_lrs[0]


def test_every_member_draws_its_own_dropout_mask(tmp_path):
    _, _, _, rows, _ = run(tmp_path, [*PRESET, "rce.epochs=1", "grpo.epochs=1"], hook_dropout=True)
    # batch 1: the encoder runs on 4 tiled copies of the query in RCE (4 members) and on 3 in GRPO (top-3 of epoch 1)
    assert set(rows[: 2 * N_TRAIN]) == {4} and set(rows[2 * N_TRAIN:]) == {3}
    _, _, _, shared, _ = run(tmp_path / "d", [*PRESET, "rce.epochs=1", "model.per_member_dropout=false"],
                             hook_dropout=True)
    assert set(shared) == {1}  # one encoding (one mask) per query, shared by its members

    # members with identical labels: equal log-probs with a shared mask, different ones with a mask each
    cfg = compose_cfg(PRESET)
    emb, groups = make_groups()
    g = groups[0]
    same = Group(g.query_id, 2, g.pool_ids, g.labels[:1].repeat(4, 1), g.rewards_raw, g.rewards, g.acc,
                 list(range(4)))
    model = build_model(cfg.model, emb.shape[1]).train()
    b = collate([same], emb)
    own = member_log_probs(model, b, smoothed=True, per_member_dropout=cfg.model.per_member_dropout)[0]
    shared_lp = member_log_probs(model, b, smoothed=True)[0]
    assert len(set(own.tolist())) == 4 and len(set(shared_lp.tolist())) == 1


def test_the_last_epoch_is_kept(tmp_path):
    result, trainer, _, _, _ = run(tmp_path, [*PRESET, "rce.epochs=3", "rce.lr=3e-3"])
    assert result.best["epoch"] == 3 and result.best["phase"] == "rce"
    last = load_pointer_checkpoint(tmp_path / "checkpoints" / "rce_epoch3.pt")
    for k, v in last.state_dict().items():
        assert torch.equal(result.model.state_dict()[k], v), k
    best = load_pointer_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert all(torch.equal(best.state_dict()[k], v) for k, v in last.state_dict().items())
    # GRPO on top: the selection scope is GRPO's last epoch
    result, _, _, _, _ = run(tmp_path / "g", [*PRESET, "rce.epochs=1", "grpo.epochs=2"])
    assert (result.best["phase"], result.best["epoch"]) == ("grpo", 2)


def test_beta_adapts_once_per_query(tmp_path):
    _, t, _, _, _ = run(tmp_path, [*PRESET, "rce.epochs=1", "grpo.epochs=2", "grpo.lr=1e-3"])
    assert t.kl_controller.n_updates == 2 * N_TRAIN
    # at batch 4: still once per query with the preset, once per step with the default cadence
    _, t4, _, _, _ = run(tmp_path / "b4", [*PRESET, "data.batch_size=4", "rce.epochs=1", "grpo.epochs=2"])
    assert t4.kl_controller.n_updates == 2 * N_TRAIN
    _, ts, _, _, _ = run(tmp_path / "s4", [*PRESET, "data.batch_size=4", "rce.epochs=1", "grpo.epochs=2",
                                          "grpo.kl_update=per_step"])
    assert ts.kl_controller.n_updates == 2 * N_TRAIN // 4


def test_at_batch_one_per_query_and_per_step_are_the_same_run(tmp_path):
    args = [*PRESET, "rce.epochs=1", "grpo.epochs=2", "grpo.lr=1e-3"]
    _, a, _, _, _ = run(tmp_path / "q", args)
    _, b, _, _, _ = run(tmp_path / "s", [*args, "grpo.kl_update=per_step"])
    assert a.memory.history == b.memory.history


def test_top1_loss_is_the_mean_over_the_steps(tmp_path):
    """At a negligible learning rate both runs see the same weights: mean over S = 2 steps is half the sum."""
    args = [*PRESET, "rce.epochs=1", "rce.use_top1_only=true", "rce.lr=1e-12"]
    _, mean, _, _, _ = run(tmp_path / "m", args)
    _, total, _, _, _ = run(tmp_path / "s", [*args, "rce.top1_step_reduction=sum"])
    m, s = mean.memory.series("rce/loss")[0][1], total.memory.series("rce/loss")[0][1]
    assert m == pytest.approx(s / 2, rel=1e-6)


# ---------------------------------------------------------------------------------------------- rank advantage


def test_rank_advantages_by_hand():
    r = torch.tensor([[0.2, 0.9, 0.5, 7.0], [3.0, 3.0, 1.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True], [True, False, False, False]])
    # row 0: ascending ranks 0, 2, 1 of n = 3 -> A = 2·rank/2 − 1 = −1, 1, 0 (the padded 7.0 is ignored)
    # row 1: ascending ranks 2, 3, 1, 0 (tie: the earlier 3.0 ranks lower) -> 2·rank/3 − 1
    # row 2: one valid member -> 0
    expected = torch.tensor([[-1.0, 1.0, 0.0, 0.0], [1 / 3, 1.0, -1 / 3, -1.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(rank_advantages(r, mask=mask), expected)


def test_grpo_with_rank_advantages_and_max_advantage_by_hand():
    # ratio 1 (new = old): L_PPO = −mean_i A_i. Rewards (0, 1, 10): rank A = (−1, 0, 1), so L_PPO = 0 and max |A| = 1;
    # z-score A = (r − 11/3) / std with the unbiased std = sqrt(((11/3)² + (8/3)² + (19/3)²) / 2): max |A| = (19/3)/std
    r = torch.tensor([[0.0, 1.0, 10.0]])
    lp = torch.zeros(1, 3)
    ranked = grpo_loss(lp, lp, r, advantages=rank_advantages(r))
    assert float(ranked["ppo_loss"]) == pytest.approx(0.0) and float(ranked["per_query_max_abs_adv"][0]) == 1.0
    std = ((11 / 3) ** 2 + (8 / 3) ** 2 + (19 / 3) ** 2) ** 0.5 / 2 ** 0.5
    z = grpo_loss(lp, lp, r)
    assert float(z["per_query_max_abs_adv"][0]) == pytest.approx((10 - 11 / 3) / std)
    # the epoch's max_advantage: mean over queries of each query's max |A| (two batches, three queries)
    stats = GRPOEpochStats()
    two = torch.tensor([[0.0, 1.0, 10.0], [1.0, 1.0, 1.0]])
    out2 = grpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), two)
    stats.add(out2, two, torch.ones(2, 3, dtype=torch.bool), two, torch.ones(2, 3, dtype=torch.bool))
    stats.add(ranked, r, torch.ones(1, 3, dtype=torch.bool), r, torch.ones(1, 3, dtype=torch.bool))
    assert stats.summary()["max_advantage"] == pytest.approx(((10 - 11 / 3) / std + 0.0 + 1.0) / 3)


def test_rank_advantage_in_the_trainer_logs_max_advantage(tmp_path):
    _, t, _, _, _ = run(tmp_path, [*SMALL, "data.batch_size=4", "rce.epochs=1", "grpo.epochs=1",
                                   "grpo.advantage=rank"])
    # rank advantages of 3 distinct rewards are −1, 0, 1: every query's max |A| is 1
    assert t.memory.series("grpo/max_advantage") == [(1, 1.0)]
    _, z, _, _, _ = run(tmp_path / "z", [*SMALL, "data.batch_size=4", "rce.epochs=1", "grpo.epochs=1"])
    assert z.memory.series("grpo/max_advantage")[0][1] != 1.0
