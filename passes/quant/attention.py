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

import math
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxopt.ir.attention import linear_from, node_arg, self_attention_blocker
from fxopt.ir.capture import propagate_shapes
from fxopt.ir.graph import copy_meta, get_attr_value, module_path
from fxopt.ir.share import TensorGuard, copy_sharing_tensors

__all__ = ["decompose_attention", "standard_self_attention", "standard_window_attention",
           "window_attention"]

_RTOL = 1e-4  # float32 rounding: the fused kernel and SDPA sum in different orders


def standard_self_attention(gm: fx.GraphModule, n: fx.Node) -> str | None:
    """Why the ``nn.MultiheadAttention`` call ``n`` is not the standard case, or None when it
    is (see the module docstring): the plain self-attention call (``self_attention_blocker``)
    that is also ``batch_first`` and ``need_weights=False``."""
    m = gm.get_submodule(n.target)
    if node_arg(n, 4, "need_weights", True) is not False:
        return "need_weights"
    why = self_attention_blocker(n, m)
    if why is None and not m.batch_first:
        return "not batch_first"
    return why


def _rewrite(gm: fx.GraphModule, n: fx.Node) -> fx.Node:
    """Decompose the call ``n``; returns the node of the attention output."""
    path, m = str(n.target), gm.get_submodule(n.target)
    h, e = m.num_heads, m.embed_dim
    m.add_module("in_proj", linear_from(m.in_proj_weight, m.in_proj_bias))
    m.out_proj = linear_from(m.out_proj.weight, m.out_proj.bias)  # the plain Linear type
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


# -- torchvision's Swin: shifted_window_attention (an fx-wrapped function) -------------------
def window_attention(qkv: torch.Tensor, relative_position_bias: torch.Tensor,
                     window_size: list[int], num_heads: int, shift_size: list[int],
                     logit_scale: torch.Tensor | None = None,
                     pad_value: torch.Tensor | None = None) -> torch.Tensor:
    """torchvision's ``shifted_window_attention`` (eval mode) between its two projections:
    ``qkv`` is the q/k/v projection of every token ``[B, H, W, 3C]``; returns the attention
    output ``[B, H, W, C]`` before the output projection. Both projections act on each token
    alone, so they commute with the padding, the shift and the window partition: torchvision
    projects the padded windows, here the tokens, and a padded token's projection is its bias
    (``pad_value``; zeros without one), written in where torchvision pads with zeros before
    projecting. Otherwise the same code (BSD-3-Clause, torchvision/models/swin_transformer.py)."""
    B, H, W, C3 = qkv.shape
    C = C3 // 3
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = qkv
    if pad_r or pad_b:
        fill = qkv.new_zeros(C3) if pad_value is None else pad_value.to(qkv.dtype)
        x = fill.expand(B, H + pad_b, W + pad_r, C3).clone()
        x[:, :H, :W] = qkv
    _, pad_H, pad_W, _ = x.shape
    shift_size = list(shift_size)
    if window_size[0] >= pad_H:
        shift_size[0] = 0
    if window_size[1] >= pad_W:
        shift_size[1] = 0
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1],
               window_size[1], C3)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1],
                                            C3)
    n, t = x.size(0), x.size(1)
    qkv_w = x.reshape(n, t, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv_w[0], qkv_w[1], qkv_w[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * (C // num_heads) ** -0.5).matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift_size) > 0:
        mask = x.new_zeros((pad_H, pad_W))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]),
                    (-shift_size[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]),
                    (-shift_size[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                mask[h[0]:h[1], w[0]:w[1]] = count
                count += 1
        mask = mask.view(pad_H // window_size[0], window_size[0], pad_W // window_size[1],
                         window_size[1])
        mask = mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, float(-100.0)).masked_fill(mask == 0, float(0.0))
        attn = attn.view(n // num_windows, num_windows, num_heads, t, t)
        attn = (attn + mask.unsqueeze(1).unsqueeze(0)).view(-1, num_heads, t, t)
    attn = F.softmax(attn, dim=-1)
    x = attn.matmul(v).transpose(1, 2).reshape(n, t, C)
    x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0],
               window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


def _swin_attention():
    try:
        from torchvision.models.swin_transformer import shifted_window_attention
    except ImportError:
        return None
    return shifted_window_attention


def _const_attr(n) -> bool:
    return n is None or (isinstance(n, fx.Node) and n.op == "get_attr")


def standard_window_attention(n: fx.Node) -> str | None:
    """Why the ``shifted_window_attention`` call ``n`` cannot be decomposed, or None."""
    names = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size",
             "num_heads", "shift_size", "attention_dropout", "dropout", "qkv_bias",
             "proj_bias", "logit_scale", "training")
    a = {**dict(zip(names, n.args)), **n.kwargs}
    if a.get("training", True) is not False:
        return "training=True"
    if not all(_const_attr(a.get(k)) for k in ("qkv_weight", "proj_weight", "qkv_bias",
                                                "proj_bias")):
        return "computed projection weights"
    if not isinstance(a.get("input"), fx.Node):
        return "no tensor input"
    return None


def _module_of(gm: fx.GraphModule, attr: fx.Node) -> tuple[str, str]:
    parent, _, leaf = attr.target.rpartition(".")
    return parent, leaf


def _linear_at(gm: fx.GraphModule, weight: fx.Node, bias: fx.Node | None,
               bias_value: torch.Tensor | None = None) -> str:
    """An ``nn.Linear`` at the path of the module that owns ``weight`` (``...attn.qkv``),
    holding its parameters (``bias_value``: another bias, for Swin V2's q/v-only bias)."""
    path, _ = _module_of(gm, weight)
    w = get_attr_value(gm, weight.target)
    b = None if bias is None else get_attr_value(gm, bias.target)
    if bias_value is not None:
        b = nn.Parameter(bias_value, requires_grad=False)
    lin = linear_from(w, b)
    parent, _, leaf = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, lin)
    return path


def _rewrite_window(gm: fx.GraphModule, n: fx.Node) -> str:
    names = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size",
             "num_heads", "shift_size", "attention_dropout", "dropout", "qkv_bias",
             "proj_bias", "logit_scale", "training")
    a = {**dict(zip(names, n.args)), **n.kwargs}
    qkv_bias, logit = a.get("qkv_bias"), a.get("logit_scale")
    bias_value = None
    if logit is not None and qkv_bias is not None:  # V2: no bias on k
        bias_value = get_attr_value(gm, qkv_bias.target).detach().clone()
        third = bias_value.numel() // 3
        bias_value[third:2 * third] = 0
    qkv_path = _linear_at(gm, a["qkv_weight"], qkv_bias, bias_value)
    proj_path = _linear_at(gm, a["proj_weight"], a.get("proj_bias"))
    g = gm.graph
    with g.inserting_before(n):
        qkv = g.call_module(qkv_path, (a["input"],))
        pad = None if qkv_bias is None else g.get_attr(f"{qkv_path}.bias")
        core = g.call_function(window_attention, (qkv, a["relative_position_bias"],
                                                  list(a["window_size"]), a["num_heads"],
                                                  list(a["shift_size"])),
                               {"logit_scale": logit, "pad_value": pad})
        out = g.call_module(proj_path, (core,))
    for new, path in ((qkv, qkv_path), (core, module_path(n)), (out, proj_path)):
        copy_meta(new, n, with_tensor_meta=False)
        new.meta["fxopt_path"] = path
    if pad is not None:
        pad.meta["fxopt_path"] = qkv_path
    n.replace_all_uses_with(out)
    g.erase_node(n)
    return module_path(n) or qkv_path.rpartition(".")[0]


def decompose_attention(gm: fx.GraphModule,
                        example_inputs: tuple) -> tuple[fx.GraphModule, list[str], list[str]]:
    """``gm`` with every standard ``nn.MultiheadAttention`` leaf call decomposed (a copy;
    ``gm`` itself when there is none), checked on ``example_inputs``; the module paths
    decomposed, and notes (calls left whole and why)."""
    swin = _swin_attention()
    calls = [n.name for n in gm.graph.nodes if (n.op == "call_module" and isinstance(
        gm.get_submodule(n.target), nn.MultiheadAttention)) or (
        swin is not None and n.op == "call_function" and n.target is swin)]
    if not calls:
        return gm, [], []
    # The modules and graph copied, the weights shared (the rewrite replaces modules and reads
    # weights, it writes into none; the guard checks): a deep copy was one more copy of the
    # model while the pass ran (issue 15, vit_h_14)
    work = copy_sharing_tensors(gm)
    guard = TensorGuard(gm)
    notes, done = [], []
    for n in [n for n in work.graph.nodes if n.name in calls]:
        if n.op == "call_function":
            why = standard_window_attention(n)
            if why is None:
                done.append(_rewrite_window(work, n))
            else:
                notes.append(f"{module_path(n) or n.name} (shifted_window_attention: {why}) "
                             f"kept whole: its projections stay float")
            continue
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
    guard.check("quantize_int8")
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
