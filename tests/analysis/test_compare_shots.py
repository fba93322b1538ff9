"""The S1-S4 table of the comparison report: per (arm, trained shot), the mean over seeds of each evaluated shot's
accuracy (``<metric>_shot<k>``), hand-computed."""

import pandas as pd

from leverplus.analysis.compare import SHOT_ACCS_COL, _shot_accs, shot_accuracy_markdown


def test_shot_accuracies_are_read_from_the_per_shot_metrics():
    m = {"test/downstream_acc": 0.5, "test/downstream_acc_shot1": 0.25, "test/downstream_acc_shot4": 0.75,
         "val/downstream_acc_shot2": 0.1, "test/downstream_acc_shotx": 0.0}
    assert _shot_accs(m, "test/downstream_acc") == {1: 0.25, 4: 0.75}


def test_the_table_averages_each_shot_over_seeds():
    df = pd.DataFrame([
        {"arm": "base", "shot_num": 2, "seed": 0, SHOT_ACCS_COL: {1: 0.2, 2: 0.4}},
        {"arm": "base", "shot_num": 2, "seed": 1, SHOT_ACCS_COL: {1: 0.3, 2: 0.5}},
        {"arm": "hps", "shot_num": 2, "seed": 0, SHOT_ACCS_COL: {1: 0.6}},
    ])
    md = shot_accuracy_markdown(df)
    assert "| arm | trained shot | seeds | S1 | S2 |" in md
    assert "| base | 2 | 2 | 25.00 | 45.00 |" in md  # (20 + 30) / 2, (40 + 50) / 2
    assert "| hps | 2 | 1 | 60.00 | n/a |" in md


def test_no_table_without_per_shot_metrics():
    assert shot_accuracy_markdown(pd.DataFrame([{"arm": "a", "shot_num": 2, "seed": 0, SHOT_ACCS_COL: {}}])) == ""
    assert shot_accuracy_markdown(pd.DataFrame()) == ""
