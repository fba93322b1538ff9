"""The InfoScore beam-search JSON: per query, the beams (ICD id lists) and their scores
(``docs/reference.md#formats-beam-json``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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

# --------------------------------------------------------------------------------------------------
# Beam JSON (reference#formats-beam-json)
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

        (``score_list`` holds the last step's InfoScore only, reference#formats-beam-json, so it is a fallback, not the same quantity.)
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


def _check_beam_shots(shots: Any, ids: list[int], *, i: int, path: str, rec: str) -> None:
    """``beams[i].shots``: the ICDs of ``id_list[i]`` in selection order, each with a finite score when present."""
    selection_order = list(reversed(ids[:-1]))
    shot_ids = [s.get("id") if isinstance(s, dict) else None for s in shots] if isinstance(shots, list) else None
    if shot_ids != selection_order:
        raise LeverPlusInputError(
            f"shot ids {shot_ids} are not id_list[{i}][:-1] in selection order {selection_order}",
            file=path, record=rec, field="beams.shots",
            fix="regenerate the beam file (shots are id_list[:-1] reversed)",
        )
    for s in shots:
        if s.get("score") is not None:
            _finite_number(s["score"], path=path, record=rec, field_name="beams.shots.score")


def _check_beam_dict(beam: Any, ids: list[int], score: float, *, i: int, path: str, qid: int) -> None:
    """One ``beams`` object: consistent with ``id_list[i]`` and ``score_list[i]``."""
    rec = f"query {qid}, beam {i}"
    if not isinstance(beam, dict):
        raise LeverPlusInputError(f"must be an object, got {_type_name(beam)}", file=path, record=rec,
                                  field="beams")
    if "full_sequence" in beam and beam["full_sequence"] != ids:
        raise LeverPlusInputError(f"full_sequence {beam['full_sequence']} != id_list[{i}] {ids}",
                                  file=path, record=rec, field="beams.full_sequence",
                                  fix="regenerate the beam file (full_sequence must equal id_list)")
    if beam.get("final_score") is not None:
        fs = _finite_number(beam["final_score"], path=path, record=rec, field_name="beams.final_score")
        if not math.isclose(fs, score, rel_tol=1e-9, abs_tol=0.0):
            raise LeverPlusInputError(f"final_score {fs} != score_list[{i}] {score}", file=path,
                                      record=rec, field="beams.final_score",
                                      fix="regenerate the beam file (final_score must equal score_list)")
    if "shots" in beam:
        _check_beam_shots(beam["shots"], ids, i=i, path=path, rec=rec)


def _check_beam_dicts(beams: Any, id_list: list[list[int]], scores: list[float], *, path: str, qid: int) -> list[dict]:
    if not isinstance(beams, list) or len(beams) != len(id_list):
        n = len(beams) if isinstance(beams, list) else _type_name(beams)
        raise LeverPlusInputError(f"must be a list of {len(id_list)} beam objects (one per id_list beam), got {n}",
                                  file=path, record=f"query {qid}", field="beams")
    for i, beam in enumerate(beams):
        _check_beam_dict(beam, id_list[i], scores[i], i=i, path=path, qid=qid)
    return beams


def _beam_ids(id_list: list, *, qid: int, path: str, num_items: Optional[int], shot_num: Optional[int],
              given: bool) -> tuple[list[list[int]], int]:
    """``id_list``: beams of ``shot_num`` ICDs then the query id, all of one length. ``shot_num`` is inferred
    from the first beam when None; returns (beams, shot_num)."""
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
    return beams_ids, shot_num


def _beam_scores(scores: Any, n_beams: int, *, qid: int, path: str) -> list[float]:
    """``score_list``: one finite score per beam."""
    if not isinstance(scores, list) or len(scores) != n_beams:
        n = len(scores) if isinstance(scores, list) else _type_name(scores)
        raise LeverPlusInputError(f"must be a list of {n_beams} scores (one per beam), got {n}", file=path,
                                  record=f"query {qid}", field="score_list")
    return [_finite_number(s, path=path, record=f"query {qid}, beam {i}", field_name="score_list")
            for i, s in enumerate(scores)]


def _shot_scores(shot_scores: Any, n_beams: int, n_shots: int, *, qid: int, path: str) -> Optional[list]:
    """``shot_scores`` (optional): per beam, one finite score per step."""
    if shot_scores is None:
        return None
    if not isinstance(shot_scores, list) or len(shot_scores) != n_beams:
        raise LeverPlusInputError(f"must be a list of {n_beams} per-beam lists", file=path, record=f"query {qid}",
                                  field="shot_scores")
    rows = []
    for i, row in enumerate(shot_scores):
        rec = f"query {qid}, beam {i}"
        if not isinstance(row, list) or len(row) != n_shots:
            raise LeverPlusInputError(f"must hold {n_shots} per-step scores, got {row!r:.60}", file=path,
                                      record=rec, field="shot_scores")
        rows.append([_finite_number(s, path=path, record=rec, field_name="shot_scores") for s in row])
    return rows


def _parse_beam_entry(qid: int, entry: Any, *, path: str, num_items: Optional[int], shot_num: Optional[int],
                      given: bool) -> tuple[BeamRecord, int]:
    """One query's record; returns it with the (possibly inferred) shot count."""
    qrec = f"query {qid}"
    if not isinstance(entry, dict):
        raise LeverPlusInputError(f"must be an object, got {_type_name(entry)}", file=path, record=qrec)
    id_list = entry.get("id_list")
    if not isinstance(id_list, list) or not id_list:
        raise LeverPlusInputError(f"must be a non-empty list of beams, got {id_list!r:.60}", file=path,
                                  record=qrec, field="id_list")
    beams_ids, shot_num = _beam_ids(id_list, qid=qid, path=path, num_items=num_items, shot_num=shot_num,
                                    given=given)
    n_beams, n_shots = len(beams_ids), shot_num
    scores = _beam_scores(entry.get("score_list"), n_beams, qid=qid, path=path)
    shot_scores = _shot_scores(entry.get("shot_scores"), n_beams, n_shots, qid=qid, path=path)
    beams = entry.get("beams")
    if beams is not None:
        beams = _check_beam_dicts(beams, beams_ids, scores, path=path, qid=qid)
    few = entry.get("few_shot_num")
    if few is not None and (not _is_int(few) or few != n_shots):
        raise LeverPlusInputError(f"is {few!r} but the beams hold {n_shots} ICDs", file=path, record=qrec,
                                  field="few_shot_num", fix="regenerate the beam file")
    return BeamRecord(qid, beams_ids, scores, shot_scores, beams, few), shot_num


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
        if qid in records:
            raise LeverPlusInputError(f"query id {qid} appears twice (key {key!r})", file=path, record=f"query {qid}",
                                      fix="merge or drop the duplicate")
        records[qid], shot_num = _parse_beam_entry(qid, entry, path=path, num_items=num_items, shot_num=shot_num,
                                                   given=given)
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

