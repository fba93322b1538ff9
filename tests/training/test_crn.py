"""Common random numbers: arms that differ only in their rewards see the same data order and the same dropout
stream at a seed, in every phase. Trainer on the synthetic groups of test_trainer.py; a Trainer subclass records,
per batch, the queries and a digest of the global torch RNG state (which drives dropout) before the batch runs."""

from __future__ import annotations

import hashlib
from functools import partial

import torch
from paths import compose_cfg
from test_trainer import SMALL, make_groups

from leverplus.data.groups import Group
from leverplus.evaluation.ranking import validation_metrics
from leverplus.model.build import build_model
from leverplus.training.trainer import Trainer


class RecordingTrainer(Trainer):
    """Records (phase batch description, query ids, RNG digest) for every training batch."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.trace = []

    def _batches(self, groups, batch_size, desc):
        return _Recorded(super()._batches(groups, batch_size, desc), desc.split()[0], self.trace)


class _Recorded:
    """The trainer's progress-bar iterable, recording each batch as it is handed out."""

    def __init__(self, bar, phase, trace):
        self.bar, self.phase, self.trace = bar, phase, trace

    def __iter__(self):
        for chunk in self.bar:
            digest = hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()
            self.trace.append((self.phase, tuple(g.query_id for g in chunk), digest))
            yield chunk

    def set_postfix(self, **kw):
        self.bar.set_postfix(**kw)


def _reward_variant(groups, scale: float, flip: bool):
    """The same groups with other rewards: what a reward ablation changes, and nothing else."""
    out = []
    for g in groups:
        raw = (1.0 - g.rewards_raw if flip else g.rewards_raw) * scale
        norm = (raw - raw.mean()) / raw.std() if raw.std() > 1e-12 else raw
        out.append(Group(g.query_id, g.shot_num, g.pool_ids, g.labels, raw, norm, g.acc, g.candidate_index))
    return out


def _train(tmp_path, groups, emb, seed=0):
    cfg = compose_cfg(SMALL + ["rce.epochs=1", "grpo.epochs=1", f"seed={seed}"])
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, emb.shape[1])
    t = RecordingTrainer(cfg, emb, groups[:32], groups[32:], tmp_path, say=lambda s: None,
                         validate=partial(validation_metrics, groups=groups[32:], embeddings=emb))
    result = t.fit(model)
    return t.trace, {k: v.clone() for k, v in result.model.state_dict().items()}


def test_arms_at_a_seed_share_data_order_and_dropout_streams(tmp_path):
    emb, groups = make_groups()
    trace_a, state_a = _train(tmp_path / "a", groups, emb)
    trace_b, state_b = _train(tmp_path / "b", _reward_variant(groups, 2.0, flip=True), emb)
    assert {p for p, _, _ in trace_a} == {"RCE", "GRPO"} and len(trace_a) >= 4
    # same batches, in the same order, each starting from the same RNG state: common random numbers
    assert trace_a == trace_b
    # ... while the rewards did change the training
    assert any(not torch.equal(state_a[k], state_b[k]) for k in state_a)
    # another seed draws other streams (the trace does see them)
    trace_1, _ = _train(tmp_path / "c", groups, emb, seed=1)
    assert [q for _, q, _ in trace_a] != [q for _, q, _ in trace_1] and trace_a[0][2] != trace_1[0][2]
