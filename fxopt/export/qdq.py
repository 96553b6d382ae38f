"""Int8 graphs as ONNX QDQ: QuantizeLinear / DequantizeLinear around standard float ops.

``export_onnx`` calls :func:`qdq_rewrite` on a copy of an int8 graph before handing it to
``torch.onnx.export``. Both forms of an int8 graph are read:

- the device-neutral int8 IR that ``quantize_int8`` writes (``fxopt.ops_int8``: codes between
  ops, grids as ``get_attr`` buffers), and
- that IR lowered by ``lower_int8_cpu`` onto PyTorch's quantized CPU kernels (quantized tensors
  between ops, weights prepacked into module attributes: unpacked here).

Every int8 op becomes "dequantize the inputs, the float op, quantize the output", the pattern
ONNX Runtime fuses back into its own int8 kernels (QLinearConv, QGemm, QLinearAdd, ...)::

    conv2d_int8(q, w_q, w_s, b, ..., x_scale, x_zp, y_scale, y_zp, act="relu", out_int8=True)
      ->  QuantizeLinear(Relu(Conv(DequantizeLinear(q, x_scale, x_zp),
                                   DequantizeLinear(w_q, w_s, 0, axis=0), b)), y_scale, y_zp)

Codes still flow between the ops (uint8 for affine grids, int8 for symmetric ones), so the
codes-preserving ops of the IR (flatten, reshape, ``contiguous``) run on them unchanged; max
pooling, clamping and the poolings read and write one grid (DequantizeLinear, the float op,
QuantizeLinear on the same scale and zero point). Weights stay int8 initializers with their
per-output-channel scales (DequantizeLinear ``axis=0``, opset >= 13); biases stay float (fxopt
adds them in float32). Dynamic int8 linear (``linear_int8_dynamic``) computes its run-time grid
in the graph exactly as fxopt does (ReduceMin/ReduceMax, ATen's scale and zero point, 7-bit with
``reduce_range``) and then runs QuantizeLinear / DequantizeLinear around a float MatMul.

    >>> rw = qdq_rewrite(copy.deepcopy(opt.graph_module))
    >>> rw.translated, rw.kept, rw.output_step
    ({'quantize': 1, 'conv2d_int8': 8, 'add_int8': 3, ...}, [], 0.0021)

``output_step`` is the scale of the coarsest dequantized grid that reaches the graph output:
ONNX Runtime's file must match the fxopt module within it. Ops consuming codes that have no
QDQ translation are listed in ``kept`` (``export_onnx`` warns about each).
"""
from __future__ import annotations

import operator
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

import fxopt.ops.int8  # noqa: F401  (defines the ops)
import fxopt.ops.int8_dynamic  # noqa: F401
from fxopt.ir.graph import get_attr_value
from fxopt.ir.activations import apply_activation

__all__ = ["qdq_rewrite", "QDQRewrite", "is_int8_graph", "INT8_OPS", "QuantizeLinear", "DequantizeLinear",
           "MIN_QDQ_OPSET"]

MIN_QDQ_OPSET = 13  # per-axis DequantizeLinear

_F = torch.ops.fxopt
_IR = {_F.quantize.default: "quantize", _F.dequantize.default: "dequantize",
       _F.conv2d_int8.default: "conv2d_int8", _F.linear_int8.default: "linear_int8",
       _F.add_int8.default: "add_int8", _F.cat_int8.default: "cat_int8",
       _F.adaptive_avg_pool2d_int8.default: "adaptive_avg_pool2d_int8",
       _F.max_pool2d_int8.default: "max_pool2d_int8",
       _F.linear_int8_dynamic.default: "linear_int8_dynamic"}
INT8_OPS = frozenset(_IR)  # what qdq_rewrite translates (decompose_fused_ops leaves them)
_QUANTIZED = ("conv2d", "conv2d_relu", "linear", "linear_relu", "add", "add_relu", "cat")
# ops that run on codes (or quantized tensors) and keep their grid: no values change
_MOVES = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute,
          torch.transpose, operator.getitem, torch.Tensor.contiguous}
_MOVE_METHODS = {"flatten", "reshape", "view", "contiguous", "squeeze", "unsqueeze", "permute",
                 "transpose", "clone", "detach"}
# float ops PyTorch runs on quantized tensors, requantized onto the input's grid
_SAME_GRID = {F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d, torch.clamp, F.hardtanh,
              F.relu, torch.relu, torch.nn.functional.relu6}


class QuantizeLinear(torch.autograd.Function):
    """``clamp(round(x / scale) + zp)`` into the zero point's dtype; ONNX QuantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale, zp):
        info = torch.iinfo(zp.dtype)
        q = torch.round(x.float() * torch.reciprocal(scale.float())) + zp.float()
        return q.clamp(info.min, info.max).to(zp.dtype)

    @staticmethod
    def symbolic(g, x, scale, zp):
        return g.op("QuantizeLinear", x, scale, zp)


class DequantizeLinear(torch.autograd.Function):
    """``(q - zp) * scale``, per tensor, or per channel along ``axis``; ONNX DequantizeLinear."""

    @staticmethod
    def forward(ctx, q, scale, zp, axis):
        if scale.dim() == 1:
            shape = [1] * q.dim()
            shape[axis] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        return (q.float() - zp.float()) * scale.float()

    @staticmethod
    def symbolic(g, q, scale, zp, axis):
        if axis is None:
            return g.op("DequantizeLinear", q, scale, zp)
        return g.op("DequantizeLinear", q, scale, zp, axis_i=axis)


def quantize_linear(x, scale, zp):
    """fx-callable :class:`QuantizeLinear` (fx cannot name ``Function.apply``)."""
    return QuantizeLinear.apply(x, scale, zp)


def dequantize_linear(q, scale, zp, axis=None):
    """fx-callable :class:`DequantizeLinear`."""
    return DequantizeLinear.apply(q, scale, zp, axis)


@dataclass(frozen=True)
class Grid:
    scale: float
    zp: int
    qmin: int = 0
    qmax: int = 255

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8 if self.qmin >= 0 else torch.int8


@dataclass
class QDQRewrite:
    gm: fx.GraphModule
    translated: dict[str, int] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    output_step: float = 0.0


def _op_name(target) -> str | None:
    """'quantized::conv2d' for a quantized op (packet or overload), else None."""
    name = getattr(target, "_qualified_op_name", None)
    if name is None and isinstance(target, torch._ops.OpOverload):
        name = target._schema.name
    return name


def _short_name(n: fx.Node) -> str:
    name = _op_name(n.target)
    if name:
        return name.split("::")[-1]
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


def is_int8_graph(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` holds int8 ops of either form (fxopt int8 IR or PyTorch quantized)."""
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in _IR or n.target is torch.quantize_per_tensor:
            return True
        name = _op_name(n.target)
        if name and name.startswith("quantized::"):
            return True
    return False


class _Writer:
    def __init__(self, gm: fx.GraphModule):
        self.gm, self.g = gm, gm.graph
        self.grid: dict[fx.Node, Grid] = {}
        self.translated: Counter = Counter()
        self.kept: list[str] = []
        self.exits: list[tuple[fx.Node, float]] = []  # activations dequantized, their step
        self._consts: dict[tuple, fx.Node] = {}
        self._n = 0

    # -- constants (initializers in the file) ---------------------------------------------------
    def const(self, key, value: torch.Tensor, name: str) -> fx.Node:
        hit = self._consts.get(key)
        if hit is not None:
            return hit
        self._n += 1
        attr = f"_onnx_{name}_{self._n}"
        self.gm.register_buffer(attr, value.detach().clone().contiguous())
        first = next(n for n in self.g.nodes if n.op != "placeholder")
        with self.g.inserting_before(first):
            node = self.g.get_attr(attr)
        self._consts[key] = node
        return node

    def _scale_zp(self, grid: Grid):
        s = self.const(("s", grid.scale), torch.tensor(grid.scale, dtype=torch.float32), "scale")
        z = self.const(("z", grid.zp, grid.dtype), torch.tensor(grid.zp, dtype=grid.dtype), "zp")
        return s, z

    def value(self, arg) -> torch.Tensor:
        return get_attr_value(self.gm, arg.target) if isinstance(arg, fx.Node) else \
            torch.as_tensor(arg)

    def ir_grid(self, s, z, qmin=0, qmax=255) -> Grid:
        return Grid(float(self.value(s)), int(self.value(z)), int(qmin), int(qmax))

    # -- QDQ pieces ----------------------------------------------------------------------------
    def q(self, x: fx.Node, grid: Grid) -> fx.Node:
        info = torch.iinfo(grid.dtype)
        if (grid.qmin, grid.qmax) != (info.min, info.max):  # a narrower range than the dtype's
            lo, hi = (grid.qmin - grid.zp) * grid.scale, (grid.qmax - grid.zp) * grid.scale
            x = self.g.call_function(torch.clamp, (x, lo, hi))
        out = self.g.call_function(quantize_linear, (x, *self._scale_zp(grid)))
        self.grid[out] = grid
        return out

    def dq(self, x: fx.Node, grid: Grid | None = None) -> fx.Node:
        grid = grid or self.grid[x]
        return self.g.call_function(dequantize_linear, (x, *self._scale_zp(grid), None))

    def float_in(self, x, grid: Grid) -> fx.Node:
        """``x`` as float values on ``grid``: dequantized codes, or float quantized first."""
        if x in self.grid:
            return self.dq(x)
        return self.dq(self.q(x, grid))

    def weight(self, w_q: torch.Tensor, w_scale: torch.Tensor, tag: str) -> fx.Node:
        key = ("w", tag)
        wq = self.const(key + ("q",), w_q.to(torch.int8), "w_int8")
        ws = self.const(key + ("s",), w_scale.float().reshape(-1), "w_scale")
        wz = self.const(key + ("z",), torch.zeros(w_scale.numel(), dtype=torch.int8), "w_zp")
        return self.g.call_function(dequantize_linear, (wq, ws, wz, 0))

    def layer(self, conv: bool, x, w_q, w_scale, bias, geometry, x_grid, y_grid, residual,
              act, act_args, out_codes: bool, tag: str) -> fx.Node:
        xf = self.float_in(x, x_grid)
        wf = self.weight(w_q, w_scale, tag)
        b = None if bias is None else self.const(("b", tag), bias.float(), "bias")
        if conv:
            stride, padding, dilation, groups = geometry
            y = self.g.call_function(F.conv2d, (xf, wf, b, list(stride), list(padding),
                                                list(dilation), groups))
        else:
            y = self.g.call_function(F.linear, (xf, wf, b))
        if residual is not None:
            y = self.g.call_function(operator.add, (y, residual))
        if act != "none":
            y = self.g.call_function(apply_activation, (y, act, tuple(act_args)))
        codes = self.q(y, y_grid)
        if out_codes:
            return codes
        out = self.dq(codes)
        self.exits.append((out, y_grid.scale))
        return out

    def requant(self, fn, args, inputs, out_grid: Grid, kwargs=None) -> fx.Node:
        """``Q(fn(DQ(inputs...), *args), out_grid)``: an op on dequantized values."""
        y = self.g.call_function(fn, (*inputs, *args), kwargs or {})
        return self.q(y, out_grid)

    # -- the two forms -------------------------------------------------------------------------
    def ir(self, n: fx.Node, kind: str) -> fx.Node | None:
        a, kw, g = n.args, n.kwargs, self.g
        if kind == "quantize":
            return self.q(a[0], self.ir_grid(a[1], a[2], a[3], a[4]))
        if kind == "dequantize":
            out = self.dq(a[0], self.ir_grid(a[1], a[2]))
            self.exits.append((out, float(self.value(a[1]))))
            return out
        if kind in ("conv2d_int8", "linear_int8"):
            conv = kind == "conv2d_int8"
            xs, xz, ys, yz = a[8:12] if conv else a[4:8]
            ri = 12 if conv else 8
            residual = a[ri] if len(a) > ri else kw.get("residual")
            bias = None if a[3] is None else self.value(a[3])
            return self.layer(conv, a[0], self.value(a[1]), self.value(a[2]), bias, a[4:8],
                              self.ir_grid(xs, xz, kw.get("x_qmin", 0), kw.get("x_qmax", 255)),
                              self.ir_grid(ys, yz, kw.get("y_qmin", 0), kw.get("y_qmax", 255)),
                              residual, kw.get("act", "none"), kw.get("act_args", ()),
                              kw.get("out_int8", False), n.name)
        if kind == "add_int8":
            ins = [self.float_in(a[0], self.ir_grid(a[1], a[2])),
                   self.float_in(a[3], self.ir_grid(a[4], a[5]))]
            y = g.call_function(operator.add, tuple(ins))
            if kw.get("act", "none") != "none":
                y = g.call_function(apply_activation, (y, kw["act"], tuple(kw.get("act_args", ()))))
            return self.q(y, self.ir_grid(a[6], a[7], kw.get("y_qmin", 0), kw.get("y_qmax", 255)))
        if kind == "cat_int8":
            ins = [self.float_in(q, self.ir_grid(s, z)) for q, s, z in zip(a[0], a[1], a[2])]
            return self.requant(torch.cat, (), [ins], self.ir_grid(a[4], a[5], a[6], a[7]),
                                {"dim": a[3]})
        if kind == "adaptive_avg_pool2d_int8":
            grid = self.ir_grid(a[2], a[3], a[4], a[5])
            return self.requant(F.adaptive_avg_pool2d, (list(a[1]),),
                                [self.float_in(a[0], grid)], grid)
        if kind == "max_pool2d_int8":
            if a[0] not in self.grid:
                return None
            return self.requant(F.max_pool2d, tuple(list(v) if isinstance(v, (list, tuple))
                                                    else v for v in a[1:6]),
                                [self.dq(a[0])], self.grid[a[0]])
        if kind == "linear_int8_dynamic":
            from fxopt.export.qdq_dynamic import dynamic_linear_qdq
            return dynamic_linear_qdq(self, n)
        return None

    def lowered(self, n: fx.Node) -> fx.Node | None:
        a, g = n.args, self.g
        t = n.target
        if t is torch.quantize_per_tensor:
            dtype = a[3] if len(a) > 3 else n.kwargs.get("dtype")
            lo, hi = (0, 255) if dtype == torch.quint8 else (-128, 127)
            return self.q(a[0], Grid(float(a[1]), int(a[2]), lo, hi))
        name = _op_name(t)
        if name and name.startswith("quantized::"):
            op = name.split("::")[1]
            ins = list(a[0]) if op == "cat" else list(a[:2]) if op.startswith("add") else [a[0]]
            if op not in _QUANTIZED or any(x not in self.grid for x in ins):
                return None
            out_grid = Grid(float(a[-2]), int(a[-1]))
            if op == "cat":
                ins = [self.dq(q) for q in a[0]]
                return self.requant(torch.cat, (), [ins], out_grid, {"dim": a[1]})
            act = "relu" if op.endswith("_relu") else "none"
            if op.startswith("add"):
                y = g.call_function(operator.add, (self.dq(a[0]), self.dq(a[1])))
                if act == "relu":
                    y = g.call_function(torch.relu, (y,))
                return self.q(y, out_grid)
            packed = get_attr_value(self.gm, a[1].target)
            conv = op.startswith("conv")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                w, bias = (torch.ops.quantized.conv2d_unpack if conv
                           else torch.ops.quantized.linear_unpack)(packed)
            if w.qscheme() not in (torch.per_channel_affine, torch.per_channel_symmetric) or \
                    bool(w.q_per_channel_zero_points().ne(0).any()):
                return None
            geometry = (packed.stride(), packed.padding(), packed.dilation(), packed.groups()) \
                if conv else ()
            return self.layer(conv, a[0], w.int_repr(), w.q_per_channel_scales(), bias,
                              geometry, self.grid[a[0]], out_grid, None, act, (), True, n.name)
        if n.op == "call_method" and t == "dequantize" and a[0] in self.grid:
            out = self.dq(a[0])
            self.exits.append((out, self.grid[a[0]].scale))
            return out
        if t in _SAME_GRID and a and a[0] in self.grid:
            grid = self.grid[a[0]]
            return self.requant(t, a[1:], [self.dq(a[0])], grid, dict(n.kwargs))
        return None

    def run(self) -> None:
        for n in list(self.g.nodes):
            if n.op not in ("call_function", "call_method"):
                continue
            codes_in = [x for x in n.all_input_nodes if x in self.grid]
            kind = _IR.get(n.target)
            with self.g.inserting_before(n):
                new = self.ir(n, kind) if kind else self.lowered(n)
            if new is not None:
                self.translated[kind or _short_name(n)] += 1
                new.meta.update({k: v for k, v in n.meta.items() if k != "tensor_meta"})
                n.replace_all_uses_with(new)
                self.g.erase_node(n)
                continue
            if not codes_in:
                continue
            moves = n.target in _MOVES if n.op == "call_function" else n.target in _MOVE_METHODS
            if moves:
                self.grid[n] = self.grid[codes_in[0]]  # the codes move, the grid stays
            else:
                self.kept.append(f"{n.name} ({n.target})")

    def output_step(self) -> float:
        reach: dict[fx.Node, bool] = {}
        for n in reversed(list(self.g.nodes)):
            reach[n] = n.op == "output" or any(reach.get(u, False) for u in n.users)
        steps = [s for node, s in self.exits if reach.get(node)]
        return max(steps) if steps else 0.0


def qdq_rewrite(gm: fx.GraphModule) -> QDQRewrite:
    """Rewrite ``gm`` (in place: pass a copy) into float ops between QuantizeLinear and
    DequantizeLinear calls, ready for ``torch.onnx.export``."""
    w = _Writer(gm)
    w.run()
    from fxopt.ir.graph import remove_unused_attributes
    gm.graph.eliminate_dead_code()
    remove_unused_attributes(gm)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, value in list(vars(gm).items()):  # the prepacked weights, unpacked above
        if isinstance(value, torch.ScriptObject) and name not in used:
            delattr(gm, name)
    gm.graph.lint()
    gm.recompile()
    return QDQRewrite(gm, dict(w.translated), w.kept, w.output_step())


def untranslated(gm: fx.GraphModule) -> list[str]:
    """The int8 ops still in ``gm`` after :func:`qdq_rewrite` (no QDQ translation)."""
    return [f"{n.name} ({n.target})" for n in gm.graph.nodes if n.op == "call_function"
            and (n.target in _IR or n.target is torch.quantize_per_tensor
                 or (_op_name(n.target) or "").startswith("quantized::"))]


def compare_within_step(out: list, ref: list, step: float):
    """ErrorStats of ``out`` against ``ref``: ok when every element is within one output
    quantization step (``step``; float slack 1e-4 relative plus 1e-6)."""
    from fxopt.ir.tolerances import ErrorStats, rel_err

    stats = ErrorStats(tolerance=step * (1 + 1e-4) + 1e-6, dtype="int8 (one output step)")
    if len(out) != len(ref):
        stats.ok, stats.reason = False, f"{len(out)} outputs vs {len(ref)}"
        return stats
    for o, r in zip(out, ref):
        if tuple(o.shape) != tuple(r.shape):
            stats.ok, stats.reason = False, f"output shape {tuple(o.shape)} vs {tuple(r.shape)}"
            stats.max_abs = stats.rel_err = float("inf")
            return stats
        if r.numel() == 0:
            continue
        stats.max_abs = max(stats.max_abs, float((o.double() - r.double()).abs().max()))
        stats.rel_err = max(stats.rel_err, float(rel_err(o, r)))
    stats.ok = stats.max_abs <= stats.tolerance
    return stats


def drop_initializer_identities(path) -> int:
    """Rewire ``Identity(initializer)`` nodes (the TorchScript exporter writes one per shared
    scale or zero point) to the initializer itself, so every DequantizeLinear reads its
    constants directly (ONNX Runtime's QDQ fusion looks for that). Returns how many went."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    rename = {}
    for node in list(graph.node):
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            rename[node.output[0]] = node.input[0]
            graph.node.remove(node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    if rename:
        onnx.save(model, str(path))
    return len(rename)
