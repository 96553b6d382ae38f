"""Test models in eval mode with BatchNorm statistics that are not the identity.

A fresh ``nn.BatchNorm2d`` has mean 0 and variance 1, which hides folding and fusion mistakes;
the tests draw its running statistics from a seed instead. On the path from tests/conftest.py.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["with_bn_stats"]


def with_bn_stats(make, seed: int, mean: float, var: tuple[float, float], bns=None) -> nn.Module:
    """``make()`` under ``torch.manual_seed(seed)``, in eval mode, each BatchNorm in ``bns(m)``
    (every ``nn.BatchNorm2d`` when None) given ``running_mean ~ U(-mean, mean)`` and
    ``running_var ~ U(*var)``."""
    torch.manual_seed(seed)
    m = make().eval()
    chosen = bns(m) if bns is not None else \
        [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    for bn in chosen:
        bn.running_mean.uniform_(-mean, mean)
        bn.running_var.uniform_(*var)
    return m
