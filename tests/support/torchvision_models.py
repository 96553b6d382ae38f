"""Untrained torchvision models for the int8 tests, with BatchNorm statistics and affine
parameters drawn from a seed: the defaults (mean 0, variance 1, weight 1, bias 0) make many
outputs degenerate. On the path from tests/conftest.py; needs torchvision (the callers
importorskip it first)."""
from __future__ import annotations

import torch

__all__ = ["randomized_bn_model"]


def randomized_bn_model(name: str) -> torch.nn.Module:
    """torchvision's ``name`` in eval mode, seed 0, without weights, each BatchNorm's running
    mean in [-0.2, 0.2], variance in [0.5, 1.5], weight in [0.5, 1.5] and bias in [-0.2, 0.2]."""
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.get_model(name, weights=None).eval()
    for mod in m.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
            with torch.no_grad():
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return m
