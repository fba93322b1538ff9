"""Loading a pointer network from any checkpoint format, strictly by default (a missing or unexpected key is an
error listing the keys and the detected format), and saving one atomically.
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from typing import Any, Mapping, Optional, Union

import torch

from leverplus.data.formats.checkpoints import (
    _IN_MEMORY,
    INFERRED_KEYS,
    _list_keys,
    _read_checkpoint,
    check_finite_weights,
    extract_pointer_state_dict,
    infer_model_config,
)
from leverplus.data.formats.io import atomic_torch_save
from leverplus.errors import LeverPlusInputError
from leverplus.model.pointer import PointerSelector

log = logging.getLogger(__name__)


def _read(path_or_state_dict: Union[str, os.PathLike, Mapping[str, Any]], map_location: Any) -> tuple[str, Any]:
    """The label used in messages (the path, or ``_IN_MEMORY``) and the loaded object."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        return str(path_or_state_dict), _read_checkpoint(path_or_state_dict, map_location)
    return _IN_MEMORY, path_or_state_dict


def _extract(obj: Any, label: str) -> tuple[dict, str, list, dict]:
    """The pointer-net state dict, its format, the ignored keys and the model config the weights imply."""
    try:
        sd, fmt, ignored = extract_pointer_state_dict(obj)
        inferred = infer_model_config(sd)
    except LeverPlusInputError as exc:
        raise LeverPlusInputError(exc.problem, file=label, field=exc.field, fix=exc.fix) from None
    check_finite_weights(sd, label=label)
    if ignored:
        log.info("%s: ignored %d non-pointer-net keys (%s)", label, len(ignored), _list_keys(ignored))
    return sd, fmt, ignored, inferred


def _build(obj: Any, fmt: str, inferred: dict, model_kwargs: dict, label: str) -> PointerSelector:
    """The model of the stored ``model_config`` (trainer ``.pt``) or of the inferred one, with ``model_kwargs`` on top."""
    unknown = sorted(set(model_kwargs) - set(inspect.signature(PointerSelector).parameters))
    if unknown:
        raise LeverPlusInputError(f"unknown model arguments {unknown}", file=label, field="model_kwargs")
    stored = obj.get("model_config") if fmt == "trainer_pt" else None
    config = dict(stored) if isinstance(stored, Mapping) else dict(inferred)
    config.update(model_kwargs)
    try:
        return PointerSelector(**config)
    except TypeError as exc:
        raise LeverPlusInputError(f"bad model config {config}: {exc}", file=label, field="model_config") from None


def _key_problems(sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> tuple[list, list]:
    """Descriptions of the missing, unexpected and wrongly shaped keys, and the wrongly shaped keys."""
    missing = sorted(k for k in expected if k not in sd)
    unexpected = sorted(k for k in sd if k not in expected)
    mismatched = sorted(k for k in sd if k in expected and sd[k].shape != expected[k].shape)
    problems = []
    if missing:
        problems.append(f"missing keys [{_list_keys(missing)}]")
    if unexpected:
        problems.append(f"unexpected keys [{_list_keys(unexpected)}]")
    if mismatched:
        shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}" for k in mismatched]
        problems.append(f"shape mismatches [{_list_keys(shapes)}]")
    return problems, mismatched


def _strict_error(model: PointerSelector, inferred: dict, fmt: str, problems: list, label: str) -> LeverPlusInputError:
    """The strict-load error: the format, the model config, the problems and the model arguments that would fit."""
    hints = [f"model.{k}={v}" for k, v in inferred.items() if model.config[k] != v]
    fix = "pass model.strict_load=false (selector.strict_load=false for generate_rl_data) to load anyway"
    if hints:
        fix = f"pass {', '.join(hints)} (what the weights imply), or {fix}"
    return LeverPlusInputError(
        f"pointer-net weights do not match the model (format {fmt}, model config "
        f"{ {k: model.config[k] for k in INFERRED_KEYS} }): " + "; ".join(problems),
        file=label,
        fix=fix,
    )


def _checkpoint_info(obj: Any, label: str, fmt: str, ignored: list) -> dict:
    """Where the weights came from and the metadata the checkpoint carried (None where it has none)."""
    meta = obj if isinstance(obj, Mapping) else {}
    info = dict(path=label, format=fmt, ignored_keys=ignored,
                **{key: meta.get(key) for key in ("epoch", "phase", "kl_beta", "metrics")})
    epoch = info["epoch"]
    if fmt == "trainer_pt" and meta.get("epoch_base") != EPOCH_BASE and isinstance(epoch, int):
        info["epoch"] = epoch + 1  # the reference (and earlier files) stored 0-based epochs: rce_epoch3.pt had 2
    return info


#: trainer ``.pt`` files store ``"epoch": N`` 1-based, as their name ``<phase>_epoch<N>.pt`` (with ``"epoch_base": 1``;
#: files without it are 0-based and read as N + 1)
EPOCH_BASE = 1


def load_pointer_checkpoint(
    path_or_state_dict: Union[str, os.PathLike, Mapping[str, Any]],
    *,
    strict: bool = True,
    map_location: Any = "cpu",
    **model_kwargs: Any,
) -> PointerSelector:
    """Build a ``PointerSelector`` from any reference#checkpoints checkpoint format and load it, strictly by default.

    Model config: the ``model_config`` stored by ``save_pointer_checkpoint`` if present, else inferred from the
    weights (``num_heads`` defaults to 1), then overridden by ``model_kwargs``. Strict: any missing or unexpected
    pointer-net key or shape mismatch raises, naming the file, the format, the keys and the fix. Non-strict:
    loads what fits and warns with the same lists. Ignored non-pointer keys (e.g. CLIP) are logged and kept in
    ``model.checkpoint_info["ignored_keys"]`` with the format, epoch, phase, kl_beta and metrics.
    """
    label, obj = _read(path_or_state_dict, map_location)
    sd, fmt, ignored, inferred = _extract(obj, label)
    model = _build(obj, fmt, inferred, model_kwargs, label)
    expected = model.state_dict()
    problems, mismatched = _key_problems(sd, expected)
    if problems and strict:
        raise _strict_error(model, inferred, fmt, problems, label)
    model.load_state_dict({k: v for k, v in sd.items() if k in expected and k not in mismatched}, strict=False)
    if problems:
        warnings.warn(f"{label}: non-strict load of a {fmt} checkpoint: " + "; ".join(problems), stacklevel=2)
    model.checkpoint_info = _checkpoint_info(obj, label, fmt, ignored)
    return model


def _plain(value: Any, where: str) -> Any:
    """Reduce metrics/extra to types ``torch.load(weights_only=True)`` accepts."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "ndim", None) == 0:
        return value.item()  # numpy scalar
    if hasattr(value, "__array__"):
        return torch.as_tensor(value)
    raise LeverPlusInputError(
        f"cannot store a {type(value).__name__} in a checkpoint", field=where, fix="store numbers, strings or tensors"
    )


def save_pointer_checkpoint(
    path: Union[str, os.PathLike],
    model: PointerSelector,
    *,
    phase: str,
    epoch: int,
    kl_beta: Optional[float] = None,
    metrics: Optional[dict] = None,
    extra: Optional[dict] = None,
) -> None:
    """Write a trainer ``.pt`` atomically (``atomic_torch_save``: temp file in the same directory, then
    ``os.replace``; the file gets the process umask like every other output).

    Layout: the reference ``{"epoch", "phase", "model_state_dict", "kl_beta", "metrics"}`` plus our
    ``"model_config"`` (so the model is rebuilt exactly), ``"epoch_base": 1`` and any ``extra`` keys. ``epoch`` is the
    1-based number of the epoch just finished, as in the file name ``<phase>_epoch<epoch>.pt`` (the reference stored
    it 0-based; such files still load, see ``checkpoint_info``).
    """
    if not isinstance(phase, str) or not phase:
        raise LeverPlusInputError(f"phase must be a non-empty string, got {phase!r}", field="phase")
    if not isinstance(epoch, int) or epoch < 0:
        raise LeverPlusInputError(f"epoch must be an int >= 0, got {epoch!r}", field="epoch")
    obj: dict[str, Any] = {
        "epoch": epoch,
        "phase": phase,
        "model_state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "kl_beta": None if kl_beta is None else float(kl_beta),
        "metrics": _plain(metrics or {}, "metrics"),
        "model_config": dict(model.config),
        "epoch_base": EPOCH_BASE,
    }
    clash = sorted(set(extra or {}) & set(obj))
    if clash:
        raise LeverPlusInputError(f"extra keys {clash} would overwrite reserved checkpoint keys", field="extra")
    obj.update(_plain(extra or {}, "extra"))

    atomic_torch_save(path, obj)
