"""The RL-data JSON: per query, pointer candidates with their VQA scores (``docs/reference.md#formats-rl-json``).

Reads the three shapes in use: the legacy shape without a wrapper, the K=64 shape with local ``pointer`` plus
``pointer_global`` and ``candidate_pool_ids``, and the "balanced" shape without ``vqa_correct``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

from leverplus.data.formats.io import (
    PathLike,
    _finite_number,
    _int_list,
    _is_int,
    _parse_key,
    _type_name,
    atomic_write_json,
    load_json,
)
from leverplus.errors import LeverPlusInputError

#: Candidate fields that must be finite numbers when present and not null (reference#formats-rl-json table).
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
    "info_score",
)
#: Candidate fields that must be strings when present and not null.
RL_STRING_FIELDS = ("gen_method", "vqa_eval_mode")
#: the values of ``vqa_eval_mode``: the official metric, the string-match fallback, a metric error
VQA_EVAL_MODES = ("vqaEval", "fallback", "error")
#: Reward fields a whole file may lack by design: the "balanced" variant has no ``vqa_correct`` (it counts as 0)
VARIANT_ABSENT_FIELDS = ("vqa_correct",)
#: Entry-level keys of an RL query that are not query content (used to build ``query`` for the legacy flat shape).
_RL_ENTRY_KEYS = ("pointer_candidates", "candidate_pool_ids", "_fix_failed", "_fix_error")


# --------------------------------------------------------------------------------------------------
# RL JSON (reference#formats-rl-json, reference#dataset-rl)
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
    pool only in that case (reference#dataset-rl step 6); otherwise the pool is built from the trajectories.
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
        return f"regenerate the RL data with shot_num={expected}, or pass data.shot_nums=[{got}] to read it as-is"
    return (f"every candidate in one file must have the same number of shots ({expected}, inferred from the first "
            "candidate); regenerate the file or drop the inconsistent candidates")


def _check_vqa_correct(cand: dict, *, path: str, record: str) -> None:
    if "vqa_correct" in cand:
        v = cand["vqa_correct"]
        if not (v is None or isinstance(v, bool) or (_is_int(v) and v in (0, 1))):
            raise LeverPlusInputError(
                f"is {v!r}; it must be 0, 1, true, false or null",
                file=path, record=record, field="vqa_correct",
                fix="set vqa_correct = 1 if vqa_acc_score > 0 else 0",
            )


def _check_rl_candidate_fields(cand: dict, *, path: str, record: str) -> None:
    """The optional score fields: finite numbers, accuracy in [0, 1], a 0/1 correctness, strings or null."""
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
    gt_prob = cand.get("vqa_gt_prob")
    if gt_prob is not None and gt_prob < 0:
        raise LeverPlusInputError(f"is {gt_prob}; a probability sum cannot be negative", file=path, record=record,
                                  field="vqa_gt_prob", fix="regenerate the candidate's vqa_gt_prob")
    _check_vqa_correct(cand, path=path, record=record)
    for name in RL_STRING_FIELDS:
        v = cand.get(name)
        if v is not None and not isinstance(v, str):
            raise LeverPlusInputError(
                f"must be a string or null, got {v!r} ({_type_name(v)})", file=path, record=record, field=name
            )
    mode = cand.get("vqa_eval_mode")
    if mode is not None and mode not in VQA_EVAL_MODES:
        # a typo such as "Fallback" would slip past data.skip_fallback_reward and train as clean data
        raise LeverPlusInputError(f"unknown value {mode!r}", file=path, record=record, field="vqa_eval_mode",
                                  fix=f"use one of {', '.join(VQA_EVAL_MODES)} (case matters)")


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


def _local_pointer(cand: dict, glob: list[int], pool: Optional[list[int]], *, path: str, record: str) -> None:
    """With ``pointer_global``, ``pointer`` holds local positions into the pool: ``pool[pointer[j]] == glob[j]``."""
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


def _rl_pointer(
    cand: dict,
    *,
    qid: int,
    pool: Optional[list[int]],
    path: str,
    record: str,
    num_items: Optional[int],
) -> tuple[list[int], bool]:
    """Pick the pointer field (reference#formats-rl-json "Legacy formats"), validate it and return
    (global ids, stored_local)."""
    if "pointer_global" in cand:
        glob = _int_list(cand["pointer_global"], path=path, record=record, field_name="pointer_global",
                         num_items=num_items)
        _local_pointer(cand, glob, pool, path=path, record=record)
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


def _rl_query_object(entry: dict, *, qid: int, path: str) -> dict:
    """The entry's ``query`` object (or, in the legacy flat shape, its non-entry keys); its id must be ``qid``."""
    qrec = f"query {qid}"
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
    return query


def _rl_candidates(cands: Any, *, qid: int, pool: Optional[list[int]], path: str, shot_num: Optional[int],
                   given: bool, num_items: Optional[int]) -> tuple[list[RLCandidate], Optional[bool], int]:
    """``pointer_candidates`` of one query: a non-empty list, one pointer kind, ``shot_num`` ids each (inferred
    from the first candidate when None). Returns (candidates, stored_local, shot_num)."""
    qrec = f"query {qid}"
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
    return candidates, first_local, shot_num


def _parse_rl_entry(qid: int, entry: Any, *, path: str, shot_num: Optional[int], given: bool,
                    num_items: Optional[int]) -> tuple[RLQuery, int]:
    """One query's record; returns it with the (possibly inferred) shot count."""
    qrec = f"query {qid}"
    if num_items is not None and qid >= num_items:
        raise LeverPlusInputError(
            f"query id {qid} is outside [0, {num_items})", file=path, record=qrec, field="query_id",
            fix="the file does not match the dataset; use the matching dataset or regenerate the file",
        )
    if not isinstance(entry, dict):
        raise LeverPlusInputError(f"must be an object, got {_type_name(entry)}", file=path, record=qrec)
    query = _rl_query_object(entry, qid=qid, path=path)
    pool = _rl_pool(entry, query, qid=qid, path=path, num_items=num_items)
    candidates, first_local, shot_num = _rl_candidates(entry.get("pointer_candidates"), qid=qid, pool=pool,
                                                       path=path, shot_num=shot_num, given=given,
                                                       num_items=num_items)
    fix_error = entry.get("_fix_error")
    return RLQuery(
        query_id=qid,
        query=query,
        candidates=candidates,
        candidate_pool_ids=pool,
        fix_failed=entry.get("_fix_failed") is True,
        fix_error=None if fix_error is None else str(fix_error),
        local_pointers=bool(first_local),
    ), shot_num


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
        if qid in queries:
            raise LeverPlusInputError(f"query id {qid} appears twice (key {key!r})", file=path,
                                      record=f"query {qid}", fix="merge or drop the duplicate")
        queries[qid], shot_num = _parse_rl_entry(qid, entry, path=path, shot_num=shot_num, given=given,
                                                 num_items=num_items)
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

