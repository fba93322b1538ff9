"""Shared fixtures: torch threads and seed for every test, the repository root (``repo``) and the train-config
composer (``compose_cfg``)."""

import os
from pathlib import Path
from typing import Callable

import pytest
import torch
from paths import REPO
from paths import compose_cfg as _compose_cfg

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def repo() -> Path:
    """The repository root (conf/, sweeps/, docs/)."""
    return REPO


@pytest.fixture
def compose_cfg() -> Callable:
    """``compose_cfg(overrides)``: conf/train.yaml composed with overrides, as ``python -m leverplus.train`` would."""
    return _compose_cfg
