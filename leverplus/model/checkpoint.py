"""Loading a pointer network from any checkpoint format, strictly by default (a missing or unexpected key is an
error listing the keys and the detected format), and saving one atomically.
"""

from __future__ import annotations

import inspect
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from leverplus.data.formats.checkpoints import (
    _IN_MEMORY,
    INFERRED_KEYS,
    _list_keys,
    _read_checkpoint,
    extract_pointer_state_dict,
    infer_model_config,
)
from leverplus.errors import LeverPlusInputError
from leverplus.model.pointer import PointerSelector

log = logging.getLogger(__name__)


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
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        label = str(path_or_state_dict)
        obj = _read_checkpoint(path_or_state_dict, map_location)
    else:
        label, obj = _IN_MEMORY, path_or_state_dict
    try:
        sd, fmt, ignored = extract_pointer_state_dict(obj)
        inferred = infer_model_config(sd)
    except LeverPlusInputError as exc:
        raise LeverPlusInputError(exc.problem, file=label, field=exc.field, fix=exc.fix) from None
    if ignored:
        log.info("%s: ignored %d non-pointer-net keys (%s)", label, len(ignored), _list_keys(ignored))

    unknown = sorted(set(model_kwargs) - set(inspect.signature(PointerSelector).parameters))
    if unknown:
        raise LeverPlusInputError(f"unknown model arguments {unknown}", file=label, field="model_kwargs")
    stored = obj.get("model_config") if fmt == "trainer_pt" else None
    config = dict(stored) if isinstance(stored, Mapping) else dict(inferred)
    config.update(model_kwargs)
    try:
        model = PointerSelector(**config)
    except TypeError as exc:
        raise LeverPlusInputError(f"bad model config {config}: {exc}", file=label, field="model_config") from None

    expected = model.state_dict()
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
    if problems and strict:
        hints = [f"model.{k}={v}" for k, v in inferred.items() if model.config[k] != v]
        fix = "pass strict=false to load anyway"
        if hints:
            fix = f"pass {', '.join(hints)} (what the weights imply), or {fix}"
        raise LeverPlusInputError(
            f"pointer-net weights do not match the model (format {fmt}, model config "
            f"{ {k: model.config[k] for k in INFERRED_KEYS} }): " + "; ".join(problems),
            file=label,
            fix=fix,
        )
    fitting = {k: v for k, v in sd.items() if k in expected and k not in mismatched}
    model.load_state_dict(fitting, strict=False)
    if problems:
        warnings.warn(f"{label}: non-strict load of a {fmt} checkpoint: " + "; ".join(problems), stacklevel=2)
    model.checkpoint_info = dict(
        path=label,
        format=fmt,
        ignored_keys=ignored,
        epoch=obj.get("epoch") if isinstance(obj, Mapping) else None,
        phase=obj.get("phase") if isinstance(obj, Mapping) else None,
        kl_beta=obj.get("kl_beta") if isinstance(obj, Mapping) else None,
        metrics=obj.get("metrics") if isinstance(obj, Mapping) else None,
    )
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
    """Write a trainer ``.pt`` atomically (temp file in the same directory, then ``os.replace``).

    Layout: the reference ``{"epoch", "phase", "model_state_dict", "kl_beta", "metrics"}`` plus our
    ``"model_config"`` (so the model is rebuilt exactly) and any ``extra`` keys.
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
    }
    clash = sorted(set(extra or {}) & set(obj))
    if clash:
        raise LeverPlusInputError(f"extra keys {clash} would overwrite reserved checkpoint keys", field="extra")
    obj.update(_plain(extra or {}, "extra"))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

