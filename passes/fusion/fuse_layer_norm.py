"""``fuse_add_layer_norm``: a residual add and the LayerNorm that reads it become one op call.

    s = x + r                 ->  t = torch.ops.fxopt.add_layer_norm(x, r, [D], w, b, eps)
    y = layer_norm(s)             s = t[0]; y = t[1]

The transformer block's pattern (ViT, Swin, DeiT: ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``,
each sum read by the next LayerNorm and by the next add; BERT's post-norm ``norm(x + f(x))``).
Both values are outputs, so the sum may have other readers: they read ``t[0]``. The fused call
goes where the add was (every reader of the sum comes after it), so nothing moves past a reader.

Rules (``RULES``): ``add_layer_norm`` (an ``nn.LayerNorm`` module, matched by exact type) and
``add_layer_norm_fn`` (``F.layer_norm``, how timm's LayerNorm traces). A match needs: an add of
two tensors of one floating dtype (no type promotion; a broadcast operand is fine, the op adds as
``+`` does), a plain LayerNorm call over the trailing dims of the sum (``normalized_shape`` a
constant, the LayerNorm has no other argument computed in the graph), ``weight``/``bias``
parameters (``get_attr``) or absent (``elementwise_affine=False``, ``bias=False``). Anything
else is left alone, and a reason is noted where one is useful: a LayerNorm that does not read an
add (a permuted tensor, ConvNeXt's channels-first norm), an add of a number, mixed dtypes.

Where it runs (``fxopt.pipelines.lowering_phase``): before ``lower_to_triton`` (``target="cuda"``,
where the op is one Triton kernel: reads x and r once, writes s and y) and after
``quantize_int8`` (so the quantizer sees the LayerNorms it smooths and the adds it quantizes,
as before). Not on the CPU: there the op would be the same two PyTorch calls.

An add that ``fuse_act`` already folded into a Linear (``linear_act`` with a residual: the MLP's
second Linear in a ViT block; timm's attention projection too) stays there: the GEMM's epilogue
adds it on the way out (then the LayerNorm: 4 passes over the rows after the GEMM, against 5
with the add here). So on a 2-block torchvision ViT, of its 5 LayerNorms (ln_1, ln_2 per
block, the final ln) 3 read an add: the position embedding's and each block's attention
residual::

    >>> fuse_add_layer_norm(gm, ctx).stats
    {'add_layer_norm': 3}

(after ``quantize_int8``, which splits the Linears' residual adds off again, all 5.)
"""
from __future__ import annotations

import numbers
import operator

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxopt.infra.registry import PassContext, PassResult, register_pass
from fxopt.infra.rewrite import Builder, Match, Rule, apply_rules, call, module
from fxopt.ir.graph import get_attr_value, tensor_meta
from fxopt.ops.fused import ADD_LAYER_NORM

__all__ = ["fuse_add_layer_norm", "RULES"]

_add = call("add", operator.add)
_ln_module = module("ln", nn.LayerNorm)
_ln_fn = call("ln", F.layer_norm)
_FN_PARAMS = ("input", "normalized_shape", "weight", "bias", "eps")


def _skip(m: Match, why: str) -> bool:
    return m.reject(f"'{m.root.name}' is not fused with its add: {why}")


def _check_add(m: Match) -> bool:
    """An add of two tensors of one floating dtype, plainly called."""
    add = m.nodes["add"]
    if len(add.args) != 2 or add.kwargs or not all(isinstance(a, fx.Node) for a in add.args):
        return False  # a number added: not a residual
    tx, ty, ts = (tensor_meta(v) for v in (*add.args, add))
    if tx is None or ty is None or ts is None:
        return False
    if not ts.dtype.is_floating_point:
        return False
    if tx.dtype != ty.dtype:
        return _skip(m, f"the add mixes {tx.dtype} and {ty.dtype}")
    return True


def _ln_values(m: Match) -> dict | str:
    """The op's normalized_shape, weight, bias and eps (weight and bias as attribute paths or
    None), or why not."""
    ln = m.nodes["ln"]
    if ln.op == "call_module":
        mod = m.module("ln")
        if type(mod) is not nn.LayerNorm or len(ln.args) != 1 or ln.kwargs:
            return "not a plain nn.LayerNorm call"
        return dict(normalized_shape=list(mod.normalized_shape), eps=float(mod.eps),
                    weight=f"{ln.target}.weight" if mod.weight is not None else None,
                    bias=f"{ln.target}.bias" if mod.bias is not None else None)
    if len(ln.args) > len(_FN_PARAMS) or set(ln.kwargs) - set(_FN_PARAMS[1:]):
        return "unexpected arguments"
    a = {"weight": None, "bias": None, "eps": 1e-5, **dict(zip(_FN_PARAMS, ln.args)),
         **ln.kwargs}
    shape, eps = a.get("normalized_shape"), a["eps"]
    if not (isinstance(shape, (list, tuple)) and all(isinstance(d, int) for d in shape)):
        return "its normalized_shape is computed in the graph"
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool):
        return "its eps is computed in the graph"
    out = dict(normalized_shape=list(shape), eps=float(eps))
    for key in ("weight", "bias"):
        v = a[key]
        if v is not None and not (isinstance(v, fx.Node) and v.op == "get_attr"):
            return f"its {key} is computed in the graph (not a parameter)"
        out[key] = None if v is None else v.target
    return out


def _check(m: Match) -> bool:
    if not _check_add(m):
        return False
    values = _ln_values(m)
    if isinstance(values, str):
        return _skip(m, values)
    ts = tensor_meta(m.nodes["add"])
    shape = values["normalized_shape"]
    if not shape or list(ts.shape[len(ts.shape) - len(shape):]) != shape:
        return _skip(m, f"normalized_shape {shape} is not the trailing dims of {list(ts.shape)}")
    for key in ("weight", "bias"):
        if values[key] is not None:
            p = get_attr_value(m.gm, values[key])
            if list(p.shape) != shape or not p.dtype.is_floating_point:
                return _skip(m, f"its {key} has shape {list(p.shape)}, dtype {p.dtype}")
    m.data["ln"] = values
    return True


def _replace(m: Match, b: Builder) -> fx.Node:
    """The fused call right after the add; the add's other readers read its first output."""
    add, ln, values = m.nodes["add"], m.root, m.data["ln"]
    with b.graph.inserting_before(add.next):
        weight, bias = (None if values[k] is None else b.get_attr(values[k])
                        for k in ("weight", "bias"))
        fused = ADD_LAYER_NORM.emit(b, name=f"{ln.name}_add", x=add.args[0],
                                    residual=add.args[1],
                                    normalized_shape=values["normalized_shape"], weight=weight,
                                    bias=bias, eps=values["eps"])
        total = b.call_function(operator.getitem, (fused, 0), name=f"{add.name}_sum")
        normed = b.call_function(operator.getitem, (fused, 1), name=f"{ln.name}_out")
    fused.meta["tensor_meta"] = (add.meta["tensor_meta"], ln.meta["tensor_meta"])
    fused.meta["fxopt_from"] = [add.name, ln.name]
    for node, src in ((fused, ln), (total, add)):
        node.meta["fxopt_path"] = src.meta.get("fxopt_path", "")
    total.meta["tensor_meta"] = add.meta["tensor_meta"]
    total.meta["fxopt_from"] = [add.name]
    add.replace_all_uses_with(total)  # the LayerNorm itself goes: the engine erases the root
    return normed


RULES = [
    Rule("add_layer_norm", lambda x, y: _ln_module(_add(x, y)), _replace, _check,
         allow_external_users=True, doc="nn.LayerNorm(x + y)"),
    Rule("add_layer_norm_fn", lambda x, y: _ln_fn(_add(x, y)), _replace, _check,
         allow_external_users=True, doc="F.layer_norm(x + y, ...)"),
]


@register_pass("fuse_add_layer_norm", after=("fuse_act", "quantize_int8"),
               before=("lower_to_triton",))
def fuse_add_layer_norm(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """A residual add and the LayerNorm reading it become one add_layer_norm call."""
    result = apply_rules(gm, RULES)
    stats = {"add_layer_norm": result.count} if result.count else {}
    return PassResult(gm, modified=result.count > 0, stats=stats, notes=list(result.notes))

