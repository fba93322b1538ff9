"""Foundations: the code version that run keys and stage caches depend on."""

import shutil

from leverplus.utils import PACKAGE_ROOT, RESULT_CODE, code_version


def test_result_code_names_existing_parts():
    assert all((PACKAGE_ROOT / part).exists() for part in RESULT_CODE)


def test_code_version_changes_only_with_code_that_computes_results(tmp_path):
    root = tmp_path / "leverplus"
    shutil.copytree(PACKAGE_ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    base = code_version(root)
    assert base == code_version(PACKAGE_ROOT)  # the hash reads file contents and relative paths only
    for cosmetic in ("analysis/plots.py", "tracking/run.py", "sweeps/ablation.py", "train.py", "errors.py"):
        (root / cosmetic).write_text((root / cosmetic).read_text() + "\n# a comment\n")
        assert code_version(root) == base, cosmetic
    for computing in ("training/losses.py", "data/rewards.py", "evaluation/vqa_metric.py", "sim/lvlm.py"):
        original = (root / computing).read_text()
        (root / computing).write_text(original + "\n# a comment\n")
        assert code_version(root) != base, computing
        (root / computing).write_text(original)
        assert code_version(root) == base
