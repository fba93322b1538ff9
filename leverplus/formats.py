"""Readers and writers for every Lever-Plus file a user has on disk (spec §1a, §1b, §1c, §4.2).

* beam JSON (InfoScore beam search, §1a)        -> :func:`read_beam_json` / :func:`write_beam_json`
* RL JSON (pointer candidates + VQA scores, §1b) -> :func:`read_rl_json` / :func:`write_rl_json`
* embedding tables (``.pt`` / ``.npy``, §1c)     -> :func:`read_embeddings` / :func:`save_embeddings`

Readers validate everything a later stage relies on and raise one
:class:`~leverplus.errors.LeverPlusInputError` naming the file, the record and the field, with a fix.
Readers never write. Writers go through a temp file in the target directory plus ``os.replace``, so a
crash mid-write never leaves a truncated target (the reference rewrote its JSON in place, which is how
half-written files appear). Rewards, pools and tensors for training belong to ``leverplus.dataset``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Mapping, Optional, Union

import numpy as np
import torch

from leverplus.errors import LeverPlusInputError

PathLike = Union[str, Path]

#: Candidate fields that must be finite numbers when present and not null (§1b table).
RL_NUMERIC_FIELDS = (
    "vqa_acc_score",
    "vqa_gt_prob",
    "vqa_rel_score",
    "vqa_rel_token_f1",
    "vqa_rel_edit_sim",
    "beam_score",
    "logprob_score",
    "similarity_score",
    "temperature",
)
#: Candidate fields that must be strings when present and not null.
RL_STRING_FIELDS = ("gen_method", "vqa_eval_mode")
#: Entry-level keys of an RL query that are not query content (used to build ``query`` for the legacy flat shape).
_RL_ENTRY_KEYS = ("pointer_candidates", "candidate_pool_ids", "_fix_failed", "_fix_error")
#: Chunk size for streaming file hashes.
_HASH_CHUNK = 1 << 20

# The process umask, read once, so atomic writes get the same permissions as a plain open() (mkstemp uses 0600).
_UMASK = os.umask(0)
os.umask(_UMASK)


# --------------------------------------------------------------------------------------------------
# Generic JSON / atomic I/O
# --------------------------------------------------------------------------------------------------


def load_json(path: PathLike) -> Any:
    """Parse a JSON file; a missing or malformed file raises LeverPlusInputError with the error position."""
    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
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


@contextlib.contextmanager
def _atomic_open(path: PathLike, mode: str) -> Iterator[IO]:
    """Yield a temp file next to ``path``; on success fsync it and ``os.replace`` it onto ``path``.

    On any exception the temp file is removed and ``path`` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        kwargs = {"encoding": "utf-8"} if "b" not in mode else {}
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: PathLike, obj: Any, *, indent: Optional[int] = None, allow_nan: bool = True) -> None:
    """Write ``obj`` as JSON atomically (temp file in the same directory + ``os.replace``; parents created).

    ``allow_nan`` is passed to :func:`json.dump` (True = Python's default, which writes non-standard ``NaN``).
    """
    with _atomic_open(path, "w") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False, allow_nan=allow_nan)


def atomic_torch_save(path: PathLike, obj: Any) -> None:
    """``torch.save`` atomically (temp file in the same directory + ``os.replace``; parents created)."""
    with _atomic_open(path, "wb") as f:
        torch.save(obj, f)


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
    try:
        qid = int(key)
    except (TypeError, ValueError):
        qid = None
    if qid is None or qid < 0:
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


# --------------------------------------------------------------------------------------------------
# RL JSON (§1b, §4.2)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RLCandidate:
    """One pointer candidate. ``pointer`` is always GLOBAL train-row ids in prompt order."""

    index: int
    pointer: tuple[int, ...]
    raw: Mapping[str, Any] = field(hash=False)

    @property
    def gen_method(self) -> Optional[str]:
        return self.raw.get("gen_method")

    @property
    def eval_mode(self) -> Optional[str]:
        """``vqa_eval_mode`` ("vqaEval", "fallback", "error") or None when absent (balanced variant)."""
        return self.raw.get("vqa_eval_mode")


@dataclass
class RLQuery:
    """One query of an RL file and its candidate group.

    ``local_pointers`` is True when the file stored ``pointer`` local to ``candidate_pool_ids`` (with
    ``pointer_global``; the K=64-fixed variant). The reference uses ``candidate_pool_ids`` as the policy's
    pool only in that case (§4.2 step 6); otherwise the pool is built from the trajectories.
    """

    query_id: int
    query: dict
    candidates: list[RLCandidate]
    candidate_pool_ids: Optional[list[int]]
    fix_failed: bool
    fix_error: Optional[str] = None
    local_pointers: bool = False

    def to_json_dict(self) -> dict:
        """The wrapped on-disk record (candidates exactly as stored, so local pointers stay local)."""
        out: dict[str, Any] = {"query": dict(self.query)}
        if self.candidate_pool_ids is not None:
            out["candidate_pool_ids"] = list(self.candidate_pool_ids)
        out["pointer_candidates"] = [dict(c.raw) for c in self.candidates]
        if self.fix_failed:
            out["_fix_failed"] = True
        if self.fix_error is not None:
            out["_fix_error"] = self.fix_error
        return out


@dataclass
class RLData:
    """A validated RL file: ``_meta`` ({} for interim saves), the shot count and queries sorted by id."""

    path: str
    meta: dict
    shot_num: int
    queries: dict[int, RLQuery]

    def eval_mode_counts(self) -> dict[str, int]:
        """Count candidates per ``vqa_eval_mode`` value; absent/null counts as "missing"."""
        counts: dict[str, int] = {}
        for q in self.queries.values():
            for c in q.candidates:
                mode = c.eval_mode if c.eval_mode is not None else "missing"
                counts[mode] = counts.get(mode, 0) + 1
        return dict(sorted(counts.items()))

    @property
    def num_candidates(self) -> int:
        return sum(len(q.candidates) for q in self.queries.values())


def _shot_fix(expected: int, got: int, given: bool) -> str:
    if given:
        return f"regenerate the RL data with shot_num={expected}, or pass data.shot_num={got} to read it as-is"
    return (f"every candidate in one file must have the same number of shots ({expected}, inferred from the first "
            "candidate); regenerate the file or drop the inconsistent candidates")


def _check_rl_candidate_fields(cand: dict, *, path: str, record: str) -> None:
    for name in RL_NUMERIC_FIELDS:
        v = cand.get(name)
        if v is not None:
            _finite_number(v, path=path, record=record, field_name=name)
    acc = cand.get("vqa_acc_score")
    if acc is not None and not 0.0 <= acc <= 1.0:
        raise LeverPlusInputError(
            f"is {acc}; VQA accuracy must lie in [0, 1]",
            file=path, record=record, field="vqa_acc_score",
            fix="store accuracy as a fraction (official VQA accuracy / 100)",
        )
    if "vqa_correct" in cand:
        v = cand["vqa_correct"]
        if not (v is None or isinstance(v, bool) or (_is_int(v) and v in (0, 1))):
            raise LeverPlusInputError(
                f"is {v!r}; it must be 0, 1, true, false or null",
                file=path, record=record, field="vqa_correct",
                fix="set vqa_correct = 1 if vqa_acc_score > 0 else 0",
            )
    for name in RL_STRING_FIELDS:
        v = cand.get(name)
        if v is not None and not isinstance(v, str):
            raise LeverPlusInputError(
                f"must be a string or null, got {v!r} ({_type_name(v)})", file=path, record=record, field=name
            )


def _rl_pool(entry: dict, query: dict, *, qid: int, path: str, num_items: Optional[int]) -> Optional[list[int]]:
    """``candidate_pool_ids`` from the entry (spec) or inside ``query`` (also accepted)."""
    record = f"query {qid}"
    outer, inner = entry.get("candidate_pool_ids"), query.get("candidate_pool_ids")
    if outer is not None and inner is not None and outer != inner:
        raise LeverPlusInputError(
            "differs between the query entry and its 'query' object",
            file=path, record=record, field="candidate_pool_ids", fix="keep one copy (on the query entry)",
        )
    pool = outer if outer is not None else inner
    if pool is None:
        return None
    pool = _int_list(pool, path=path, record=record, field_name="candidate_pool_ids", num_items=num_items)
    if qid in pool:
        raise LeverPlusInputError(
            f"the query's own id {qid} is in its candidate pool",
            file=path, record=record, field="candidate_pool_ids",
            fix="remove the query from its pool (an example must not be its own demonstration)",
        )
    return pool


def _rl_pointer(
    cand: dict,
    *,
    qid: int,
    pool: Optional[list[int]],
    path: str,
    record: str,
    num_items: Optional[int],
) -> tuple[list[int], bool]:
    """Pick the pointer field (§1b "Legacy formats"), validate it and return (global ids, stored_local)."""
    if "pointer_global" in cand:
        glob = _int_list(cand["pointer_global"], path=path, record=record, field_name="pointer_global",
                         num_items=num_items)
        if pool is None:
            raise LeverPlusInputError(
                "has pointer_global (so 'pointer' is local) but the query has no candidate_pool_ids",
                file=path, record=record, field="pointer_global",
                fix="add candidate_pool_ids to the query entry, or drop pointer_global and store global ids in pointer",
            )
        if "pointer" not in cand:
            raise LeverPlusInputError(
                "has pointer_global but no local 'pointer'", file=path, record=record, field="pointer",
                fix="store pointer[i] = candidate_pool_ids.index(pointer_global[i])",
            )
        local = cand["pointer"]
        if not isinstance(local, list) or not all(_is_int(v) for v in local) or len(local) != len(glob):
            raise LeverPlusInputError(
                f"local pointer {local!r} must be a list of {len(glob)} integers (one per pointer_global entry)",
                file=path, record=record, field="pointer",
            )
        for j, (lo, gl) in enumerate(zip(local, glob)):
            if not 0 <= lo < len(pool):
                raise LeverPlusInputError(
                    f"local index {lo} (entry {j}) is outside the pool [0, {len(pool)})",
                    file=path, record=record, field="pointer",
                    fix="re-run the K=64 pool fix for this query",
                )
            if pool[lo] != gl:
                raise LeverPlusInputError(
                    f"candidate_pool_ids[{lo}] = {pool[lo]} but pointer_global[{j}] = {gl}",
                    file=path, record=record, field="pointer",
                    fix="re-run the K=64 pool fix for this query (pool[local] must equal the global id)",
                )
        ids, name, local_flag = glob, "pointer_global", True
    elif "pointer" in cand:
        ids, name, local_flag = cand["pointer"], "pointer", False
    elif "pointer_pos" in cand:
        ids, name, local_flag = cand["pointer_pos"], "pointer_pos", False
    else:
        raise LeverPlusInputError(
            "has no pointer field (pointer_global+pointer, pointer or pointer_pos)",
            file=path, record=record, field="pointer", fix="store the chosen ICD ids in 'pointer'",
        )
    ids = _int_list(ids, path=path, record=record, field_name=name, num_items=num_items)
    if qid in ids:
        raise LeverPlusInputError(
            f"the query's own id {qid} is among its demonstrations {ids}",
            file=path, record=record, field=name, fix="drop this candidate (a query cannot be its own ICD)",
        )
    return ids, local_flag


def _parse_rl_obj(obj: Any, *, path: str, shot_num: Optional[int], num_items: Optional[int]) -> RLData:
    if shot_num is not None and (not _is_int(shot_num) or shot_num < 1):
        raise LeverPlusInputError(f"shot_num must be a positive integer, got {shot_num!r}", file=path)
    if not isinstance(obj, dict):
        raise LeverPlusInputError(
            f"top level must be a JSON object keyed by query id, got {_type_name(obj)}",
            file=path, fix="pass an RL-data JSON file (rl_data_*.json)",
        )
    meta = obj.get("_meta", {})
    if not isinstance(meta, dict):
        raise LeverPlusInputError(f"must be an object, got {_type_name(meta)}", file=path, record="_meta",
                                  field="_meta")
    given = shot_num is not None
    queries: dict[int, RLQuery] = {}
    for key, entry in obj.items():
        if isinstance(key, str) and key.startswith("_"):
            continue
        qid = _parse_key(key, path, "RL-data")
        qrec = f"query {qid}"
        if qid in queries:
            raise LeverPlusInputError(f"query id {qid} appears twice (key {key!r})", file=path, record=qrec,
                                      fix="merge or drop the duplicate")
        if num_items is not None and qid >= num_items:
            raise LeverPlusInputError(
                f"query id {qid} is outside [0, {num_items})", file=path, record=qrec, field="query_id",
                fix="the file does not match the dataset; use the matching dataset or regenerate the file",
            )
        if not isinstance(entry, dict):
            raise LeverPlusInputError(f"must be an object, got {_type_name(entry)}", file=path, record=qrec)
        if "query" in entry:
            query = entry["query"]
            if not isinstance(query, dict):
                raise LeverPlusInputError(f"must be an object, got {_type_name(query)}", file=path, record=qrec,
                                          field="query")
        else:  # legacy flat shape: query fields sit next to pointer_candidates
            query = {k: v for k, v in entry.items() if k not in _RL_ENTRY_KEYS}
        if "query_id" in query and str(query["query_id"]) != str(qid):
            raise LeverPlusInputError(
                f"is {query['query_id']!r} but the record key says {qid}", file=path, record=qrec,
                field="query_id", fix="the key and query.query_id must both be the train-row index",
            )
        pool = _rl_pool(entry, query, qid=qid, path=path, num_items=num_items)
        cands = entry.get("pointer_candidates")
        if not isinstance(cands, list):
            raise LeverPlusInputError(
                f"must be a list of candidate objects, got {_type_name(cands)}",
                file=path, record=qrec, field="pointer_candidates",
            )
        if not cands:
            raise LeverPlusInputError(
                "is empty (empty group: nothing to learn from)", file=path, record=qrec,
                field="pointer_candidates", fix="drop this query from the file or regenerate its candidates",
            )
        candidates: list[RLCandidate] = []
        first_local: Optional[bool] = None
        for i, cand in enumerate(cands):
            rec = f"query {qid}, candidate {i}"
            if not isinstance(cand, dict):
                raise LeverPlusInputError(f"must be an object, got {_type_name(cand)}", file=path, record=rec,
                                          field="pointer_candidates")
            ids, local = _rl_pointer(cand, qid=qid, pool=pool, path=path, record=rec, num_items=num_items)
            if first_local is None:
                first_local = local
            elif local != first_local:
                raise LeverPlusInputError(
                    "candidates of one query mix local pointers (with pointer_global) and global pointers",
                    file=path, record=rec, field="pointer_global",
                    fix="re-run the K=64 pool fix on this query so every candidate has pointer_global",
                )
            if shot_num is None:
                shot_num = len(ids)
            if len(ids) != shot_num:
                raise LeverPlusInputError(
                    f"has {len(ids)} ids {ids} but shot_num is {shot_num}", file=path, record=rec,
                    field="pointer_global" if local else "pointer", fix=_shot_fix(shot_num, len(ids), given),
                )
            _check_rl_candidate_fields(cand, path=path, record=rec)
            candidates.append(RLCandidate(index=i, pointer=tuple(ids), raw=cand))
        fix_error = entry.get("_fix_error")
        queries[qid] = RLQuery(
            query_id=qid,
            query=query,
            candidates=candidates,
            candidate_pool_ids=pool,
            fix_failed=entry.get("_fix_failed") is True,
            fix_error=None if fix_error is None else str(fix_error),
            local_pointers=bool(first_local),
        )
    if not queries:
        raise LeverPlusInputError("holds no query records", file=path,
                                  fix="pass a non-empty RL-data file (only '_meta' was found)")
    return RLData(path=path, meta=meta, shot_num=shot_num, queries=dict(sorted(queries.items())))


def read_rl_json(path: PathLike, *, shot_num: Optional[int] = None, num_items: Optional[int] = None) -> RLData:
    """Read and validate an RL-data JSON (plain, legacy flat, K=64-fixed or balanced variant).

    ``shot_num``: expected pointer length (inferred from the first candidate of the first query when None).
    ``num_items``: train-split size; ids must lie in [0, num_items) (only non-negativity is checked when None).
    Pointers are returned as global ids whichever field the file used.
    """
    return _parse_rl_obj(load_json(path), path=str(path), shot_num=shot_num, num_items=num_items)


def write_rl_json(
    path: PathLike,
    queries: Mapping[Union[int, str], Union[dict, RLQuery]],
    meta: Optional[dict],
    *,
    validate: bool = True,
) -> None:
    """Write an RL file atomically with ``_meta`` first (``None`` = interim save without it), ``indent=2``.

    Values are on-disk query records (dicts) or :class:`RLQuery`. With ``validate`` the content is checked by
    the reader's rules first, so we never write a file we would refuse to read.
    """
    path = str(path)
    records = {_parse_key(k, path, "RL-data"): (v.to_json_dict() if isinstance(v, RLQuery) else v)
               for k, v in queries.items()}
    if len(records) != len(queries):
        raise LeverPlusInputError("two keys name the same query id (e.g. 12 and '12')", file=path,
                                  fix="pass one record per query id")
    out: dict[str, Any] = {} if meta is None else {"_meta": meta}
    out.update((str(k), records[k]) for k in sorted(records))
    if validate:
        _parse_rl_obj(out, path=path, shot_num=None, num_items=None)
    atomic_write_json(path, out, indent=2)


# --------------------------------------------------------------------------------------------------
# Beam JSON (§1a)
# --------------------------------------------------------------------------------------------------


@dataclass
class BeamRecord:
    """One query of an InfoScore beam file. Each ``id_list`` beam is ``[icd..., query_id]`` in prompt order."""

    query_id: int
    id_list: list[list[int]]
    score_list: list[float]
    shot_scores: Optional[list[list[float]]] = None
    beams: Optional[list[dict]] = None
    few_shot_num: Optional[int] = None

    @property
    def icd_sequences(self) -> list[tuple[int, ...]]:
        """The ICDs of each beam in prompt order (query id dropped)."""
        return [tuple(beam[:-1]) for beam in self.id_list]

    def sequence_infoscore(self, i: int) -> float:
        """Total InfoScore gain of beam ``i``: ``sum(shot_scores[i])`` if stored, else ``score_list[i]``.

        (``score_list`` holds the last step's InfoScore only, §1a, so it is a fallback, not the same quantity.)
        """
        if self.shot_scores is not None:
            return float(sum(self.shot_scores[i]))
        return float(self.score_list[i])

    def to_json_dict(self) -> dict:
        out: dict[str, Any] = {"id_list": [list(b) for b in self.id_list], "score_list": list(self.score_list)}
        if self.shot_scores is not None:
            out["shot_scores"] = [list(s) for s in self.shot_scores]
        if self.beams is not None:
            out["beams"] = list(self.beams)
        if self.few_shot_num is not None:
            out["few_shot_num"] = self.few_shot_num
        return out


def _check_beam_dicts(beams: Any, id_list: list[list[int]], scores: list[float], *, path: str, qid: int) -> list[dict]:
    if not isinstance(beams, list) or len(beams) != len(id_list):
        n = len(beams) if isinstance(beams, list) else _type_name(beams)
        raise LeverPlusInputError(f"must be a list of {len(id_list)} beam objects (one per id_list beam), got {n}",
                                  file=path, record=f"query {qid}", field="beams")
    for i, beam in enumerate(beams):
        rec = f"query {qid}, beam {i}"
        if not isinstance(beam, dict):
            raise LeverPlusInputError(f"must be an object, got {_type_name(beam)}", file=path, record=rec,
                                      field="beams")
        if "full_sequence" in beam and beam["full_sequence"] != id_list[i]:
            raise LeverPlusInputError(f"full_sequence {beam['full_sequence']} != id_list[{i}] {id_list[i]}",
                                      file=path, record=rec, field="beams.full_sequence",
                                      fix="regenerate the beam file (full_sequence must equal id_list)")
        if beam.get("final_score") is not None:
            fs = _finite_number(beam["final_score"], path=path, record=rec, field_name="beams.final_score")
            if not math.isclose(fs, scores[i], rel_tol=1e-9, abs_tol=0.0):
                raise LeverPlusInputError(f"final_score {fs} != score_list[{i}] {scores[i]}", file=path,
                                          record=rec, field="beams.final_score",
                                          fix="regenerate the beam file (final_score must equal score_list)")
        if "shots" in beam:
            shots = beam["shots"]
            selection_order = list(reversed(id_list[i][:-1]))
            ids = [s.get("id") if isinstance(s, dict) else None for s in shots] if isinstance(shots, list) else None
            if ids != selection_order:
                raise LeverPlusInputError(
                    f"shot ids {ids} are not id_list[{i}][:-1] in selection order {selection_order}",
                    file=path, record=rec, field="beams.shots",
                    fix="regenerate the beam file (shots are id_list[:-1] reversed)",
                )
            for s in shots:
                if s.get("score") is not None:
                    _finite_number(s["score"], path=path, record=rec, field_name="beams.shots.score")
    return beams


def _parse_beam_obj(obj: Any, *, path: str, num_items: Optional[int],
                    shot_num: Optional[int]) -> dict[int, BeamRecord]:
    if shot_num is not None and (not _is_int(shot_num) or shot_num < 1):
        raise LeverPlusInputError(f"shot_num must be a positive integer, got {shot_num!r}", file=path)
    if not isinstance(obj, dict):
        raise LeverPlusInputError(f"top level must be a JSON object keyed by query id, got {_type_name(obj)}",
                                  file=path, fix="pass an InfoScore beam-search JSON file")
    given = shot_num is not None
    records: dict[int, BeamRecord] = {}
    for key, entry in obj.items():
        if isinstance(key, str) and key.startswith("_"):
            continue
        qid = _parse_key(key, path, "beam")
        qrec = f"query {qid}"
        if qid in records:
            raise LeverPlusInputError(f"query id {qid} appears twice (key {key!r})", file=path, record=qrec,
                                      fix="merge or drop the duplicate")
        if not isinstance(entry, dict):
            raise LeverPlusInputError(f"must be an object, got {_type_name(entry)}", file=path, record=qrec)
        id_list = entry.get("id_list")
        if not isinstance(id_list, list) or not id_list:
            raise LeverPlusInputError(f"must be a non-empty list of beams, got {id_list!r:.60}", file=path,
                                      record=qrec, field="id_list")
        beams_ids: list[list[int]] = []
        for i, beam in enumerate(id_list):
            rec = f"query {qid}, beam {i}"
            ids = _int_list(beam, path=path, record=rec, field_name="id_list", num_items=num_items)
            if ids[-1] != qid:
                raise LeverPlusInputError(
                    f"beam {ids} does not end with the query id {qid}", file=path, record=rec, field="id_list",
                    fix="each beam is [icd..., query_idx] (query last); regenerate the beam file",
                )
            if len(ids) < 2:
                raise LeverPlusInputError(f"beam {ids} holds no ICD", file=path, record=rec, field="id_list",
                                          fix="each beam is [icd..., query_idx] with at least one ICD")
            if beams_ids and len(ids) != len(beams_ids[0]):
                raise LeverPlusInputError(
                    f"has {len(ids)} ids but beam 0 has {len(beams_ids[0])}; all beams must have the same length",
                    file=path, record=rec, field="id_list", fix="regenerate the beam file",
                )
            if shot_num is None:
                shot_num = len(ids) - 1
            if len(ids) - 1 != shot_num:
                raise LeverPlusInputError(
                    f"has {len(ids) - 1} ICDs but shot_num is {shot_num}", file=path, record=rec, field="id_list",
                    fix=(f"regenerate the beam data with max_shot={shot_num}, or pass shot_num={len(ids) - 1}"
                         if given else "all records of one file must have the same shot count; regenerate it"),
                )
            beams_ids.append(ids)
        n_beams, n_shots = len(beams_ids), shot_num
        scores = entry.get("score_list")
        if not isinstance(scores, list) or len(scores) != n_beams:
            n = len(scores) if isinstance(scores, list) else _type_name(scores)
            raise LeverPlusInputError(f"must be a list of {n_beams} scores (one per beam), got {n}", file=path,
                                      record=qrec, field="score_list")
        scores = [_finite_number(s, path=path, record=f"query {qid}, beam {i}", field_name="score_list")
                  for i, s in enumerate(scores)]
        shot_scores = entry.get("shot_scores")
        if shot_scores is not None:
            if not isinstance(shot_scores, list) or len(shot_scores) != n_beams:
                raise LeverPlusInputError(f"must be a list of {n_beams} per-beam lists", file=path, record=qrec,
                                          field="shot_scores")
            rows = []
            for i, row in enumerate(shot_scores):
                rec = f"query {qid}, beam {i}"
                if not isinstance(row, list) or len(row) != n_shots:
                    raise LeverPlusInputError(f"must hold {n_shots} per-step scores, got {row!r:.60}", file=path,
                                              record=rec, field="shot_scores")
                rows.append([_finite_number(s, path=path, record=rec, field_name="shot_scores") for s in row])
            shot_scores = rows
        beams = entry.get("beams")
        if beams is not None:
            beams = _check_beam_dicts(beams, beams_ids, scores, path=path, qid=qid)
        few = entry.get("few_shot_num")
        if few is not None and (not _is_int(few) or few != n_shots):
            raise LeverPlusInputError(f"is {few!r} but the beams hold {n_shots} ICDs", file=path, record=qrec,
                                      field="few_shot_num", fix="regenerate the beam file")
        records[qid] = BeamRecord(qid, beams_ids, scores, shot_scores, beams, few)
    if not records:
        raise LeverPlusInputError("holds no query records", file=path, fix="pass a non-empty beam file")
    return dict(sorted(records.items()))


def read_beam_json(
    path: PathLike, *, num_items: Optional[int] = None, shot_num: Optional[int] = None
) -> dict[int, BeamRecord]:
    """Read and validate an InfoScore beam JSON; records sorted by query id.

    ``shot_num``: expected ICDs per beam (inferred from the first beam when None; all records must agree).
    ``num_items``: train-split size; ids must lie in [0, num_items).
    """
    return _parse_beam_obj(load_json(path), path=str(path), num_items=num_items, shot_num=shot_num)


def write_beam_json(
    path: PathLike, records: Mapping[Any, Union[BeamRecord, dict]], *, validate: bool = True
) -> None:
    """Write a beam JSON atomically (keys ``str(query_idx)`` in numeric order); validated first by default."""
    path = str(path)
    parsed = {_parse_key(k, path, "beam"): (v.to_json_dict() if isinstance(v, BeamRecord) else v)
              for k, v in records.items()}
    if len(parsed) != len(records):
        raise LeverPlusInputError("two keys name the same query id (e.g. 12 and '12')", file=path,
                                  fix="pass one record per query id")
    out = {str(k): parsed[k] for k in sorted(parsed)}
    if validate:
        _parse_beam_obj(out, path=path, num_items=None, shot_num=None)
    atomic_write_json(path, out)


# --------------------------------------------------------------------------------------------------
# Embeddings (§1c)
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
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
            raise LeverPlusInputError(f"cannot be read by torch.load(weights_only=True): {e}", file=path,
                                      fix="save a tensor with torch.save (no pickled objects)") from e
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
    bad row is named), and ``N == expected_rows`` when given.
    """
    path = str(path)
    return _check_embeddings(_load_embedding_payload(path), path=path, expected_rows=expected_rows)


def save_embeddings(path: PathLike, tensor: Union[torch.Tensor, np.ndarray]) -> None:
    """Validate and atomically save a contiguous CPU float32 ``[N, d]`` table (``.npy`` -> np.save, else torch.save).

    A view is copied first, so the file holds only its rows, not the whole parent storage.
    """
    path = str(path)
    t = _check_embeddings(tensor, path=path, expected_rows=None)
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset() != 0:
        t = t.clone()
    if Path(path).suffix.lower() == ".npy":
        with _atomic_open(path, "wb") as f:
            np.save(f, t.numpy(), allow_pickle=False)
    else:
        atomic_torch_save(path, t)


__all__ = [
    "BeamRecord",
    "RLCandidate",
    "RLData",
    "RLQuery",
    "RL_NUMERIC_FIELDS",
    "atomic_torch_save",
    "atomic_write_json",
    "file_fingerprint",
    "load_json",
    "read_beam_json",
    "read_embeddings",
    "read_rl_json",
    "save_embeddings",
    "write_beam_json",
    "write_rl_json",
]
