"""Where a simulated world's files live and what they are called (docs/sim.md): the names and the folder layout
shared by the writer (``generate.py``), the reader (``eval_queries`` of ``generate.py``) and the ``sim`` scorer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

from leverplus.config.sim_params import SimParams

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
