"""Embedding tables (``.pt`` tensor, a dict holding one, or ``.npy``): one row per train item
(``docs/reference.md#formats-embeddings``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from leverplus.data.formats.io import PathLike, _type_name, atomic_open, atomic_torch_save, torch_load
from leverplus.errors import LeverPlusInputError

# --------------------------------------------------------------------------------------------------
# Embeddings (reference#formats-embeddings)
# --------------------------------------------------------------------------------------------------


def _load_embedding_payload(path: str) -> Union[torch.Tensor, np.ndarray]:
    suffix = Path(path).suffix.lower()
    if not Path(path).is_file():
        raise LeverPlusInputError("file not found", file=path, fix="check the path")
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise LeverPlusInputError(f"cannot be read as a plain .npy array: {e}", file=path,
                                      fix="save a float array with np.save (no object arrays / pickles)") from e
    if suffix in (".pt", ".pth"):
        payload = torch_load(path, "embedding table")
        if isinstance(payload, torch.Tensor):
            return payload
        if isinstance(payload, dict):
            tensors = {k: v for k, v in payload.items() if isinstance(v, torch.Tensor)}
            if len(tensors) == 1:
                return next(iter(tensors.values()))
            raise LeverPlusInputError(
                f"holds a dict with {len(tensors)} tensors (keys {sorted(map(str, tensors))}); expected exactly one",
                file=path, fix="save the [N, d] embedding tensor alone",
            )
        raise LeverPlusInputError(f"holds a {_type_name(payload)}, not a tensor", file=path,
                                  fix="save the [N, d] embedding tensor with torch.save")
    raise LeverPlusInputError(f"unsupported extension {suffix!r}", file=path, fix="use a .pt or .npy file")


def _check_embeddings(t: Union[torch.Tensor, np.ndarray], *, path: str,
                      expected_rows: Optional[int]) -> torch.Tensor:
    if isinstance(t, np.ndarray):
        if t.dtype.kind != "f":
            raise LeverPlusInputError(f"dtype {t.dtype} is not floating point", file=path,
                                      fix="store float32 embeddings")
        t = torch.from_numpy(np.ascontiguousarray(t))
    if not isinstance(t, torch.Tensor):
        raise LeverPlusInputError(f"is a {_type_name(t)}, not a tensor", file=path)
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise LeverPlusInputError(f"has shape {tuple(t.shape)}; expected a non-empty 2-D [N, d] table",
                                  file=path, fix="store one row per train item")
    if not t.is_floating_point():
        raise LeverPlusInputError(f"dtype {t.dtype} is not floating point", file=path, fix="store float32 embeddings")
    t = t.detach().to(device="cpu", dtype=torch.float32)
    bad = (~torch.isfinite(t)).any(dim=1).nonzero()
    if bad.numel():
        r = int(bad[0, 0])
        raise LeverPlusInputError(f"row {r} contains NaN or inf ({bad.numel()} bad rows in all)", file=path,
                                  record=f"row {r}", fix="recompute the embeddings for these items")
    if expected_rows is not None and t.shape[0] != expected_rows:
        raise LeverPlusInputError(
            f"has {t.shape[0]} rows but {expected_rows} were expected (one per train item)", file=path,
            fix="use the embedding file exported for this dataset split, or regenerate it",
        )
    return t.contiguous()


def read_embeddings(path: PathLike, *, expected_rows: Optional[int] = None) -> torch.Tensor:
    """Load a float32 CPU ``[N, d]`` embedding table (row i = train row i) from ``.pt``/``.pth`` or ``.npy``.

    ``.pt``: a tensor, or a dict holding exactly one tensor (which must be 2-D), loaded with
    ``weights_only=True``. ``.npy``: ``np.load(allow_pickle=False)``. Checks: 2-D, floating, finite (the first
    bad row is named), ``N == expected_rows`` when given, and :func:`check_informative` (all rows equal: refused;
    some all-zero rows: a warning with their count).
    """
    path = str(path)
    t = _check_embeddings(_load_embedding_payload(path), path=path, expected_rows=expected_rows)
    check_informative(t, path=path)
    return t


def check_informative(t: torch.Tensor, *, path: str) -> None:
    """Refuse a table whose rows are all equal (all-zero included: nothing tells the items apart, every pool
    would look the same); warn with the count and the first row when some rows are all zero (a zero vector has
    cosine 0 with everything, so those items are indistinguishable from each other)."""
    if t.shape[0] > 1 and bool((t == t[0]).all()):
        kind = "all zero" if not bool(t[0].any()) else "identical"
        raise LeverPlusInputError(
            f"all {t.shape[0]} rows are {kind}: the embeddings carry no information about the items", file=path,
            fix="recompute the embeddings (an export that wrote a placeholder tensor?)")
    zero = (~t.any(dim=1)).nonzero()
    if zero.numel():
        warnings.warn(f"{path}: {zero.numel()} of {t.shape[0]} embedding rows are all zero (first: row "
                      f"{int(zero[0, 0])}); those items cannot be told apart", stacklevel=3)


def save_embeddings(path: PathLike, tensor: Union[torch.Tensor, np.ndarray]) -> None:
    """Validate and atomically save a contiguous CPU float32 ``[N, d]`` table (``.npy`` -> np.save, else torch.save).

    A view is copied first, so the file holds only its rows, not the whole parent storage.
    """
    path = str(path)
    t = _check_embeddings(tensor, path=path, expected_rows=None)
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset() != 0:
        t = t.clone()
    if Path(path).suffix.lower() == ".npy":
        with atomic_open(path, "wb") as f:
            np.save(f, t.numpy(), allow_pickle=False)
    else:
        atomic_torch_save(path, t)

