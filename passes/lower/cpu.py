"""``lower_int8_cpu``: the int8 IR onto PyTorch's quantized CPU kernels (x86 / fbgemm / onednn).

``quantize_int8`` writes device-neutral ops that carry int8 codes between layers
(``fxopt.ops.int8``). On ``target="cpu"`` this pass maps each onto PyTorch's quantized kernels,
with quantized tensors (``torch.quint8``: the grid travels with the tensor) flowing between
them, weights prepacked once into attributes of the module. The lowering is a table, ``RULES``:
one row per IR op (and case), run by the rewrite engine (``fxopt.infra.rewrite``), which tries
the rows in order at each op and rewrites it with the first whose check passes:

    row                       an fxopt op ...                       becomes
    quantize                  quantize(x, s, zp, 0, 255)            quantize_per_tensor(x, s, zp)
    dequantize                dequantize(q, s, zp)                  q.dequantize()
    conv2d_int8               conv2d_int8(q, ..., act="relu")       quantized.conv2d_relu(q,
                                                                      packed, s_y, zp_y)
                              conv2d_int8(q, ..., act="relu6")      quantized.conv2d(...), then
                                                                      clamp(0, 6)
    linear_int8               linear_int8(q, ...)                   quantized.linear(_relu)(...)
    add_int8                  add_int8(a, ..., b, ..., act="relu")  quantized.add_relu(a, b, ...)
    mul_int8                  mul_int8(a, ..., b, ..., act="none")  quantized.mul(a, b, ...)
                              (broadcasting: an SE gate [N, C, 1, 1]; within one code of the IR)
    adaptive_avg_pool2d_int8  adaptive_avg_pool2d_int8(q, size, ..) F.adaptive_avg_pool2d(q, ..)
                              (on its own grid, y_scale=: quantize_per_tensor(F.adaptive_avg_
                              pool2d(q.dequantize(), ..), s_y, zp_y), the IR's arithmetic)
    avg_pool2d_int8           avg_pool2d_int8(q, k, s, p, ceil, ..) F.avg_pool2d(q, k, s, ...)
                              (bit for bit on channels-last codes; contiguous ones round a tie
                              after adding the zero point: within one code)
    max_pool2d_int8           max_pool2d_int8(q, k, s, p, d, ceil)  F.max_pool2d(q, k, s, ...)
    upsample_nearest2d_int8   upsample_nearest2d_int8(q, size, sf,  F.interpolate(q, size, sf,
                                ...)                                  mode="nearest")
                              (bit for bit, but for a scale factor in (1, 1.5) or (2, 2.5): see
                              the reference row)
    cat_int8                  cat_int8(qs, ..., dim, s_y, zp_y)     quantized.cat(qs, dim, ...)
    conv2d_int8_onednn        conv2d_int8(q, ..., act="hardswish")  fxopt.onednn_conv2d_int8(
                                                                      q.int_repr(), ...), codes
                                                                      wrapped as quint8 again
    linear_int8_onednn        linear_int8(q, ..., act="gelu")       fxopt.onednn_linear_int8(..)
                              (every activation: the ``onednn_int8`` column's post-op, else
                              sigmoid, hardsigmoid, tanh, ... on the kernel's float32 output,
                              then quantized: the layer stays int8)
    codes_of_wrapped_codes    wrap(codes, s, zp).int_repr()         codes (oneDNN to oneDNN)
    int8_layer_reference      a conv2d_int8 / linear_int8 no kernel row took: the fxopt op on the
                              dequantized input, requantized (exact: dequantizing and requantizing
                              on one grid is the identity)
    add_int8_reference        an add_int8 no kernel row took: the fxopt op on the codes
                              (``int_repr``), wrapped as a quantized tensor
    mul_int8_reference        likewise a mul_int8 (an activation quantized.mul does not fuse)
    upsample_nearest2d_int8_reference
                              an upsample_nearest2d_int8 whose scale factor PyTorch's quantized
                              kernel indexes unlike its float one (it lacks the float kernel's
                              exact cases for a kept or doubled size): the float F.interpolate
                              on the dequantized input, requantized (exact)

Which epilogues the kernels take comes from the activation table
(``ACTIVATIONS[act].quantized_cpu``: "fused" is ``quantized.conv2d_relu``, "clamp" is a clamp
after the kernel, exact on the codes; ``onednn_int8``: the post-ops of oneDNN's int8 kernels,
``fxopt.ops.cpu``, for hardswish, SiLU, GELU, ...); an epilogue none of them has (a float
residual, a float output, sigmoid) is what the kernel rows ``reject`` and the reference rows after
them take. The
report names each op run as the reference. Flatten and reshape run on quantized tensors
unchanged. A new op is a row: ``op_rule(name, [SCHEMA.overload], replace, check)`` reading the
op's arguments through its view (``Conv2dInt8.of(m.root).x_scale``).

The pass's reference is the int8 graph before it run in lockstep with the lowered graph
(``fxopt.passes.lower.lockstep``), which the engine's ``rewrites`` (IR node -> lowered node)
make possible. Worked example (``tests/passes/lower/test_cpu.py``'s ``Net``: conv-relu, a
residual block, global average pooling, a linear layer)::

    >>> lower_int8_cpu(int8_graph, ctx).stats
    {'quantize': 1, 'conv2d': 2, 'add': 1, 'pool': 1, 'linear': 1, 'dequantize': 1,
     'fallback': 0, 'engine': 'x86', 'tie_flips': 0}
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxopt.infra.preconditions import EVAL_MODE
from fxopt.infra.registry import PassContext, PassResult, register_pass
from fxopt.infra.rewrite import Builder, Match, Rule, apply_rules, call, method, op_rule
from fxopt.ir.activations import ACTIVATIONS
from fxopt.ir.graph import copy_meta, get_attr_value, module_path, tensor_meta
from fxopt.ops.int8 import (ADD_INT8, AVG_POOL2D_INT8, AVGPOOL_INT8, CAT_INT8, CONV2D_INT8,
                            DEQUANTIZE, INT8_IR_OPS, LINEAR_INT8, MAXPOOL_INT8, MUL_INT8, QUANTIZE,
                            UPSAMPLE_NEAREST2D_INT8, AvgPool2dInt8, AvgPool2dWindowInt8,
                            BinaryInt8, CatInt8, Dequantize, Int8Layer, MaxPool2dInt8, Quantize,
                            UpsampleNearest2dInt8)
from fxopt.ops import onednn
from fxopt.ops.cpu import ONEDNN_CONV2D_INT8, ONEDNN_LINEAR_INT8
from fxopt.ops.schema import OpView, schema_of, view_of
from fxopt.passes.lower.lockstep import LockstepReference
from fxopt.quant.config import QuantConfig
from fxopt.quant.measure import output_step

__all__ = ["lower_int8_cpu", "quantized_engine_available", "LockstepReference", "RULES",
           "CpuLowering", "SMALL_MACS"]

# A layer with at most this many MACs per call is "small" (the digits model's are 0.1-0.3M;
# a ResNet-18 layer at 224x224 has 100M+).
SMALL_MACS = 2_000_000
_UINT8 = (0, 255)  # PyTorch's quint8: the only activation grid its x86 kernels take


def quantized_engine_available() -> bool:
    """Whether PyTorch's quantized CPU kernels (fbgemm / x86 / onednn) can run here."""
    try:
        return torch.backends.quantized.engine in ("x86", "fbgemm", "onednn")
    except RuntimeError:
        return False


@contextlib.contextmanager
def _quiet():
    """PyTorch deprecates quantized tensor creation (the kernels stay) with a warning it prints
    once per process: the pass creates quantized tensors under this, so the user never sees it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
        yield


@contextlib.contextmanager
def _engine(name: str | None):
    """Pack under quantized engine ``name`` (the packed params keep their implementation)."""
    before = torch.backends.quantized.engine
    if name and name != before and name in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def _auto_engine(n: fx.Node, w_q: torch.Tensor, groups: int = 1) -> str | None:
    """The engine to pack ``n``'s weights with: fbgemm for tiny dense layers (its per-call cost
    is lower: the digits model at batch 1 ran 0.22 ms against 0.28 ms with x86), else PyTorch's
    own choice (``x86``: oneDNN or fbgemm by its heuristics; faster on ResNet-scale layers, 4.2
    ms against 5.7 ms for resnet18 at batch 1; both measured on the 2-core CPU machine).
    Grouped and depthwise convolutions are tiny in MACs but not in time: under fbgemm
    shufflenet_v2_x1_0's int8 ran 571 ms against 346 ms under x86 and torch.ao's 373 ms (bs 1,
    1 thread, interleaved, load average 15), so they take PyTorch's choice."""
    tm = tensor_meta(n)
    shape = tuple(getattr(tm, "shape", ()) or ())
    if "fbgemm" not in torch.backends.quantized.supported_engines or len(shape) < 2 \
            or groups != 1:
        return None
    rows = 1
    for d in (shape[:1] + shape[2:]) if len(shape) == 4 else shape[:-1]:
        rows *= int(d)
    return "fbgemm" if rows * w_q.numel() <= SMALL_MACS else None


def _reads_lowered(value, method: str) -> bool:
    return isinstance(value, fx.Node) and value.op == "call_method" and value.target == method


def is_reference_call(node: fx.Node) -> bool:
    """Whether ``node`` is an fxopt reference call a fallback row wrote: an int8 layer on a
    dequantized quantized tensor, or an int8 add or mul on the codes of quantized tensors (not
    an IR op to lower again, in this run or a later one)."""
    v = Int8Layer.match(node)
    if v is not None:
        return _reads_lowered(v.x, "dequantize")
    v = BinaryInt8.match(node)
    return v is not None and _reads_lowered(v.a, "int_repr")


@dataclass
class CpuLowering:
    """What the rows share (``m.context``): the engine to pack weights with (``QuantConfig``'s
    ``cpu_engine``) and the user's names of the ops run as the fxopt reference (for the
    report). The reference calls are not IR ops to lower again (``skip``)."""

    engine: str = "auto"
    fallback: list[str] = field(default_factory=list)

    def skip(self, node: fx.Node) -> bool:
        return is_reference_call(node)


def _who(n: fx.Node) -> str:
    return module_path(n) or n.name


def _const(m: Match, node: fx.Node):
    return get_attr_value(m.gm, node.target)


def _grid(m: Match, scale: fx.Node, zp: fx.Node) -> tuple[float, int]:
    """A grid's scale and zero point as the numbers PyTorch's kernels take."""
    return float(_const(m, scale)), int(_const(m, zp))


def _is_codes(node) -> bool:
    """Whether ``node`` carries int8 codes (a quantized tensor once lowered): its meta says so."""
    return getattr(tensor_meta(node), "dtype", None) in (torch.uint8, torch.quint8)


def _quantized_cpu(act: str) -> str | None:
    row = ACTIVATIONS.get(act)
    return None if row is None else row.quantized_cpu


def _kernel(kind: str, act: str):
    """``quantized.<kind>``, or ``quantized.<kind>_<act>`` where the kernel fuses ``act``."""
    fused = act != "none" and _quantized_cpu(act) == "fused"
    return getattr(torch.ops.quantized, f"{kind}_{act}" if fused else kind)


def _reject(m: Match, why: str) -> bool:
    return m.reject(f"{schema_of(m.root.target).name} ({_who(m.root)}): {why}")


# -- quantize, dequantize, pooling, cat: one call each -----------------------------------------
def _uint8(m: Match, lo: int, hi: int) -> bool:
    return (lo, hi) == _UINT8 or _reject(m, f"grid [{lo}, {hi}] (the kernels take quint8 only)")


def _uint8_grid(view: type[OpView], qmin: str, qmax: str):
    """A check: the op's ``qmin``/``qmax`` arguments are PyTorch's quint8 grid."""

    def check(m: Match) -> bool:
        v = view.of(m.root)
        return _uint8(m, v.get(qmin), v.get(qmax))

    return check


def _quantize(m: Match, b: Builder) -> fx.Node:
    v = Quantize.of(m.root)
    b.tally("quantize")
    return b.call_function(torch.quantize_per_tensor, (v.x, *_grid(m, v.scale, v.zp),
                                                       torch.quint8))


def _dequantize(m: Match, b: Builder) -> fx.Node:
    b.tally("dequantize")
    return b.call_method("dequantize", (Dequantize.of(m.root).q,))


def _avg_pool(m: Match, b: Builder) -> fx.Node:
    v = AvgPool2dInt8.of(m.root)
    b.tally("pool")
    if v.y_scale is None:  # on its input's grid: PyTorch's quantized pooling keeps it
        return b.call_function(F.adaptive_avg_pool2d, (v.q, list(v.output_size)))
    # onto its own grid: the float average of the dequantized codes, quantized once (the IR's
    # arithmetic; a quantized pool then a requantize would round twice)
    y = b.call_function(F.adaptive_avg_pool2d, (b.call_method("dequantize", (v.q,)),
                                                list(v.output_size)))
    return b.call_function(torch.quantize_per_tensor, (y, *_grid(m, v.y_scale, v.y_zp),
                                                       torch.quint8))


def _avg_pool2d(m: Match, b: Builder) -> fx.Node:
    v = AvgPool2dWindowInt8.of(m.root)
    b.tally("pool")
    return b.call_function(F.avg_pool2d, (v.q, list(v.kernel_size), list(v.stride),
                                          list(v.padding), v.ceil_mode, v.count_include_pad))


def _max_pool(m: Match, b: Builder) -> fx.Node:
    v = MaxPool2dInt8.of(m.root)
    b.tally("pool")
    return b.call_function(F.max_pool2d, (v.q, list(v.kernel_size), list(v.stride),
                                          list(v.padding), list(v.dilation), v.ceil_mode))


def _upsample_kwargs(v: OpView) -> dict:
    return dict(size=v.output_size, scale_factor=v.scale_factors, mode="nearest")


def _upsample_nearest(m: Match, b: Builder) -> fx.Node:
    v = UpsampleNearest2dInt8.of(m.root)
    b.tally("upsample")
    return b.call_function(F.interpolate, (v.q,), _upsample_kwargs(v))


def _upsample_indexes_alike(m: Match) -> bool:
    """PyTorch's quantized nearest kernel computes ``floor(i * float32(1 / scale))`` for every
    size; its float kernel (the IR's rule) copies a kept size and halves the index of a doubled
    one. They differ where a scale factor keeps or doubles a size without being 1 or 2: in
    (1, 1.5) or (2, 2.5) (a size given is always alike)."""
    v = UpsampleNearest2dInt8.of(m.root)
    odd = [f for f in (v.scale_factors or []) if 1 < f < 1.5 or 2 < f < 2.5]
    return _uint8(m, v.qmin, v.qmax) and (not odd or _reject(
        m, f"scale factor {odd[0]}: PyTorch's quantized kernel indexes it differently"))


def _upsample_reference(m: Match, b: Builder) -> fx.Node:
    """The float kernel on the dequantized input, requantized on the same grid (exact: each
    output is an input value, which requantizes to its own code)."""
    v = UpsampleNearest2dInt8.of(m.root)
    y = b.call_function(F.interpolate, (b.call_method("dequantize", (v.q,)),),
                        _upsample_kwargs(v))
    m.context.fallback.append(_who(m.root))
    return b.call_function(torch.quantize_per_tensor, (y, *_grid(m, v.scale, v.zp),
                                                       torch.quint8))


def _cat(m: Match, b: Builder) -> fx.Node:
    v = CatInt8.of(m.root)
    b.tally("cat")
    return b.call_function(torch.ops.quantized.cat, (list(v.qs), v.dim,
                                                     *_grid(m, v.y_scale, v.y_zp)))


def _binary(kind: str):
    """add_int8 (``kind="add"``) / mul_int8 (``"mul"``) onto ``quantized.<kind>(_relu)``, which
    broadcast as the IR does."""

    def replace(m: Match, b: Builder) -> fx.Node:
        v = BinaryInt8.of(m.root)
        b.tally(kind)
        return b.call_function(_kernel(kind, v.act), (v.a, v.b, *_grid(m, v.y_scale, v.y_zp)))

    return replace


def _binary_fits(kind: str):
    def check(m: Match) -> bool:
        v = BinaryInt8.of(m.root)
        if _quantized_cpu(v.act) != "fused":
            return _reject(m, f"no quantized {kind} with activation {v.act}")
        return _uint8(m, v.y_qmin, v.y_qmax)

    return check


# -- conv2d_int8 / linear_int8: prepacked weights ---------------------------------------------
def _layer_fits(m: Match) -> bool:
    v = Int8Layer.of(m.root)
    if v.residual is not None:
        return _reject(m, "a float residual")
    if not v.out_int8:
        return _reject(m, "a float output")
    if not (_uint8(m, v.y_qmin, v.y_qmax) and _uint8(m, v.x_qmin, v.x_qmax)):
        return False
    if _quantized_cpu(v.act) is None:
        return _reject(m, f"activation {v.act}")
    if not _is_codes(v.x):
        return _reject(m, "a float input")
    return True


def _packed(b: Builder, base: str, packed) -> fx.Node:
    """A get_attr of ``packed`` (a ScriptObject, not a tensor: it is set, not registered)."""
    i = 0
    while hasattr(b.gm, f"{base}_packed_{i}"):
        i += 1
    setattr(b.gm, f"{base}_packed_{i}", packed)
    with warnings.catch_warnings():  # fx warns that a ScriptObject is not a buffer
        warnings.filterwarnings("ignore", message="Attempted to insert a get_attr")
        return b.get_attr(f"{base}_packed_{i}")


def _layer(kind: str):
    """The replacement of a conv2d_int8 (``kind="conv2d"``) or linear_int8 (``"linear"``)."""

    def replace(m: Match, b: Builder) -> fx.Node:
        v, n = Int8Layer.of(m.root), m.root
        w_q, w_s = _const(m, v.w_q), _const(m, v.w_scale)
        bias = None if v.bias is None else _const(m, v.bias).float()
        groups = v.groups if kind == "conv2d" else 1
        engine = _auto_engine(n, w_q, groups) if m.context.engine == "auto" \
            else m.context.engine
        with _quiet(), _engine(engine):
            packed_for = torch.backends.quantized.engine
            wq = torch._make_per_channel_quantized_tensor(
                w_q.to(torch.int8), w_s.double(), torch.zeros_like(w_s, dtype=torch.int64), 0)
            if kind == "conv2d":
                packed = torch.ops.quantized.conv2d_prepack(
                    wq, bias, list(v.stride), list(v.padding), list(v.dilation), v.groups)
            else:
                packed = torch.ops.quantized.linear_prepack(wq, bias)
        p = _packed(b, _who(n).replace(".", "_"), packed)
        p.meta["fxopt_engine"] = packed_for  # saved with the weights, packed again under it
        out = b.call_function(_kernel(kind, v.act), (v.x, p, *_grid(m, v.y_scale, v.y_zp)))
        b.tally(kind)
        bounds = ACTIVATIONS[v.act].bounds(v.act_args)
        if bounds is None:
            return out
        copy_meta(out, n)
        return b.call_function(torch.clamp, (out, *bounds))  # exact on the codes

    return replace


# -- the fxopt reference where PyTorch has no kernel ------------------------------------------
def _layer_reference(m: Match, b: Builder) -> fx.Node:
    """The op on the dequantized input (float in, float out), requantized when its output is
    int8 codes: the fxopt reference, exact."""
    v = Int8Layer.of(m.root)
    x = b.call_method("dequantize", (v.x,))
    if tensor_meta(v.x) is not None:
        x.meta["tensor_meta"] = v.x.meta["tensor_meta"]
    y = v.emit(b, x=x, out_int8=False)
    m.context.fallback.append(_who(m.root))
    if not v.out_int8:
        return y
    return b.call_function(torch.quantize_per_tensor, (y, *_grid(m, v.y_scale, v.y_zp),
                                                       torch.quint8))


def _binary_reference(m: Match, b: Builder) -> fx.Node:
    """``add_int8`` / ``mul_int8`` read codes: the op on the quantized inputs' codes, its codes
    wrapped as a quantized tensor on the output grid."""
    v = BinaryInt8.of(m.root)
    codes = v.emit(b, a=b.call_method("int_repr", (v.a,)), b=b.call_method("int_repr", (v.b,)))
    m.context.fallback.append(_who(m.root))
    return b.call_function(torch._make_per_tensor_quantized_tensor,
                           (codes, *_grid(m, v.y_scale, v.y_zp)))


# -- oneDNN's int8 kernels: the post-ops PyTorch's quantized kernels lack ---------------------
def _onednn_fits(kind: str):
    def check(m: Match) -> bool:
        v = Int8Layer.of(m.root)
        if v.residual is not None or not v.out_int8:
            return _reject(m, "a float residual or output")
        if not (_uint8(m, v.y_qmin, v.y_qmax) and _uint8(m, v.x_qmin, v.x_qmax)):
            return False
        if not _is_codes(v.x):
            return _reject(m, "a float input")
        if not onednn.onednn_int8_available():
            return _reject(m, "oneDNN's int8 kernels are not available here")
        return True

    return check


def _onednn_layer(kind: str):
    """conv2d_int8 / linear_int8 onto oneDNN's int8 kernel with the activation as its post-op:
    the codes of the quantized input in, codes out, wrapped as a quantized tensor again."""
    op = ONEDNN_CONV2D_INT8 if kind == "conv2d" else ONEDNN_LINEAR_INT8

    def replace(m: Match, b: Builder) -> fx.Node:
        v = Int8Layer.of(m.root)
        (xs, xz), (ys, yz) = _grid(m, v.x_scale, v.x_zp), _grid(m, v.y_scale, v.y_zp)
        values = dict(q=b.call_method("int_repr", (v.x,)), w_q=v.w_q, w_scale=v.w_scale,
                      bias=v.bias, x_scale=xs, x_zp=xz, y_scale=ys, y_zp=yz, act=v.act,
                      act_args=list(v.act_args))
        if kind == "conv2d":
            values.update(stride=v.stride, padding=v.padding, dilation=v.dilation,
                          groups=v.groups)
        codes = op.emit(b, **values)
        b.tally(f"onednn_{kind}")
        return b.call_function(torch._make_per_tensor_quantized_tensor, (codes, ys, yz))

    return replace


_WRAP = torch._make_per_tensor_quantized_tensor

# -- the table ----------------------------------------------------------------------------------
RULES = [
    op_rule("quantize", [QUANTIZE.overload], _quantize, _uint8_grid(Quantize, "qmin", "qmax")),
    op_rule("dequantize", [DEQUANTIZE.overload], _dequantize),
    op_rule("conv2d_int8", [CONV2D_INT8.overload], _layer("conv2d"), _layer_fits),
    op_rule("linear_int8", [LINEAR_INT8.overload], _layer("linear"), _layer_fits),
    op_rule("add_int8", [ADD_INT8.overload], _binary("add"), _binary_fits("add")),
    op_rule("mul_int8", [MUL_INT8.overload], _binary("mul"), _binary_fits("mul")),
    op_rule("adaptive_avg_pool2d_int8", [AVGPOOL_INT8.overload], _avg_pool,
            _uint8_grid(AvgPool2dInt8, "qmin", "qmax")),
    op_rule("avg_pool2d_int8", [AVG_POOL2D_INT8.overload], _avg_pool2d,
            _uint8_grid(AvgPool2dWindowInt8, "qmin", "qmax")),
    op_rule("max_pool2d_int8", [MAXPOOL_INT8.overload], _max_pool),
    op_rule("upsample_nearest2d_int8", [UPSAMPLE_NEAREST2D_INT8.overload], _upsample_nearest,
            _upsample_indexes_alike),
    op_rule("cat_int8", [CAT_INT8.overload], _cat, _uint8_grid(CatInt8, "y_qmin", "y_qmax")),
    op_rule("conv2d_int8_onednn", [CONV2D_INT8.overload], _onednn_layer("conv2d"),
            _onednn_fits("conv2d")),
    op_rule("linear_int8_onednn", [LINEAR_INT8.overload], _onednn_layer("linear"),
            _onednn_fits("linear")),
    # between two oneDNN layers the codes stay plain: no re-wrap, no copy
    Rule("codes_of_wrapped_codes",
         lambda c, s, z: method("codes", "int_repr")(call("wrap", _WRAP)(c, s, z)),
         lambda m, b: m["c"], allow_external_users=True),
    # after the kernel rows: what they rejected runs the fxopt reference
    op_rule("int8_layer_reference", [CONV2D_INT8.overload, LINEAR_INT8.overload],
            _layer_reference),
    op_rule("add_int8_reference", [ADD_INT8.overload], _binary_reference),
    op_rule("mul_int8_reference", [MUL_INT8.overload], _binary_reference),
    op_rule("upsample_nearest2d_int8_reference", [UPSAMPLE_NEAREST2D_INT8.overload],
            _upsample_reference),
]


# -- the pass -----------------------------------------------------------------------------------
def _affine_uint8_only(gm: fx.GraphModule) -> bool:
    """Every output grid in the int8 IR is uint8 [0, 255] (PyTorch's quint8); symmetric int8
    grids (``QuantConfig(activation_symmetric=True)``) have no x86 kernels for activations."""
    for n in gm.graph.nodes:
        v = view_of(n) if n.op == "call_function" and n.target in INT8_IR_OPS else None
        for lo, hi in (("qmin", "qmax"), ("y_qmin", "y_qmax")):
            if v is not None and lo in v.values and (v.get(lo), v.get(hi)) != _UINT8:
                return False
    return True


@register_pass("lower_int8_cpu", requires=(EVAL_MODE,), reference="returned",
               after=("quantize_int8",))
def lower_int8_cpu(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """The int8 ops onto PyTorch's quantized CPU kernels (target='cpu')."""
    if not any((Quantize.matches(n) or Int8Layer.matches(n)) and not is_reference_call(n)
               for n in gm.graph.nodes):
        return PassResult(gm, modified=False)
    if ctx.target != "cpu":
        return PassResult(gm, modified=False, notes=[f"target is {ctx.target}: nothing to do"])
    if not quantized_engine_available():
        return PassResult(gm, modified=False, notes=[
            f"PyTorch's quantized engine is '{torch.backends.quantized.engine}' here (x86, "
            f"fbgemm or onednn needed): the int8 ops run the exact reference (slow)"])
    if not _affine_uint8_only(gm):
        return PassResult(gm, modified=False, notes=[
            "symmetric int8 activation grids have no PyTorch CPU kernels: the int8 ops run the "
            "exact reference (slow); use QuantConfig(activation_symmetric=False) on CPU"])
    with _quiet():  # spend PyTorch's once-per-process warning here, where it says nothing
        torch.quantize_per_tensor(torch.zeros(1), 1.0, 0, torch.quint8)
    reference = copy.deepcopy(gm)
    step = output_step(gm)
    state = CpuLowering(engine=ctx.config(QuantConfig).cpu_engine)
    result = apply_rules(gm, RULES, context=state, skip=state.skip)
    mapping = {matched[-1]: new for _, matched, new in result.rewrites}
    lockstep = LockstepReference(reference, gm, mapping)
    lockstep(*ctx.example_inputs)
    notes = []
    if lockstep.off:
        notes.append("lowered ops more than one code from the int8 IR on the example inputs: "
                     + ", ".join(f"{k} ({v} codes)" for k, v in lockstep.off.items()))
    if state.fallback:
        notes.append(f"no PyTorch int8 kernel, fxopt reference on dequantized input: "
                     f"{', '.join(state.fallback)}")
    notes += [f"not lowered: {r}" for r in result.rejected]
    stats = {**result.tallies, "fallback": len(state.fallback),
             "engine": torch.backends.quantized.engine,
             "tie_flips": lockstep.flips}  # codes one step from the IR's, example inputs
    return PassResult(gm, modified=True, stats=stats, notes=notes, reference=lockstep,
                      max_abs_tolerance=step * (1 + 1e-4),  # one code, float slack
                      shapes_changed=True)
