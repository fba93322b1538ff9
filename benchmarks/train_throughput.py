"""RCE and GRPO training throughput (queries/second) and peak memory on OKVQA-shaped RL data.

Shape: 800 queries (640 train after the 80% split), 12 candidates each, shot 2, embeddings 9009 x 512, per-query
pools built from the trajectories (the reference's legacy path: ~18 items).

    python benchmarks/train_throughput.py                 # batch size 1 and the default batch size
    python benchmarks/train_throughput.py --batch-sizes 1 8 32 64
    python benchmarks/train_throughput.py --preset        # also +preset=reference (batch 1, a dropout mask per member)
    python benchmarks/train_throughput.py --fused         # also each batch size with optimizer_impl=fused
    python benchmarks/train_throughput.py --reference-path ~/src/Lever-Plus   # side by side with the reference
    python benchmarks/train_throughput.py --flops         # FLOPs per query and the q/s ceiling of this CPU

The reference trainer needs a virtualenv of its own (``bash benchmarks/reference_venv.sh VENV``, then
``--reference-python VENV/bin/python``).

Without ``--reference-path`` it reports absolute figures and the machine. With it, the same data are written as an
RL JSON and an embedding file and the reference trainer (``python -m lever_lm.workflows.grpo_post_train`` run
from that checkout; its code never enters this repository) trains on them in child processes with the same thread
count: RCE time = t(1 RCE epoch) − t(0 epochs), GRPO time = t(1 RCE + 1 GRPO epoch) − t(1 RCE epoch), so start-up,
data loading and its old log-prob pass cancel out (its per-epoch validation pass over the 160 held-out queries
stays in). One untimed child warms the disk cache first; each child then runs ``--repeats`` times, interleaved, and
the fastest counts (leverplus's phases likewise). leverplus's one-time start cost (the first AdamW builds import torch's compiler stack) is timed
separately, before the phases.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from leverplus.data.batching import PaddedGroups
from leverplus.data.formats.rl_json import RLCandidate, RLData, RLQuery, write_rl_json
from leverplus.data.groups import GroupOptions, build_groups
from leverplus.model.build import build_model
from leverplus.training.trainer import Trainer, sequence_log_probs_by_query


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


def machine() -> str:
    """CPU model, core count and torch version: the context every figure needs."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, Python {platform.python_version()}"


def reference_qps(ref: Path, emb: torch.Tensor, rl: RLData, threads: int, module: str,
                  python: str = sys.executable, repeats: int = 3) -> tuple:
    """(RCE q/s, GRPO q/s) of the reference trainer on the same data, from three timed child processes run by
    ``python`` (the reference's own interpreter when its dependencies cannot sit beside leverplus's)."""
    with tempfile.TemporaryDirectory() as tmp:
        data, emb_path = Path(tmp) / "rl_data.json", Path(tmp) / "emb.pt"
        write_rl_json(data, rl.queries, None)
        torch.save(emb, emb_path)
        env = {**os.environ, "PYTHONPATH": str(ref), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

        def timed(rce: int, grpo: int) -> float:
            cmd = [python, "-m", module, "--beam_data", str(data), "--img_emb", str(emb_path),
                   "--rce_epochs", str(rce), "--grpo_epochs", str(grpo), "--device", "cpu",
                   "--output_dir", str(Path(tmp) / f"out_{rce}_{grpo}")]
            t0 = time.perf_counter()
            out = subprocess.run(cmd, cwd=ref, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"reference trainer failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
            return time.perf_counter() - t0

        timed(0, 0)  # untimed: the first child reads the reference's virtualenv from a cold disk cache
        # the fastest of ``repeats`` runs of each, interleaved, so a burst of load on the machine hits one repeat
        t00, t10, t11 = (min(ts) for ts in zip(*[(timed(0, 0), timed(1, 0), timed(1, 1)) for _ in range(repeats)]))
    if not t00 < t10 < t11:
        raise SystemExit(f"reference timings are not ordered (0 epochs {t00:.2f} s, 1 RCE {t10:.2f} s, 1 RCE + 1 GRPO "
                         f"{t11:.2f} s): the machine is too noisy to measure; rerun when it is quiet or raise --repeats")
    n = int(round(0.8 * len(rl.queries)))  # the reference's train split
    return n / (t10 - t00), n / (t11 - t10)


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from leverplus.config.store import conf_dir, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return hydra_compose("train", overrides=["tracking.enabled=false", "progress=false", *overrides])


def leverplus_qps(emb, train, overrides) -> tuple:
    """(RCE q/s, GRPO q/s, old-logp q/s) of one epoch each, training only (no validation)."""
    cfg = compose([*overrides, "rce.epochs=1", "grpo.epochs=1", "eval.offline=false"])
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
    return n / t_rce, n / t_grpo, n / t_old


def flops_per_query(emb, train, overrides) -> float:
    """Forward + backward FLOPs of the RCE loss per training query (torch's FlopCounterMode over one epoch)."""
    from torch.utils.flop_counter import FlopCounterMode

    from leverplus.training.losses import rce_loss
    from leverplus.training.trainer import member_log_probs, rce_targets

    cfg = compose(overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, emb.shape[1]).train()
    table = PaddedGroups(train, emb)
    bs, total = int(cfg.data.batch_size), 0
    for i in range(0, len(train), bs):
        b = table(train[i:i + bs])
        with FlopCounterMode(display=False) as counter:
            log_probs = member_log_probs(model, b, smoothed=True, per_member_dropout=cfg.model.per_member_dropout)
            rewards, mask = rce_targets(cfg.rce, b)
            rce_loss(log_probs, rewards, temperature=1.0, mask=mask)["loss"].backward()
        total += counter.get_total_flops()
    return total / len(train)


def matmul_peak_gflops(threads: int) -> float:
    """FP32 matmul rate of this CPU on the model's largest product ([576, 512] x [512, 256], batch 32's input
    projection): the ceiling of any step made of such products."""
    a, w = torch.randn(576, 512), torch.randn(256, 512)
    for _ in range(20):
        a @ w.t()
    t0, n = time.perf_counter(), 400
    for _ in range(n):
        a @ w.t()
    return 2 * 576 * 512 * 256 * n / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", action="store_true", help="also time +preset=reference")
    ap.add_argument("--fused", action="store_true", help="also time each batch size with optimizer_impl=fused")
    ap.add_argument("--flops", action="store_true",
                    help="also count FLOPs per query and print the q/s ceiling at this CPU's matmul rate")
    ap.add_argument("--reference-path", type=Path, default=None,
                    help="a checkout of the public Lever-Plus repository: time its trainer on the same data")
    ap.add_argument("--reference-module", default="lever_lm.workflows.grpo_post_train")
    ap.add_argument("--reference-python", default=sys.executable,
                    help="interpreter for the reference trainer (a virtualenv with its own dependencies)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs of each reference child process (the fastest counts) and of each leverplus phase")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from leverplus.utils import tune_malloc

    print(f"machine: {machine()}; threads={args.threads}")
    print(f"tune_malloc: {tune_malloc()}  (as every run of the app; see leverplus.utils.tune_malloc)")
    t0 = time.perf_counter()
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], foreach=True)  # one-time imports, once per process
    print(f"one-time start cost (first AdamW): {time.perf_counter() - t0:.2f} s")

    default_bs = int(compose([]).data.batch_size)
    sizes = args.batch_sizes or [1, default_bs]
    emb, rl = okvqa_like()
    groups = build_groups(rl, GroupOptions())
    train = groups[:640]
    pool = sum(len(g.pool_ids) for g in train) / len(train)
    members = sum(g.size for g in train) / len(train)
    print(f"data: {len(train)} train queries, {members:.1f} candidates/group, pools of {pool:.1f} items, d={emb.shape[1]}")
    ref = None
    if args.reference_path is not None:
        ref = reference_qps(args.reference_path.expanduser().resolve(), emb, rl, args.threads, args.reference_module,
                            args.reference_python, args.repeats)
        print(f"reference trainer (batch 1): RCE {ref[0]:.0f} q/s, GRPO {ref[1]:.0f} q/s")
    runs = [(f"batch {bs}", [f"data.batch_size={bs}"]) for bs in sizes]
    if args.fused:
        runs += [(f"batch {bs}, fused", [f"data.batch_size={bs}", "optimizer_impl=fused"]) for bs in sizes]
    if args.preset:
        runs.append(("+preset=reference", ["+preset=reference"]))
    print(f"{'run':>18} | {'RCE q/s':>8} | {'x ref':>6} | {'GRPO q/s':>8} | {'x ref':>6} | {'old-logp q/s':>12}")
    for label, overrides in runs:
        # the fastest of --repeats runs of each phase, as for the reference
        rce, grpo, old = (max(xs) for xs in zip(*[leverplus_qps(emb, train, overrides) for _ in range(args.repeats)]))
        x_rce = f"{rce / ref[0]:>5.1f}x" if ref else f"{'-':>6}"
        x_grpo = f"{grpo / ref[1]:>5.1f}x" if ref else f"{'-':>6}"
        print(f"{label:>18} | {rce:>8.0f} | {x_rce} | {grpo:>8.0f} | {x_grpo} | {old:>12.0f}")
    if args.flops:
        peak = matmul_peak_gflops(args.threads)
        print(f"matmul rate: {peak:.0f} GFLOP/s (fp32, {args.threads} threads)")
        for label, overrides in runs:
            f = flops_per_query(emb, train, overrides)
            print(f"{label:>18} | {f / 1e6:6.1f} MFLOP/query (RCE forward + backward) | ceiling at the matmul rate "
                  f"{peak * 1e9 / f:,.0f} q/s" + (f" = {peak * 1e9 / f / ref[0]:.0f}x the reference's RCE" if ref else ""))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {peak_mb:.0f} MB (threads={torch.get_num_threads()})")


if __name__ == "__main__":
    main()
