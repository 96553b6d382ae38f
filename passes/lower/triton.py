"""``lower_to_triton``: fused float ops and the int8 IR onto fxopt's Triton kernels (CUDA).

The lowering is a table, ``RULES``: one row per source op and case, named
``"<source> -> <kernel>"``, run by the rewrite engine (``fxopt.infra.rewrite``), which tries the
rows in order at each op and rewrites it with the first whose check passes. A row reads the
source's arguments through its op view, prepares the weight once into the layout its kernel
reads (a new buffer of the module, shared by every op reading that weight), and writes the
kernel op by name through its schema (``fxopt.ops.triton``, ``fxopt.ops.triton_int8``),
grids as plain numbers:

    source (fxopt., nn., operator.) kernel (fxopt.)                  weight as
    conv2d_act, depthwise           triton_depthwise_conv2d          [KH*KW, C]
    conv2d_act                      triton_conv2d                    channels-last
    linear_act                      triton_linear                    [N, K], contiguous
    Conv2d (depthwise), Conv2d      the same two, act="none"
    Linear                          triton_linear
    a + b, float, one dtype         triton_add(a, b)                 (b broadcasts to a, or swapped)
    a * b, float, one dtype         triton_mul(a, b)                 (the same; SE gates x * gate)
    act(triton_add(a, b))           triton_add(a, b, act=...)        (the activation fused)
    act(triton_mul(a, b))           triton_mul(a, b, act=...)        (the activation fused)
    add_layer_norm, width <= 16384  triton_add_layer_norm            (one program per row)
    quantize(x, s, zp, lo, hi)      triton_quantize(x, float(s), int(zp), lo, hi)
    dequantize(q, s, zp)            triton_dequantize(q, float(s), int(zp))
    conv2d_int8, depthwise          triton_depthwise_conv2d_int8     [KH*KW, C]
    conv2d_int8                     triton_conv2d_int8               channels-last, column sums
    linear_int8                     triton_linear_int8               [N, K], column sums
    add_int8                        triton_add_int8
    max_pool2d_int8, pad <= k/2     triton_max_pool2d_int8
    adaptive_avg_pool2d_int8, 1x1   triton_global_avg_pool2d_int8

("depthwise": ``groups`` equal to the input and output channels, one input channel per group.)
A case a kernel cannot take is ``m.reject(why)`` in its row's check: the op stays on PyTorch
and the notes say why. A new kernel is a row: ``_row(SOURCE, TRITON_KERNEL, values, check)``
(``SOURCE``: an fxopt op, an ``nn.Module`` type or a PyTorch function such as ``operator.add``);
its stats key is the kernel's name without ``triton_``.

The convolution kernels write channels-last outputs, so activations stay NHWC from the graph's
entry (``fuse_act`` puts the one conversion there) to its exit, and int8 codes flow between
quantized layers; ``stats["layout_copies"]`` counts the kernel inputs that would still need a
conversion. The residual adds and the pooling of an int8 CNN run on the codes too (one pass
each, outputs channels-last); a float residual add that ``fuse_act`` could not fold into a
convolution (after an activation, a broadcast operand) is one kernel, its activation fused; so
is a float product of two tensors (a squeeze-excitation gate ``x * gate``, gate ``[N, C, 1, 1]``).
Ops with no row (``cat_int8``, ``conv1d_act``, float pooling, ...) stay on PyTorch; the notes
name each of them.

Reference (DESIGN.md section 4): the graph before the pass. Float graphs must equal it to the
output dtype's tolerance (fp16/bf16 1e-2, fp32 1e-5, TF32 where PyTorch allows it); int8 graphs
within one quantization step of the output (the epilogue's float rounding may differ at ties).

Runs for ``target="cuda"``; on the CPU only with ``FXOPT_TRITON_ON_CPU=1`` (the kernels then run
in Triton's interpreter: tests, CI). Worked example, ``tests/passes/lower/test_triton.py``'s
``Net`` (conv-bn-relu, a residual block, depthwise + pointwise, max pool, a plain Linear)::

    FXOPT_TRITON_ON_CPU=1 python -c "import fxopt; fxopt.optimize(m, x, target='cpu',
        passes=['lower_to_triton'])"
    # stats: {'conv2d': 3, 'depthwise_conv2d': 1, 'linear': 1, 'on_pytorch': 2,
    #         'layout_copies': 0, 'device': 'cpu (Triton interpreter)'}
    # notes: ['left on PyTorch (no Triton kernel): MaxPool2d x1, adaptive_avg_pool2d x1']
"""
from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from fxopt.infra.preconditions import EVAL_MODE
from fxopt.infra.registry import PassContext, PassResult, register_pass
from fxopt.infra.rewrite import Builder, Match, Rule, apply_rules, call, module, op_rule
from fxopt.ir.activations import CAPTURE_FORMS
from fxopt.ir.graph import add_buffer, get_attr_value, tensor_meta
from fxopt.ops.fused import ADD_LAYER_NORM, CONV2D_ACT, LINEAR_ACT, FusedLayer
from fxopt.ops.int8 import (ADD_INT8, AVGPOOL_INT8, CONV2D_INT8, DEQUANTIZE, LINEAR_INT8,
                            MAXPOOL_INT8, QUANTIZE, AddInt8, AvgPool2dInt8, Dequantize, Int8Layer,
                            MaxPool2dInt8, Quantize)
from fxopt.ops.schema import OpSchema
from fxopt.ops.triton import (TRITON_ADD, TRITON_ADD_LAYER_NORM, TRITON_CONV2D,
                              TRITON_DEPTHWISE_CONV2D, TRITON_LINEAR, TRITON_MUL, triton_on_cpu)
from fxopt.ops.triton_int8 import (TRITON_ADD_INT8, TRITON_CONV2D_INT8,
                                   TRITON_DEPTHWISE_CONV2D_INT8, TRITON_DEQUANTIZE,
                                   TRITON_GLOBAL_AVG_POOL2D_INT8, TRITON_LINEAR_INT8,
                                   TRITON_MAX_POOL2D_INT8, TRITON_QUANTIZE)
from fxopt.passes.fusion.fuse_act import act_spec
from fxopt.passes.lower.triton_report import layout_copies, left_on_pytorch, op_name, user_name
from fxopt.quant.measure import output_step

__all__ = ["lower_to_triton", "triton_available", "RULES", "TritonLowering"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def triton_available() -> bool:
    """Whether Triton imports here (the kernels need it; the ops' CPU fallback does not)."""
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


@dataclass
class TritonLowering:
    """What the rows share (``m.context``): the weights prepared so far, one buffer per
    (weight, layout), so that a weight several ops read is prepared once."""

    prepared: dict[tuple[str, str], str] = field(default_factory=dict)

    def buffer(self, b: Builder, src: str, layout: str, make: Callable) -> fx.Node:
        """A get_attr of ``make(weight)``, registered once per (weight ``src``, ``layout``)."""
        target = self.prepared.get((src, layout))
        if target is None:
            w = get_attr_value(b.gm, src).detach()
            target = add_buffer(b.gm, f"{src.replace('.', '_')}_{layout}_", make(w))
            self.prepared[(src, layout)] = target
        return b.get_attr(target)


# The weight preparations live in fxopt.triton_kernels, which imports Triton: the rows import
# them when they fire, so that this module (and the pass registry) imports without Triton.


# -- reading the graph --------------------------------------------------------------------------
def _dtype(node):
    return getattr(tensor_meta(node), "dtype", None)


def _is_const(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def _scalar(m: Match, node: fx.Node, cast):
    return cast(get_attr_value(m.gm, node.target).item())


def _skip(m: Match, why: str) -> bool:
    """Reject the match; the note names the op and the user's module."""
    return m.reject(f"{op_name(m.root)} ({user_name(m.root)}): {why}")


# -- float layers: fused ops, and the nn.Conv2d / nn.Linear calls fuse_act left ----------------
def _float_layer(m: Match) -> bool:
    """The float layer has a constant weight of a dtype the kernels take. Its arguments, by the
    kernels' parameter names, go to ``m.data["call"]`` (a module's weight and bias as attribute
    names: read only when the row fires)."""
    n = m.root
    if n.op == "call_module":
        if len(n.args) != 1 or n.kwargs or not isinstance(n.args[0], fx.Node):
            return False  # not a plain call of the layer: nothing to lower, nothing to say
        mod = get_attr_value(m.gm, n.target)
        call: dict[str, Any] = {"x": n.args[0], "weight": f"{n.target}.weight",
                                "bias": None if mod.bias is None else f"{n.target}.bias"}
        if isinstance(mod, nn.Conv2d):
            if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
                return _skip(m, f"padding {mod.padding!r}, padding_mode {mod.padding_mode!r}")
            call.update(stride=mod.stride, padding=mod.padding, dilation=mod.dilation,
                        groups=mod.groups)
    else:
        call = dict(FusedLayer.of(n).values)
    weight, ndim = call["weight"], 4 if "groups" in call else 2
    src = weight if isinstance(weight, str) else weight.target if _is_const(weight) else None
    w = None if src is None else get_attr_value(m.gm, src)
    if w is None or w.dim() != ndim:
        return _skip(m, f"weight is not a constant {ndim}-D tensor")
    if w.dtype not in _FLOATS or _dtype(call["x"]) not in (w.dtype, None):
        return _skip(m, f"dtype {w.dtype} (the kernels take fp16, bf16, fp32)")
    m.data.update(call=call, w=w, src=src)
    return True


def _depthwise(m: Match) -> bool:
    """One input channel per group, as many groups as input and output channels."""
    call, w = m.data["call"], m.data["w"]
    tm = tensor_meta(call["x"])
    c_in = tm.shape[1] if tm is not None else None
    groups = call["groups"]
    return groups > 1 and groups == w.shape[0] == c_in and w.shape[1] == 1


def _float_args(m: Match, b: Builder) -> dict[str, Any]:
    call = dict(m.data["call"])
    if isinstance(call["bias"], str):
        call["bias"] = b.get_attr(call["bias"])
    return call


def _conv_values(m: Match, b: Builder) -> dict[str, Any]:
    from fxopt.triton_kernels import prepare_conv_weight

    weight = m.context.buffer(b, m.data["src"], "nhwc", prepare_conv_weight)
    return {**_float_args(m, b), "weight": weight}


def _depthwise_values(m: Match, b: Builder) -> dict[str, Any]:
    from fxopt.triton_kernels import prepare_depthwise_weight

    args, w = _float_args(m, b), m.data["w"]
    del args["groups"]  # the kernel's weight layout says it: one channel per group
    weight = m.context.buffer(b, m.data["src"], "dw", prepare_depthwise_weight)
    return {**args, "weight": weight, "kernel_size": [w.shape[2], w.shape[3]]}


def _linear_values(m: Match, b: Builder) -> dict[str, Any]:
    args = _float_args(m, b)
    if not m.data["w"].is_contiguous():
        args["weight"] = m.context.buffer(b, m.data["src"], "nk", lambda t: t.contiguous())
    elif isinstance(args["weight"], str):
        args["weight"] = b.get_attr(args["weight"])
    return args


# -- float residual adds and gate products: a + b, a * b (what fuse_act could not fold) ----------
def _nhwc(tm) -> bool:
    """Whether recorded tensor metadata ``tm`` is channels-last 4-D memory."""
    return len(tm.shape) == 4 and torch.empty_strided(
        tuple(tm.shape), tuple(tm.stride), device="meta").is_contiguous(
            memory_format=torch.channels_last)


# how the notes say what the kernel does: operator -> (verb, symbol)
_FLOAT_BINARY = {operator.add: ("adds", "+"), operator.mul: ("multiplies", "*")}


def _float_binary_fits(m: Match) -> bool:
    """Two tensors of one float dtype, one of them of the output's shape: it is ``a`` (``b``
    broadcasts to it; ``+`` and ``*`` commute exactly, so the operands may swap), the
    channels-last one if only one is (the output takes ``a``'s layout: NHWC stays NHWC between
    the convolutions)."""
    n = m.root
    verb, symbol = _FLOAT_BINARY[n.target]
    if len(n.args) != 2 or n.kwargs or not all(isinstance(v, fx.Node) for v in n.args):
        return False  # a number added or multiplied, or not a plain call: nothing to say
    (x, y), (tx, ty), out = n.args, (tensor_meta(v) for v in n.args), tensor_meta(n)
    if tx is None or ty is None or out is None:
        return False  # not tensors (shape arithmetic)
    if tx.dtype not in _FLOATS or ty.dtype not in _FLOATS:
        return _skip(m, f"dtypes {tx.dtype}, {ty.dtype} (the kernel {verb} fp16, bf16, fp32)")
    if tx.dtype != ty.dtype:
        return _skip(m, f"dtypes {tx.dtype} and {ty.dtype} (the kernel {verb} one dtype)")
    if tuple(tx.shape) == tuple(out.shape) and not (_nhwc(ty) and not _nhwc(tx)
                                                    and tuple(ty.shape) == tuple(out.shape)):
        m.data["ab"] = (x, y)
    elif tuple(ty.shape) == tuple(out.shape):
        m.data["ab"] = (y, x)
    else:
        return _skip(m, f"both operands broadcast ({tuple(tx.shape)} {symbol} "
                        f"{tuple(ty.shape)})")
    return True


def _float_binary_values(m: Match, b: Builder) -> dict[str, Any]:
    a, other = m.data["ab"]
    return {"a": a, "b": other}


# -- the residual add and LayerNorm of a transformer block: add_layer_norm -----------------------
_MAX_ROW = 16384  # fxopt.triton_kernels.norm.MAX_N (that module imports Triton)


def _add_layer_norm_fits(m: Match) -> bool:
    """fp16/bf16/fp32 operands of one dtype, affine parameters of that dtype or float32, rows
    of at most ``_MAX_ROW`` elements (one block per row)."""
    v = ADD_LAYER_NORM.view.of(m.root)
    tx, tr = tensor_meta(v.x), tensor_meta(v.residual)
    if tx is None or tr is None:
        return False
    if tx.dtype not in _FLOATS or tr.dtype != tx.dtype:
        return _skip(m, f"dtypes {tx.dtype}, {tr.dtype} (the kernel takes one of fp16, bf16, "
                        f"fp32)")
    for p in (v.weight, v.bias):
        if p is not None and _dtype(p) not in (tx.dtype, torch.float32):
            return _skip(m, f"affine parameter of dtype {_dtype(p)}")
    n = math.prod(v.normalized_shape)
    if n > _MAX_ROW:
        return _skip(m, f"rows of {n} elements (the kernel takes up to {_MAX_ROW})")
    return True


def _add_layer_norm_values(m: Match, b: Builder) -> dict[str, Any]:
    return dict(ADD_LAYER_NORM.view.of(m.root).values)


_act = call("act", *(row.canonical for row in CAPTURE_FORMS.values()), torch.clamp)


def _act_rule(kernel: OpSchema) -> Rule:
    """``act(kernel(a, b))`` -> ``kernel(a, b, act=...)``: the activation after a lowered float
    add or product with none yet, one the kernel's epilogue runs (its row fired first, in graph
    order)."""
    from_kernel = call("op", kernel.overload)

    def fits(m: Match) -> bool:
        from fxopt.triton_kernels.epilogue import act_code

        if kernel.view.of(m.nodes["op"]).act != "none":
            return False
        spec = act_spec(m.nodes["act"])
        if isinstance(spec, str):
            return _skip(m, f"not fused into {kernel.name}: {spec}")
        try:
            act_code(*spec)
        except ValueError as e:
            return _skip(m, str(e))
        m.data["act"] = spec
        return True

    def replace(m: Match, b: Builder) -> fx.Node:
        act, act_args = m.data["act"]
        return kernel.view.of(m.nodes["op"]).emit(b, act=act, act_args=act_args)

    return Rule(f"act({kernel.name}) -> {kernel.name}", lambda x: _act(from_kernel(x)), replace,
                fits)


# -- int8 layers --------------------------------------------------------------------------------
def _int8_layer(m: Match) -> bool:
    v = Int8Layer.of(m.root)
    grids = (v.w_q, v.w_scale, v.x_scale, v.x_zp, v.y_scale, v.y_zp)
    if not all(_is_const(g) for g in grids) or (v.bias is not None and not _is_const(v.bias)):
        return _skip(m, "weights or grids are not constants")
    m.data.update(call=dict(v.values), w=get_attr_value(m.gm, v.w_q.target), src=v.w_q.target)
    return True


def _int8_args(m: Match) -> dict[str, Any]:
    v = Int8Layer.of(m.root)
    return {**v.values, "x_scale": _scalar(m, v.x_scale, float),
            "x_zp": _scalar(m, v.x_zp, int), "y_scale": _scalar(m, v.y_scale, float),
            "y_zp": _scalar(m, v.y_zp, int)}


def _conv_int8_values(m: Match, b: Builder) -> dict[str, Any]:
    from fxopt.triton_kernels import prepare_conv_weight, weight_colsum

    w_q = m.context.buffer(b, m.data["src"], "nhwc", prepare_conv_weight)
    colsum = m.context.buffer(b, m.data["src"], "colsum", weight_colsum)
    return {**_int8_args(m), "w_q": w_q, "w_colsum": colsum}


def _depthwise_int8_values(m: Match, b: Builder) -> dict[str, Any]:
    from fxopt.triton_kernels import prepare_depthwise_weight

    args, w = _int8_args(m), m.data["w"]
    del args["groups"]
    w_q = m.context.buffer(b, m.data["src"], "dw", prepare_depthwise_weight)
    return {**args, "w_q": w_q, "kernel_size": [w.shape[2], w.shape[3]]}


def _linear_int8_values(m: Match, b: Builder) -> dict[str, Any]:
    from fxopt.triton_kernels import weight_colsum

    args = {**_int8_args(m), "w_colsum": m.context.buffer(b, m.data["src"], "colsum",
                                                          weight_colsum)}
    if not m.data["w"].is_contiguous():
        args["w_q"] = m.context.buffer(b, m.data["src"], "nk", lambda t: t.contiguous())
    return args


# -- int8 between the layers: grids, residual adds, pooling -------------------------------------
def _quantize_fits(m: Match) -> bool:
    v = Quantize.of(m.root)
    if not (_is_const(v.scale) and _is_const(v.zp)):
        return _skip(m, "grid is not a constant")
    if _dtype(v.x) not in _FLOATS + (None,):
        return _skip(m, f"input dtype {_dtype(v.x)}")
    return True


def _quantize_values(m: Match, b: Builder) -> dict[str, Any]:
    v = Quantize.of(m.root)
    return {**v.values, "scale": _scalar(m, v.scale, float), "zp": _scalar(m, v.zp, int)}


def _dequantize_fits(m: Match) -> bool:
    v = Dequantize.of(m.root)
    return (_is_const(v.scale) and _is_const(v.zp)) or _skip(m, "grid is not a constant")


def _dequantize_values(m: Match, b: Builder) -> dict[str, Any]:
    v = Dequantize.of(m.root)
    return {"q": v.q, "scale": _scalar(m, v.scale, float), "zp": _scalar(m, v.zp, int)}


def _add_fits(m: Match) -> bool:
    from fxopt.triton_kernels.epilogue import act_code

    v = AddInt8.of(m.root)
    if not all(_is_const(g) for g in (v.a_scale, v.a_zp, v.b_scale, v.b_zp, v.y_scale, v.y_zp)):
        return _skip(m, "grids are not constants")
    try:
        act_code(v.act, v.act_args)
    except ValueError as e:
        return _skip(m, str(e))
    ta, tb = tensor_meta(v.a), tensor_meta(v.b)
    if ta is not None and tb is not None and tuple(ta.shape) != tuple(tb.shape):
        try:  # the kernel broadcasts b to a's shape, not a to b's
            same = tuple(torch.broadcast_shapes(ta.shape, tb.shape)) == tuple(ta.shape)
        except RuntimeError:
            same = False
        if not same:
            return _skip(m, f"broadcast of {tuple(ta.shape)} to {tuple(tb.shape)}")
    return True


def _add_values(m: Match, b: Builder) -> dict[str, Any]:
    v = AddInt8.of(m.root)
    grids = {k: _scalar(m, getattr(v, k), float if k.endswith("scale") else int)
             for k in ("a_scale", "a_zp", "b_scale", "b_zp", "y_scale", "y_zp")}
    return {**v.values, **grids}


def _max_pool_fits(m: Match) -> bool:
    v = MaxPool2dInt8.of(m.root)
    if any(p > k // 2 for p, k in zip(v.padding, v.kernel_size)):
        return _skip(m, f"padding {list(v.padding)} over half the kernel {list(v.kernel_size)}")
    return True


def _max_pool_values(m: Match, b: Builder) -> dict[str, Any]:
    v = MaxPool2dInt8.of(m.root)
    return {**v.values, "ceil_mode": bool(v.ceil_mode)}


def _avg_pool_fits(m: Match) -> bool:
    v = AvgPool2dInt8.of(m.root)
    if list(v.output_size) != [1, 1]:
        return _skip(m, f"output size {list(v.output_size)} (the kernel pools to 1x1)")
    if v.y_scale is not None and not (_is_const(v.y_scale) and _is_const(v.y_zp)):
        return _skip(m, "output grid is not a constant")
    return (_is_const(v.scale) and _is_const(v.zp)) or _skip(m, "grid is not a constant")


def _avg_pool_values(m: Match, b: Builder) -> dict[str, Any]:
    v = AvgPool2dInt8.of(m.root)
    own = {} if v.y_scale is None else {"y_scale": _scalar(m, v.y_scale, float),
                                        "y_zp": _scalar(m, v.y_zp, int)}
    return {"q": v.q, "scale": _scalar(m, v.scale, float), "zp": _scalar(m, v.zp, int),
            "qmin": v.qmin, "qmax": v.qmax, **own}


# -- the table ----------------------------------------------------------------------------------
def _row(source: OpSchema | type[nn.Module] | Callable, kernel: OpSchema,
         values: Callable[[Match, Builder], dict[str, Any]],
         check: Callable[[Match], bool] | None = None) -> Rule:
    """Calls of ``source`` (an fxopt op, an ``nn.Module`` type, or a function such as
    ``operator.add``) onto ``kernel`` where ``check`` passes; ``values(m, b)`` are the kernel's
    arguments by name."""

    def replace(m: Match, b: Builder) -> fx.Node:
        b.tally(kernel.name.removeprefix("triton_"))  # the stats key
        return kernel.emit(b, **values(m, b))

    if isinstance(source, OpSchema):
        return op_rule(f"{source.name} -> {kernel.name}", [source.overload], replace, check)
    if not isinstance(source, type):  # a function (capture's canonical form: operator.add)
        return op_rule(f"{source.__name__} -> {kernel.name}", [source], replace, check)
    layer = module(f"{source.__name__} -> {kernel.name}", source)
    return Rule(layer.name, lambda x: layer(x), replace, check)


def _and(*checks: Callable[[Match], bool]) -> Callable[[Match], bool]:
    return lambda m: all(check(m) for check in checks)


RULES = [
    # float (depthwise before the general convolution: the first row that fits is taken)
    _row(CONV2D_ACT, TRITON_DEPTHWISE_CONV2D, _depthwise_values, _and(_float_layer, _depthwise)),
    _row(CONV2D_ACT, TRITON_CONV2D, _conv_values, _float_layer),
    _row(LINEAR_ACT, TRITON_LINEAR, _linear_values, _float_layer),
    _row(nn.Conv2d, TRITON_DEPTHWISE_CONV2D, _depthwise_values, _and(_float_layer, _depthwise)),
    _row(nn.Conv2d, TRITON_CONV2D, _conv_values, _float_layer),
    _row(nn.Linear, TRITON_LINEAR, _linear_values, _float_layer),
    _row(operator.add, TRITON_ADD, _float_binary_values, _float_binary_fits),
    _row(operator.mul, TRITON_MUL, _float_binary_values, _float_binary_fits),
    _row(ADD_LAYER_NORM, TRITON_ADD_LAYER_NORM, _add_layer_norm_values, _add_layer_norm_fits),
    # int8
    _row(QUANTIZE, TRITON_QUANTIZE, _quantize_values, _quantize_fits),
    _row(DEQUANTIZE, TRITON_DEQUANTIZE, _dequantize_values, _dequantize_fits),
    _row(CONV2D_INT8, TRITON_DEPTHWISE_CONV2D_INT8, _depthwise_int8_values,
         _and(_int8_layer, _depthwise)),
    _row(CONV2D_INT8, TRITON_CONV2D_INT8, _conv_int8_values, _int8_layer),
    _row(LINEAR_INT8, TRITON_LINEAR_INT8, _linear_int8_values, _int8_layer),
    _row(ADD_INT8, TRITON_ADD_INT8, _add_values, _add_fits),
    _row(MAXPOOL_INT8, TRITON_MAX_POOL2D_INT8, _max_pool_values, _max_pool_fits),
    _row(AVGPOOL_INT8, TRITON_GLOBAL_AVG_POOL2D_INT8, _avg_pool_values, _avg_pool_fits),
    # epilogue: an activation after a lowered add or product
    _act_rule(TRITON_ADD),
    _act_rule(TRITON_MUL),
]


# -- the pass -----------------------------------------------------------------------------------
def _candidates(gm: fx.GraphModule) -> bool:
    """Whether any row's source op is in the graph."""
    return any(rule.root.node_ok(n, gm) for n in gm.graph.nodes for rule in RULES)


@register_pass("lower_to_triton", requires=(EVAL_MODE,), reference="returned",
               after=("fuse_act", "quantize_int8"), batch_check=True)
def lower_to_triton(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Fused and int8 ops onto fxopt's Triton kernels (target='cuda'), weights prepared once."""
    if not _candidates(gm):
        return PassResult(gm, modified=False)
    if ctx.target != "cuda" and not triton_on_cpu():
        return PassResult(gm, modified=False, notes=[
            f"target is {ctx.target}: nothing to do (FXOPT_TRITON_ON_CPU=1 runs the Triton "
            f"kernels in the interpreter on the CPU, for tests)"])
    if not triton_available():
        return PassResult(gm, modified=False, notes=["Triton is not installed: the fused and "
                                                     "int8 ops stay on PyTorch"])
    reference = copy.deepcopy(gm)
    step = output_step(gm)
    result = apply_rules(gm, RULES, context=TritonLowering())
    if result.count == 0:  # every candidate was rejected (or none fit): the graph is as it was
        return PassResult(gm, modified=False, notes=["no op could be lowered: " + "; ".join(
            result.rejected)] if result.rejected else [])
    copies, left = layout_copies(gm), left_on_pytorch(gm)
    notes = []
    if result.rejected:
        notes.append("not lowered (no kernel for this case): " + "; ".join(result.rejected))
    if left:
        notes.append("left on PyTorch (no Triton kernel): " +
                     ", ".join(f"{k} x{v}" for k, v in sorted(left.items())))
    if copies:
        notes.append("inputs converted to channels-last on entry: " + ", ".join(copies))
    device = "cuda" if ctx.target == "cuda" else "cpu (Triton interpreter)"
    stats = {**result.tallies, "on_pytorch": sum(left.values()),
             "layout_copies": len(copies), "device": device}
    return PassResult(gm, modified=True, stats=stats, notes=notes, reference=reference,
                      max_abs_tolerance=step * (1 + 1e-4) if step > 0 else None,
                      shapes_changed=True)
