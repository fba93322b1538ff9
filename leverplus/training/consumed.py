"""What training consumes from the rewards, as a hash: two reward configurations whose hashes agree train
bit-identical models, so a sweep runs them once (arm aliasing)."""

from __future__ import annotations

import torch

from leverplus.training.losses import group_advantages, top_k_members
from leverplus.utils import enum_value


def hash_consumed_rewards(h, groups, cfg) -> None:
    """Feed ``h`` what training consumes from the train groups' rewards, in the form it is consumed.

    RCE: the weights are ``softmax(r/τ)`` of the raw or normalised rewards, so a group whose rewards are all equal
    gives exactly uniform weights whatever the value (such groups keep their raw values under z-scoring): hashed
    as zeros. GRPO: the advantages and the top-k picks of every curriculum stage, exactly as ``grpo_loss`` gets them.
    """
    rce_raw = bool(cfg.rce.use_raw_reward)
    grpo_on = int(cfg.grpo.epochs) > 0
    grpo_raw = str(enum_value(cfg.grpo.reward_source)) == "raw"
    ks = sorted({None if int(k) < 0 else int(k) for _, k in cfg.grpo.top_k_schedule}, key=lambda k: (k is None, k))
    for g in groups:
        h.update(str((g.query_id, g.shot_num)).encode())
        h.update(g.labels.numpy().tobytes())
        r = g.rewards_raw if rce_raw else g.rewards
        h.update((torch.zeros_like(r) if bool((r == r[0]).all()) else r).numpy().tobytes())
    if grpo_on and groups:  # one padded [N, G] batch: row-wise identical to the trainer's batches
        width = max(len(g.rewards) for g in groups)
        r = torch.zeros(len(groups), width, dtype=groups[0].rewards.dtype)
        mask = torch.zeros(len(groups), width, dtype=torch.bool)
        for i, g in enumerate(groups):
            r[i, : len(g.rewards)] = g.rewards_raw if grpo_raw else g.rewards
            mask[i, : len(g.rewards)] = True
        for k in ks:
            idx, sel = top_k_members(r, mask=mask, k=k)
            adv = group_advantages(torch.gather(r, 1, idx), mask=sel, std_floor=float(cfg.grpo.adv_std_floor),
                                   clip=float(cfg.grpo.adv_clip))
            h.update(idx.numpy().tobytes())
            h.update(adv.numpy().tobytes())

