"""Opening ``nn.MultiheadAttention`` leaves so that pruning sees their heads.

Capture keeps ``nn.MultiheadAttention`` as one call (its forward branches on tensor properties),
and PyTorch's forward needs its inner width to equal the width of its input (``embed_dim``), so
neither its heads nor the channels of the stream that feeds it could shrink. Before the channel
analysis, ``open_attention`` rewrites each self-attention call it can into plain layers the
channel rules know, computing the same thing::

    qkv = in_proj(x)                                # nn.Linear(E, 3E): in_proj_weight/bias
    q, k, v = qkv.unflatten(-1, (3, -1, d)).permute(2, 0, 3, 1, 4).unbind(0)  # [N, H, L, d]
    o = F.scaled_dot_product_attention(q, k, v)     # the default scale 1/sqrt(d)
    y = out_proj(o.transpose(1, 2).flatten(2))      # the same nn.Linear as before

The head count is the ``-1`` of the unflatten, so the reshape rule makes each head one unit
(its q, k and v rows and its columns of ``out_proj`` go together) and the head dim ``d`` stays:
pruning removes whole heads, and the stream feeding ``in_proj``'s columns and fed by
``out_proj``'s rows shrinks with its group. Opened: calls with ``query is key is value``, the
packed projection, no masks, no ``bias_k``/``bias_v``/``add_zero_attn``, and no use of the
returned attention weights (``fxopt.ir.attention.self_attention_blocker``, shared with int8's
decomposition); any other call stays a leaf (its channels frozen).

    >>> gm2, opened = open_attention(gm, example_inputs)   # a new graph; gm is not changed
"""
from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxopt.ir.attention import linear_from, self_attention_blocker
from fxopt.ir.capture import propagate_shapes
from fxopt.ir.graph import copy_meta, get_attr_value

__all__ = ["open_attention", "can_open"]


def can_open(node: fx.Node, mod: nn.Module) -> bool:
    """True when ``node`` is a self-attention call ``open_attention`` rewrites exactly."""
    return self_attention_blocker(node, mod) is None


def _open_one(gm: fx.GraphModule, node: fx.Node, mod: nn.MultiheadAttention) -> None:
    g = gm.graph
    path = node.target
    x = node.args[0] if node.args else node.kwargs["query"]
    head_dim = mod.embed_dim // mod.num_heads
    parent, _, leaf = path.rpartition(".")
    owner = get_attr_value(gm, parent) if parent else gm
    owner.add_module(f"{leaf}_in_proj", linear_from(mod.in_proj_weight, mod.in_proj_bias))
    out_proj = copy.copy(mod.out_proj)  # its own tensors dict: pruning replaces them
    out_proj._parameters = dict(mod.out_proj._parameters)
    owner.add_module(f"{leaf}_out_proj", out_proj)
    before = set(g.nodes)
    prefix = f"{parent}." if parent else ""
    with g.inserting_before(node):
        h = x if mod.batch_first else g.call_method("transpose", (x, 0, 1))
        qkv = g.call_module(f"{prefix}{leaf}_in_proj", (h,))
        qkv = g.call_method("unflatten", (qkv, -1, (3, -1, head_dim)))
        qkv = g.call_method("permute", (qkv, 2, 0, 3, 1, 4))
        parts = g.call_method("unbind", (qkv, 0))
        q, k, v = (g.call_function(operator.getitem, (parts, i)) for i in range(3))
        o = g.call_function(F.scaled_dot_product_attention, (q, k, v))
        o = g.call_method("flatten", (g.call_method("transpose", (o, 1, 2)), 2))
        y = g.call_module(f"{prefix}{leaf}_out_proj", (o,))
        if not mod.batch_first:
            y = g.call_method("transpose", (y, 0, 1))
    for new in g.nodes:
        if new not in before:
            copy_meta(new, node, with_tensor_meta=False)
    for user in list(node.users):
        if user.args[1] == 0:
            user.replace_all_uses_with(y)
        g.erase_node(user)
    g.erase_node(node)


def open_attention(gm: fx.GraphModule, inputs: tuple) -> tuple[fx.GraphModule, int]:
    """A copy of ``gm`` with its self-attention leaves opened, and how many were opened
    (``gm`` itself when none was)."""
    todo = [n.target for n in gm.graph.nodes if n.op == "call_module"
            and can_open(n, get_attr_value(gm, n.target))]
    if not todo:
        return gm, 0
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph), gm.__class__.__name__)
    new.meta = dict(getattr(gm, "meta", {}))
    by_target = {n.target: n for n in new.graph.nodes if n.op == "call_module"}
    for target in todo:
        _open_one(new, by_target[target], get_attr_value(new, target))
    new.graph.eliminate_dead_code()
    new.graph.lint()
    new.delete_all_unused_submodules()
    new.recompile()
    new.train(False)
    try:
        with torch.no_grad():
            propagate_shapes(new, inputs)
    except Exception:  # noqa: BLE001 - inputs the graph cannot run: leave the leaves closed
        return gm, 0
    return new, len(todo)
