"""Shared plumbing of the generation apps (``generate_rl_data``, ``generate_beam_data``): which queries, shards by
index range, resumable output with periodic atomic saves, and merging shards.

The output file is the only state. While a run works, the file holds the finished query records plus a
``_partial`` entry (settings, shard, counters); readers skip ``_``-keys, so an interim file is already loadable
(the reference's interim saves had no ``_meta`` either). A restart with the same settings skips the finished
queries; other settings are refused. The final file replaces ``_partial`` with ``_meta``. Every per-query result
depends only on the query (seeded per query, scored per query), so a resumed or sharded-then-merged run writes
byte-identical files to an uninterrupted one — provided ``created_at`` is fixed (the default).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

from leverplus.data.formats.io import atomic_write_json, load_json, remove_stale_temps
from leverplus.errors import LeverPlusInputError

PathLike = Union[str, Path]
#: ``created_at`` default: fixed, so identical inputs give byte-identical files (content-hashed run keys);
#: pass ``created_at=now`` for the wall clock (kept across resumes, the earliest one wins when merging).
FIXED_CREATED_AT = "2000-01-01 00:00:00"
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def resolve_created_at(value: Optional[str]) -> str:
    """``"now"`` -> the wall clock (reference format ``%Y-%m-%d %H:%M:%S``); None -> the fixed default."""
    if value is None:
        return FIXED_CREATED_AT
    return time.strftime(TIME_FORMAT) if value == "now" else str(value)


def ids_fingerprint(ids: Sequence[int]) -> str:
    """16 hex chars identifying a list of query ids (stored instead of the list itself)."""
    return hashlib.sha256(json.dumps([int(i) for i in ids]).encode()).hexdigest()[:16]


def shard_range(ids: Sequence[int], start: int = 0, end: Optional[int] = None) -> tuple[list[int], dict]:
    """``ids[start:end]`` (indices into the sorted list, the reference's ``--start_idx/--end_idx``; ``end``
    None or -1 = to the end) and the shard description written to ``_meta.shard`` (empty for the whole list)."""
    n = len(ids)
    stop = n if end is None or end == -1 else int(end)
    if not 0 <= start <= stop <= n:
        raise LeverPlusInputError(f"shard [{start}, {end}) is outside the {n} queries", field="queries.start",
                                  fix=f"use 0 <= start <= end <= {n} (end=-1 or null for the rest)")
    shard = {} if (start == 0 and stop == n) else {"start": int(start), "end": int(stop), "num_queries_total": n}
    return [int(i) for i in ids[start:stop]], shard


class ResumableOutput:
    """Query records of one output file, with resume, periodic atomic saves and a final write.

    settings: everything that determines the records (compared on resume and when merging).
    final_writer: ``(path, records, meta)`` writes the finished file (validated by the format's reader).
    """

    def __init__(self, path: PathLike, settings: Dict[str, Any], shard: Dict[str, Any],
                 final_writer: Callable[[str, Dict[int, dict], dict], None], *, resume: bool = True,
                 created_at: Optional[str] = None) -> None:
        self.path = str(path)
        self.settings = json.loads(json.dumps(settings))  # plain JSON types, as read back from disk
        self.shard = dict(shard)
        self.final_writer = final_writer
        self.records: Dict[int, dict] = {}
        self.state: Dict[str, Any] = {"dropped": {}, "empty_queries": []}
        self.complete = False
        self.created_at = None if created_at == "now" else resolve_created_at(created_at)
        for tmp in remove_stale_temps(self.path):  # left by a killed run of this generator
            print(f"[leverplus] removed {tmp}, a temp file of an interrupted run", file=sys.stderr)
        if os.path.exists(self.path):
            if not resume:
                raise LeverPlusInputError("the output file already exists", file=self.path,
                                          fix="delete it, choose another output, or pass resume=true")
            self._load()
        if self.created_at is None:
            self.created_at = resolve_created_at("now")

    def _load(self) -> None:
        obj = load_json(self.path)
        if not isinstance(obj, dict):
            raise LeverPlusInputError("is not a generator output (not a JSON object)", file=self.path,
                                      fix="choose another output path")
        block = obj.get("_partial") or obj.get("_meta")
        if not isinstance(block, dict) or "generation" not in block:
            raise LeverPlusInputError("exists but was not written by this generator (no _partial/_meta.generation)",
                                      file=self.path, fix="choose another output path or delete the file")
        if block["generation"] != self.settings or block.get("shard", {}) != self.shard:
            diff = sorted(k for k in set(block["generation"]) | set(self.settings)
                          if block["generation"].get(k) != self.settings.get(k))
            if block.get("shard", {}) != self.shard:
                diff.append("shard")
            raise LeverPlusInputError(f"was generated with other settings (differ: {', '.join(diff)})",
                                      file=self.path, fix="resume with the same settings, or choose another output")
        self.complete = "_meta" in obj
        self.created_at = self.created_at or block.get("created_at")
        self.state = {"dropped": dict(block.get("dropped_candidates", {})),
                      "empty_queries": list(block.get("empty_queries", []))}
        if self.complete:
            self.meta = obj["_meta"]
        self.records = {int(k): v for k, v in obj.items() if not k.startswith("_")}

    def done(self) -> set[int]:
        """Query ids already finished (written, or found to have no candidate left)."""
        return set(self.records) | set(self.state["empty_queries"])

    def add(self, query_id: int, record: Optional[dict], dropped: Optional[Dict[str, int]] = None) -> None:
        if record is None:
            self.state["empty_queries"].append(int(query_id))
        else:
            self.records[int(query_id)] = record
        for reason, n in (dropped or {}).items():
            self.state["dropped"][reason] = int(self.state["dropped"].get(reason, 0)) + int(n)

    def _block(self) -> dict:
        block = {"generation": self.settings, "created_at": self.created_at,
                 "dropped_candidates": dict(sorted(self.state["dropped"].items())),
                 "empty_queries": sorted(self.state["empty_queries"])}
        if self.shard:
            block["shard"] = self.shard
        return block

    def save_partial(self) -> None:
        """Atomic interim save: ``_partial`` + the finished records (sorted by id), indent=2."""
        out: Dict[str, Any] = {"_partial": self._block()}
        out.update((str(k), self.records[k]) for k in sorted(self.records))
        atomic_write_json(self.path, out, indent=2)

    def finalize(self, meta: Dict[str, Any]) -> dict:
        """Write the final file; ``meta`` gets ``created_at``, the counters, ``generation`` and ``shard``."""
        full = {"created_at": self.created_at, **meta, **{k: v for k, v in self._block().items()
                                                          if k != "created_at"}}
        if not self.records:
            raise LeverPlusInputError("no query produced a record (every candidate was dropped)", file=self.path,
                                      fix="check the annotations (strict_eval drops queries without official "
                                          "annotations) or pass strict_eval=false")
        self.final_writer(self.path, self.records, full)
        self.complete, self.meta = True, full
        return full


def _read_shard(p: PathLike, first_meta: Optional[dict], records: Dict[int, dict]) -> dict:
    """One finished shard: its records added to ``records`` (disjoint from the others'); returns its ``_meta``."""
    obj = load_json(p)
    meta = obj.get("_meta") if isinstance(obj, dict) else None
    if not isinstance(meta, dict) or "generation" not in meta:
        what = "an unfinished shard (_partial)" if isinstance(obj, dict) and "_partial" in obj else \
            "not a generator output"
        raise LeverPlusInputError(f"is {what}", file=str(p), fix="finish (resume) the shard before merging")
    if first_meta is not None and meta["generation"] != first_meta["generation"]:
        raise LeverPlusInputError("was generated with other settings than the first shard", file=str(p),
                                  record="_meta", field="generation", fix="merge shards of one run only")
    for k, v in obj.items():
        if k.startswith("_"):
            continue
        if int(k) in records:
            raise LeverPlusInputError(f"query {k} is also in another shard", file=str(p), record=f"query {k}",
                                      fix="shards must cover disjoint index ranges")
        records[int(k)] = v
    return meta


def _check_coverage(covered: List[tuple], total: int) -> None:
    """The shards' [start, end) ranges tile [0, total) without a gap."""
    pos = 0
    for start, end, _ in sorted(covered, key=lambda c: c[0]):
        if start != pos:
            raise LeverPlusInputError(f"the shards leave queries [{pos}, {start}) of {total} uncovered",
                                      fix="generate and pass the missing shard (or --allow-gaps)")
        pos = end
    if pos != total:
        raise LeverPlusInputError(f"the shards leave queries [{pos}, {total}) uncovered",
                                  fix="generate and pass the missing shard (or --allow-gaps)")


def _merged_meta(metas: List[dict]) -> dict:
    """The first shard's ``_meta`` without ``shard``; earliest ``created_at``; drop counters summed."""
    dropped: Dict[str, int] = {}
    for m in metas:
        for k, v in m.get("dropped_candidates", {}).items():
            dropped[k] = dropped.get(k, 0) + int(v)
    meta = {k: v for k, v in metas[0].items() if k != "shard"}
    meta["created_at"] = min(m["created_at"] for m in metas)
    meta["dropped_candidates"] = dict(sorted(dropped.items()))
    meta["empty_queries"] = sorted(q for m in metas for q in m.get("empty_queries", []))
    return meta


def merge_outputs(output: PathLike, inputs: Sequence[PathLike], *,
                  final_writer: Callable[[str, Dict[int, dict], dict], None],
                  recount: Callable[[Dict[int, dict]], Dict[str, Any]], allow_gaps: bool = False) -> dict:
    """Merge finished shard files into one file, as an uninterrupted run would have written it.

    Shards must be finished (``_meta``), share ``generation`` and the query list, and hold disjoint queries;
    together they must cover every query (``allow_gaps`` merges an incomplete set). Counters are summed,
    ``recount(records)`` recomputes the record-derived ``_meta`` fields, ``created_at`` is the earliest.
    """
    if not inputs:
        raise LeverPlusInputError("no shard files given", fix="pass the shard files to merge")
    metas: List[dict] = []
    records: Dict[int, dict] = {}
    covered = []
    for p in inputs:
        meta = _read_shard(p, metas[0] if metas else None, records)
        shard = meta.get("shard") or {"start": 0, "end": None}
        covered.append((shard.get("start", 0), shard.get("end"), str(p)))
        metas.append(meta)
    total = next((m["shard"]["num_queries_total"] for m in metas if m.get("shard")), None)
    if total is not None and not allow_gaps:
        _check_coverage(covered, total)
    meta = _merged_meta(metas)
    meta.update(recount(records))
    final_writer(str(output), records, meta)
    return meta


def read_pool_file(path: PathLike) -> Dict[int, List[int]]:
    """Per-query pools: ``{"<qid>": [ids...]}`` or an RL JSON (its ``candidate_pool_ids``)."""
    path = str(path)
    obj = load_json(path)
    if not isinstance(obj, dict):
        raise LeverPlusInputError("must map query ids to pools", file=path, fix='{"12": [3, 4, ...], ...}')
    pools = {}
    for k, v in obj.items():
        if k.startswith("_"):
            continue
        if isinstance(v, dict):  # an RL JSON: its candidate_pool_ids
            v = v.get("candidate_pool_ids")
        if not isinstance(v, list) or not all(isinstance(i, int) for i in v):
            raise LeverPlusInputError("must be a list of train ids", file=path, record=f"query {k}",
                                      field="candidate_pool_ids")
        pools[int(k)] = [int(i) for i in v]
    return pools


def chunks(items: Sequence[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def merge_cli(label: str, what: str, merge_fn, argv) -> None:
    """``python -m leverplus.<label> merge OUT SHARD... [--allow-gaps]``."""
    parser = argparse.ArgumentParser(prog=f"python -m leverplus.{label} merge",
                                     description=f"Merge finished {what} shards into one file.")
    parser.add_argument("output")
    parser.add_argument("shards", nargs="+")
    parser.add_argument("--allow-gaps", action="store_true", help="merge even if some index range is missing")
    args = parser.parse_args(argv)
    merge_fn(args.output, args.shards, args.allow_gaps)


def dispatch_cli(merge_main, hydra_main) -> None:
    """``merge ...`` as the first argument merges shards (clear error, exit 1, on bad shards); else run the app."""
    if len(sys.argv) > 1 and sys.argv[1] == "merge":
        try:
            merge_main(sys.argv[2:])
        except LeverPlusInputError as e:
            print(f"[leverplus] error: {e}", file=sys.stderr)
            sys.exit(1)
    else:
        hydra_main()


__all__ = ["FIXED_CREATED_AT", "ResumableOutput", "chunks", "dispatch_cli", "ids_fingerprint", "merge_cli",
           "merge_outputs", "read_pool_file", "resolve_created_at", "shard_range"]
