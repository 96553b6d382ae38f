"""Parameter and MAC counts of a model as the benchmarks report them: an ``nn.Module``, a
``GraphModule`` or an ``OptimizedModule`` (counted on its graph), MACs at one example input."""
from __future__ import annotations

import copy

import torch

__all__ = ["macs", "params"]


def macs(model, x) -> int:
    import fxopt
    from fxopt.ir.capture import propagate_shapes
    from fxopt.ir.metrics import count_macs

    if isinstance(model, fxopt.OptimizedModule):
        model = model.graph_module
    if isinstance(model, torch.fx.GraphModule):
        g = copy.deepcopy(model)
        propagate_shapes(g, (x,))
        return count_macs(g)
    return count_macs(fxopt.capture(model, x))


def params(model) -> int:
    import fxopt
    from fxopt.ir.graph import count_params

    return count_params(model.graph_module if isinstance(model, fxopt.OptimizedModule) else model)
