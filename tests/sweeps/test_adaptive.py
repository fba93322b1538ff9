"""The adaptive-seeds rounds (leverplus.sweeps.adaptive) on a scripted sequence of results: which jobs each round
launches, when each arm stops and why, and what the comparison shows. No MLflow, no Hydra: the launcher is a list and
the results come from a script of per-seed differences."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from leverplus.analysis.compare import compare_runs, report_markdown
from leverplus.sweeps.adaptive import AdaptiveConf, AdaptiveRun, allocation_record, cell_differences, run_adaptive
from leverplus.sweeps.grid import Job

SHOT = "data.shot_nums=[2]"
# per-seed Δ accuracy (arm − baseline) of three arms over seeds 0..6
SCRIPT = {
    "good": [0.10, 0.11, 0.09, 0.10, 0.10, 0.10, 0.10],  # better at the first look
    "null": [0.0, 0.001, -0.001, 0.0, 0.0, 0.0, 0.0],  # equivalent within ±0.5 pp at the first look
    "open": [0.02, -0.02, 0.01, -0.01, 0.03, -0.03, 0.0],  # inconclusive at every look
}
BASE_ACC = 0.5


def _jobs(n_seeds: int = 7):
    jobs = []
    for s in range(n_seeds):
        pair = (SHOT, f"seed={s}")
        jobs.append(Job("base", "baseline", [SHOT, f"seed={s}", "grpo.epochs=0"], pair))
        jobs += [Job(arm, "arm", [SHOT, f"seed={s}", f"x={arm}"], pair) for arm in SCRIPT]
    return jobs


class ScriptedSweep:
    """Launcher and results reader of a scripted sweep: launched jobs become runs with the scripted accuracies."""

    def __init__(self):
        self.rounds, self.rows = [], []

    def launch(self, jobs):
        self.rounds.append(sorted((j.arm, int(j.pair[1].split("=")[1])) for j in jobs))
        for j in jobs:
            s = int(j.pair[1].split("=")[1])
            acc = BASE_ACC if j.role == "baseline" else BASE_ACC + SCRIPT[j.arm][s]
            self.rows.append({"arm": j.arm, "role": j.role, "shot_num": 2, "seed": s, "acc": acc,
                              "run_id": f"{j.arm}/{s}"})
        return jobs

    def read(self):
        return pd.DataFrame(self.rows)


def test_scripted_allocation_round_by_round(tmp_path):
    conf = AdaptiveConf(enabled=True, initial_seeds=3, step=2, max_seeds=7, margin_pp=0.5, alpha=0.05)
    run = AdaptiveRun(conf, _jobs())
    fake = ScriptedSweep()
    run_adaptive(run, fake.launch, "s", tmp_path, read_runs=fake.read)
    # round 0: every arm and the baseline on seeds 0-2; then only "open" (and the baseline) on 3-4, then 5-6
    assert fake.rounds[0] == sorted((a, s) for a in ["base", *SCRIPT] for s in range(3))
    assert fake.rounds[1] == [("base", 3), ("base", 4), ("open", 3), ("open", 4)]
    assert fake.rounds[2] == [("base", 5), ("base", 6), ("open", 5), ("open", 6)]
    assert len(fake.rounds) == 3
    rec = json.loads((tmp_path / "adaptive.json").read_text())
    assert rec["design"]["looks"] == [3, 5, 7] and rec["design"]["alpha_per_look"] == pytest.approx(0.05 / 3)
    assert rec["design"]["budget"] == 21 and rec["design"]["budget_left"] == 21 - (3 + 3 + 7)
    cells = {c["arm"]: c for c in rec["cells"]}
    assert {a: (c["n_seeds"], c["verdict"], c["look"]) for a, c in cells.items()} == {
        "good": (3, "better", 1), "null": (3, "equivalent", 1), "open": (7, "inconclusive", 3)}
    assert "at the maximum of 7 seeds, stop" in cells["open"]["reason"]
    assert "look 1 of 3" in cells["good"]["reason"] and "stop" in cells["good"]["reason"]
    assert [sorted(r["add"]) for r in rec["rounds"]] == [
        sorted(json.dumps([a, 2]) for a in SCRIPT), [json.dumps(["open", 2])], [json.dumps(["open", 2])], []]


def test_budget_caps_the_seeds_and_says_so(tmp_path):
    # budget 11 = 3 x 3 first-look seeds + 2: "open" gets look 2 (5 seeds), then the budget is spent
    conf = AdaptiveConf(enabled=True, initial_seeds=3, step=2, max_seeds=7, budget=11)
    run = AdaptiveRun(conf, _jobs())
    fake = ScriptedSweep()
    run_adaptive(run, fake.launch, "s", tmp_path, read_runs=fake.read)
    assert len(fake.rounds) == 2
    cells = {c["arm"]: c for c in allocation_record(run)["cells"]}
    assert cells["open"]["n_seeds"] == 5 and "the budget has 0 seed run(s) left" in cells["open"]["reason"]


def test_cell_differences_pair_by_shot_and_seed():
    runs = pd.DataFrame([
        {"arm": "b", "role": "baseline", "shot_num": 2, "seed": 0, "acc": 0.5},
        {"arm": "b", "role": "baseline", "shot_num": 2, "seed": 1, "acc": 0.4},
        {"arm": "x", "role": "arm", "shot_num": 2, "seed": 1, "acc": 0.45},
        {"arm": "x", "role": "arm", "shot_num": 2, "seed": 0, "acc": 0.55},
        {"arm": "x", "role": "arm", "shot_num": 2, "seed": 2, "acc": 0.9},  # no baseline at seed 2: not paired
    ])
    assert cell_differences(runs, [("x", 2)]) == {("x", 2): pytest.approx([0.05, 0.05])}


def test_comparison_shows_seeds_and_why(tmp_path):
    conf = AdaptiveConf(enabled=True, initial_seeds=3, step=2, max_seeds=7)
    run = AdaptiveRun(conf, _jobs())
    fake = ScriptedSweep()
    run_adaptive(run, fake.launch, "s", tmp_path, read_runs=fake.read)
    rec = allocation_record(run)
    rep = compare_runs(fake.read(), n_boot=20)
    rep.allocation_design, rep.seed_allocation = rec["design"], rec["cells"]
    frame = rep.to_frame().set_index("arm")
    assert frame.loc["open", "adaptive_n_seeds"] == 7 and frame.loc["open", "n_seeds"] == 7
    assert frame.loc["good", "adaptive_verdict"] == "better" and "stop" in frame.loc["good", "adaptive_reason"]
    md = report_markdown(rep)
    assert "### Adaptive seeds (looks at [3, 5, 7] seeds, alpha 0.0167 per look" in md
    assert "| open | 2 | 7 | inconclusive |" in md
