"""What the rows of the QDQ table share: the grid of every value holding codes, and the pieces
every QDQ form is built from.

An int8 graph carries *codes* between its ops. The QDQ rewrite (``fxopt.export.qdq``) keeps
them flowing (uint8 codes for affine grids, int8 for symmetric ones) and gives every op a float
body between DequantizeLinear and QuantizeLinear. One :class:`QDQState` is the ``context`` of
``apply_rules``: each row reads it as ``m.context`` and builds with its helpers::

    st = m.context
    grid = st.grid_of(m.root.args[0])            # None: a float value, not codes
    y = b.call_function(F.max_pool2d, (st.dq(b, m.root.args[0]), 2))
    return st.q(b, y, grid)                      # codes again, on the same grid

- ``grid``: the grid of each node that holds codes. :meth:`QDQState.q` records the grid of the
  codes it writes; ops that only move codes (flatten, reshape, ``contiguous``, ... the
  ``CODE_MOVES`` table) are looked through by :meth:`QDQState.grid_of`, so they stay in the
  graph and run on the codes unchanged, and need no row.
- constants: scales, zero points, int8 weights and float biases become buffers (initializers
  in the file), one per distinct value, read by ``get_attr`` nodes placed at the top of the
  graph so every later row can share them.
- ``exits``: each activation dequantized for good, with the step of its grid; the coarsest step
  that reaches the graph output is the tolerance of the ONNX Runtime check
  (:meth:`QDQState.output_step`).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxopt.export.onnx_ops import dequantize_linear, quantize_linear
from fxopt.infra.rewrite import Builder
from fxopt.ir.activations import apply_activation
from fxopt.ir.graph import get_attr_value

__all__ = ["Grid", "QDQState", "CODE_MOVES", "CODE_MOVE_METHODS", "moves_codes"]

# Ops that move codes without changing them: their output holds codes on their input's grid.
# (``chunk`` / ``split``: a tuple of pieces, each read by a getitem; ShuffleNet's branches)
CODE_MOVES = frozenset({torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
                        torch.permute, torch.transpose, operator.getitem,
                        torch.Tensor.contiguous, torch.chunk, torch.split, torch.unbind})
CODE_MOVE_METHODS = frozenset({"flatten", "reshape", "view", "contiguous", "squeeze",
                               "unsqueeze", "permute", "transpose", "clone", "detach", "chunk",
                               "split", "unbind"})


def moves_codes(node: fx.Node) -> bool:
    """Whether ``node`` is a call that only moves its input's values (see ``CODE_MOVES``)."""
    if node.op == "call_function":
        return node.target in CODE_MOVES
    return node.op == "call_method" and node.target in CODE_MOVE_METHODS


@dataclass(frozen=True)
class Grid:
    """A per-tensor quantization grid: ``value = (code - zp) * scale``, codes in qmin..qmax."""

    scale: float
    zp: int
    qmin: int = 0
    qmax: int = 255

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8 if self.qmin >= 0 else torch.int8


class QDQState:
    """The context of one QDQ rewrite of ``gm`` (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm, self.g = gm, gm.graph
        self.grid: dict[fx.Node, Grid] = {}
        self.exits: list[tuple[fx.Node, float]] = []  # activations dequantized, their step
        self._consts: dict[tuple, fx.Node] = {}
        self._n = 0

    # -- reading the source graph ----------------------------------------------------------
    def value(self, arg) -> torch.Tensor:
        """The tensor behind a ``get_attr`` node (or a constant)."""
        return get_attr_value(self.gm, arg.target) if isinstance(arg, fx.Node) else \
            torch.as_tensor(arg)

    def ir_grid(self, scale, zp, qmin=0, qmax=255) -> Grid:
        """The grid of an fxopt int8 op's arguments (scale and zero point are buffers)."""
        return Grid(float(self.value(scale)), int(self.value(zp)), int(qmin), int(qmax))

    def grid_of(self, x) -> Grid | None:
        """The grid of the codes ``x`` holds; None for float values and non-nodes."""
        if not isinstance(x, fx.Node):
            return None
        if x in self.grid:
            return self.grid[x]
        if not moves_codes(x):
            return None
        return next((g for g in map(self.grid_of, x.all_input_nodes) if g is not None), None)

    # -- constants (initializers in the file) -----------------------------------------------
    def const(self, key, value: torch.Tensor, name: str) -> fx.Node:
        """A ``get_attr`` of a new buffer holding ``value``, one per ``key``. Placed before
        the first computation so that every row, wherever it rewrites, can read it."""
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

    def _scale_zp(self, grid: Grid) -> tuple[fx.Node, fx.Node]:
        s = self.const(("s", grid.scale), torch.tensor(grid.scale, dtype=torch.float32), "scale")
        z = self.const(("z", grid.zp, grid.dtype), torch.tensor(grid.zp, dtype=grid.dtype), "zp")
        return s, z

    # -- QDQ pieces -------------------------------------------------------------------------
    def q(self, b: Builder, x: fx.Node, grid: Grid) -> fx.Node:
        """QuantizeLinear of the float ``x`` onto ``grid``; the result holds codes."""
        info = torch.iinfo(grid.dtype)
        if (grid.qmin, grid.qmax) != (info.min, info.max):
            # a narrower range than the dtype's (7-bit grids): ONNX saturates to the dtype only
            lo, hi = (grid.qmin - grid.zp) * grid.scale, (grid.qmax - grid.zp) * grid.scale
            x = b.call_function(torch.clamp, (x, lo, hi))
        out = b.call_function(quantize_linear, (x, *self._scale_zp(grid)))
        self.grid[out] = grid
        return out

    def dq(self, b: Builder, x: fx.Node, grid: Grid | None = None) -> fx.Node:
        """DequantizeLinear of the codes ``x`` (on ``grid``, by default the one they hold).
        The codes' own kind (uint8 or int8) wins over ``grid``'s: an op's argument grid
        (``ir_grid``) does not say which, its producer's does."""
        known = self.grid_of(x)
        if grid is None:
            grid = known
        elif known is not None and known.dtype != grid.dtype:
            grid = Grid(grid.scale, grid.zp, known.qmin, known.qmax)
        return b.call_function(dequantize_linear, (x, *self._scale_zp(grid), None))

    def dq_exit(self, b: Builder, x: fx.Node, grid: Grid | None = None) -> fx.Node:
        """:meth:`dq` of an activation leaving the int8 region (its step may bound the check)."""
        out = self.dq(b, x, grid)
        self.exits.append((out, (grid or self.grid_of(x)).scale))
        return out

    def float_in(self, b: Builder, x, grid: Grid) -> fx.Node:
        """``x`` as float values on ``grid``: dequantized codes, or a float quantized first."""
        if self.grid_of(x) is not None:
            return self.dq(b, x)
        return self.dq(b, self.q(b, x, grid))

    def weight(self, b: Builder, w_q: torch.Tensor, w_scale: torch.Tensor, tag: str) -> fx.Node:
        """An int8 weight initializer, dequantized per output channel (axis 0, zero point 0):
        the form ONNX Runtime folds into QLinearConv / QGemm."""
        key = ("w", tag)
        wq = self.const(key + ("q",), w_q.to(torch.int8), "w_int8")
        ws = self.const(key + ("s",), w_scale.float().reshape(-1), "w_scale")
        wz = self.const(key + ("z",), torch.zeros(w_scale.numel(), dtype=torch.int8), "w_zp")
        return b.call_function(dequantize_linear, (wq, ws, wz, 0))

    def bias(self, bias: torch.Tensor | None, tag: str) -> fx.Node | None:
        """A float bias initializer (fxopt adds biases in float32), or None."""
        return None if bias is None else self.const(("b", tag), bias.float(), "bias")

    @staticmethod
    def activation(b: Builder, y: fx.Node, act: str, act_args=()) -> fx.Node:
        """``act`` (a row of ``fxopt.ir.activations``) applied to ``y``; ``none``: ``y``."""
        if act == "none":
            return y
        return b.call_function(apply_activation, (y, act, tuple(act_args)))

    def layer(self, b: Builder, *, x, w_q: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None, conv: tuple | None, x_grid: Grid, y_grid: Grid,
              residual=None, act: str = "none", act_args=(), out_codes: bool = True,
              tag: str) -> fx.Node:
        """A quantized convolution (``conv``: stride, padding, dilation, groups) or linear
        (``conv=None``) layer: ``Q(act(op(DQ(x), DQ(w), b) + residual))``, the codes when
        ``out_codes``, else dequantized again (an exit of the int8 region)."""
        xf = self.float_in(b, x, x_grid)
        wf = self.weight(b, w_q, w_scale, tag)
        bf = self.bias(bias, tag)
        if conv is not None:
            stride, padding, dilation, groups = conv
            y = b.call_function(F.conv2d, (xf, wf, bf, list(stride), list(padding),
                                           list(dilation), groups))
        else:
            y = b.call_function(F.linear, (xf, wf, bf))
        if residual is not None:
            y = b.call_function(operator.add, (y, residual))
        codes = self.q(b, self.activation(b, y, act, act_args), y_grid)
        return codes if out_codes else self.dq_exit(b, codes)

    def requant(self, b: Builder, fn, args, inputs, out_grid: Grid, kwargs=None) -> fx.Node:
        """``Q(fn(*inputs, *args, **kwargs), out_grid)``: a float op on dequantized values."""
        y = b.call_function(fn, (*inputs, *args), kwargs or {})
        return self.q(b, y, out_grid)

    # -- after the rewrite ------------------------------------------------------------------
    def output_step(self) -> float:
        """The coarsest step among the dequantized activations that reach the output."""
        reach: dict[fx.Node, bool] = {}
        for n in reversed(list(self.g.nodes)):
            reach[n] = n.op == "output" or any(reach.get(u, False) for u in n.users)
        steps = [s for node, s in self.exits if reach.get(node)]
        return max(steps) if steps else 0.0
