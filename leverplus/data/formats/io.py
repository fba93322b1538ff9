"""Shared file I/O of the format modules: JSON loading with positions in errors, atomic writes (a temp file in the
target directory plus ``os.replace``, with the process umask), streaming file fingerprints, and the small value
checks every reader uses.

Readers validate everything a later stage relies on and raise one
:class:`~leverplus.errors.LeverPlusInputError` naming the file, the record and the field, with a fix.
Readers never write. Writers never leave a truncated target: a crash mid-write leaves the old file intact.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Optional, Union

import torch

from leverplus.errors import LeverPlusInputError
from leverplus.utils import pid_alive

PathLike = Union[str, Path]
#: Chunk size for streaming file hashes.
_HASH_CHUNK = 1 << 20

# The process umask, read once, so atomic writes get the same permissions as a plain open() (mkstemp uses 0600).
_UMASK = os.umask(0)
os.umask(_UMASK)


# --------------------------------------------------------------------------------------------------
# Generic JSON / atomic I/O
# --------------------------------------------------------------------------------------------------


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list) -> dict:
    """``json`` object hook: a dict, refusing duplicate keys (``json`` keeps the last one without a word)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


def load_json(path: PathLike) -> Any:
    """Parse a JSON file; a missing or malformed file raises LeverPlusInputError with the error position."""
    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise LeverPlusInputError(
            f"key {e.key!r} appears twice in one JSON object (the later value would silently win)",
            file=path, record=f"key {e.key!r}", fix="keep one entry per key",
        ) from None
    except json.JSONDecodeError as e:
        raise LeverPlusInputError(
            f"malformed JSON at line {e.lineno}, column {e.colno} (char {e.pos}): {e.msg}",
            file=path,
            fix="repair the file or regenerate it (an interrupted in-place write leaves a truncated file)",
        ) from e
    except UnicodeDecodeError as e:
        raise LeverPlusInputError(
            f"not UTF-8 text (byte {e.start}): {e.reason}", file=path, fix="pass the JSON file, not a binary file"
        ) from e
    except FileNotFoundError as e:
        raise LeverPlusInputError("file not found", file=path, fix="check the path") from e
    except OSError as e:
        raise LeverPlusInputError(f"cannot read the file: {e.strerror or e}", file=path, fix="check the path") from e


#: errno values meaning "the disk (or the user's quota) is full"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def temp_prefix(target: PathLike) -> str:
    """Name prefix of this process's temp files for ``target``: ``.<name>.<host>-<pid>.`` (so a later process can
    tell the leftovers of a killed writer from the temp files of a live one)."""
    return f".{Path(target).name}.{socket.gethostname()}-{os.getpid()}."



def remove_stale_temps(target: PathLike) -> list[Path]:
    """Delete the temp files of ``target`` left by killed writers on this host (``temp_prefix`` names whose
    process is gone); returns the deleted paths. Temp files of live processes and of other hosts are kept."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    mine, removed = f".{target.name}.{socket.gethostname()}-", []
    for p in target.parent.glob(f".{glob_escape(target.name)}.*.tmp"):
        pid = p.name[len(mine):].split(".", 1)[0] if p.name.startswith(mine) else ""
        if pid.isdigit() and not pid_alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped (a file name used as a glob prefix)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def disk_full_error(path: PathLike, exc: OSError) -> LeverPlusInputError:
    """The one message for a write that ran out of space: the path and what to do."""
    return LeverPlusInputError(
        f"no space left on the device while writing ({exc.strerror or exc}); nothing was written there", file=str(path),
        fix="free space on that disk, or write elsewhere with output_dir=/path/with/space (caches: "
            "data.cache_dir=/path/with/space)")


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str) -> Iterator[IO]:
    """Yield a temp file next to ``path``; on success fsync it and ``os.replace`` it onto ``path``.

    On any exception the temp file is removed and ``path`` is left untouched. A full disk (ENOSPC, EDQUOT) becomes
    one LeverPlusInputError naming ``path`` and the fix.
    """
    target = Path(path)
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=temp_prefix(target), suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_UMASK)
        kwargs = {"encoding": "utf-8"} if "b" not in mode else {}
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            raise disk_full_error(target, e) from e
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) atomically: a reader sees the old file or the new one, never half of it."""
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: PathLike, obj: Any, *, indent: Optional[int] = None, allow_nan: bool = True) -> None:
    """Write ``obj`` as JSON atomically (temp file in the same directory + ``os.replace``; parents created).

    ``allow_nan`` is passed to :func:`json.dump` (True = Python's default, which writes non-standard ``NaN``).
    """
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False, allow_nan=allow_nan)


def atomic_torch_save(path: PathLike, obj: Any) -> None:
    """``torch.save`` atomically (temp file in the same directory + ``os.replace``; parents created).

    Serialised in memory first, so a failing write reaches the caller as the OSError itself (torch's own writer
    would report a full disk as an opaque RuntimeError)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_open(path, "wb") as f:
        f.write(buf.getbuffer())


def torch_load(path: PathLike, what: str, *, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a file torch cannot read raises one LeverPlusInputError naming the
    file and saying why: missing, a text file, truncated or damaged, or pickled Python objects."""
    path = str(path)
    if not os.path.isfile(path):
        raise LeverPlusInputError(f"{what} not found", file=path, fix="check the path")
    try:
        return torch.load(path, weights_only=True, map_location=map_location)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise _torch_load_error(path, exc, what) from exc


def _torch_load_error(path: str, exc: Exception, what: str) -> LeverPlusInputError:
    with open(path, "rb") as f:
        head = f.read(4096)
    detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if "Unsupported global" in str(exc):
        glob = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        return LeverPlusInputError(
            f"holds pickled Python objects{f' ({glob.group(1)})' if glob else ''} that torch.load(weights_only=True) "
            "refuses", file=path,
            fix="reduce it to tensors in a trusted environment: torch.save(torch.load(p, weights_only=False)"
                "['state_dict'], 'sd.pt')")
    if head.startswith(b"PK"):  # torch's zip format, so the archive itself is damaged
        return LeverPlusInputError(
            f"is a damaged or truncated torch file and cannot be read as a {what} ({detail})", file=path,
            fix="the file is incomplete (an interrupted copy or download?): copy or export it again")
    if not head or (b"\0" not in head and _is_text(head)):
        return LeverPlusInputError(
            f"is {'empty' if not head else 'a text file'}, not a torch {what}", file=path,
            fix=f"pass the {what} saved with torch.save (a .pt file), not a {'text' if head else 'empty'} file")
    return LeverPlusInputError(f"cannot be read as a torch {what} ({detail})", file=path,
                               fix=f"check that the file is a complete {what} saved with torch.save")


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start > len(head) - 4  # a multi-byte character cut by the 4 KB window
    return True


def file_fingerprint(paths: Union[PathLike, Iterable[PathLike]]) -> str:
    """16 hex chars of sha256 over each file's base name, size and content (streamed), in the order given.

    The name is part of the hash (so swapping two files' roles changes it); the directory is not (so moving
    a data folder keeps run keys stable).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise LeverPlusInputError("not an existing file, cannot fingerprint it", file=str(p), fix="check the path")
        h.update(p.name.encode("utf-8") + b"\0")
        h.update(p.stat().st_size.to_bytes(8, "little"))
        with open(p, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Small validation helpers
# --------------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _type_name(v: Any) -> str:
    t = type(v)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__name__}"


def _parse_key(key: Any, path: str, kind: str) -> int:
    """A top-level key -> non-negative int query id (Python int() syntax, as the reference's ``int(k)``)."""
    # decimal digits only: int() would also take "9_0_0_0" (as 9000), " 9" and "+9"
    if isinstance(key, str):
        qid = int(key) if key.isascii() and key.isdigit() else None
    else:
        qid = key if isinstance(key, int) and not isinstance(key, bool) and key >= 0 else None
    if qid is None:
        raise LeverPlusInputError(
            f"top-level key {key!r} is not a non-negative integer query id",
            file=path,
            record=f"key {key!r}",
            fix=f"a {kind} file maps str(query_idx) to a record; rename or remove this key "
            "(keys starting with '_' are metadata and skipped)",
        )
    return qid


def _int_list(
    value: Any,
    *,
    path: str,
    record: str,
    field_name: str,
    num_items: Optional[int],
    allow_empty: bool = False,
) -> list[int]:
    """Validate a list of distinct non-negative ints (< num_items when given)."""
    if not isinstance(value, list):
        raise LeverPlusInputError(
            f"must be a list of integer ids, got {_type_name(value)}", file=path, record=record, field=field_name
        )
    if not value and not allow_empty:
        raise LeverPlusInputError("is an empty list", file=path, record=record, field=field_name,
                                  fix="store at least one id")
    seen: set[int] = set()
    for j, v in enumerate(value):
        if not _is_int(v):
            raise LeverPlusInputError(
                f"entry {j} must be an integer id, got {v!r} ({_type_name(v)})",
                file=path,
                record=record,
                field=field_name,
                fix="store plain JSON integers (convert numpy ints with int())",
            )
        if v < 0 or (num_items is not None and v >= num_items):
            bound = f"[0, {num_items})" if num_items is not None else "[0, inf)"
            raise LeverPlusInputError(
                f"id {v} (entry {j}) is outside {bound}",
                file=path,
                record=record,
                field=field_name,
                fix="the file does not match the dataset/embedding table (num_items="
                f"{num_items}); use the matching dataset or regenerate the file",
            )
        if v in seen:
            raise LeverPlusInputError(
                f"id {v} appears more than once in {value}",
                file=path,
                record=record,
                field=field_name,
                fix="an id may be used only once; regenerate or drop this record",
            )
        seen.add(v)
    return list(value)


def _finite_number(value: Any, *, path: str, record: str, field_name: str) -> float:
    if not _is_number(value):
        raise LeverPlusInputError(
            f"must be a number, got {value!r} ({_type_name(value)})", file=path, record=record, field=field_name
        )
    if not math.isfinite(value):
        raise LeverPlusInputError(
            f"is {value!r}; it must be finite", file=path, record=record, field=field_name,
            fix="recompute this value or drop the record",
        )
    return float(value)
