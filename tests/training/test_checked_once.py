"""The trainer validates its data once and then trains with the model's per-batch input checks off: bad data still
fails, before any training, naming the query and the field; with valid data the checks change nothing."""

import dataclasses

import pytest
import torch
from paths import compose_cfg
from test_trainer import SMALL, make_groups, run

from leverplus.config.schema import RCEConfig
from leverplus.data.batching import check_groups, collate
from leverplus.errors import LeverPlusInputError
from leverplus.model.build import build_model
from leverplus.model.pointer import inputs_checked
from leverplus.training.trainer import Trainer, member_log_probs
from leverplus.utils import plain_config


def _trainer(tmp_path, emb, groups):
    return Trainer(compose_cfg(SMALL), emb, groups, [], tmp_path, say=lambda s: None)


@pytest.mark.parametrize(
    "spoil, field, words",
    [
        (lambda emb, g: emb.__setitem__((g[3].pool_ids[2], 5), float("nan")), "embeddings", "NaN"),
        (lambda emb, g: g[3].labels.__setitem__((1, 0), 10), "labels", "[0, 10)"),
        (lambda emb, g: g[3].labels.__setitem__((1, 0), -1), "labels", "[0, 10)"),
        (lambda emb, g: g[3].pool_ids.__setitem__(4, 10**6), "pool_ids/query_id", "outside the embedding table"),
        (lambda emb, g: setattr(g[3], "labels", g[3].labels.float()), "labels", "integer"),
        (lambda emb, g: setattr(g[3], "shot_num", 11), "shot_num", "distinct items"),
    ],
)
def test_bad_data_fails_at_trainer_start_naming_query_and_field(tmp_path, spoil, field, words):
    emb, groups = make_groups()
    spoil(emb, groups)
    with pytest.raises(LeverPlusInputError) as e:
        _trainer(tmp_path, emb, groups)
    assert e.value.field == field and words in str(e.value)
    if field != "embeddings":
        assert "query 3 (train)" in str(e.value)
    assert not list(tmp_path.iterdir())  # nothing was written


def test_valid_data_passes_and_checks_off_restore_after_an_error():
    emb, groups = make_groups()
    check_groups(groups, emb)  # no error
    model = build_model(compose_cfg(SMALL).model, emb.shape[1])
    with pytest.raises(RuntimeError):
        with inputs_checked(model):
            assert model.check_inputs is False
            raise RuntimeError("boom")
    assert model.check_inputs is True
    b = collate(groups[:2], emb)
    with pytest.raises(LeverPlusInputError, match="NaN"):  # the checks are back on
        model.sequence_nll(b.query_emb * float("nan"), b.cand_emb, b.labels, b.cand_mask)


@pytest.mark.parametrize("smoothed", [True, False])
def test_log_probs_are_bit_identical_with_the_checks_off(smoothed):
    emb, groups = make_groups()
    model = build_model(compose_cfg(SMALL).model, emb.shape[1]).train()
    b = collate(groups[:8], emb)
    torch.manual_seed(3)
    on = member_log_probs(model, b, smoothed=smoothed)
    torch.manual_seed(3)
    with inputs_checked(model):
        off = member_log_probs(model, b, smoothed=smoothed)
    assert torch.equal(on, off)  # the same dropout draws and the same arithmetic


def test_training_with_the_checks_off_equals_training_with_them_on(tmp_path, monkeypatch):
    import contextlib

    import leverplus.training.trainer as trainer_module

    a = run(tmp_path / "off", ["rce.epochs=2", "grpo.epochs=2"])[1]
    monkeypatch.setattr(trainer_module, "inputs_checked", lambda model: contextlib.nullcontext(model))
    b = run(tmp_path / "on", ["rce.epochs=2", "grpo.epochs=2"])[1]
    assert len(a.memory.history) > 10
    timings = ("time", "seconds", "per_s")
    drop = lambda h: [x for x in h if not any(t in x[1] for t in timings)]  # noqa: E731
    assert drop(a.memory.history) == drop(b.memory.history)


def test_plain_config_gives_the_dataclass_or_a_namespace_with_the_same_values():
    node = compose_cfg([]).rce
    plain = plain_config(node)
    assert isinstance(plain, RCEConfig)
    assert {f.name: getattr(plain, f.name) for f in dataclasses.fields(plain)} == {k: node[k] for k in node}
    from omegaconf import OmegaConf

    ns = plain_config(OmegaConf.create({"lr": 0.5, "epochs": 2}))
    assert (ns.lr, ns.epochs) == (0.5, 2)
    assert plain_config(plain) is plain
