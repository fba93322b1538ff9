"""Embedding tables (``.pt`` tensor, a dict holding one, or ``.npy``): one row per train item
(``docs/reference.md#formats-embeddings``).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from leverplus.data.formats.io import PathLike, _type_name, atomic_open, atomic_torch_save, torch_load
from leverplus.errors import LeverPlusInputError

log = logging.getLogger(__name__)

#: how many row indices a warning about repeated rows lists
SHOWN_ROWS = 5

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
    some all-zero rows, or non-zero rows repeated exactly: a warning with their count).
    """
    path = str(path)
    t = _check_embeddings(_load_embedding_payload(path), path=path, expected_rows=expected_rows)
    check_informative(t, path=path)
    return t


def check_informative(t: torch.Tensor, *, path: str) -> None:
    """Refuse a table whose rows are all equal (all-zero included: nothing tells the items apart, every pool
    would look the same); warn with the count and the first row when some rows are all zero (a zero vector has
    cosine 0 with everything, so those items are indistinguishable from each other), and through logging with the
    count and the first rows when non-zero rows repeat another row's vector exactly (:func:`_repeated_rows`)."""
    if t.shape[0] > 1 and bool((t == t[0]).all()):
        kind = "all zero" if not bool(t[0].any()) else "identical"
        raise LeverPlusInputError(
            f"all {t.shape[0]} rows are {kind}: the embeddings carry no information about the items", file=path,
            fix="recompute the embeddings (an export that wrote a placeholder tensor?)")
    nonzero = t.any(dim=1)
    zero = (~nonzero).nonzero()
    if zero.numel():
        warnings.warn(f"{path}: {zero.numel()} of {t.shape[0]} embedding rows are all zero (first: row "
                      f"{int(zero[0, 0])}); those items cannot be told apart", stacklevel=3)
    rows, shared = _repeated_rows(t, nonzero.numpy())
    if rows.size:
        shown = ", ".join(str(int(r)) for r in rows[:SHOWN_ROWS]) + (", ..." if rows.size > SHOWN_ROWS else "")
        log.warning(f"{path}: {rows.size} of {t.shape[0]} embedding rows repeat another row's vector exactly "
                    f"({shared} shared vector{'s' if shared > 1 else ''}; rows {shown}); those items cannot be told "
                    "apart (an export that wrote one vector for several items?)")


def _row_hashes(a: np.ndarray, chunk: int) -> np.ndarray:
    """A 64-bit hash of each row's bytes: its 64-bit words summed with fixed random odd weights (mod 2^64).
    Identical rows always get the same hash; a few distinct rows may too (the caller compares those exactly).
    Vectorised, a chunk of rows at a time."""
    words = a.view(np.uint64) if a.shape[1] * a.itemsize % 8 == 0 else a.view(np.uint32)
    weights = np.random.default_rng(0).integers(0, 2**63, size=words.shape[1], dtype=np.uint64) * np.uint64(2) + 1
    out = np.empty(a.shape[0], dtype=np.uint64)
    for s in range(0, a.shape[0], chunk):
        out[s:s + chunk] = (words[s:s + chunk] * weights).sum(axis=1, dtype=np.uint64)
    return out


def _repeated_rows(t: torch.Tensor, among: Optional[np.ndarray] = None, chunk: int = 4096) -> tuple[np.ndarray, int]:
    """The rows (ascending) whose vector equals another row's exactly, and how many distinct vectors they share.
    Only rows where the boolean mask ``among`` is true take part (default: all).

    Every row is hashed (:func:`_row_hashes`); a row whose hash occurs more than once is compared exactly with the
    first row of its hash group, and the rare rows that differ from it (a collision) are compared among themselves
    (``np.unique`` over whole rows). The result is exact; a table without repeats costs one pass.
    """
    ids = np.arange(t.shape[0]) if among is None else np.nonzero(among)[0]
    if ids.size < 2:
        return np.empty(0, dtype=np.int64), 0
    a = np.ascontiguousarray(t.numpy())  # no copy for a table read_embeddings returns
    _, first, inverse, counts = np.unique(_row_hashes(a, chunk)[ids], return_index=True, return_inverse=True,
                                          return_counts=True)
    inverse = inverse.reshape(-1)
    pos = np.nonzero(counts[inverse] > 1)[0]  # positions in ids whose hash occurs more than once
    same = np.zeros(pos.size, dtype=bool)
    for s in range(0, pos.size, chunk):
        p = pos[s:s + chunk]
        same[s:s + chunk] = (a[ids[p]] == a[ids[first[inverse[p]]]]).all(axis=1)
    groups, sizes = np.unique(inverse[pos[same]], return_counts=True)
    repeated = [ids[pos[same]][np.isin(inverse[pos[same]], groups[sizes > 1])]]
    shared = int((sizes > 1).sum())
    rest = ids[pos[~same]]
    if rest.size > 1:
        _, inv, cnt = np.unique(a[rest], axis=0, return_inverse=True, return_counts=True)
        repeated.append(rest[cnt[inv.reshape(-1)] > 1])
        shared += int((cnt > 1).sum())
    return np.sort(np.concatenate(repeated)), shared


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

