"""Data curation as dataset options (mixed queries, a positive-ratio range) and as sweep arms."""

from __future__ import annotations

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from leverplus.config.validation import validate_config
from leverplus.data.curation import Curation, is_positive, positive_ratio
from leverplus.data.formats.rl_json import read_rl_json, write_rl_json
from leverplus.data.groups import FilterStats, GroupOptions, build_groups
from leverplus.errors import LeverPlusInputError
from leverplus.pipeline import load_data, prepare_groups
from leverplus.sweeps.grid import GridSpec, expand


def cand(pointer, correct, acc, mode="vqaEval"):
    return {"pointer": pointer, "vqa_correct": correct, "vqa_acc_score": acc, "vqa_eval_mode": mode}


def test_positive_is_vqa_correct_else_accuracy_above_zero():
    assert is_positive({"vqa_correct": 1, "vqa_acc_score": 0.0}) and not is_positive({"vqa_correct": 0})
    assert is_positive({"vqa_acc_score": 0.3}) and not is_positive({"vqa_acc_score": 0.0}) and not is_positive({})
    assert positive_ratio([{"vqa_correct": 1}, {"vqa_correct": 0}, {"vqa_acc_score": 0.6}, {}]) == 0.5
    assert positive_ratio([]) == 0.0


def test_drop_reasons_by_hand():
    pos, neg = {"vqa_correct": 1}, {"vqa_correct": 0}
    off = Curation()
    assert not off.active and off.drop_reason([pos, pos]) is None and off.drop_reason([neg]) is None
    mixed = Curation(mixed_queries=True)
    assert mixed.drop_reason([pos, pos]) == "not_mixed" and mixed.drop_reason([neg, neg]) == "not_mixed"
    assert mixed.drop_reason([pos, neg]) is None
    band = Curation(positive_ratio_min=0.4, positive_ratio_max=0.6)
    # ratios 1/4 = 0.25 (out), 2/4 = 0.5 (in), 2/5 = 0.4 (in: both ends included), 3/5 = 0.6 (in), 1.0 (out)
    assert band.drop_reason([pos, neg, neg, neg]) == "positive_ratio"
    assert band.drop_reason([pos, pos, neg, neg]) is None
    assert band.drop_reason([pos, pos, neg, neg, neg]) is None and band.drop_reason([pos, pos, pos, neg, neg]) is None
    assert band.drop_reason([pos, pos]) == "positive_ratio"


@pytest.fixture
def rl(tmp_path):
    records = {
        1: {"query": {"query_id": 1}, "pointer_candidates": [cand([2, 3], 1, 1.0), cand([4, 5], 0, 0.0)]},  # 0.5
        2: {"query": {"query_id": 2}, "pointer_candidates": [cand([3, 4], 1, 0.6), cand([5, 6], 1, 1.0)]},  # all +
        3: {"query": {"query_id": 3}, "pointer_candidates": [cand([1, 2], 0, 0.0), cand([4, 5], 0, 0.0)]},  # all −
        # 1 of 3 positive (0.33); the fallback candidate is dropped first, then 1 of 2 (0.5)
        4: {"query": {"query_id": 4}, "pointer_candidates": [cand([1, 2], 1, 1.0), cand([3, 5], 0, 0.0),
                                                             cand([6, 7], 0, 0.0, mode="fallback")]},
    }
    path = tmp_path / "rl.json"
    write_rl_json(path, records, {"notes": "curation"})
    return read_rl_json(path, shot_num=2)


def test_defaults_keep_every_query(rl):
    assert GroupOptions().curation == Curation()
    assert [g.query_id for g in build_groups(rl, GroupOptions())] == [1, 2, 3, 4]


def test_mixed_queries_keep_only_queries_with_both_kinds(rl):
    stats = FilterStats()
    groups = build_groups(rl, GroupOptions(mixed_queries=True), stats=stats)
    assert [g.query_id for g in groups] == [1, 4]  # 4 is judged on the candidates the filters keep
    assert stats.dropped == {"fallback": 1, "not_mixed": 2} and stats.queries_kept == 2


def test_positive_ratio_range(rl):
    stats = FilterStats()
    groups = build_groups(rl, GroupOptions(positive_ratio_min=0.0, positive_ratio_max=0.5), stats=stats)
    assert [g.query_id for g in groups] == [1, 3, 4] and stats.dropped["positive_ratio"] == 1
    groups = build_groups(rl, GroupOptions(positive_ratio_min=0.75))
    assert [g.query_id for g in groups] == [2]


def test_the_range_is_checked_before_any_work(compose_cfg):
    with pytest.raises(LeverPlusInputError, match="data.positive_ratio_min") as err:
        validate_config(compose_cfg(["data.positive_ratio_min=0.7", "data.positive_ratio_max=0.5"]))
    assert "data.positive_ratio_max=0.6" in err.value.fix
    validate_config(compose_cfg(["data.positive_ratio_min=0.4", "data.positive_ratio_max=0.6"]))


def test_arms_sharing_loaded_data_get_their_own_curated_groups(compose_cfg, tmp_path):
    base = ["data=sim_tiny", f"data.cache_dir={tmp_path}", "tracking.enabled=false"]
    cfg = compose_cfg(base)
    data = load_data(cfg)
    plain = prepare_groups(cfg, data, with_sft=False)
    curated_cfg = compose_cfg(base + ["data.mixed_queries=true"])
    assert load_data(curated_cfg) is data  # the same parse, so the shared skeleton cache must tell them apart
    curated = prepare_groups(curated_cfg, data, with_sft=False)
    assert 0 < len(curated.train) < len(plain.train)
    for g in curated.train + curated.val:
        acc = g.acc.tolist()
        assert any(a > 0 for a in acc) and any(a == 0 for a in acc)
    again = prepare_groups(cfg, data, with_sft=False)
    assert [g.query_id for g in again.train] == [g.query_id for g in plain.train]


def test_the_curation_sweep_compares_every_variant_with_the_baseline(repo, compose_cfg):
    spec = yaml.safe_load((repo / "sweeps" / "data_curation.yaml").read_text())["hydra"]["sweeper"]
    grid = GridSpec(factors=spec["factors"], paired_by=spec["paired_by"], baseline=spec["baseline"],
                    baseline_label=spec["baseline_label"], arm_overrides=spec.get("arm_overrides", {}))
    jobs, _ = expand(grid, OverridesParser.create().parse_overrides([]))
    variants = spec["factors"]["data_variant"]
    assert len(jobs) == 3 * (1 + len(variants))  # per seed: the baseline and one arm per variant
    assert sum(j.role == "baseline" for j in jobs) == 3
    assert {j.arm for j in jobs if j.role == "arm"} == {"mixed_queries=true",
                                                        "positive_ratio_min=0.4|positive_ratio_max=0.6",
                                                        "mixed_queries=true|positive_ratio_max=0.5",
                                                        "diversity_augment=true"}
    for job in jobs[: 1 + len(variants)]:  # every job composes and passes the range checks
        cfg = compose_cfg(job.overrides)
        validate_config(cfg)
        curation = GroupOptions.from_config(cfg.data, cfg.reward).curation
        if job.role == "baseline":
            assert curation == Curation() and not cfg.data.diversity_augment
        else:  # a query filter, or the augmented file
            assert curation.active != bool(cfg.data.diversity_augment)
