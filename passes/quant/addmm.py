"""Hugging Face's ``Conv1D`` into a Linear layer: ``addmm(b, x, W)`` -> ``linear_act(x, W.T, b)``.

GPT-2's projections (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``) are
``transformers.pytorch_utils.Conv1D``: a Linear layer whose weight is stored transposed
(``[in, out]``), computed as ``torch.addmm(bias, x.view(-1, in), weight)``. ``torch.export``
writes that as ``aten.addmm`` of two ``get_attr`` parameters, which ``find_layers`` does not
know, so static int8 quantized only GPT-2's ``lm_head``. Before planning, ``quantize_int8``
rewrites each ``aten.addmm(bias, x, weight)`` (or ``torch.addmm``, a symbolic trace of such a
layer) with a constant fp32 2-D ``weight`` ``[in, out]``, a constant 1-D ``bias`` ``[out]``, a
2-D fp32 ``x`` and the default ``beta = alpha = 1`` into the fused
``linear_act(x, weight.T, bias)``; the transposed weight is a new buffer of the pass's graph
(the user's module is not touched). The node is labelled with the module's path (the weight's
owner), so the int8 planner, ``keep_float`` and the report name it as the user's ``Conv1D``;
any other ``addmm`` (a product of two activations, a scaled one) stays as it was.

In float the rewrite is the same product and sum (the GEMM may order the sum differently:
float32 rounding); the pass manager checks the int8 graph against the simulated reference
built on the rewritten graph.

    >>> gm, n = addmm_as_linear(gm)   # a copy; n addmm calls now linear_act
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx

from fxopt.ir.graph import add_buffer, copy_meta, get_attr_value, tensor_meta_of
from fxopt.ops.fused import LINEAR_ACT

__all__ = ["addmm_as_linear", "constant_addmm"]

_ADDMM = (torch.ops.aten.addmm.default, torch.addmm)  # torch.export, symbolic_trace


def _constant(gm: fx.GraphModule, a) -> torch.Tensor | None:
    if isinstance(a, fx.Node) and a.op == "get_attr":
        v = get_attr_value(gm, a.target)
        if isinstance(v, torch.Tensor) and v.dtype == torch.float32:
            return v
    return None


def constant_addmm(gm: fx.GraphModule, n: fx.Node) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(weight [in, out], bias [out])`` when ``n`` is ``aten.addmm(bias, x, weight)`` of a
    Linear layer stored transposed (module docstring), else None."""
    if n.op != "call_function" or n.target not in _ADDMM or n.kwargs or len(n.args) != 3:
        return None
    b, x, w = (_constant(gm, n.args[0]), n.args[1], _constant(gm, n.args[2]))
    tm = x.meta.get("tensor_meta") if isinstance(x, fx.Node) else None
    if w is None or b is None or w.dim() != 2 or b.shape != (w.shape[1],) \
            or getattr(tm, "dtype", None) != torch.float32 or len(getattr(tm, "shape", ())) != 2:
        return None
    return w, b


def addmm_as_linear(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A copy of ``gm`` with each constant-weight ``aten.addmm`` (module docstring) rewritten
    into ``linear_act`` (``gm`` itself when there is none), and how many."""
    if not any(constant_addmm(gm, n) is not None for n in gm.graph.nodes):
        return gm, 0
    gm = copy.deepcopy(gm)
    count = 0
    for n in list(gm.graph.nodes):
        wb = constant_addmm(gm, n)
        if wb is None:
            continue
        w, b = wb
        owner = str(n.args[2].target).rpartition(".")[0]
        wt = w.detach().t().contiguous()
        name = add_buffer(gm, "_fxopt_linear_weight", wt)
        with gm.graph.inserting_before(n):
            w_node = gm.graph.get_attr(name)
            new = LINEAR_ACT.emit(gm.graph, x=n.args[1], weight=w_node, bias=n.args[0])
        w_node.meta["tensor_meta"] = tensor_meta_of(wt)
        copy_meta(new, n)
        for node in (w_node, new):
            node.meta["fxopt_path"] = owner
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
        count += 1
    gm.graph.lint()
    gm.recompile()
    return gm, count
