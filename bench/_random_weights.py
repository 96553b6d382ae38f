"""Trained-like BatchNorm in randomly initialized torchvision models: the default statistics
(mean 0, variance 1, weight 1, bias 0) make every BatchNorm an identity, which hides what
folding and int8 calibration do with real ones."""
from __future__ import annotations

import torch

__all__ = ["randomize_batchnorm", "redraw_zero_weights"]


def randomize_batchnorm(model: torch.nn.Module, *, affine: bool = True) -> torch.nn.Module:
    """Draw each BatchNorm's running mean in [-0.2, 0.2] and variance in [0.5, 1.5] and, with
    ``affine``, its weight in [0.5, 1.5] and bias in [-0.2, 0.2] (from torch's global RNG, in
    module order); returns ``model``."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
            if affine:
                with torch.no_grad():
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.uniform_(-0.2, 0.2)
    return model


def redraw_zero_weights(model: torch.nn.Module, seed: int = 2) -> list[str]:
    """Every conv/linear weight that is all zeros at initialization (torchvision's ViT zero-inits
    its head: constant outputs, no SQNR to measure) drawn from N(0, 0.02) instead, seeded;
    returns the modules' paths."""
    gen = torch.Generator().manual_seed(seed)
    redrawn = []
    with torch.no_grad():
        for path, mod in model.named_modules():
            w = getattr(mod, "weight", None)
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and not w.any():
                w.copy_(torch.randn(w.shape, generator=gen) * 0.02)
                redrawn.append(path)
    return redrawn
