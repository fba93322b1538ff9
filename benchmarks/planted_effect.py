"""Planted-effect study: does the comparison find an effect that is there by construction, and only then?

Run by hand, not in tests:

    python benchmarks/planted_effect.py                       # small: data=sim_tiny worlds (num_test 300), 4 worlds
    python benchmarks/planted_effect.py --worlds 20 --seeds 3 # more replications
    python benchmarks/planted_effect.py --size full --worlds 20   # the embedded world's size (data=sim), slow
    python benchmarks/planted_effect.py --merge a.json b.json     # one summary of studies run in parallel pieces

Each replication is an independent simulated world (``data.sim.seed = w``) in which a known fraction of the RL
anchors is scored by the fallback matcher and every fallback-scored correctness is inverted
(``data.sim.fallback_fraction``, ``fallback_noise=1``, ``fallback_noise_kind=flip``). Arms, at every training seed:

* ``base``: skips the fallback-scored rewards (``data.skip_fallback_reward=true``): it never reads the corrupted field;
* ``planted``: trains on them (``skip_fallback_reward=false``): worse by construction;
* ``null``: the baseline's config with other RCE/GRPO random streams (``rce.seed_offset``, ``grpo.seed_offset``):
  the same reward design, so Δ = 0 in expectation, but with independent training noise (a null arm that is *not*
  identical; an identical config would give Δ ≡ 0 under common random numbers);
* ``planted_indep``: the planted arm with those other streams, to measure what common random numbers (CRN) buy.

Per world and arm, the verdicts use the protocol of ``python -m leverplus.compare``: the seed-level paired t-test
(arm − base at the same seed) with the four-way margin verdict, and the per-query sign-flip test over the pooled
(seed, query) pairs; BH over the family {planted, null} of each world. Reported: power (share of worlds where the
planted arm is "worse"), false positives on the null arm per test and family-wise, the null arm's equivalence
verdicts, the seed sd of Δ with and without CRN, the changed-query share and the KL from SFT.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ARMS = {
    "base": ["data.skip_fallback_reward=true"],
    "planted": ["data.skip_fallback_reward=false"],
    "null": ["data.skip_fallback_reward=true", "rce.seed_offset=4", "grpo.seed_offset=5"],
    "planted_indep": ["data.skip_fallback_reward=false", "rce.seed_offset=4", "grpo.seed_offset=5"],
}
SIZES = {
    "small": ["data=sim_tiny", "data.sim.num_test=300", "data.sim.num_val=60"],
    "full": ["data=sim"],
}
# the training regime that moves the SFT selector enough for a reward to matter (docs/benchmarks.md)
REGIME = ["rce.lr=1e-3", "rce.epochs=10"]


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from leverplus.config.store import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose("train", overrides=list(overrides))


def run_arm(overrides, out_dir: Path) -> dict:
    """One run in-process (no MLflow): test accuracy, per-query test rows of the selector, KL from SFT."""
    from leverplus.config.validation import validate_config
    from leverplus.evaluation.policy_kl import KL_METRIC
    from leverplus.pipeline import load_data, train_and_evaluate

    cfg = _compose(overrides + ["tracking.enabled=false", "plot_curves=false", "checkpoint_every_epoch=false",
                                "eval.downstream_splits=[test]", "eval.baselines=[]", "eval.shot_nums=[2]"])
    validate_config(cfg)
    data = load_data(cfg)
    outcome = train_and_evaluate(cfg, data, out_dir, say=lambda s: None)
    # the trained shot only: with several evaluated shots the rows of one query repeat, once per shot
    rows = [r for r in outcome.per_query if r.get("method") == "selector" and r.get("split") == "test"
            and int(r.get("shot_num", 2)) == 2]
    return {"acc": float(outcome.metrics["test/downstream_acc"]),
            "kl": float(outcome.metrics.get(KL_METRIC, math.nan)),
            "per_query": {int(r["query_index"]): (float(r["acc"]), tuple(r["icds"])) for r in rows}}


def analyse_world(res: dict, seeds, margin: float, alpha: float) -> dict:
    """Verdicts of every arm vs base in one world (res[arm][seed] = run_arm output)."""
    from leverplus.evaluation.stats import bh_by_family, paired_verdict, sign_flip_test

    out = {}
    for arm in [a for a in ARMS if a != "base"]:
        d = np.array([res[arm][s]["acc"] - res["base"][s]["acc"] for s in seeds])
        v = paired_verdict(d, margin, alpha=alpha)
        qd, changed, n = [], 0, 0
        for s in seeds:
            a, b = res[arm][s]["per_query"], res["base"][s]["per_query"]
            for q in sorted(set(a) & set(b)):
                qd.append(a[q][0] - b[q][0])
                changed += a[q][1] != b[q][1]
                n += 1
        p_query = sign_flip_test(qd, seed=0) if qd else math.nan
        out[arm] = {"delta": float(d.mean()), "sd": float(d.std(ddof=1)) if d.size > 1 else math.nan,
                    "verdict": v.verdict, "p_seed": v.p_value, "p_query": p_query,
                    "query_delta": float(np.mean(qd)) if qd else math.nan,
                    "changed_frac": changed / max(n, 1),
                    "kl": float(np.mean([res[arm][s]["kl"] for s in seeds]))}
    fam = ["planted", "null"]
    for key in ("p_seed", "p_query"):
        q = bh_by_family([out[a][key] for a in fam])
        for a, qv in zip(fam, q):
            out[a][key.replace("p_", "q_")] = float(qv)
    out["base_kl"] = float(np.mean([res["base"][s]["kl"] for s in seeds]))
    return out


def summarise(worlds: list, alpha: float) -> dict:
    def share(arm, pred):
        vals = [pred(w[arm]) for w in worlds]
        return sum(vals) / len(vals)

    s = {
        "n_worlds": len(worlds),
        "planted_delta_pp": 100 * float(np.mean([w["planted"]["delta"] for w in worlds])),
        "power_seed_worse": share("planted", lambda a: a["verdict"] == "worse"),
        "power_query": share("planted", lambda a: a["p_query"] < alpha and a["query_delta"] < 0),
        "fp_seed_null": share("null", lambda a: a["verdict"] in ("better", "worse")),
        "fp_query_null": share("null", lambda a: a["p_query"] < alpha),
        "fwer_seed_bh": float(np.mean([w["null"]["q_seed"] < alpha for w in worlds])),
        "fwer_query_bh": float(np.mean([w["null"]["q_query"] < alpha for w in worlds])),
        "null_equivalent": share("null", lambda a: a["verdict"] == "equivalent"),
        "null_inconclusive": share("null", lambda a: a["verdict"] == "inconclusive"),
        "sd_crn_pp": 100 * float(np.sqrt(np.nanmean([w["planted"]["sd"] ** 2 for w in worlds]))),
        "sd_indep_pp": 100 * float(np.sqrt(np.nanmean([w["planted_indep"]["sd"] ** 2 for w in worlds]))),
        "sd_null_pp": 100 * float(np.sqrt(np.nanmean([w["null"]["sd"] ** 2 for w in worlds]))),
        "changed_frac_planted": float(np.mean([w["planted"]["changed_frac"] for w in worlds])),
        "changed_frac_null": float(np.mean([w["null"]["changed_frac"] for w in worlds])),
        "kl_base": float(np.mean([w["base_kl"] for w in worlds])),
        "kl_planted": float(np.mean([w["planted"]["kl"] for w in worlds])),
    }
    s["ci_shrink_crn"] = s["sd_crn_pp"] / s["sd_indep_pp"] if s["sd_indep_pp"] > 0 else math.nan
    return s


def settings_of(args) -> dict:
    """What a result file's worlds were made with (files are merged only when these agree)."""
    return {"seeds": args.seeds, "size": args.size, "fallback_fraction": args.fallback_fraction, "regime": args.regime}


def merge(paths, alpha: float) -> dict:
    """One summary over the worlds of several result files (a study run in parallel pieces), with the counts and
    95% Wilson intervals of power and false positives."""
    from scipy.stats import binomtest

    worlds, settings = [], set()
    for path in paths:
        d = json.loads(Path(path).read_text())
        worlds += d["worlds"]
        setting = tuple(d["summary"].get(k) for k in ("size", "seeds", "fallback_fraction", "regime"))
        if any(v is not None for v in setting):  # (partial files of older versions carry none)
            settings.add(setting)
    if len(settings) > 1:
        raise SystemExit(f"the files were made with different settings (size, seeds, fraction, regime): {settings}")
    s = summarise(worlds, alpha)
    n = len(worlds)
    for key in ("power_seed_worse", "power_query", "fp_seed_null", "fp_query_null", "fwer_seed_bh", "fwer_query_bh",
                "null_equivalent"):
        k = int(round(s[key] * n))
        ci = binomtest(k, n).proportion_ci(method="wilson")
        s[key + "_count"] = f"{k}/{n} [{100 * ci.low:.0f}, {100 * ci.high:.0f}]%"
    s["planted_delta_pp_per_world"] = [round(100 * w["planted"]["delta"], 1) for w in worlds]
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="summarise the worlds of these result files together (nothing is run)")
    ap.add_argument("--worlds", type=int, default=4, help="independent world seeds (replications)")
    ap.add_argument("--first-world", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per arm (the protocol under test)")
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--fallback-fraction", type=float, default=0.8, help="share of anchors with inverted correctness")
    ap.add_argument("--margin-pp", type=float, default=0.5)
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--regime", default=" ".join(REGIME), help="training overrides of every arm")
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides of every run")
    ap.add_argument("--out", default=None, help="JSON results file (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.merge:
        print(json.dumps(merge(args.merge, args.alpha), indent=2))
        return 0

    work = Path(tempfile.mkdtemp(prefix="planted-"))
    print(f"working in {work} (runs.jsonl: one line per finished run)", flush=True)
    os.environ.setdefault("LEVERPLUS_CACHE", str(work / "cache"))
    seeds = list(range(args.seeds))
    planted = [f"data.sim.fallback_fraction={args.fallback_fraction}", "data.sim.fallback_noise=1.0",
               "data.sim.fallback_noise_kind=flip"]
    t0 = time.time()
    worlds = []
    for w in range(args.first_world, args.first_world + args.worlds):
        res = {arm: {} for arm in ARMS}
        for s in seeds:
            for arm, ov in ARMS.items():
                overrides = SIZES[args.size] + planted + args.regime.split() + args.extra + ov + [
                    f"data.sim.seed={w}", f"seed={s}", "data.shot_nums=[2]"]
                res[arm][s] = run_arm(overrides, work / f"w{w}" / arm / str(s))
                with open(work / "runs.jsonl", "a") as f:  # each run as it ends, so a stopped study keeps its runs
                    f.write(json.dumps({"world": w, "arm": arm, "seed": s, "acc": res[arm][s]["acc"],
                                        "kl": res[arm][s]["kl"]}) + "\n")
        worlds.append(analyse_world(res, seeds, args.margin_pp / 100, args.alpha))
        print(f"world {w}: " + json.dumps({a: {k: round(v, 4) if isinstance(v, float) else v
                                               for k, v in worlds[-1][a].items()}
                                           for a in ("planted", "null", "planted_indep")}), flush=True)
        if args.out:  # the analysed worlds so far, so a stopped study keeps its replications
            partial = {**summarise(worlds, args.alpha), **settings_of(args)}
            Path(args.out).write_text(json.dumps({"partial": True, "summary": partial, "worlds": worlds}, indent=2))
    summary = summarise(worlds, args.alpha)
    summary.update({**settings_of(args), "wall_s": round(time.time() - t0, 1), "date": str(date.today()),
                    "machine": f"{platform.machine()} {os.cpu_count()} cpu (shared)"})
    print(json.dumps(summary, indent=2))
    out = Path(args.out) if args.out else work / "planted_effect.json"
    out.write_text(json.dumps({"summary": summary, "worlds": worlds}, indent=2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
