"""Build hook: ship the top-level ``conf/`` and ``sweeps/`` inside the wheel as ``leverplus/_conf`` and
``leverplus/_sweeps``, so a non-editable install finds its Hydra configs outside the source tree. The source tree
keeps them at the top level, where users edit them; everything else is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = {"conf": "_conf", "sweeps": "_sweeps"}


class BuildPyWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        for src, dst in SHIPPED.items():
            target = Path(self.build_lib) / "leverplus" / dst
            shutil.copytree(ROOT / src, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))


setup(cmdclass={"build_py": BuildPyWithConfigs})
