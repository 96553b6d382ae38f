"""How good an int8 model is, and how big one quantization step of its output is.

    >>> sqnr_db(float_logits, int8_logits)        # 10 log10(||ref||^2 / ||ref - out||^2)
    >>> compare(outputs(gm, batches), outputs(int8, batches))   # sqnr_db, max_abs_err, top-1
    >>> output_step(int8_gm)                      # the coarsest grid that reaches the output
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from fxopt.ir.graph import get_attr_value
from fxopt.ops.int8 import Dequantize

__all__ = ["sqnr_db", "outputs", "compare", "sqnr_of", "output_step"]


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(||ref||^2 / ||ref - out||^2)`` in dB."""
    r, o = ref.detach().double(), out.detach().double()
    noise = float(((r - o) ** 2).sum())
    signal = float((r ** 2).sum())
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def _flat(o) -> torch.Tensor:
    leaves = [t for t in torch.utils._pytree.tree_leaves(o) if isinstance(t, torch.Tensor)]
    return torch.cat([t.detach().reshape(-1).double() for t in leaves]) if leaves \
        else torch.zeros(0, dtype=torch.float64)


def outputs(module, batches) -> list:
    """``module``'s outputs on ``batches``, flattened to float64 (with the top-1 class of a
    ``[N, classes]`` output), for :func:`compare`."""
    with torch.no_grad():
        outs = []
        for args in batches:
            o = module(*args)
            outs.append((_flat(o), o.argmax(dim=1)) if isinstance(o, torch.Tensor) and o.dim() == 2
                        else _flat(o))
        return outs


def sqnr_of(module, batches, float_outs) -> float:
    """SQNR of ``module``'s outputs on ``batches`` against ``float_outs`` (from ``outputs``)."""
    return compare(float_outs, outputs(module, batches))["sqnr_db"]


def compare(float_outs, q_outs) -> dict:
    ref = torch.cat([o[0] if isinstance(o, tuple) else o for o in float_outs])
    out = torch.cat([o[0] if isinstance(o, tuple) else o for o in q_outs])
    res = {"sqnr_db": round(sqnr_db(ref, out), 2),
           "max_abs_err": float(f"{float((ref - out).abs().max()):.4g}") if ref.numel() else 0.0}
    if all(isinstance(o, tuple) for o in float_outs + q_outs):
        a = torch.cat([o[1] for o in float_outs])
        b = torch.cat([o[1] for o in q_outs])
        res["top1_agreement"] = round(float((a == b).float().mean()), 4)
    return res


def output_step(gm: fx.GraphModule, exits: list[fx.Node] | None = None) -> float:
    """One quantization step of the output of an int8 graph: the coarsest grid among the
    dequantize nodes (``exits``; default: all of them) that reach the graph output."""
    if exits is None:
        exits = [n for n in gm.graph.nodes if Dequantize.matches(n)]
    reach: dict[fx.Node, bool] = {}
    for n in reversed(list(gm.graph.nodes)):
        reach[n] = n.op == "output" or any(reach.get(u, False) for u in n.users)
    steps = [float(get_attr_value(gm, Dequantize.of(d).scale.target)) for d in exits
             if reach.get(d)]
    return max(steps) if steps else 0.0
