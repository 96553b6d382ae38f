"""The int8 rewrite of ``quantize_int8``: a :class:`~passes.quantize_plan.Plan` written into the
graph as the int8 IR of ``fxopt.ops.int8``.

``Writer(gm, plan).run()`` walks the plan's int8 nodes in graph order: a layer becomes
``conv2d_int8`` / ``linear_int8`` writing codes (a residual layer: the conv on its pre-add grid,
then ``add_int8`` with the activation); max pooling, average pooling (``avg_pool2d_int8``,
``adaptive_avg_pool2d_int8``, the latter onto its own grid), flatten, adds, products
(``mul_int8``), cats and BatchNorms (``batch_norm2d_int8``, a ReLU after it its ``act``) of int8
values become their int8 forms; the first int8 reader of a
float value gets a ``quantize``; every float reader of an int8 value gets one ``dequantize`` (an
exit), which the pass returns to size its tolerance (``fxopt.quant.measure.output_step``); a
reader of its shape only reads the codes. Every call is written through the op schema, its
arguments by name.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxopt.ir.graph import add_buffer, copy_meta, module_path, tensor_meta_of
from fxopt.ops.int8 import (ADD_INT8, BATCH_NORM2D_INT8, CAT_INT8, CONV2D_INT8, DEQUANTIZE,
                            LINEAR_INT8, MUL_INT8, QUANTIZE)
from fxopt.quant.plan import PRE, Plan
from fxopt.quant.roles import SAME_GRID
from fxopt.quant.qparams import QParams

__all__ = ["Writer"]


def _label(n: fx.Node) -> str:
    return module_path(n) or n.name


class Writer:
    """Writes the int8 IR for ``plan`` into ``gm`` (the graph the plan was made on)."""

    def __init__(self, gm: fx.GraphModule, plan: Plan,
                 weight_codes: dict[fx.Node, torch.Tensor] | None = None):
        self.gm, self.g, self.plan = gm, gm.graph, plan
        self.weight_codes = weight_codes or {}  # the layers' int8 weights, when made already
        self.codes: dict[fx.Node, fx.Node] = {}   # original int8 node -> node of its codes
        self.entries: dict[fx.Node, fx.Node] = {}  # float value -> its quantize node
        self.attrs: dict = {}
        # a counter per role, the same-grid rows' own (``SameGridRole.count``) included
        self.counts = {"conv2d": 0, "linear": 0, "add": 0, "mul": 0, "cat": 0, "pool": 0,
                       "batch_norm": 0,
                       **{r.count: 0 for r in SAME_GRID.values() if r.count},
                       "quantize": 0, "dequantize": 0}

    def attr(self, prefix: str, value: torch.Tensor, key=None) -> fx.Node:
        if key is not None and key in self.attrs:
            return self.attrs[key]
        name = add_buffer(self.gm, prefix, value)
        first = next(n for n in self.g.nodes if n.op != "placeholder")
        with self.g.inserting_before(first):
            node = self.g.get_attr(name)
        node.meta["tensor_meta"] = tensor_meta_of(value)
        if key is not None:
            self.attrs[key] = node
        return node

    def grid_attrs(self, key, base: str) -> tuple[fx.Node, fx.Node, QParams]:
        qp = self.plan.grid(key)
        gid = ("grid", id(qp))
        s = self.attr(f"{base}_scale_", qp.scale.clone(), (gid, "s"))
        z = self.attr(f"{base}_zp_", qp.zero_point.clone(), (gid, "z"))
        return s, z, qp

    def input_codes(self, value: fx.Node,
                    before: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, QParams]:
        """Codes of ``value`` (an int8 value's codes, or a quantize at a region entry)."""
        s, z, qp = self.grid_attrs(value, _base(value))
        if value in self.codes:
            return self.codes[value], s, z, qp
        q = self.entries.get(value)
        if q is None:
            with self.g.inserting_before(before):  # the first quantized reader
                q = QUANTIZE.emit(self.g, x=value, scale=s, zp=z, qmin=qp.qmin, qmax=qp.qmax)
            copy_meta(q, value)
            self.entries[value] = q
            self.counts["quantize"] += 1
        return q, s, z, qp

    def layer(self, n: fx.Node) -> fx.Node:
        layer = self.plan.layers[n]
        base = layer.label.replace(".", "_")
        x, xs, xz, x_qp = self.input_codes(layer.x, n)
        w_qp = self.plan.weights[n]
        w_q = self.weight_codes.get(n)
        w_q = self.attr(f"{base}_w_int8_", w_qp.quantize(layer.weight) if w_q is None else w_q)
        w_s = self.attr(f"{base}_w_scale_", w_qp.scale.clone())
        b = None if layer.bias is None else self.attr(f"{base}_bias_", layer.bias.clone())
        split = layer.residual is not None
        out_key = (PRE, n) if split else n
        if split:
            qp = self.plan.grids[out_key]
            ys = self.attr(f"{base}_pre_scale_", qp.scale.clone())
            yz = self.attr(f"{base}_pre_zp_", qp.zero_point.clone())
            y_qp = qp
        else:
            ys, yz, y_qp = self.grid_attrs(n, base)
        values = dict(x=x, w_q=w_q, w_scale=w_s, bias=b, x_scale=xs, x_zp=xz, y_scale=ys,
                      y_zp=yz, act="none" if split else layer.act,
                      act_args=[] if split else list(layer.act_args), x_qmin=x_qp.qmin,
                      x_qmax=x_qp.qmax, y_qmin=y_qp.qmin, y_qmax=y_qp.qmax, out_int8=True)
        op = LINEAR_INT8
        if layer.kind == "conv2d":
            stride, padding, dilation, groups = layer.conv
            values.update(stride=stride, padding=padding, dilation=dilation, groups=groups)
            op = CONV2D_INT8
        with self.g.inserting_before(n):
            new = op.emit(self.g, **values)
        copy_meta(new, n)
        if layer.path:
            new.meta["fxopt_path"] = layer.path  # the conv / linear module, not the activation
        self.counts[layer.kind] += 1
        if not split:
            return new
        r, rs, rz, _ = self.input_codes(layer.residual, n)
        os_, oz, o_qp = self.grid_attrs(n, base)
        with self.g.inserting_before(n):
            add = ADD_INT8.emit(self.g, a=new, a_scale=ys, a_zp=yz, b=r, b_scale=rs, b_zp=rz,
                                y_scale=os_, y_zp=oz, act=layer.act,
                                act_args=list(layer.act_args), y_qmin=o_qp.qmin,
                                y_qmax=o_qp.qmax)
        copy_meta(add, n)
        self.counts["add"] += 1
        return add

    def batch_norm(self, n: fx.Node) -> fx.Node:
        """An eval BatchNorm of an int8 value: ``batch_norm2d_int8`` onto its grid (the ReLU's
        when one is fused: ``act="relu"``), the module's statistics and affine as buffers."""
        bn, base = self.gm.get_submodule(n.target), _base(n)
        x, xs, xz, _ = self.input_codes(n.args[0], n)
        ys, yz, qp = self.grid_attrs(n, base)
        p = {k: None if getattr(bn, k) is None else
             self.attr(f"{base}_{k}_", getattr(bn, k).detach().float().clone())
             for k in ("weight", "bias", "running_mean", "running_var")}
        with self.g.inserting_before(n):
            return BATCH_NORM2D_INT8.emit(
                self.g, q=x, weight=p["weight"], bias=p["bias"], mean=p["running_mean"],
                var=p["running_var"], eps=float(bn.eps), x_scale=xs, x_zp=xz, y_scale=ys,
                y_zp=yz, act="none" if self.plan.bn_relu(n) is None else "relu",
                y_qmin=qp.qmin, y_qmax=qp.qmax)

    def other(self, n: fx.Node, role: str) -> fx.Node:
        src = n.args[0]
        row = SAME_GRID.get(role)
        if (row is not None and row.passthrough) or role == "bn_relu":
            return self.codes[src]  # a BatchNorm's ReLU: its clamp, in the BatchNorm's codes
        if row is not None and row.op is None:  # a reshape: the same call on the codes
            with self.g.inserting_before(n):
                new = self.g.create_node(n.op, n.target, (self.codes[src], *n.args[1:]),
                                         dict(n.kwargs))
        elif row is not None:
            values = row.args(self.gm, n)
            if row.on_grid:
                s, z, qp = self.grid_attrs(src, _base(src))
                values.update(scale=s, zp=z, qmin=qp.qmin, qmax=qp.qmax)
            if row.own_grid:  # requantized onto its own observed grid
                ys, yz, _ = self.grid_attrs(n, _base(n))
                values.update(y_scale=ys, y_zp=yz)
            with self.g.inserting_before(n):
                new = row.op.emit(self.g, q=self.codes[src], **values)
        elif role == "batch_norm":
            new = self.batch_norm(n)
        elif role in ("add", "mul"):
            a, as_, az, _ = self.input_codes(n.args[0], n)
            b, bs, bz, _ = self.input_codes(n.args[1], n)
            ys, yz, qp = self.grid_attrs(n, _base(n))
            op = ADD_INT8 if role == "add" else MUL_INT8
            with self.g.inserting_before(n):
                new = op.emit(self.g, a=a, a_scale=as_, a_zp=az, b=b, b_scale=bs, b_zp=bz,
                              y_scale=ys, y_zp=yz, y_qmin=qp.qmin, y_qmax=qp.qmax)
        else:  # cat
            ins = [self.input_codes(v, n) for v in n.args[0]]
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
            ys, yz, qp = self.grid_attrs(n, _base(n))
            with self.g.inserting_before(n):
                new = CAT_INT8.emit(self.g, qs=[i[0] for i in ins], scales=[i[1] for i in ins],
                                    zps=[i[2] for i in ins], dim=dim, y_scale=ys, y_zp=yz,
                                    y_qmin=qp.qmin, y_qmax=qp.qmax)
        copy_meta(new, n)
        count = role if row is None else row.count
        if count:
            self.counts[count] += 1
        return new

    def run(self) -> list[fx.Node]:
        """Rewrites; returns the dequantize nodes (the region exits)."""
        order = [n for n in self.g.nodes if n in self.plan.roles]
        for n in order:
            role = self.plan.roles[n]
            self.codes[n] = self.layer(n) if role == "layer" else self.other(n, role)
        converted = set(order)
        exits = []
        for n in order:
            float_users = [u for u in n.users if u not in converted]
            for u in [u for u in float_users if _reads_shape(u)]:
                u.replace_input_with(n, self.codes[n])  # the codes have the value's shape
            float_users = [u for u in float_users if not _reads_shape(u)]
            if not float_users:
                continue
            s, z, _ = self.grid_attrs(n, _base(n))
            with self.g.inserting_after(self.codes[n]):
                deq = DEQUANTIZE.emit(self.g, q=self.codes[n], scale=s, zp=z)
            copy_meta(deq, n)
            self.counts["dequantize"] += 1
            exits.append(deq)
            for u in float_users:
                u.replace_input_with(n, deq)
        for n in reversed(order):
            self.g.erase_node(n)
        return exits


def _reads_shape(u: fx.Node) -> bool:
    """``v.shape``, ``v.size(...)``, ``v.dim()``: a reader of the shape only (FPN's
    ``F.interpolate(top, size=lateral.shape[-2:])``), which needs no dequantize."""
    return (u.op == "call_function" and u.target is getattr and u.args[1:] == ("shape",)) or \
        (u.op == "call_method" and u.target in ("size", "dim"))


def _base(n: fx.Node) -> str:
    return (_label(n)).replace(".", "_")
