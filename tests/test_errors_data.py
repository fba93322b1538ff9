"""Error catalogue, data side: bad reward fields, uninformative embeddings, damaged caches and world files, leftovers
of killed writers, unreadable or diverged checkpoints, a full disk. Each case: the bad input, what the user sees,
and that nothing was written or trained (or, for caches, that the run recovers with the same result)."""

import dataclasses
import errno
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from leverplus.config.sim_params import SimParams, params_hash
from leverplus.data.formats import embeddings as embeddings_format
from leverplus.data.formats.beam_json import write_beam_json
from leverplus.data.formats.embeddings import read_embeddings
from leverplus.data.formats.io import atomic_write_json, remove_stale_temps, temp_prefix
from leverplus.data.formats.rl_json import write_rl_json
from leverplus.datagen import generate_beam_data as gb
from leverplus.datagen import generate_rl_data as gr
from leverplus.errors import LeverPlusInputError
from leverplus.evaluation.answer_cache import AnswerCache
from leverplus.model.checkpoint import load_pointer_checkpoint, save_pointer_checkpoint
from leverplus.model.pointer import PointerSelector
from leverplus.sim.files import sim_data_paths
from leverplus.train import run
from leverplus.training.stage_cache import StageCache

N, D, SHOT = 24, 8, 2


def _candidates(qid: int, rewards):
    """One candidate per (correct, acc) pair, pointers distinct and never the query itself."""
    others = [i for i in range(N) if i != qid]
    return [{"pointer": others[2 * j: 2 * j + 2], "gen_method": "beam", "vqa_correct": h, "vqa_acc_score": s,
             "vqa_eval_mode": "vqaEval"} for j, (h, s) in enumerate(rewards)]


def make_files(tmp_path: Path, edit=None, emb=None, beams=False):
    """A tiny Lever-Plus input set (embeddings + one RL file; with ``beams`` a beam JSON too, so SFT runs): 10 queries
    of 4 candidates each. ``edit(records)`` changes the records before they are written."""
    torch.manual_seed(0)
    emb_path = tmp_path / "emb.pt"
    torch.save(torch.randn(N, D) if emb is None else emb, emb_path)
    records = {q: {"query": {"query_id": q}, "pointer_candidates": _candidates(q, [(1, 1.0), (0, 0.0), (1, 0.6),
                                                                                  (0, 0.3)])}
               for q in range(10)}
    if edit:
        edit(records)
    rl_path = tmp_path / "rl.json"
    write_rl_json(rl_path, records, {"notes": "test"})
    if beams:
        beam_records = {q: {"id_list": [c["pointer"] + [q] for c in r["pointer_candidates"][:2]],
                            "score_list": [0.2, 0.1]} for q, r in records.items()}
        write_beam_json(tmp_path / "beams.json", beam_records)
    return emb_path, rl_path


def files_cfg(compose_cfg, tmp_path, emb_path, rl_path, *extra):
    return compose_cfg(["data=files", "tracking.enabled=false", "rce.epochs=1", "grpo.epochs=0",
                        "model.hidden_dim=16", f"data.files.embeddings={emb_path}",
                        f"+data.files.rl_json.{SHOT}={rl_path}", f"output_dir={tmp_path / 'out'}",
                        f"data.cache_dir={tmp_path / 'cache'}", *extra])


def nothing_trained(tmp_path: Path) -> bool:
    out = tmp_path / "out"
    return not (out / "checkpoints").exists() and not (out / "metrics.json").exists()


# ---------------------------------------------------------------------------------------------- reward fields


def test_renamed_reward_fields_are_refused_naming_the_first_candidate(tmp_path, compose_cfg):
    def rename(records):
        for r in records.values():
            for c in r["pointer_candidates"]:
                c["correct"], c["acc"] = c.pop("vqa_correct"), c.pop("vqa_acc_score")

    emb, rl = make_files(tmp_path, rename)
    with pytest.raises(LeverPlusInputError) as e:
        run(files_cfg(compose_cfg, tmp_path, emb, rl))
    msg = str(e.value)
    assert msg.startswith(f"{rl}: record query 0, candidate 0: field 'vqa_correct': no candidate has any field")
    assert "reward.mode=hard_plus_soft" in msg and "Fix:" in msg
    assert nothing_trained(tmp_path)


def test_a_refused_reward_field_opens_no_mlflow_run(tmp_path, compose_cfg):
    """With tracking on: the reward check runs before the run's MLflow run is opened, so the store holds no run."""
    import mlflow

    def rename(records):
        for r in records.values():
            for c in r["pointer_candidates"]:
                c["acc"] = c.pop("vqa_acc_score")

    emb, rl = make_files(tmp_path, rename)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = files_cfg(compose_cfg, tmp_path, emb, rl, "tracking.enabled=true", f"tracking.uri={uri}")
    with pytest.raises(LeverPlusInputError, match="vqa_acc_score"):
        run(cfg)
    assert nothing_trained(tmp_path)
    if (tmp_path / "mlflow.db").exists():
        client = mlflow.MlflowClient(tracking_uri=uri)
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_one_missing_reward_field_is_refused_not_counted_as_zero(tmp_path, compose_cfg):
    def drop(records):
        del records[3]["pointer_candidates"][2]["vqa_acc_score"]

    emb, rl = make_files(tmp_path, drop)
    with pytest.raises(LeverPlusInputError) as e:
        run(files_cfg(compose_cfg, tmp_path, emb, rl))
    assert str(e.value).startswith(f"{rl}: record query 3, candidate 2: field 'vqa_acc_score': missing or null in 1 "
                                   "of 40 candidates")
    assert nothing_trained(tmp_path)


def test_the_check_follows_the_declared_fields_of_the_mode(tmp_path, compose_cfg):
    """hard01_plus_gtprob reads vqa_gt_prob, which this file lacks; hard_only does not need vqa_acc_score."""
    emb, rl = make_files(tmp_path)
    with pytest.raises(LeverPlusInputError, match="field 'vqa_gt_prob': missing or null in 40 of 40 candidates"):
        run(files_cfg(compose_cfg, tmp_path, emb, rl, "reward.mode=hard01_plus_gtprob"))
    assert nothing_trained(tmp_path)

    def drop_acc(records):
        del records[0]["pointer_candidates"][0]["vqa_acc_score"]

    emb, rl = make_files(tmp_path, drop_acc)
    run(files_cfg(compose_cfg, tmp_path, emb, rl, "reward.mode=hard_only"))
    assert (tmp_path / "out" / "metrics.json").is_file()


def test_balanced_files_without_vqa_correct_warn_and_train(tmp_path, compose_cfg):
    """The "balanced" variant has no vqa_correct anywhere (reference: it counts as 0): a warning, not an error."""
    def balanced(records):
        for r in records.values():
            for c in r["pointer_candidates"]:
                del c["vqa_correct"]

    emb, rl = make_files(tmp_path, balanced)
    with pytest.warns(UserWarning, match="no candidate has vqa_correct"):
        run(files_cfg(compose_cfg, tmp_path, emb, rl))
    assert (tmp_path / "out" / "metrics.json").is_file()


def test_no_reward_contrast_in_any_group_is_refused(tmp_path, compose_cfg):
    def flat(records):
        for q, r in records.items():
            r["pointer_candidates"] = _candidates(q, [(0, 0.0)] * 4)

    emb, rl = make_files(tmp_path, flat)
    with pytest.raises(LeverPlusInputError) as e:
        run(files_cfg(compose_cfg, tmp_path, emb, rl))
    assert "none of the 8 training groups has reward contrast under reward.mode=hard_plus_soft" in str(e.value)
    assert str(rl) in str(e.value)
    assert nothing_trained(tmp_path)


def test_some_groups_without_contrast_are_counted_in_a_warning(tmp_path, compose_cfg, caplog):
    def some_flat(records):
        for q in (0, 1, 2):
            records[q]["pointer_candidates"] = _candidates(q, [(1, 1.0)] * 4)

    emb, rl = make_files(tmp_path, some_flat)
    with caplog.at_level("WARNING", logger="leverplus.data.loading"):
        run(files_cfg(compose_cfg, tmp_path, emb, rl))
    said = [r.getMessage() for r in caplog.records if "reward contrast" in r.getMessage()]
    assert len(said) == 1 and "3 of 8 training groups (38%) have no reward contrast" in said[0]  # once per run
    assert (tmp_path / "out" / "metrics.json").is_file()


# ---------------------------------------------------------------------------------------------- embeddings


def test_constant_or_all_zero_embedding_tables_are_refused(tmp_path, compose_cfg):
    for name, table in (("zeros", torch.zeros(N, D)), ("constant", torch.full((N, D), 0.5))):
        sub = tmp_path / name
        sub.mkdir()
        emb, rl = make_files(sub, emb=table)
        with pytest.raises(LeverPlusInputError) as e:
            run(files_cfg(compose_cfg, sub, emb, rl))
        kind = "all zero" if name == "zeros" else "identical"
        assert str(e.value).startswith(f"{emb}: all {N} rows are {kind}: the embeddings carry no information")
        assert nothing_trained(sub)


def test_some_all_zero_embedding_rows_are_counted_in_a_warning(tmp_path):
    t = torch.randn(N, D)
    t[[3, 7, 9]] = 0.0
    torch.save(t, tmp_path / "emb.pt")
    with pytest.warns(UserWarning, match=r"emb.pt: 3 of 24 embedding rows are all zero \(first: row 3\)"):
        assert torch.equal(read_embeddings(tmp_path / "emb.pt"), t)


def test_non_zero_rows_repeated_exactly_are_counted_in_one_logging_warning(tmp_path, caplog, monkeypatch):
    t = torch.randn(N, D)
    t[[5, 11]] = t[2].clone()  # one vector at rows 2, 5, 11
    t[[20, 22]] = t[8].clone()  # another at rows 8, 20, 22
    t[[3, 4]] = 0.0  # repeated too, but all zero: the zero-row warning's case, not this one
    t[13, 0] = t[14, 0] + 1.0  # rows 13 and 14 differ in one value only: distinct
    t[13, 1:] = t[14, 1:].clone()
    torch.save(t, tmp_path / "emb.pt")
    with caplog.at_level("WARNING", logger="leverplus.data.formats.embeddings"):
        with pytest.warns(UserWarning, match=r"emb.pt: 2 of 24 embedding rows are all zero \(first: row 3\)"):
            assert torch.equal(read_embeddings(tmp_path / "emb.pt"), t)
    said = [r.getMessage() for r in caplog.records if r.name == "leverplus.data.formats.embeddings"]
    assert said == [f"{tmp_path / 'emb.pt'}: 6 of 24 embedding rows repeat another row's vector exactly (2 shared "
                    "vectors; rows 2, 5, 8, 11, 20, ...); those items cannot be told apart (an export that wrote one "
                    "vector for several items?)"]
    caplog.clear()
    torch.save(torch.randn(N, D), tmp_path / "sound.pt")
    with caplog.at_level("WARNING", logger="leverplus.data.formats.embeddings"):
        read_embeddings(tmp_path / "sound.pt")
    assert not caplog.records
    # the row hash only narrows the search: with every hash equal (all rows collide) the rows found are the same
    monkeypatch.setattr(embeddings_format, "_row_hashes", lambda a, chunk: np.zeros(a.shape[0], dtype=np.uint64))
    rows, shared = embeddings_format._repeated_rows(t, t.any(dim=1).numpy())
    assert rows.tolist() == [2, 5, 8, 11, 20, 22] and shared == 2


def test_a_truncated_or_text_embedding_file_names_the_file_and_the_fix(tmp_path):
    torch.save(torch.randn(N, D), tmp_path / "emb.pt")
    data = (tmp_path / "emb.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(LeverPlusInputError, match=r"cut.pt: is a damaged or truncated torch file .* Fix: the file is "
                                                  "incomplete"):
        read_embeddings(tmp_path / "cut.pt")
    (tmp_path / "text.pt").write_text("0.1 0.2 0.3\n0.4 0.5 0.6\n")
    with pytest.raises(LeverPlusInputError, match=r"text.pt: is a text file, not a torch embedding table\. Fix: "):
        read_embeddings(tmp_path / "text.pt")


# ---------------------------------------------------------------------------------------------- checkpoints


def _small():
    return PointerSelector(D, hidden_dim=16)


def test_nan_weights_in_a_given_checkpoint_are_caught_at_load(tmp_path, compose_cfg):
    model = _small()
    with torch.no_grad():
        model.query_proj.weight[0, 0] = float("nan")
        model.query_proj.weight[1, 1] = float("inf")
    save_pointer_checkpoint(tmp_path / "sft.pt", model, phase="rce", epoch=1)
    with pytest.raises(LeverPlusInputError) as e:
        load_pointer_checkpoint(tmp_path / "sft.pt")
    shape = tuple(model.query_proj.weight.shape)
    assert str(e.value) == (f"{tmp_path / 'sft.pt'}: field 'query_proj.weight': tensor 'query_proj.weight' {shape} "
                            "holds 2 NaN/inf values. Fix: use an earlier checkpoint of that training (this one "
                            "diverged) or retrain it")
    emb, rl = make_files(tmp_path)
    with pytest.raises(LeverPlusInputError, match="sft.pt: field 'query_proj.weight'"):
        run(files_cfg(compose_cfg, tmp_path, emb, rl, f"data.files.sft_checkpoint={tmp_path / 'sft.pt'}"))
    assert nothing_trained(tmp_path)


def test_a_text_file_given_as_checkpoint_names_the_file(tmp_path, compose_cfg):
    (tmp_path / "sft.pt").write_text("model weights: see the shared drive\n")
    emb, rl = make_files(tmp_path)
    with pytest.raises(LeverPlusInputError) as e:
        run(files_cfg(compose_cfg, tmp_path, emb, rl, f"data.files.sft_checkpoint={tmp_path / 'sft.pt'}"))
    assert str(e.value).startswith(f"{tmp_path / 'sft.pt'}: is a text file, not a torch checkpoint. Fix: pass the "
                                   "checkpoint saved with torch.save")
    assert nothing_trained(tmp_path)


def test_a_truncated_checkpoint_names_the_file(tmp_path):
    save_pointer_checkpoint(tmp_path / "ok.pt", _small(), phase="rce", epoch=1)
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) - 100])
    with pytest.raises(LeverPlusInputError, match="cut.pt: is a damaged or truncated torch file"):
        load_pointer_checkpoint(tmp_path / "cut.pt")


def test_epoch_checkpoints_store_the_epoch_of_their_name_and_old_files_still_load(tmp_path, compose_cfg):
    emb, rl = make_files(tmp_path)
    run(files_cfg(compose_cfg, tmp_path, emb, rl, "rce.epochs=2"))
    ckpts = tmp_path / "out" / "checkpoints"
    for n in (1, 2):
        raw = torch.load(ckpts / f"rce_epoch{n}.pt", weights_only=True)
        assert (raw["epoch"], raw["epoch_base"]) == (n, 1)
        assert load_pointer_checkpoint(ckpts / f"rce_epoch{n}.pt").checkpoint_info["epoch"] == n
    # a 0-based file of the reference trainer (no epoch_base): rce_epoch2.pt held epoch 1
    raw = torch.load(ckpts / "rce_epoch2.pt", weights_only=True)
    old = {k: v for k, v in raw.items() if k != "epoch_base"} | {"epoch": 1}
    torch.save(old, tmp_path / "old_rce_epoch2.pt")
    assert load_pointer_checkpoint(tmp_path / "old_rce_epoch2.pt").checkpoint_info["epoch"] == 2


def test_checkpoints_get_the_umask_like_other_outputs(tmp_path):
    old = os.umask(0o027)
    try:
        save_pointer_checkpoint(tmp_path / "a.pt", _small(), phase="rce", epoch=1)
        (tmp_path / "plain").write_text("x")
    finally:
        os.umask(old)
    # the atomic writer read the umask at import (0o022 in this test process): group/other can read
    assert os.stat(tmp_path / "a.pt").st_mode & 0o777 == 0o666 & ~old


# ---------------------------------------------------------------------------------------------- full disk


def test_a_full_disk_gives_one_message_and_no_half_written_file(tmp_path, monkeypatch):
    target = tmp_path / "checkpoints" / "rce_epoch1.pt"
    save_pointer_checkpoint(target, _small(), phase="rce", epoch=1)
    before = target.read_bytes()
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:100])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: FullDisk(real_fdopen(fd, *a, **k)))
    with pytest.raises(LeverPlusInputError) as e:
        save_pointer_checkpoint(target, _small(), phase="rce", epoch=1)
    with pytest.raises(LeverPlusInputError, match="metrics.json: no space left"):
        atomic_write_json(tmp_path / "metrics.json", {"a": 1})
    monkeypatch.undo()
    assert str(e.value) == (f"{target}: no space left on the device while writing (No space left on device); nothing "
                            "was written there. Fix: free space on that disk, or write elsewhere with "
                            "output_dir=/path/with/space (caches: data.cache_dir=/path/with/space)")
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == errno.ENOSPC
    assert os.listdir(target.parent) == ["rce_epoch1.pt"] and target.read_bytes() == before  # old file intact
    assert not (tmp_path / "metrics.json").exists()


# ---------------------------------------------------------------------------------------------- killed writers


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temp_files_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    target = tmp_path / "rl_data.json"
    host = socket.gethostname()
    dead = tmp_path / f".rl_data.json.{host}-{_dead_pid()}.abc123.tmp"
    final = tmp_path / f".rl_data.json.{host}-{_dead_pid()}.final.tmp"
    live = tmp_path / f"{temp_prefix(target)}xyz.tmp"  # this process: alive
    other_host = tmp_path / ".rl_data.json.elsewhere-1.abc.tmp"
    for p in (dead, final, live, other_host):
        p.write_text("{")
    assert sorted(remove_stale_temps(target)) == sorted([dead, final])
    assert live.exists() and other_host.exists() and not dead.exists() and not final.exists()


def test_a_generator_restart_removes_the_temp_files_of_the_killed_run(tmp_path):
    from leverplus.datagen.generation import ResumableOutput

    out = tmp_path / "rl.json"
    leftover = tmp_path / f".rl.json.{socket.gethostname()}-{_dead_pid()}.q1w2e3.tmp"
    leftover.write_text('{"_partial": ')
    ResumableOutput(out, {"a": 1}, {}, lambda *a: None)
    assert not leftover.exists() and not out.exists()


# ---------------------------------------------------------------------------------------------- stage cache


def test_damaged_stage_cache_entries_are_deleted_and_missed(tmp_path):
    cache = StageCache(tmp_path)
    state = _small().state_dict()
    cache.put("sft", "k", state)
    path = cache.path("sft", "k")
    good = path.read_bytes()
    assert all(torch.equal(a, b) for a, b in zip(cache.get("sft", "k").values(), state.values()))
    damages = {"flipped": lambda b: b[:-2000] + bytes(x ^ 0xFF for x in b[-2000:-1000]) + b[-1000:],
               "truncated": lambda b: b[: len(b) // 2], "empty": lambda b: b"",
               "plain_state_dict": None}
    for name, damage in damages.items():
        if damage is None:
            torch.save(state, path)  # an entry without its hash
        else:
            path.write_bytes(damage(good))
        with pytest.warns(UserWarning, match=f"stage cache entry {path} .*deleted, the stage is recomputed"):
            assert cache.get("sft", "k") is None, name
        assert not path.exists(), name


def test_an_edited_stage_cache_entry_fails_its_hash(tmp_path):
    cache = StageCache(tmp_path)
    cache.put("rce", "k", _small().state_dict())
    path = cache.path("rce", "k")
    entry = torch.load(path, weights_only=True)
    entry["state"]["query_proj.weight"][0, 0] += 1.0  # a valid torch file whose content changed
    torch.save(entry, path)
    with pytest.warns(UserWarning, match="does not match its stored sha256"):
        assert cache.get("rce", "k") is None
    assert not path.exists()


def _results(tmp_path: Path) -> dict:
    """The run's metrics without its timings."""
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    return {k: v for k, v in metrics.items() if not k.endswith("_s")}


def test_damaged_sft_and_rce_cache_entries_are_recomputed_with_the_same_result(tmp_path, compose_cfg):
    emb, rl = make_files(tmp_path, beams=True)
    # grpo.epochs=1: an RCE-only run trains its RCE phase (best-epoch selection) and never reads the RCE entry
    extra = [f"data.files.beam_json={tmp_path / 'beams.json'}", "rce.cache=true", "sft.epochs=1", "grpo.epochs=1"]
    run(files_cfg(compose_cfg, tmp_path, emb, rl, *extra))
    clean = _results(tmp_path)
    sft, rce = (next((tmp_path / "cache" / "stages" / stage).glob("*.pt")) for stage in ("sft", "rce"))
    data = bytearray(sft.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])  # flipped bytes
    sft.write_bytes(bytes(data))
    rce.write_bytes(rce.read_bytes()[:-300])  # truncated
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(files_cfg(compose_cfg, tmp_path, emb, rl, *extra))
    told = [str(w.message) for w in caught if "stage cache entry" in str(w.message)]
    assert len(told) == 2 and str(sft) in told[0] and str(rce) in told[1], told
    assert all("deleted, the stage is recomputed" in m for m in told)
    assert _results(tmp_path) == clean
    # recomputed entries are sound again: a third run hits both without a word
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(files_cfg(compose_cfg, tmp_path, emb, rl, *extra))
    assert not [w for w in caught if "stage cache entry" in str(w.message)]


# ---------------------------------------------------------------------------------------------- answer cache

ANSWER_LOGGER = "leverplus.evaluation.answer_cache"


@pytest.mark.parametrize("damage", ["garbage", "schema_page"])
def test_an_unreadable_answer_cache_is_moved_aside_and_a_fresh_store_started(tmp_path, caplog, damage):
    path = tmp_path / "answers.sqlite"
    with AnswerCache(path) as store:
        store.put_many([(f"k{i}", "x" * 50) for i in range(2000)])  # closing the last connection checkpoints the WAL
    data = bytearray(path.read_bytes())
    if damage == "garbage":  # sqlite: "file is not a database"
        data = bytearray(os.urandom(len(data)))
    else:  # header kept, the rest of page 1 (the schema) overwritten: "database disk image is malformed"
        data[100:4096] = os.urandom(3996)
    path.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger=ANSWER_LOGGER):
        store = AnswerCache(path)
    said = [r.getMessage() for r in caplog.records if r.name == ANSWER_LOGGER]
    assert len(said) == 1 and said[0].startswith(f"answer cache {path} is not a readable sqlite database (sqlite: ")
    assert said[0].endswith(f"moved aside to {path}.corrupt, a fresh store is started (its answers are generated "
                            "again)")
    assert Path(f"{path}.corrupt").read_bytes() == bytes(data)  # set aside as it was
    assert len(store) == 0 and store.put_many([("k0", "y")]) == 1 and store.get("k0") == "y"  # usable at once
    store.close()
    caplog.clear()
    with caplog.at_level("WARNING", logger=ANSWER_LOGGER):
        assert AnswerCache(path).get("k0") == "y"  # sound again: kept, without a word
    assert not caplog.records


# ---------------------------------------------------------------------------------------------- simulated world


@pytest.fixture
def tiny_params(compose_cfg):
    from omegaconf import OmegaConf

    from leverplus.config.sim_params import SimParams

    return SimParams.from_mapping(OmegaConf.to_container(compose_cfg(["data=sim_tiny"]).data.sim))


SIM_LOGGER = "leverplus.sim.generate"


def _world_warnings(caplog) -> list:
    return [r.getMessage() for r in caplog.records if r.name == SIM_LOGGER and r.levelname == "WARNING"]


def _compose_generator(name: str, overrides):
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf" / "generate"),
                               version_base=None):
        return compose(name, overrides=list(overrides))


def test_an_edited_world_file_is_detected_and_the_world_regenerated(tmp_path, tiny_params, caplog):
    from leverplus.sim.source import verified_world

    paths = verified_world(tiny_params, tmp_path)
    rl = paths.rl_json[2]
    original = rl.read_bytes()
    obj = json.loads(original)
    for key, rec in obj.items():  # valid JSON, rewards inverted
        if not key.startswith("_"):
            for c in rec["pointer_candidates"]:
                c["vqa_correct"] = 1 - c["vqa_correct"]
    rl.write_text(json.dumps(obj))
    with caplog.at_level("WARNING", logger=SIM_LOGGER):
        again = verified_world(tiny_params, tmp_path)
    assert _world_warnings(caplog) == [f"simulated world {paths.root}: {rl} does not match the sha256 its manifest "
                                       "stores (the file was modified or damaged); deleting it and generating it again"]
    assert again == paths and rl.read_bytes() == original  # regenerated: the same bytes as first generated
    # a truncated tensor file is caught the same way
    caplog.clear()
    paths.eval_embeddings["val"].write_bytes(paths.eval_embeddings["val"].read_bytes()[:200])
    with caplog.at_level("WARNING", logger=SIM_LOGGER):
        verified_world(tiny_params, tmp_path)
    told = _world_warnings(caplog)
    assert len(told) == 1 and "val_embeddings.pt: is a damaged or truncated torch file" in told[0], told
    caplog.clear()
    with caplog.at_level("WARNING", logger=SIM_LOGGER):
        verified_world(tiny_params, tmp_path)  # sound again: no warning
    assert _world_warnings(caplog) == []


@pytest.mark.parametrize("app", ["beam_data", "rl_data"])
def test_an_edited_world_file_is_regenerated_on_the_generators_sim_path(tmp_path, tiny_params, caplog, app):
    """The generators' ``sim`` scorer reads the world through the same check as ``data=sim``."""
    sim = [f"scorer.sim.params.{k}={json.dumps(v) if isinstance(v, list) else v}"
           for k, v in dataclasses.asdict(tiny_params).items() if v != getattr(SimParams(), k)]
    extra = []
    if app == "rl_data":
        save_pointer_checkpoint(tmp_path / "sel.pt", PointerSelector(d_model=tiny_params.embedding_dim,
                                                                     hidden_dim=16), phase="sft", epoch=0)
        extra = [f"selector.checkpoint={tmp_path / 'sel.pt'}", "shot_num=1"]
    out = tmp_path / "out.json"
    cfg = _compose_generator(app, sim + extra + [f"scorer.sim.cache_dir={tmp_path / 'cache'}", f"output={out}",
                                                 "queries.end=2"])
    generate = gb.run if app == "beam_data" else gr.run
    generate(cfg, say=lambda _m: None)  # generates the world on first use
    paths = sim_data_paths(tmp_path / "cache" / "sim" / params_hash(tiny_params), tiny_params)
    sound = out.read_bytes()
    edited = paths.beam_json
    original = edited.read_bytes()
    obj = json.loads(original)
    first = next(k for k in obj if not k.startswith("_"))
    obj[first]["score_list"] = [-s for s in obj[first]["score_list"]]  # valid JSON, other content
    edited.write_text(json.dumps(obj))
    out.unlink()
    with caplog.at_level("WARNING", logger=SIM_LOGGER):
        generate(cfg, say=lambda _m: None)
    assert _world_warnings(caplog) == [f"simulated world {paths.root}: {edited} does not match the sha256 its "
                                       "manifest stores (the file was modified or damaged); deleting it and "
                                       "generating it again"]
    assert edited.read_bytes() == original  # regenerated
    assert out.read_bytes() == sound  # and the generator's output is the one of a sound world


def test_temp_folders_of_a_killed_world_generation_are_removed(tmp_path, tiny_params, caplog):
    from leverplus.config.sim_params import SimParams, params_hash
    from leverplus.sim.source import verified_world

    h = params_hash(tiny_params)
    tmp_path.mkdir(exist_ok=True)
    stale = tmp_path / f".{h}.tmp-abc123"
    (stale / "half").mkdir(parents=True)
    (stale / "half" / "train_embeddings.pt").write_bytes(b"PK")
    with caplog.at_level("WARNING", logger=SIM_LOGGER):
        paths = verified_world(tiny_params, tmp_path)
    assert _world_warnings(caplog) == [f"removing {stale}, left by an interrupted world generation"]
    assert not stale.exists() and paths.manifest.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([h, f"{h}.lock"])
