"""K=64 re-pooling of RL files: give every query a pool of exactly K ids and local pointers into it.

The reference's December runs trained on re-pooled files (reference#formats-rl-json, "K=64-fixed variant";
``scripts/fix_rl_candidate_pool_k64_v3.py``): a legacy file's pointers are global train ids, so the policy's
pool was rebuilt per query. Here, per query:

1. the distinct ICD ids its candidates use, in order of first appearance (the reference used Python ``set``
   order, i.e. hash order; first appearance is deterministic);
2. padded with the anchor's own pool (``--pools`` file, else the query's current ``candidate_pool_ids``), in that
   pool's order, skipping ids already in and the query itself;
3. optionally padded with ``range(N)`` (``fill_range``, the reference's last resort), then cut at K.

Each candidate keeps its global ids in ``pointer_global`` and gets ``pointer = [pool.index(g) ...]``. Every
written record is checked (K distinct ids, the query not among them, ``pool[pointer[j]] == pointer_global[j]``)
and the file is written atomically; a query that cannot be re-pooled is an error naming it (the reference kept
it with ``_fix_failed``). Run it with ``python -m leverplus.repool``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from leverplus.data.formats.io import PathLike, file_fingerprint
from leverplus.data.formats.rl_json import RLData, RLQuery, read_rl_json, write_rl_json
from leverplus.datagen.generation import read_pool_file
from leverplus.errors import LeverPlusInputError

#: the reference's pool size
DEFAULT_K = 64


def _used_ids(q: RLQuery) -> List[int]:
    """The distinct global ICD ids of the query's candidates, in order of first appearance."""
    return list(dict.fromkeys(i for c in q.candidates for i in c.pointer))


def repooled_pool(q: RLQuery, anchor_pool: Optional[Sequence[int]], k: int, *, path: str,
                  fill_range: Optional[int] = None) -> List[int]:
    """The query's new pool of exactly ``k`` ids: used ids, then the anchor pool, then ``range(fill_range)``."""
    record = f"query {q.query_id}"
    used = _used_ids(q)
    if len(used) > k:
        raise LeverPlusInputError(f"its candidates use {len(used)} distinct ICDs, more than K={k}", file=path,
                                  record=record, field="pointer", fix=f"pass --k {len(used)} or more")
    pool, seen = list(used), set(used) | {q.query_id}
    sources: List[Sequence[int]] = [anchor_pool or []]
    if fill_range is not None:
        sources.append(range(fill_range))
    for source in sources:
        for i in source:
            if len(pool) == k:
                break
            if int(i) not in seen:
                seen.add(int(i))
                pool.append(int(i))
    if len(pool) < k:
        raise LeverPlusInputError(
            f"only {len(pool)} ids after padding with the anchor pool ({len(anchor_pool or [])} ids); K={k}",
            file=path, record=record, field="candidate_pool_ids",
            fix="pass --pools with the anchors' sampler pools (a {\"<qid>\": [ids]} file or a K=64 RL JSON), or "
                "--fill-range N to pad from range(N) as the reference did")
    return pool


def repool_query(q: RLQuery, pool: Sequence[int]) -> Dict[str, Any]:
    """The on-disk record of ``q`` over ``pool``: local ``pointer`` plus ``pointer_global`` on every candidate;
    every other candidate field kept as it was (``_fix_failed`` / ``_fix_error`` of an earlier fix dropped)."""
    pos = {g: j for j, g in enumerate(pool)}
    cands = []
    for c in q.candidates:
        raw = dict(c.raw)
        raw["pointer"] = [pos[g] for g in c.pointer]
        raw["pointer_global"] = list(c.pointer)
        cands.append(raw)
    return {"query": dict(q.query), "candidate_pool_ids": list(pool), "pointer_candidates": cands}


def check_repooled(qid: int, record: Mapping[str, Any], k: int, *, path: str) -> None:
    """The K=64 invariants of one written record: ``k`` distinct ids without the query, and every local pointer
    mapping to its global id (``pool[pointer[j]] == pointer_global[j]``)."""
    where = f"query {qid}"
    pool = record["candidate_pool_ids"]
    if len(pool) != k or len(set(pool)) != k or qid in pool:
        raise LeverPlusInputError(f"the new pool has {len(pool)} ids ({len(set(pool))} distinct), expected {k} "
                                  "distinct ids without the query", file=path, record=where,
                                  field="candidate_pool_ids", fix="report this as a bug of leverplus.repool")
    for i, c in enumerate(record["pointer_candidates"]):
        for j, (lo, gl) in enumerate(zip(c["pointer"], c["pointer_global"])):
            if not 0 <= lo < k or pool[lo] != gl:
                raise LeverPlusInputError(f"local pointer {lo} (entry {j}) does not map to global id {gl}",
                                          file=path, record=f"{where}, candidate {i}", field="pointer",
                                          fix="report this as a bug of leverplus.repool")


def repool_file(source: PathLike, output: PathLike, *, k: int = DEFAULT_K, pools: Optional[PathLike] = None,
                fill_range: Optional[int] = None, shot_num: Optional[int] = None,
                overwrite: bool = False) -> Dict[str, Any]:
    """Re-pool every query of ``source`` into ``output`` (written atomically); returns the output's ``_meta``.

    ``pools``: the anchors' pools (``{"<qid>": [ids]}`` or an RL JSON with ``candidate_pool_ids``); without it
    each query's own ``candidate_pool_ids`` pads its pool. ``fill_range``: pad from ``range(fill_range)`` last.
    """
    src, out = Path(source), Path(output)
    if k < 1:
        raise LeverPlusInputError(f"K must be >= 1, got {k}", field="k", fix="e.g. --k 64")
    if out.exists() and not overwrite:
        raise LeverPlusInputError("exists already", file=str(out), fix="choose another output or pass --overwrite")
    data: RLData = read_rl_json(src, shot_num=shot_num, num_items=fill_range)
    anchor_pools = read_pool_file(pools) if pools is not None else {}
    records: Dict[int, Dict[str, Any]] = {}
    for qid, q in data.queries.items():
        if pools is not None and qid not in anchor_pools and fill_range is None:
            raise LeverPlusInputError(f"has no pool for query {qid}", file=str(pools), record=f"query {qid}",
                                      fix="add the query's pool, or pass --fill-range N to pad from range(N)")
        anchor = anchor_pools.get(qid) if pools is not None else q.candidate_pool_ids
        pool = repooled_pool(q, anchor, k, path=str(src), fill_range=fill_range)
        records[qid] = repool_query(q, pool)
        check_repooled(qid, records[qid], k, path=str(out))
    meta = dict(data.meta)
    meta["repool"] = {
        "k": k, "source": {"file": src.name, "fingerprint": file_fingerprint(src)},
        "pools": ({"file": Path(pools).name, "fingerprint": file_fingerprint(pools)} if pools is not None
                  else "candidate_pool_ids"),
        "fill_range": fill_range,
        "order": "ICDs used by the candidates (first appearance), then the anchor pool, then range(fill_range)",
    }
    write_rl_json(out, records, meta)
    return meta


__all__ = ["DEFAULT_K", "check_repooled", "repool_file", "repool_query", "repooled_pool"]
