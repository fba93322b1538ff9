"""Where a simulated world's files live and what they are called (docs/sim.md): the names and the folder layout
shared by the writer (``generate.py``), the reader (``eval_queries`` of ``generate.py``) and the ``sim`` scorer."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Union

import numpy as np

from leverplus.config.sim_params import SimParams
from leverplus.data.formats.embeddings import read_embeddings
from leverplus.data.formats.io import load_json
from leverplus.errors import LeverPlusInputError

PathLike = Union[str, Path]

VQA_MODEL_NAME = "sim-lvlm"
#: Fixed, so files are byte-identical per parameters (the reference stamps the wall clock here).
CREATED_AT = "2000-01-01 00:00:00"
EVAL_FORMAT = "leverplus-sim-eval-queries/1"

EMBEDDINGS_FILE = "train_embeddings.pt"
EVAL_QUERIES_FILE = "eval_queries.json"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class SimDataPaths:
    """Where one generated world lives."""

    root: Path
    embeddings: Path  # [num_train, d] train embeddings (query and candidate table)
    beam_json: Path  # InfoScore beam JSON (reference#formats-beam-json)
    rl_json: dict  # shot_num -> RL JSON path (reference#formats-rl-json)
    eval_queries: Path  # our eval-query JSON (val/test questions, answers, pools)
    eval_embeddings: dict  # "val"/"test" -> [n, d] embeddings of the eval queries
    manifest: Path

    def all_files(self) -> list[Path]:
        """Every data file, in a fixed order (manifest last)."""
        return ([self.embeddings, self.beam_json] + [self.rl_json[s] for s in sorted(self.rl_json)]
                + [self.eval_queries] + [self.eval_embeddings[s] for s in sorted(self.eval_embeddings)]
                + [self.manifest])


def beam_json_name(p: SimParams) -> str:
    """The reference's beam-file name (``generate_data.py:L319-324``) for the simulated dataset and model."""
    return (f"vqa-sim-{VQA_MODEL_NAME.replace('-', '_')}-RandSampler-scorer:infoscore-construct_order:left-"
            f"beam_size:{p.beam_size}-max_shot:{p.beam_max_shot}-candidate_num:{p.candidate_num}-"
            f"sample_num:{p.num_anchors}.json")


def sim_data_paths(root: PathLike, p: SimParams) -> SimDataPaths:
    """The file layout of a world folder (files need not exist yet)."""
    root = Path(root)
    return SimDataPaths(
        root=root,
        embeddings=root / EMBEDDINGS_FILE,
        beam_json=root / beam_json_name(p),
        rl_json={s: root / f"rl_data_RandSampler_{VQA_MODEL_NAME}_shot{s}.json" for s in sorted(p.shot_nums)},
        eval_queries=root / EVAL_QUERIES_FILE,
        eval_embeddings={s: root / f"{s}_embeddings.pt" for s in ("val", "test")},
        manifest=root / MANIFEST_FILE,
    )


def _sha16(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:16]


def _tensor_sha16(path: Path) -> str:
    """The manifest's hash of a ``.pt`` table: its float32 tensor bytes (the file embeds a random serialisation id)."""
    t = read_embeddings(path).numpy()
    return hashlib.sha256(np.ascontiguousarray(t, dtype=np.float32).tobytes()).hexdigest()[:16]


def _manifest_entries(paths: SimDataPaths, files: dict) -> Iterator[tuple]:
    """(path, kind, stored hash) of each file the manifest describes (kind "sha256" or "tensor_sha256")."""
    yield paths.embeddings, "tensor_sha256", files["embeddings"]["tensor_sha256"]
    yield paths.beam_json, "sha256", files["beam_json"]["sha256"]
    for s, path in sorted(paths.rl_json.items()):
        yield path, "sha256", files["rl_json"][str(s)]["sha256"]
    yield paths.eval_queries, "sha256", files["eval_queries"]["sha256"]
    for split, path in sorted(paths.eval_embeddings.items()):
        yield path, "tensor_sha256", files["eval_embeddings"][split]["tensor_sha256"]


def world_problem(paths: SimDataPaths) -> Optional[str]:
    """Why a complete world folder cannot be trusted (a file whose content differs from the hash its manifest
    stores, or an unreadable manifest or file), naming the file; None when every file matches."""
    try:
        files = load_json(paths.manifest)["files"]
        for path, kind, want in _manifest_entries(paths, files):
            got = _tensor_sha16(path) if kind == "tensor_sha256" else _sha16(path)
            if got != want:
                return f"{path} does not match the {kind} its manifest stores (the file was modified or damaged)"
    except LeverPlusInputError as e:
        return str(e)
    except (KeyError, TypeError, OSError) as e:
        return f"{paths.manifest} is not a complete manifest ({type(e).__name__}: {e})"
    return None


def stale_temp_dirs(cache_root: PathLike, params_hash: str) -> List[Path]:
    """Temp folders of interrupted generations of one world (``.<params_hash>.tmp-*``). Generation happens only
    under the world's lock, so while that lock is held every such folder is a leftover of a killed process."""
    root = Path(cache_root)
    return sorted(p for p in root.glob(f".{params_hash}.tmp-*") if p.is_dir()) if root.is_dir() else []
