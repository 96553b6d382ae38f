"""Shared fixtures. Tests run on the CPU; `gpu` tests skip without CUDA.

The tree mirrors the source tree (``tests/fxopt/ir/test_capture.py`` tests
``fxopt/ir/capture.py``, ``tests/passes/fusion/test_fuse_act.py`` tests
``passes/fusion/fuse_act.py``); helpers several test modules share live in ``tests/support``,
importable by name (``import prune_zoo``).
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
