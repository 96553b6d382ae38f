"""The attention projections into int8: a leaf ``nn.MultiheadAttention`` call decomposed.

Capture keeps ``nn.MultiheadAttention`` a leaf (its forward branches on tensor properties), so
its q/k/v input projection and ``out_proj`` are inside one ``call_module`` that the quantizer
cannot see into (torchvision's ViTs: 2 of the 4 Linear layers of every encoder block). For
the standard case, ``quantize_int8`` rewrites the call into what it computes::

    qkv = in_proj(x)                             # nn.Linear(E, 3E), the module's own weights
    q, k, v = (t.unflatten(-1, (H, D)).transpose(1, 2) for t in qkv.chunk(3, -1))
    o = F.scaled_dot_product_attention(q, k, v)  # [B, H, L, D]
    y = out_proj(o.transpose(1, 2).flatten(2))   # nn.Linear(E, E)

so ``find_layers`` finds two more Linear layers (``<path>.in_proj``, ``<path>.out_proj``) and the
attention itself stays float between them. The standard case: self-attention (query, key and
value one value), ``batch_first=True``, one packed input projection, no masks, no
``bias_k``/``bias_v``, no ``add_zero_attn``, ``need_weights=False`` and only the output read
(the ``(output, None)`` tuple's first element). Anything else stays a leaf, as before.

Each rewrite is checked against the leaf call on the example inputs (the float graph before
and after must agree within float rounding); a rewrite that does not agree is undone and named.
"""
from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxopt.ir.capture import propagate_shapes
from fxopt.ir.graph import copy_meta

__all__ = ["decompose_attention", "standard_self_attention"]

_RTOL = 1e-4  # float32 rounding: the fused kernel and SDPA sum in different orders


def _arg(n: fx.Node, i: int, name: str, default=None):
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def standard_self_attention(gm: fx.GraphModule, n: fx.Node) -> str | None:
    """Why the ``nn.MultiheadAttention`` call ``n`` is not the standard case, or None when it
    is (see the module docstring)."""
    m = gm.get_submodule(n.target)
    q, k, v = (_arg(n, i, name) for i, name in enumerate(("query", "key", "value")))
    if not (isinstance(q, fx.Node) and q is k is v):
        return "not self-attention"
    if not m.batch_first or not m._qkv_same_embed_dim or m.in_proj_weight is None:
        return "not batch_first with one packed input projection"
    if m.bias_k is not None or m.bias_v is not None or m.add_zero_attn:
        return "bias_k/bias_v or add_zero_attn"
    for i, name, default in ((3, "key_padding_mask", None), (5, "attn_mask", None),
                             (7, "is_causal", False)):
        if _arg(n, i, name, default) not in (None, False):
            return f"{name}"
    if _arg(n, 4, "need_weights", True) is not False:
        return "need_weights"
    for u in n.users:
        if not (u.op == "call_function" and u.target is operator.getitem
                and u.args[1] in (0, 1)) or (u.args[1] == 1 and u.users):
            return "its attention weights are read"
    return None


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight``/``bias`` themselves (the module's parameters)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
    if bias is not None:
        lin.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
    return lin.eval()


def _rewrite(gm: fx.GraphModule, n: fx.Node) -> fx.Node:
    """Decompose the call ``n``; returns the node of the attention output."""
    path, m = str(n.target), gm.get_submodule(n.target)
    h, e = m.num_heads, m.embed_dim
    m.add_module("in_proj", _linear(m.in_proj_weight, m.in_proj_bias))
    m.out_proj = _linear(m.out_proj.weight, m.out_proj.bias)  # the plain Linear type
    g, x = gm.graph, n.args[0] if n.args else n.kwargs["query"]
    with g.inserting_before(n):
        made = [g.call_module(f"{path}.in_proj", (x,))]
        made.append(g.call_method("chunk", (made[0], 3, -1)))
        heads = []
        for i in range(3):
            part = g.call_function(operator.getitem, (made[1], i))
            split = g.call_method("unflatten", (part, -1, (h, e // h)))
            heads.append(g.call_method("transpose", (split, 1, 2)))
            made += [part, split, heads[-1]]
        o = g.call_function(F.scaled_dot_product_attention, tuple(heads))
        back = g.call_method("transpose", (o, 1, 2))
        flat = g.call_function(torch.flatten, (back,), {"start_dim": 2, "end_dim": -1})
        out = g.call_module(f"{path}.out_proj", (flat,))
        made += [o, back, flat, out]
    for new in made:
        copy_meta(new, n, with_tensor_meta=False)
        new.meta["fxopt_path"] = path
    made[0].meta["fxopt_path"], out.meta["fxopt_path"] = f"{path}.in_proj", f"{path}.out_proj"
    for u in list(n.users):
        if u.args[1] == 0:
            u.replace_all_uses_with(out)
        g.erase_node(u)
    g.erase_node(n)
    return out


def decompose_attention(gm: fx.GraphModule,
                        example_inputs: tuple) -> tuple[fx.GraphModule, list[str], list[str]]:
    """``gm`` with every standard ``nn.MultiheadAttention`` leaf call decomposed (a copy;
    ``gm`` itself when there is none), checked on ``example_inputs``; the module paths
    decomposed, and notes (calls left whole and why)."""
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"
             and isinstance(gm.get_submodule(n.target), nn.MultiheadAttention)]
    if not calls:
        return gm, [], []
    work = copy.deepcopy(gm)
    notes, done = [], []
    for n in [n for n in work.graph.nodes if n.op == "call_module" and n.target in calls]:
        why = standard_self_attention(work, n)
        if why is not None:
            notes.append(f"{n.target} (MultiheadAttention: {why}) kept whole: its projections "
                         f"stay float")
            continue
        _rewrite(work, n)
        done.append(str(n.target))
    if not done:
        return gm, [], notes
    work.graph.lint()
    work.recompile()
    with torch.no_grad():
        want = gm(*example_inputs)
        propagate_shapes(work, example_inputs)
        got = work(*example_inputs)
    ok = isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor) \
        and got.shape == want.shape and float((got - want).abs().max()) <= \
        _RTOL * max(float(want.abs().max()), 1.0)
    if not ok:
        return gm, [], notes + ["MultiheadAttention kept whole: its decomposition did not "
                                "match the leaf call on the example inputs"]
    return work, done, notes
