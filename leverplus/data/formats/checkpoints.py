"""Pointer-network checkpoint formats (``docs/reference.md#checkpoints``): trainer ``.pt``, Lightning ``.ckpt``
(CLIP keys ignored), the v2format renames, and raw state dicts. Detects the format, extracts the pointer
network's state dict and infers its shape config; building and loading the model is ``leverplus.model.checkpoint``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Union

import torch

from leverplus.data.formats.io import torch_load
from leverplus.errors import LeverPlusInputError

# ====================================================================== checkpoints

CHECKPOINT_FORMATS = ("trainer_pt", "lightning_ckpt", "v2format_ckpt", "raw_state_dict")
LIGHTNING_PREFIX = "lever_lm.pointer_selector."
RAW_PREFIXES = ("pointer_selector.", "model.")  # tried in order on raw state dicts
V2FORMAT_RENAMES = (("cross_attn.", "cross_attn_layers.0."), ("attn_norm.", "attn_norms.0."))
INFERRED_KEYS = ("d_model", "hidden_dim", "num_layers", "use_query_update_gate")
_IN_MEMORY = "<in-memory checkpoint>"
_MAX_LISTED = 20


def _list_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else "")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Keep the keys under ``prefix`` (stripped); return them and the ignored keys."""
    kept = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return kept, [k for k in sd if not k.startswith(prefix)]


def _rename_v2format(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo ``convert_v3_to_v2_format.py``'s renames (reference#defect-c2): ``cross_attn.*`` -> ``cross_attn_layers.0.*`` etc."""
    out = {}
    for k, v in sd.items():
        for old, new in V2FORMAT_RENAMES:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


def _has_v2format_names(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith(old) for k in sd for old, _ in V2FORMAT_RENAMES)


def _pointer_keys(sd: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Strip the first known prefix present (Lightning, then raw ones); keys without it are ignored."""
    prefix = next((p for p in (LIGHTNING_PREFIX,) + RAW_PREFIXES if any(k.startswith(p) for k in sd)), "")
    return _strip_prefix(sd, prefix)


def detect_checkpoint_format(obj: Any) -> str:
    """Which of reference#checkpoints formats ``obj`` (a loaded checkpoint) is: one of ``CHECKPOINT_FORMATS``."""
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        return "trainer_pt"
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        inner, _ = _pointer_keys(obj["state_dict"])
        return "v2format_ckpt" if _has_v2format_names(inner) else "lightning_ckpt"
    if _is_state_dict(obj):
        return "raw_state_dict"
    kind = f"a dict with keys {sorted(map(str, obj))[:10]}" if isinstance(obj, Mapping) else type(obj).__name__
    raise LeverPlusInputError(
        f"not a pointer-net checkpoint: got {kind}",
        fix="pass a trainer .pt, a Lightning .ckpt, a v2format .ckpt or a raw state dict",
    )


def extract_pointer_state_dict(obj: Any) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """Return ``(pointer-net state dict with our names, format, ignored keys)``.

    Lightning/v2format: only ``lever_lm.pointer_selector.*`` is kept (CLIP and other keys are ignored).
    Raw dicts: a ``pointer_selector.`` or ``model.`` prefix is stripped (keys without it are ignored).
    v2format names are renamed back in every format.
    """
    fmt = detect_checkpoint_format(obj)
    if fmt == "trainer_pt":
        sd = obj["model_state_dict"]
    elif fmt in ("lightning_ckpt", "v2format_ckpt"):
        sd = obj["state_dict"]
    else:
        sd = obj
    if not _is_state_dict(sd):
        raise LeverPlusInputError(
            f"the state dict of this {fmt} checkpoint is empty or holds non-tensor values",
            field="model_state_dict" if fmt == "trainer_pt" else "state_dict",
        )
    kept, ignored = _pointer_keys(sd)
    return _rename_v2format(kept), fmt, ignored


def infer_model_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``d_model``, ``hidden_dim``, ``num_layers`` and ``use_query_update_gate`` implied by the weights.

    ``num_heads`` does not change any shape and cannot be inferred. Without any ``cross_attn_layers.*`` key
    ``num_layers`` is reported as 1, so a strict load then names the missing attention keys.
    """
    if "query_proj.weight" not in state_dict:
        raise LeverPlusInputError(
            "no 'query_proj.weight' key: cannot infer the model size",
            field="state_dict",
            fix="pass a Lever-Plus pointer-net checkpoint",
        )
    hidden_dim = int(state_dict["query_proj.weight"].shape[0])
    d_model = int(state_dict["input_proj.weight"].shape[1]) if "input_proj.weight" in state_dict else hidden_dim
    parts = [k.split(".") for k in state_dict if k.startswith("cross_attn_layers.")]
    layers = {int(p[1]) for p in parts if p[1].isdigit()}
    return dict(
        d_model=d_model,
        hidden_dim=hidden_dim,
        num_layers=max(layers) + 1 if layers else 1,
        use_query_update_gate="query_update_gate.weight" in state_dict,
    )


def _read_checkpoint(path: Union[str, os.PathLike], map_location: Any) -> Any:
    return torch_load(Path(path), "checkpoint", map_location=map_location)


def check_finite_weights(state_dict: Mapping[str, torch.Tensor], *, label: str) -> None:
    """Every floating tensor is finite; the first one with NaN/inf is named (a model from it would fail at its
    first step, far from the cause)."""
    for name, t in state_dict.items():
        if t.is_floating_point() or t.is_complex():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise LeverPlusInputError(
                    f"tensor {name!r} {tuple(t.shape)} holds {bad} NaN/inf values", file=label, field=name,
                    fix="use an earlier checkpoint of that training (this one diverged) or retrain it")
