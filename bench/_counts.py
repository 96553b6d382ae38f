"""Parameter and MAC counts of a model as the benchmarks report them: an ``nn.Module``, a
``GraphModule`` or an ``OptimizedModule`` (counted on its graph), MACs at one example input (a
tensor, or a tuple of them for a model with several inputs)."""
from __future__ import annotations

import copy

import torch

__all__ = ["macs", "params"]


def macs(model, x, capture: str | None = None) -> int:
    """MACs of one call on ``x``. A plain module is captured with ``fxopt.capture`` (symbolic
    trace), or as ``optimize(capture=...)`` captures it when ``capture`` is given (``"auto"``
    or ``"export"`` for models symbolic tracing cannot go through, as Hugging Face's)."""
    import fxopt
    from fxopt.ir.capture import propagate_shapes
    from fxopt.ir.metrics import count_macs

    xs = x if isinstance(x, tuple) else (x,)
    if isinstance(model, fxopt.OptimizedModule):
        model = model.graph_module
    if isinstance(model, torch.fx.GraphModule):
        g = copy.deepcopy(model)
        propagate_shapes(g, xs)
        return count_macs(g)
    if capture is not None:
        return count_macs(fxopt.optimize(model, xs, pipeline=[], capture=capture).graph_module)
    return count_macs(fxopt.capture(model, xs))


def params(model) -> int:
    import fxopt
    from fxopt.ir.graph import count_params

    return count_params(model.graph_module if isinstance(model, fxopt.OptimizedModule) else model)
