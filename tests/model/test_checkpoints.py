"""Strict checkpoint I/O for the four reference#checkpoints formats: trainer .pt, Lightning .ckpt, v2format .ckpt, raw state dict."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from leverplus.data.formats.checkpoints import (
    detect_checkpoint_format,
    extract_pointer_state_dict,
    infer_model_config,
)
from leverplus.errors import LeverPlusInputError
from leverplus.model.checkpoint import load_pointer_checkpoint, save_pointer_checkpoint
from leverplus.model.pointer import PointerSelector


def small(num_layers: int = 1, gate: bool = True, **kw) -> PointerSelector:
    return PointerSelector(12, hidden_dim=8, num_layers=num_layers, use_query_update_gate=gate, **kw)


def same_weights(a: PointerSelector, b: PointerSelector) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def lightning_dict(model: PointerSelector, v2format: bool = False) -> dict:
    """A Lightning SFT checkpoint: pointer net under lever_lm.pointer_selector., plus fake CLIP weights."""
    sd = {}
    for k, v in model.state_dict().items():
        if v2format:  # convert_v3_to_v2_format.py: keep layer 0 only, rename it
            if k.startswith(("cross_attn_layers.", "attn_norms.")) and not k.split(".")[1] == "0":
                continue
            k = k.replace("cross_attn_layers.0.", "cross_attn.").replace("attn_norms.0.", "attn_norm.")
        sd[f"lever_lm.pointer_selector.{k}"] = v
    sd["lever_lm.sen_model.text_model.embeddings.token_embedding.weight"] = torch.randn(5, 4)
    sd["lever_lm.img_model.vision_model.post_layernorm.weight"] = torch.randn(4)
    hp = {"lr": 1e-4, "weight_decay": 1e-3, "warm_steps": 0.05}
    return {"epoch": 3, "global_step": 0 if v2format else 120, "state_dict": sd, "hyper_parameters": hp,
            **({"pytorch-lightning_version": "2.0.0"} if v2format else {})}


def test_trainer_pt_round_trip_restores_weights_config_and_metadata(tmp_path):
    model = small(num_layers=2, num_heads=2, dropout=0.3)
    path = tmp_path / "ckpt" / "grpo_epoch2.pt"
    save_pointer_checkpoint(path, model, phase="grpo", epoch=2, kl_beta=0.15,
                            metrics={"val_loss": np.float32(0.5), "acc": [1, 2]}, extra={"seed": 7})
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"epoch", "phase", "model_state_dict", "kl_beta", "metrics", "model_config", "epoch_base",
                        "seed"}
    assert (raw["epoch"], raw["epoch_base"]) == (2, 1)  # 1-based, as the file name
    assert detect_checkpoint_format(raw) == "trainer_pt"
    loaded = load_pointer_checkpoint(path)
    assert same_weights(model, loaded)
    assert loaded.config == model.config  # num_heads=2 and dropout=0.3 come from the stored model_config
    info = loaded.checkpoint_info
    assert (info["format"], info["epoch"], info["phase"], info["kl_beta"]) == ("trainer_pt", 2, "grpo", 0.15)
    assert info["metrics"] == {"val_loss": 0.5, "acc": [1, 2]}
    assert os.listdir(path.parent) == ["grpo_epoch2.pt"]  # no temp file left behind


def test_reference_trainer_pt_without_model_config_is_inferred(tmp_path):
    model = small(num_layers=3, gate=False)
    ref = {"epoch": 0, "phase": "rce", "model_state_dict": model.state_dict(), "kl_beta": 0.1, "metrics": {}}
    torch.save(ref, tmp_path / "rce_epoch1.pt")
    loaded = load_pointer_checkpoint(tmp_path / "rce_epoch1.pt")
    assert loaded.num_layers == 3 and not loaded.use_query_update_gate and same_weights(model, loaded)


def test_lightning_ckpt_keeps_pointer_keys_and_reports_clip_keys_as_ignored(tmp_path):
    model = small()
    torch.save(lightning_dict(model), tmp_path / "sft.ckpt")
    obj = torch.load(tmp_path / "sft.ckpt", weights_only=True)
    assert detect_checkpoint_format(obj) == "lightning_ckpt"
    sd, fmt, ignored = extract_pointer_state_dict(obj)
    assert fmt == "lightning_ckpt" and set(sd) == set(model.state_dict())
    assert sorted(ignored) == ["lever_lm.img_model.vision_model.post_layernorm.weight",
                               "lever_lm.sen_model.text_model.embeddings.token_embedding.weight"]
    loaded = load_pointer_checkpoint(tmp_path / "sft.ckpt")
    assert same_weights(model, loaded) and loaded.checkpoint_info["ignored_keys"] == ignored


def test_v2format_names_are_mapped_back_in_lightning_and_raw_dicts(tmp_path):
    model = small(num_layers=1)
    obj = lightning_dict(model, v2format=True)
    assert detect_checkpoint_format(obj) == "v2format_ckpt"
    torch.save(obj, tmp_path / "rce_epoch5_v2format.ckpt")
    loaded = load_pointer_checkpoint(tmp_path / "rce_epoch5_v2format.ckpt")
    assert same_weights(model, loaded)  # the trained cross-attention is used, unlike the reference (reference#defect-c2)
    raw = {k.replace("lever_lm.pointer_selector.", ""): v for k, v in obj["state_dict"].items() if "pointer" in k}
    assert "cross_attn.in_proj_weight" in raw and "attn_norm.bias" in raw
    assert detect_checkpoint_format(raw) == "raw_state_dict"
    assert same_weights(model, load_pointer_checkpoint(raw))


def test_v2format_of_a_three_layer_model_loads_only_non_strictly():
    model = small(num_layers=3)
    obj = lightning_dict(model, v2format=True)  # layers 1 and 2 were dropped by the converter
    one = load_pointer_checkpoint(obj)  # inferred num_layers = 1: the file is complete for that model
    assert one.num_layers == 1
    with pytest.raises(LeverPlusInputError, match="missing keys") as err:
        load_pointer_checkpoint(obj, num_layers=3)
    assert "cross_attn_layers.1.in_proj_weight" in str(err.value) and "v2format_ckpt" in str(err.value)


@pytest.mark.parametrize("prefix", ["", "pointer_selector.", "model."])
def test_raw_state_dicts_with_and_without_prefix(tmp_path, prefix):
    model = small(num_layers=3)
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, tmp_path / "raw.pt")
    loaded = load_pointer_checkpoint(tmp_path / "raw.pt")
    assert loaded.num_layers == 3 and same_weights(model, loaded)


def test_infer_model_config_from_weights():
    assert infer_model_config(PointerSelector(512).state_dict()) == dict(
        d_model=512, hidden_dim=256, num_layers=1, use_query_update_gate=True)
    assert infer_model_config(small(num_layers=3, gate=False).state_dict()) == dict(
        d_model=12, hidden_dim=8, num_layers=3, use_query_update_gate=False)
    # d_model == hidden_dim: input_proj is an Identity with no weight
    assert infer_model_config(PointerSelector(8, hidden_dim=8).state_dict())["d_model"] == 8


def test_strict_error_for_a_missing_key(tmp_path):
    sd = small().state_dict()
    del sd["attn_norms.0.bias"]
    torch.save(sd, tmp_path / "m.pt")
    with pytest.raises(LeverPlusInputError) as err:
        load_pointer_checkpoint(tmp_path / "m.pt")
    msg = str(err.value)
    assert str(tmp_path / "m.pt") in msg and "raw_state_dict" in msg
    assert "missing keys [attn_norms.0.bias]" in msg and "model.strict_load=false" in msg


def test_strict_error_for_an_unexpected_key_and_strict_false_warns(tmp_path):
    model = small()
    sd = dict(model.state_dict())
    sd["extra_head.weight"] = torch.zeros(3)
    with pytest.raises(LeverPlusInputError, match=r"unexpected keys \[extra_head.weight\]"):
        load_pointer_checkpoint(sd)
    with pytest.warns(UserWarning, match="extra_head.weight"):
        loaded = load_pointer_checkpoint(sd, strict=False)
    assert same_weights(model, loaded)


def test_strict_error_for_a_wrong_shape_and_non_strict_skips_it():
    model = small()
    sd = dict(model.state_dict())
    sd["query_update_gate.bias"] = torch.zeros(5)
    expected = r"shape mismatches \[query_update_gate.bias \(5,\) vs model \(8,\)\]"
    with pytest.raises(LeverPlusInputError, match=expected):
        load_pointer_checkpoint(sd)
    with pytest.warns(UserWarning, match="shape mismatches"):
        loaded = load_pointer_checkpoint(sd, strict=False)
    assert torch.equal(loaded.query_proj.weight, model.query_proj.weight)
    assert torch.all(loaded.query_update_gate.bias == 0)  # kept its init, not the bad tensor


def test_conflicting_kwarg_gives_the_strict_error_with_the_fix(tmp_path):
    torch.save(small(num_layers=3).state_dict(), tmp_path / "three.pt")
    with pytest.raises(LeverPlusInputError) as err:
        load_pointer_checkpoint(tmp_path / "three.pt", num_layers=1)
    msg = str(err.value)
    assert "unexpected keys" in msg and "cross_attn_layers.2.in_proj_bias" in msg
    assert "pass model.num_layers=3" in msg and "model.strict_load=false" in msg
    with pytest.raises(LeverPlusInputError, match="model.use_query_update_gate=True"):
        load_pointer_checkpoint(tmp_path / "three.pt", use_query_update_gate=False)
    # non-conflicting kwargs are fine (num_heads cannot be inferred from weights)
    assert load_pointer_checkpoint(tmp_path / "three.pt", num_heads=2, dropout=0.0).config["num_heads"] == 2
    with pytest.raises(LeverPlusInputError, match="unknown model arguments"):
        load_pointer_checkpoint(tmp_path / "three.pt", n_layers=3)


def test_unreadable_files_give_a_clear_error_naming_the_file(tmp_path):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(LeverPlusInputError, match="corrupt.pt.*is a text file, not a torch checkpoint"):
        load_pointer_checkpoint(bad)
    save_pointer_checkpoint(tmp_path / "ok.pt", small(), phase="rce", epoch=0)
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(LeverPlusInputError, match="truncated.pt.*damaged or truncated"):
        load_pointer_checkpoint(tmp_path / "truncated.pt")
    with pytest.raises(LeverPlusInputError, match="missing.pt: checkpoint not found"):
        load_pointer_checkpoint(tmp_path / "missing.pt")
    torch.save({"state_dict": small().state_dict(), "cfg": _Opaque()}, tmp_path / "pickled.ckpt")
    with pytest.raises(LeverPlusInputError, match="weights_only"):
        load_pointer_checkpoint(tmp_path / "pickled.ckpt")
    torch.save({"foo": 1}, tmp_path / "other.pt")
    with pytest.raises(LeverPlusInputError, match="other.pt.*not a pointer-net checkpoint"):
        load_pointer_checkpoint(tmp_path / "other.pt")


class _Opaque:
    """An arbitrary Python object, as OmegaConf configs inside Lightning hyper_parameters."""


def test_atomic_save_never_leaves_a_half_written_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "rce_epoch1.pt"
    first = small()
    save_pointer_checkpoint(path, first, phase="rce", epoch=0)
    real_save = torch.save

    def crash(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_pointer_checkpoint(path, small(), phase="rce", epoch=0)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["rce_epoch1.pt"]  # temp file removed
    assert same_weights(first, load_pointer_checkpoint(path))  # the old file is intact


def test_save_rejects_bad_metadata(tmp_path):
    with pytest.raises(LeverPlusInputError, match="reserved"):
        save_pointer_checkpoint(tmp_path / "a.pt", small(), phase="rce", epoch=0, extra={"epoch": 3})
    with pytest.raises(LeverPlusInputError, match="epoch"):
        save_pointer_checkpoint(tmp_path / "a.pt", small(), phase="rce", epoch=-1)
    with pytest.raises(LeverPlusInputError, match="cannot store"):
        save_pointer_checkpoint(tmp_path / "a.pt", small(), phase="rce", epoch=0, metrics={"x": object()})
    assert os.listdir(tmp_path) == []


def test_loaded_model_computes_the_same_outputs():
    torch.manual_seed(0)
    model = small(num_layers=2).eval()
    loaded = load_pointer_checkpoint(lightning_dict(model)).eval()
    q, C = torch.randn(2, 12), torch.randn(2, 5, 12)
    labels = torch.tensor([[[0, 1]], [[4, 2]]])
    assert torch.equal(model.sequence_log_probs(q, C, labels), loaded.sequence_log_probs(q, C, labels))


def test_saved_checkpoint_respects_the_umask_like_a_plain_file(tmp_path):
    """Checkpoints go through the project's one atomic writer, so they get the umask like every other output
    (a bare mkstemp would leave them 0600)."""
    save_pointer_checkpoint(tmp_path / "best.pt", small(), phase="rce", epoch=0)
    (tmp_path / "plain.txt").write_text("x")
    umask = os.umask(0)
    os.umask(umask)
    mode = os.stat(tmp_path / "best.pt").st_mode & 0o777
    assert mode == os.stat(tmp_path / "plain.txt").st_mode & 0o777 == 0o666 & ~umask
