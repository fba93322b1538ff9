"""RCE and GRPO training throughput (queries/second) and peak memory on OKVQA-shaped RL data.

Shape (issue [core]): 800 queries, 12 candidates each, shot 2, embeddings 9009 x 512, per-query pools built from the
trajectories (the reference's legacy path: ~18 items). The reference trainer ran one query per optimiser step at about
36 queries/s (RCE) and 59 queries/s (GRPO) on a 2-core CPU with 2 threads.

    python benchmarks/train_throughput.py                 # batch size 1 and the default batch size
    python benchmarks/train_throughput.py --batch-sizes 1 8 32 64
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from leverplus.data.formats.rl_json import RLCandidate, RLData, RLQuery
from leverplus.data.groups import GroupOptions, build_groups
from leverplus.model.build import build_model
from leverplus.training.trainer import Trainer, sequence_log_probs_by_query

REF_RCE_QPS, REF_GRPO_QPS = 36.0, 59.0


def okvqa_like(n_queries: int = 800, n_cands: int = 12, n_items: int = 9009, d: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(n_items, d, generator=g), dim=-1)
    queries = {}
    for q in range(n_queries):
        neighbours = torch.randperm(n_items - 1, generator=g)[:18] + 1  # a ~18-item trajectory pool, query excluded
        neighbours = [int(i) if int(i) != q else 0 for i in neighbours]
        cands = []
        for i in range(n_cands):
            a, b = torch.randperm(len(neighbours), generator=g)[:2].tolist()
            correct = int(torch.rand(1, generator=g) < 0.45)
            raw = {"pointer": [neighbours[a], neighbours[b]], "gen_method": "beam", "vqa_correct": correct,
                   "vqa_acc_score": float(correct) * 0.9, "vqa_eval_mode": "vqaEval"}
            cands.append(RLCandidate(i, (neighbours[a], neighbours[b]), raw))
        queries[q] = RLQuery(q, {"query_id": q}, cands, None, False)
    return emb, RLData("okvqa_like.json", {}, 2, queries)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from leverplus.utils import tune_malloc

    print(f"tune_malloc: {tune_malloc()}  (as every run of the app; see leverplus.utils.tune_malloc)")

    from hydra import compose, initialize_config_dir

    from leverplus.config.store import register_configs
    from leverplus.utils import PACKAGE_ROOT

    register_configs()
    with initialize_config_dir(config_dir=str(PACKAGE_ROOT.parent / "conf"), version_base=None):
        base = compose("train", overrides=["tracking.enabled=false", "progress=false"])
    default_bs = int(base.data.batch_size)
    sizes = args.batch_sizes or [1, default_bs]

    emb, rl = okvqa_like()
    groups = build_groups(rl, GroupOptions())
    train = groups[:640]
    pool = sum(len(g.pool_ids) for g in train) / len(train)
    members = sum(g.size for g in train) / len(train)
    print(f"data: {len(train)} train queries, {members:.1f} candidates/group, pools of {pool:.1f} items, d={emb.shape[1]}")
    print(f"{'batch':>5} | {'RCE q/s':>8} | {'x ref':>6} | {'GRPO q/s':>8} | {'x ref':>6} | {'old-logp q/s':>12}")
    for bs in sizes:
        with initialize_config_dir(config_dir=str(PACKAGE_ROOT.parent / "conf"), version_base=None):
            cfg = compose("train", overrides=["tracking.enabled=false", "progress=false", f"data.batch_size={bs}",
                                              "rce.epochs=1", "grpo.epochs=1", "eval.offline=false"])
        torch.manual_seed(0)
        model = build_model(cfg.model, emb.shape[1])
        trainer = Trainer(cfg, emb, train, [], "/tmp/leverplus-bench", say=lambda s: None)
        trainer.validate = lambda m: {}  # measure training only
        t0 = time.perf_counter()
        old = sequence_log_probs_by_query(model, train, emb)
        t_old = time.perf_counter() - t0
        t0 = time.perf_counter()
        trainer.run_rce(model, select=False)
        t_rce = time.perf_counter() - t0
        t0 = time.perf_counter()
        trainer.run_grpo(model, old, select=False)
        t_grpo = time.perf_counter() - t0
        n = len(train)
        rce, grpo = n / t_rce, n / t_grpo
        print(f"{bs:>5} | {rce:>8.0f} | {rce / REF_RCE_QPS:>5.1f}x | {grpo:>8.0f} | {grpo / REF_GRPO_QPS:>5.1f}x | {n / t_old:>12.0f}")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {peak_mb:.0f} MB (threads={torch.get_num_threads()})")


if __name__ == "__main__":
    main()
