"""``lower_to_triton``: fused float ops and the int8 IR onto fxopt's Triton kernels (CUDA).

Each rewrite prepares its weight once, into the layout its kernel reads, as a new buffer of the
module, and passes grids (scales, zero points) as numbers (``fxopt.ops_triton``):

    fxopt.conv2d_act(x, w, b, ...)        -> fxopt.triton_conv2d(x, w_nhwc, b, ...)
    fxopt.conv2d_act(..., groups=C)       -> fxopt.triton_depthwise_conv2d(x, w_[KH*KW, C], ...)
    fxopt.linear_act(x, w, b, ...), Linear -> fxopt.triton_linear(x, w_[N, K], b, ...)
    nn.Conv2d (not fused)                 -> fxopt.triton_conv2d / triton_depthwise_conv2d
    fxopt.quantize(x, s, zp, lo, hi)      -> fxopt.triton_quantize(x, float(s), int(zp), lo, hi)
    fxopt.conv2d_int8(q, w_q, ...)        -> fxopt.triton_conv2d_int8(q, w_q_nhwc, ..., colsum, ...)
      depthwise: fxopt.triton_depthwise_conv2d_int8(q, w_[KH*KW, C], ...)
    fxopt.linear_int8(q, w_q, ...)        -> fxopt.triton_linear_int8(q, w_q, ..., colsum, ...)
    fxopt.dequantize(q, s, zp)            -> fxopt.triton_dequantize(q, float(s), int(zp))
    fxopt.add_int8(a, s_a, zp_a, b, ...)  -> fxopt.triton_add_int8(a, float(s_a), int(zp_a), b, ...)
    fxopt.max_pool2d_int8(q, k, s, p, d, ceil) -> fxopt.triton_max_pool2d_int8(q, k, s, p, d, ceil)
    fxopt.adaptive_avg_pool2d_int8(q, [1, 1], s, zp, lo, hi)
                                          -> fxopt.triton_global_avg_pool2d_int8(q, float(s), ...)

The convolution kernels write channels-last outputs, so activations stay NHWC from the graph's
entry (``fuse_act`` puts the one conversion there) to its exit, and int8 codes flow between
quantized layers; ``stats["layout_copies"]`` counts the kernel inputs that would still need a
conversion. The residual adds and the pooling of an int8 CNN run on the codes too (one pass
each, outputs channels-last). Ops with no Triton kernel (``cat_int8``, int8 average pooling to
other sizes than 1x1, ``conv1d_act``, float pooling, float64 layers, ...) stay on PyTorch; the
notes name each of them.

Reference (DESIGN.md section 4): the graph before the pass. Float graphs must equal it to the
output dtype's tolerance (fp16/bf16 1e-2, fp32 1e-5, TF32 where PyTorch allows it); int8 graphs
within one quantization step of the output (the epilogue's float rounding may differ at ties).

Runs for ``target="cuda"``; on the CPU only with ``FXOPT_TRITON_ON_CPU=1`` (the kernels then run
in Triton's interpreter: tests, CI):

    FXOPT_TRITON_ON_CPU=1 python -c "import fxopt; fxopt.optimize(m, x, target='cpu',
        passes=['lower_to_triton'])"
"""
from __future__ import annotations

import copy
from collections import Counter

import torch
import torch.fx as fx
import torch.nn as nn

import fxopt.ops  # noqa: F401 - defines torch.ops.fxopt.* (int8 and triton ops included)
from fxopt.infra.preconditions import EVAL_MODE
from fxopt.infra.registry import PassContext, PassResult, register_pass
from fxopt.ir.graph import (
    add_buffer,
    copy_meta,
    get_attr_value,
    module_path,
    remove_unused_attributes,
)
from fxopt.ops import int8 as _int8_ops

# TEMPORARY (layout refactor): op handles as overloads until this pass reads the schema
(ADD_INT8, AVGPOOL_INT8, CONV2D_INT8, DEQUANTIZE, LINEAR_INT8, MAXPOOL_INT8, QUANTIZE) = (
    getattr(_int8_ops, _n).overload for _n in ('ADD_INT8', 'AVGPOOL_INT8', 'CONV2D_INT8', 'DEQUANTIZE', 'LINEAR_INT8', 'MAXPOOL_INT8', 'QUANTIZE'))
from fxopt.ops.triton import TRITON_OPS, triton_on_cpu

__all__ = ["lower_to_triton", "triton_available"]

_OPS = torch.ops.fxopt
CONV2D = _OPS.conv2d_act.default
CONV1D = _OPS.conv1d_act.default
LINEAR = _OPS.linear_act.default
T_CONV = _OPS.triton_conv2d.default
T_DW = _OPS.triton_depthwise_conv2d.default
T_LINEAR = _OPS.triton_linear.default
T_QUANTIZE = _OPS.triton_quantize.default
T_DEQUANTIZE = _OPS.triton_dequantize.default
T_CONV_INT8 = _OPS.triton_conv2d_int8.default
T_DW_INT8 = _OPS.triton_depthwise_conv2d_int8.default
T_LINEAR_INT8 = _OPS.triton_linear_int8.default
T_ADD_INT8 = _OPS.triton_add_int8.default
T_MAXPOOL_INT8 = _OPS.triton_max_pool2d_int8.default
T_GAP_INT8 = _OPS.triton_global_avg_pool2d_int8.default
_CONV_OUT = (T_CONV, T_DW, T_CONV_INT8, T_DW_INT8)
_NHWC_OUT = _CONV_OUT + (T_MAXPOOL_INT8, T_GAP_INT8)  # ops whose outputs are channels-last
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_INT8_KW = ("act", "act_args", "x_qmin", "x_qmax", "y_qmin", "y_qmax", "out_int8")
# Ops that move no data (views, shape queries) are not worth naming as "left on PyTorch".
_FREE = {"flatten", "reshape", "view", "getitem", "size", "dim", "unsqueeze", "squeeze",
         "getattr", "contiguous", "to", "type_as", "detach"}


def triton_available() -> bool:
    """Whether Triton imports here (the kernels need it; the ops' CPU fallback does not)."""
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


def _tm(node):
    return node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None


def _dtype(node):
    tm = _tm(node)
    return getattr(tm, "dtype", None)


def _is_const(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def _channels_last(node) -> bool:
    """Whether ``node``'s recorded output is NHWC memory (or not 4-D: nothing to convert)."""
    tm = _tm(node)
    if tm is None or len(tm.shape) != 4:
        return True
    t = torch.empty_strided(tuple(tm.shape), tuple(tm.stride), device="meta")
    return t.is_contiguous(memory_format=torch.channels_last)


def _name(n: fx.Node) -> str:
    """The user's name for ``n``: its module path, else the first node it stands for."""
    return module_path(n) or next(iter(n.meta.get("fxopt_from", [])), n.name)


def _opname(n: fx.Node) -> str:
    t = n.target
    if n.op == "call_module":
        return type(n.graph.owning_module.get_submodule(t)).__name__
    if n.op == "call_method":
        return str(t)
    name = getattr(t, "__name__", str(t))
    return name.split(".")[0] if isinstance(t, torch._ops.OpOverload) else name


class _Lowering:
    def __init__(self, gm: fx.GraphModule):
        self.gm, self.g = gm, gm.graph
        self.counts: Counter = Counter()
        self.skipped: list[str] = []   # "op (module path): why"
        self.prepared: dict = {}      # (weight attr, layout) -> get_attr target

    # -- helpers ------------------------------------------------------------------------------
    def _value(self, node) -> torch.Tensor:
        return get_attr_value(self.gm, node.target)

    def _buffer(self, src: str, layout: str, make) -> fx.Node:
        """A get_attr of ``make(weight)`` registered once per (weight, layout)."""
        key = (src, layout)
        target = self.prepared.get(key)
        if target is None:
            w = get_attr_value(self.gm, src).detach()
            target = add_buffer(self.gm, f"{src.replace('.', '_')}_{layout}_", make(w))
            self.prepared[key] = target
        return self.g.get_attr(target)

    def _scalar(self, node, cast):
        return cast(self._value(node).item())

    def _skip(self, n: fx.Node, why: str) -> None:
        self.skipped.append(f"{_opname(n)} ({_name(n)}): {why}")

    # -- float ---------------------------------------------------------------------------------
    def float_conv(self, n, x, w_node, b_node, stride, padding, dilation, groups, residual, act,
                   act_args):
        from fxopt.triton_kernels import prepare_conv_weight, prepare_depthwise_weight

        w = self._value(w_node) if _is_const(w_node) else None
        if w is None or w.dim() != 4:
            return self._skip(n, "weight is not a constant 4-D tensor")
        if w.dtype not in _FLOATS or _dtype(x) not in (w.dtype, None):
            return self._skip(n, f"dtype {w.dtype} (the kernels take fp16, bf16, fp32)")
        c_in = _tm(x).shape[1] if _tm(x) is not None else None
        src = w_node.target
        if groups > 1 and groups == w.shape[0] == c_in and w.shape[1] == 1:
            w2 = self._buffer(src, "dw", prepare_depthwise_weight)
            self.counts["depthwise_conv2d"] += 1
            return self.g.call_function(T_DW, (x, w2, b_node, [w.shape[2], w.shape[3]],
                                               list(stride), list(padding), list(dilation),
                                               residual), {"act": act, "act_args": list(act_args)})
        w4 = self._buffer(src, "nhwc", prepare_conv_weight)
        self.counts["conv2d"] += 1
        return self.g.call_function(T_CONV, (x, w4, b_node, list(stride), list(padding),
                                             list(dilation), groups, residual),
                                    {"act": act, "act_args": list(act_args)})

    def float_linear(self, n, x, w_node, b_node, residual, act, act_args):
        w = self._value(w_node) if _is_const(w_node) else None
        if w is None or w.dim() != 2:
            return self._skip(n, "weight is not a constant 2-D tensor")
        if w.dtype not in _FLOATS or _dtype(x) not in (w.dtype, None):
            return self._skip(n, f"dtype {w.dtype} (the kernels take fp16, bf16, fp32)")
        if not w.is_contiguous():
            w_node = self._buffer(w_node.target, "nk", lambda t: t.contiguous())
        self.counts["linear"] += 1
        return self.g.call_function(T_LINEAR, (x, w_node, b_node, residual),
                                    {"act": act, "act_args": list(act_args)})

    def module(self, n):
        m = self.gm.get_submodule(n.target)
        if len(n.args) != 1 or n.kwargs or not isinstance(n.args[0], fx.Node):
            return None
        if type(m) not in (nn.Conv2d, nn.Linear):
            return None
        w_node = self.g.get_attr(f"{n.target}.weight")
        b_node = None if m.bias is None else self.g.get_attr(f"{n.target}.bias")
        if type(m) is nn.Linear:
            out = self.float_linear(n, n.args[0], w_node, b_node, None, "none", [])
        elif m.padding_mode != "zeros" or isinstance(m.padding, str):
            out = self._skip(n, f"padding {m.padding!r}, padding_mode {m.padding_mode!r}")
        else:
            out = self.float_conv(n, n.args[0], w_node, b_node, m.stride, m.padding, m.dilation,
                                  m.groups, None, "none", [])
        if out is None:  # the get_attr nodes just made are unused
            for extra in (w_node, b_node):
                if extra is not None:
                    self.g.erase_node(extra)
        return out

    # -- int8 ----------------------------------------------------------------------------------
    def int8_layer(self, n):
        from fxopt.triton_kernels import (
            prepare_conv_weight,
            prepare_depthwise_weight,
            weight_colsum,
        )

        conv = n.target is CONV2D_INT8
        a = list(n.args)
        nfixed = 12 if conv else 8
        residual = a[nfixed] if len(a) > nfixed else n.kwargs.get("residual")
        x, w_node, ws_node, b_node = a[:4]
        grids = a[8:12] if conv else a[4:8]
        if not all(_is_const(g) for g in (w_node, ws_node, *grids)) or \
                (b_node is not None and not _is_const(b_node)):
            return self._skip(n, "weights or grids are not constants")
        xs, xz, ys, yz = (self._scalar(grids[0], float), self._scalar(grids[1], int),
                          self._scalar(grids[2], float), self._scalar(grids[3], int))
        kw = {k: n.kwargs[k] for k in _INT8_KW if k in n.kwargs}
        if "act_args" in kw:
            kw["act_args"] = list(kw["act_args"])
        w = self._value(w_node)
        src = w_node.target
        if not conv:
            colsum = self._buffer(src, "colsum", weight_colsum)
            if not w.is_contiguous():
                w_node = self._buffer(src, "nk", lambda t: t.contiguous())
            self.counts["linear_int8"] += 1
            return self.g.call_function(T_LINEAR_INT8, (x, w_node, ws_node, b_node, colsum, xs,
                                                        xz, ys, yz, residual), kw)
        stride, padding, dilation, groups = a[4:8]
        c_in = _tm(x).shape[1] if _tm(x) is not None else None
        if groups > 1 and groups == w.shape[0] == c_in and w.shape[1] == 1:
            w2 = self._buffer(src, "dw", prepare_depthwise_weight)
            self.counts["depthwise_conv2d_int8"] += 1
            return self.g.call_function(T_DW_INT8, (x, w2, ws_node, b_node,
                                                    [w.shape[2], w.shape[3]], list(stride),
                                                    list(padding), list(dilation), xs, xz, ys, yz,
                                                    residual), kw)
        w4 = self._buffer(src, "nhwc", prepare_conv_weight)
        colsum = self._buffer(src, "colsum", weight_colsum)
        self.counts["conv2d_int8"] += 1
        return self.g.call_function(T_CONV_INT8, (x, w4, ws_node, b_node, colsum, list(stride),
                                                  list(padding), list(dilation), groups, xs, xz,
                                                  ys, yz, residual), kw)

    def grid_op(self, n):
        a = n.args
        if not (_is_const(a[1]) and _is_const(a[2])):
            return self._skip(n, "grid is not a constant")
        s, z = self._scalar(a[1], float), self._scalar(a[2], int)
        if n.target is QUANTIZE:
            if _dtype(a[0]) not in _FLOATS + (None,):
                return self._skip(n, f"input dtype {_dtype(a[0])}")
            self.counts["quantize"] += 1
            return self.g.call_function(T_QUANTIZE, (a[0], s, z, a[3], a[4]))
        self.counts["dequantize"] += 1
        return self.g.call_function(T_DEQUANTIZE, (a[0], s, z))

    def add_int8(self, n):
        from fxopt.triton_kernels.epilogue import act_code

        a, as_, az, b, bs, bz, ys, yz = n.args[:8]
        if not all(_is_const(g) for g in (as_, az, bs, bz, ys, yz)):
            return self._skip(n, "grids are not constants")
        act, act_args = n.kwargs.get("act", "none"), list(n.kwargs.get("act_args", []))
        try:
            act_code(act, act_args)
        except ValueError as e:
            return self._skip(n, str(e))
        ta, tb = _tm(a), _tm(b)
        if ta is not None and tb is not None and tuple(ta.shape) != tuple(tb.shape):
            try:
                same = tuple(torch.broadcast_shapes(ta.shape, tb.shape)) == tuple(ta.shape)
            except RuntimeError:
                same = False
            if not same:
                return self._skip(n, f"broadcast of {tuple(ta.shape)} to {tuple(tb.shape)}")
        kw = {"act": act, "act_args": act_args}
        kw.update({k: n.kwargs[k] for k in ("y_qmin", "y_qmax") if k in n.kwargs})
        self.counts["add_int8"] += 1
        return self.g.call_function(T_ADD_INT8, (
            a, self._scalar(as_, float), self._scalar(az, int), b, self._scalar(bs, float),
            self._scalar(bz, int), self._scalar(ys, float), self._scalar(yz, int)), kw)

    def max_pool_int8(self, n):
        q, k, s, p, d, ceil = n.args[:6]
        if any(pi > ki // 2 for pi, ki in zip(p, k)):
            return self._skip(n, f"padding {list(p)} over half the kernel {list(k)}")
        self.counts["max_pool2d_int8"] += 1
        return self.g.call_function(T_MAXPOOL_INT8, (q, list(k), list(s), list(p), list(d),
                                                     bool(ceil)))

    def avg_pool_int8(self, n):
        q, size, sc, zp, lo, hi = n.args[:6]
        if list(size) != [1, 1]:
            return self._skip(n, f"output size {list(size)} (the kernel pools to 1x1)")
        if not (_is_const(sc) and _is_const(zp)):
            return self._skip(n, "grid is not a constant")
        self.counts["global_avg_pool2d_int8"] += 1
        return self.g.call_function(T_GAP_INT8, (q, self._scalar(sc, float),
                                                 self._scalar(zp, int), lo, hi))

    # -- driver ---------------------------------------------------------------------------------
    def node(self, n: fx.Node):
        if n.op == "call_module":
            return self.module(n)
        if n.op != "call_function":
            return None
        t = n.target
        if t is CONV2D:
            a = list(n.args)
            residual = a[7] if len(a) > 7 else n.kwargs.get("residual")
            return self.float_conv(n, a[0], a[1], a[2], a[3], a[4], a[5], a[6], residual,
                                   n.kwargs.get("act", "none"), n.kwargs.get("act_args", []))
        if t is LINEAR:
            a = list(n.args)
            residual = a[3] if len(a) > 3 else n.kwargs.get("residual")
            return self.float_linear(n, a[0], a[1], a[2], residual, n.kwargs.get("act", "none"),
                                     n.kwargs.get("act_args", []))
        if t in (CONV2D_INT8, LINEAR_INT8):
            return self.int8_layer(n)
        if t in (QUANTIZE, DEQUANTIZE):
            return self.grid_op(n)
        if t is ADD_INT8:
            return self.add_int8(n)
        if t is MAXPOOL_INT8:
            return self.max_pool_int8(n)
        if t is AVGPOOL_INT8:
            return self.avg_pool_int8(n)
        return None

    def run(self) -> None:
        for n in list(self.g.nodes):
            with self.g.inserting_before(n):
                new = self.node(n)
            if new is None:
                continue
            copy_meta(new, n)
            n.replace_all_uses_with(new)
            self.g.erase_node(n)

    def layout_copies(self) -> list[str]:
        """Kernel inputs that are not NHWC (the op converts them on entry: a copy per call)."""
        out = []
        for n in self.g.nodes:
            if n.op == "call_function" and n.target in _CONV_OUT:
                for src in (n.args[0], n.args[7] if n.target is T_CONV else None):
                    if isinstance(src, fx.Node) and not (
                            src.op == "call_function" and src.target in _NHWC_OUT) \
                            and not _channels_last(src):
                        out.append(_name(n))
        return out

    def left_on_pytorch(self) -> Counter:
        """Compute ops still on PyTorch, by op name (views and shape queries not counted)."""
        left: Counter = Counter()
        for n in self.g.nodes:
            if n.op not in ("call_function", "call_method", "call_module"):
                continue
            if n.op == "call_function" and n.target in TRITON_OPS:
                continue
            name = _opname(n)
            if name in _FREE:
                continue
            left[name] += 1
        return left


_LOWERED = (CONV2D, LINEAR, CONV2D_INT8, LINEAR_INT8, QUANTIZE, DEQUANTIZE, ADD_INT8,
            MAXPOOL_INT8, AVGPOOL_INT8)


def _candidates(gm: fx.GraphModule) -> bool:
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _LOWERED:
            return True
        if n.op == "call_module" and type(gm.get_submodule(n.target)) in (nn.Conv2d, nn.Linear):
            return True
    return False


@register_pass("lower_to_triton", requires=(EVAL_MODE,), reference="returned",
               after=("fuse_act", "quantize_int8"))
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
    exits = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is DEQUANTIZE]
    step = 0.0
    if exits:
        from fxopt.quant.measure import output_step as _output_step
        step = _output_step(gm, exits)
    low = _Lowering(gm)
    low.run()
    lowered = sum(low.counts.values())
    if lowered == 0:
        # Every candidate was skipped: leave the graph as it was (nodes made for the attempt
        # are gone: the module rewrite erases its own get_attr nodes).
        return PassResult(gm, modified=False, notes=["no op could be lowered: " +
                                                     "; ".join(low.skipped)])
    for n in list(gm.graph.nodes):  # the grids and weights the old ops read
        if n.op == "get_attr" and not n.users:
            gm.graph.erase_node(n)
    remove_unused_attributes(gm)
    gm.graph.lint()
    gm.recompile()
    copies = low.layout_copies()
    left = low.left_on_pytorch()
    notes = []
    if low.skipped:
        notes.append("not lowered (no kernel for this case): " + "; ".join(low.skipped))
    if left:
        notes.append("left on PyTorch (no Triton kernel): " +
                     ", ".join(f"{k} x{v}" for k, v in sorted(left.items())))
    if copies:
        notes.append("inputs converted to channels-last on entry: " + ", ".join(copies))
    device = "cuda" if ctx.target == "cuda" else "cpu (Triton interpreter)"
    stats = {**dict(low.counts), "on_pytorch": sum(left.values()),
             "layout_copies": len(copies), "device": device}
    return PassResult(gm, modified=True, stats=stats, notes=notes, reference=reference,
                      max_abs_tolerance=step * (1 + 1e-4) if step > 0 else None,
                      shapes_changed=True)
