"""Recognizing a plain self-attention ``nn.MultiheadAttention`` leaf call, and the ``nn.Linear``
that holds its projection weights: shared by the two rewrites that open such a call (int8's
``decompose_attention`` in passes/quant/attention.py and pruning's ``open_attention`` in
fxopt/prune/attention.py).

``self_attention_blocker`` names what stops a call from being the plain case both rewrites
compute exactly -- query, key and value one value, one packed input projection, no
``bias_k``/``bias_v``, no ``add_zero_attn``, no masks, not causal, the returned attention
weights never read -- or returns None. Each caller adds what its own rewrite needs (int8:
``batch_first`` and ``need_weights=False``; pruning handles both layouts).

    >>> self_attention_blocker(node, gm.get_submodule(node.target))   # None: can be opened
    >>> in_proj = linear_from(mha.in_proj_weight, mha.in_proj_bias)   # the same Parameters
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn

__all__ = ["linear_from", "node_arg", "self_attention_blocker"]


def node_arg(node: fx.Node, pos: int, name: str, default=None):
    """Argument ``name`` of the call ``node``, positional at ``pos`` or by keyword."""
    return node.args[pos] if len(node.args) > pos else node.kwargs.get(name, default)


def self_attention_blocker(node: fx.Node, mod: nn.Module) -> str | None:
    """Why the call ``node`` of ``mod`` is not a plain self-attention call (see the module
    docstring), or None when it is."""
    if not isinstance(mod, nn.MultiheadAttention):
        return "not nn.MultiheadAttention"
    q, k, v = (node_arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
    if not (isinstance(q, fx.Node) and q is k is v):
        return "not self-attention"
    if not mod._qkv_same_embed_dim or mod.in_proj_weight is None:
        return "no packed input projection"
    if mod.bias_k is not None or mod.bias_v is not None or mod.add_zero_attn:
        return "bias_k/bias_v or add_zero_attn"
    for pos, name in ((3, "key_padding_mask"), (5, "attn_mask"), (7, "is_causal")):
        if node_arg(node, pos, name) not in (None, False):
            return name
    for user in node.users:  # only item 0 (the output) may be used, never the weights
        if not (user.op == "call_function" and user.target is operator.getitem
                and (user.args[1] == 0 or not user.users)):
            return "its attention weights are read"
    return None


def linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An eval-mode ``nn.Linear`` holding ``weight``/``bias`` themselves (a module's own
    parameters, not copies)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
    if bias is not None:
        lin.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
    return lin.eval()
