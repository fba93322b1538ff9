"""Groups, filters, pools, split and padded batching (reference#dataset-rl, reference#split)."""

import json

import pytest
import torch

from leverplus.data.batching import PaddedGroups, _length_mask, collate, iterate_batches, num_batches
from leverplus.data.formats.beam_json import BeamRecord
from leverplus.data.formats.rl_json import read_rl_json, write_rl_json
from leverplus.data.groups import (
    FilterStats,
    GroupOptions,
    _drop_reason,
    beam_groups,
    build_groups,
    split_query_ids,
)
from leverplus.errors import LeverPlusInputError


def cand(pointer, correct, acc, mode="vqaEval", gen="beam", **extra):
    c = {"pointer": list(pointer), "gen_method": gen, "vqa_correct": correct, "vqa_acc_score": acc,
         "vqa_eval_mode": mode}
    c.update(extra)
    return c


@pytest.fixture
def rl_file(tmp_path):
    queries = {
        10: {"query": {"query_id": 10}, "pointer_candidates": [
            cand([1, 2], 1, 1.0), cand([3, 4], 0, 0.0, gen="random"), cand([2, 5], 1, 0.6, mode="fallback")]},
        11: {"query": {"query_id": 11}, "pointer_candidates": [
            cand([1, 3], 0, 0.0), cand([4, 6], 0, 0.0, mode="error")]},
        12: {"query": {"query_id": 12}, "pointer_candidates": [cand([7, 8], 1, 0.3, mode="fallback")]},
    }
    path = tmp_path / "rl.json"
    write_rl_json(path, queries, {"notes": "test"})
    return path


def test_filters_pool_labels_and_rewards(rl_file):
    rl = read_rl_json(rl_file, num_items=20)
    stats = FilterStats()
    groups = build_groups(rl, GroupOptions(), stats=stats)
    # query 12 has only a fallback candidate -> dropped; 11 keeps one (error dropped)
    assert [g.query_id for g in groups] == [10, 11]
    g10 = groups[0]
    # trajectory pool = sorted union of surviving pointer ids: {1,2,3,4}
    assert g10.pool_ids == [1, 2, 3, 4]
    assert g10.labels.tolist() == [[0, 1], [2, 3]]
    # hard_plus_soft: 1*1 + 1*1.0 = 2.0 ; 0 + 0 = 0
    assert g10.rewards_raw.tolist() == [2.0, 0.0]
    # z-score of [2, 0]: mean 1, unbiased std sqrt(2) -> [0.7071, -0.7071]
    assert torch.allclose(g10.rewards, torch.tensor([0.70710678, -0.70710678]))
    # single member group: std undefined -> raw rewards kept
    assert groups[1].rewards.tolist() == [0.0]
    assert stats.dropped == {"fallback": 2, "eval_error": 1, "empty_query": 1}
    assert (stats.queries_in, stats.queries_kept) == (3, 2)


def test_keep_fallback_and_filter_gen_methods(rl_file):
    rl = read_rl_json(rl_file, num_items=20)
    groups = build_groups(rl, GroupOptions(skip_fallback_reward=False, filter_gen_methods=["beam"]))
    assert [g.query_id for g in groups] == [10, 11, 12]
    assert groups[0].size == 2  # the random candidate is filtered out, the fallback one kept
    assert groups[0].gen_methods == ["beam", "beam"]


def test_require_positive_query_uses_reward_threshold(rl_file):
    rl = read_rl_json(rl_file, num_items=20)
    groups = build_groups(rl, GroupOptions(require_positive_query=True))
    assert [g.query_id for g in groups] == [10]


def test_candidate_pool_ids_local_pointers(tmp_path):
    pool = [9, 3, 5, 7]
    queries = {2: {"query": {"query_id": 2}, "candidate_pool_ids": pool, "pointer_candidates": [
        cand([1, 3], 1, 1.0, pointer_global=[3, 7]), cand([2, 0], 0, 0.0, pointer_global=[5, 9])]}}
    write_rl_json(tmp_path / "k64.json", queries, {})
    rl = read_rl_json(tmp_path / "k64.json", num_items=10)
    (g,) = build_groups(rl, GroupOptions())
    assert g.pool_ids == pool
    assert g.labels.tolist() == [[1, 3], [2, 0]]
    assert g.global_pointers() == [(3, 7), (5, 9)]


def test_pointer_outside_truncated_pool_is_a_clear_error(rl_file):
    rl = read_rl_json(rl_file, num_items=20)
    with pytest.raises(LeverPlusInputError) as e:
        build_groups(rl, GroupOptions(max_pool_size=3))
    assert "query 10" in str(e.value) and "pointer" in str(e.value) and "max_pool_size" in str(e.value)


def test_split_by_sorted_id_and_file(tmp_path):
    assert split_query_ids([5, 1, 3, 2, 4], 0.8) == ([1, 2, 3, 4], [5])
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [2, 1], "val": [3]}))
    assert split_query_ids([1, 2, 3], split_file=str(split)) == ([1, 2], [3])
    split.write_text(json.dumps({"train": [1], "val": [1]}))
    with pytest.raises(LeverPlusInputError, match="both train and val"):
        split_query_ids([1], split_file=str(split))


def test_collate_pads_and_masks(rl_file):
    rl = read_rl_json(rl_file, num_items=20)
    groups = build_groups(rl, GroupOptions())
    emb = torch.randn(20, 4)
    b = collate(groups, emb)
    assert b.cand_emb.shape == (2, 4, 4) and b.labels.shape == (2, 2, 2)
    assert b.member_mask.tolist() == [[True, True], [True, False]]
    assert b.cand_mask.tolist() == [[True, True, True, True], [True, True, False, False]]
    assert torch.equal(b.cand_emb[1, :2], emb[[1, 3]])
    assert torch.equal(b.query_emb, emb[[10, 11]])
    assert b.rewards_raw.tolist() == [[2.0, 0.0], [0.0, 0.0]]


def _ragged_groups(n=23, seed=0):
    """Groups with pools of 2..9 items, 1..6 members and shots 1 or 2 (so every table needs slicing)."""
    from leverplus.data.groups import Group

    gen = torch.Generator().manual_seed(seed)
    groups = []
    for q in range(n):
        k, m, s = int(torch.randint(2, 10, (1,), generator=gen)), int(torch.randint(1, 7, (1,), generator=gen)), 1 + q % 2
        pool = torch.randperm(30, generator=gen)[:k].tolist()
        labels = torch.stack([torch.randperm(k, generator=gen)[:s] for _ in range(m)])
        raw = torch.randn(m, generator=gen)
        groups.append(Group(q, s, pool, labels, raw, raw * 2, (raw > 0).float(), list(range(m))))
    return groups


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_padded_groups_give_exactly_what_collate_gives(batch_size):
    groups = _ragged_groups()
    emb = torch.randn(30, 5)
    old = {g.query_id: torch.randn(g.size) for g in groups}
    table = PaddedGroups(groups, emb, old)
    chunks = list(iterate_batches(groups, batch_size, shuffle=True, generator=torch.Generator().manual_seed(1)))
    assert any(len({len(g.pool_ids) for g in c}) > 1 for c in chunks) or batch_size == 1
    for chunk in chunks:
        want, got = collate(chunk, emb, old), table(chunk)
        for name, value in want.__dict__.items():
            other = getattr(got, name)
            if isinstance(value, torch.Tensor):
                assert other.dtype == value.dtype and other.shape == value.shape, name
                assert torch.equal(other, value) and other.is_contiguous(), name
            else:
                assert other == value, name
    assert PaddedGroups(groups, emb)(chunks[0]).old_log_probs is None


def test_padded_groups_refuse_a_group_they_were_not_built_from():
    groups = _ragged_groups(4)
    table = PaddedGroups(groups[:3], torch.randn(30, 5))
    with pytest.raises(ValueError, match="not built from"):
        table([groups[3]])


def test_batches_never_mix_shots_and_cover_everything():
    def group(qid, shot):
        from leverplus.data.groups import Group

        return Group(qid, shot, [0, 1, 2, 3], torch.zeros(1, shot, dtype=torch.long), torch.zeros(1), torch.zeros(1),
                     torch.zeros(1), [0])

    groups = [group(i, 1 + i % 2) for i in range(7)]
    gen = torch.Generator().manual_seed(0)
    batches = list(iterate_batches(groups, 2, shuffle=True, generator=gen))
    assert len(batches) == num_batches(groups, 2) == 4  # shot 1: 3 groups -> 2 batches; shot 2: 4 -> 2
    assert all(len({g.shot_num for g in b}) == 1 for b in batches)
    assert sorted(g.query_id for b in batches for g in b) == list(range(7))


def test_beam_groups_use_the_rl_pool():
    rec = BeamRecord(query_id=5, id_list=[[1, 2, 5], [3, 1, 5]], score_list=[0.2, 0.1],
                     shot_scores=[[0.3, 0.2], [0.1, 0.1]])
    (g,) = beam_groups({5: rec}, {5: [3, 1, 9]}, [5])
    assert g.pool_ids == [3, 1, 9, 2]  # beam id 2 appended to the pool
    assert g.labels.tolist() == [[1, 3], [0, 1]]
    # InfoScore of each beam: sum of shot scores -> 0.5, 0.2
    assert torch.allclose(g.rewards_raw, torch.tensor([0.5, 0.2]))


def test_prepare_groups_reuses_skeletons_across_reward_configs_and_equals_build_groups(tmp_path):
    """Arms of a reward sweep share one loaded dataset: the cached reward-independent part must give exactly
    the groups (and filter stats) that build_groups computes from scratch, whatever reward comes after."""
    from paths import compose_cfg

    from leverplus.data.groups import FilterStats, GroupOptions, build_groups, split_query_ids
    from leverplus.data.loading import prepare_groups
    from leverplus.pipeline import load_data

    base = ["data=sim_tiny", "data.shot_nums=[1,2]", f"data.cache_dir={tmp_path}", "tracking.enabled=false"]
    configs = [compose_cfg(base + extra) for extra in (
        [], ["reward.mode=hard_only", "reward.hard_weight=2"], ["reward.mode=soft_only", "data.require_positive_query=true"],
        ["data.skip_fallback_reward=false"])]
    data = load_data(configs[0])
    for cfg in configs + configs[:1]:  # the last one hits the cache filled by the first
        got = prepare_groups(cfg, data, with_sft=False)
        opts = GroupOptions.from_config(cfg.data, cfg.reward)
        for shot, rl in sorted(data.rl.items()):
            tr, va = split_query_ids(list(rl.queries), cfg.data.train_fraction)
            st = FilterStats()
            want = [build_groups(rl, opts, embeddings=data.embeddings, fallback_pools=data.pools, query_ids=ids,
                                 stats=st) for ids in (tr, va)]
            assert got.stats[shot] == st
            for mine, ref in ((got.train, want[0]), (got.val, want[1])):
                mine = [g for g in mine if g.shot_num == shot]
                assert [g.query_id for g in mine] == [g.query_id for g in ref]
                for a, b in zip(mine, ref):
                    assert a.pool_ids == b.pool_ids and a.candidate_index == b.candidate_index
                    for f in ("labels", "rewards_raw", "rewards", "acc"):
                        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert len(data.group_cache) == 2 * 2 * 2  # (shot 1, 2) x (train, val) x (skip_fallback true, false)


def test_drop_reason_follows_the_filter_order_and_length_mask():
    opts = GroupOptions(drop_eval_errors=True, skip_fallback_reward=True, filter_gen_methods=["beam"])
    assert _drop_reason({"vqa_eval_mode": "error", "gen_method": "random"}, opts) == "eval_error"
    assert _drop_reason({"vqa_eval_mode": "fallback", "gen_method": "random"}, opts) == "fallback"
    assert _drop_reason({"vqa_eval_mode": "vqaEval", "gen_method": "random"}, opts) == "gen_method"
    assert _drop_reason({"vqa_eval_mode": "vqaEval", "gen_method": "beam"}, opts) is None
    assert _drop_reason({"eval_failed": True}, GroupOptions(drop_eval_errors=False, filter_gen_methods=None)) is None
    assert _length_mask([2, 0, 3]).tolist() == [[True, True, False], [False, False, False], [True, True, True]]
