"""The int8 rewrite of ``quantize_int8``: a :class:`~passes.quantize_plan.Plan` written into the
graph as the int8 IR of ``fxopt.ops.int8``.

``Writer(gm, plan).run()`` walks the plan's int8 nodes in graph order: a layer becomes
``conv2d_int8`` / ``linear_int8`` writing codes (a residual layer: the conv on its pre-add grid,
then ``add_int8`` with the activation); max pooling, average pooling (``avg_pool2d_int8``,
``adaptive_avg_pool2d_int8``), flatten, adds, products (``mul_int8``) and cats of int8 values
become their int8 forms; the first int8 reader of a float value gets a ``quantize``; every
float reader of an int8 value gets one ``dequantize`` (an exit), which the pass returns to size
its tolerance (``fxopt.quant.measure.output_step``). Every call is written through the op
schema, its arguments by name.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxopt.ir.graph import add_buffer, copy_meta, module_path, tensor_meta_of
from fxopt.ops.int8 import (ADD_INT8, AVG_POOL2D_INT8, AVGPOOL_INT8, CAT_INT8, CONV2D_INT8,
                            DEQUANTIZE, LINEAR_INT8, MAXPOOL_INT8, MUL_INT8, QUANTIZE)
from fxopt.quant.plan import PRE, Plan, avg_pool2d_args
from fxopt.quant.qparams import QParams

__all__ = ["Writer"]


def _label(n: fx.Node) -> str:
    return module_path(n) or n.name


class Writer:
    """Writes the int8 IR for ``plan`` into ``gm`` (the graph the plan was made on)."""

    def __init__(self, gm: fx.GraphModule, plan: Plan):
        self.gm, self.g, self.plan = gm, gm.graph, plan
        self.codes: dict[fx.Node, fx.Node] = {}   # original int8 node -> node of its codes
        self.entries: dict[fx.Node, fx.Node] = {}  # float value -> its quantize node
        self.attrs: dict = {}
        self.counts = {"conv2d": 0, "linear": 0, "add": 0, "mul": 0, "cat": 0, "pool": 0,
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
        w_q = self.attr(f"{base}_w_int8_", w_qp.quantize(layer.weight))
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

    def other(self, n: fx.Node, role: str) -> fx.Node:
        src = n.args[0]
        if role == "maxpool":
            with self.g.inserting_before(n):
                k, st, p, d, c = _maxpool_args(self.gm, n)
                new = MAXPOOL_INT8.emit(self.g, q=self.codes[src], kernel_size=k, stride=st,
                                        padding=p, dilation=d, ceil_mode=c)
            self.counts["pool"] += 1
        elif role in ("flatten", "identity"):
            args = (self.codes[src], *n.args[1:])
            with self.g.inserting_before(n):
                new = self.g.create_node(n.op, n.target, args, dict(n.kwargs))
            if role == "identity":
                return self.codes[src]
        elif role == "avgpool":
            s, z, qp = self.grid_attrs(src, _base(src))
            size = _avgpool_size(self.gm, n)
            with self.g.inserting_before(n):
                new = AVGPOOL_INT8.emit(self.g, q=self.codes[src], output_size=size, scale=s,
                                        zp=z, qmin=qp.qmin, qmax=qp.qmax)
            self.counts["pool"] += 1
        elif role == "avg_pool2d":
            s, z, qp = self.grid_attrs(src, _base(src))
            k, st, p, ceil, cip, _ = avg_pool2d_args(self.gm, n)
            with self.g.inserting_before(n):
                new = AVG_POOL2D_INT8.emit(self.g, q=self.codes[src], kernel_size=k, stride=st,
                                           padding=p, ceil_mode=ceil, count_include_pad=cip,
                                           scale=s, zp=z, qmin=qp.qmin, qmax=qp.qmax)
            self.counts["pool"] += 1
        elif role in ("add", "mul"):
            a, as_, az, _ = self.input_codes(n.args[0], n)
            b, bs, bz, _ = self.input_codes(n.args[1], n)
            ys, yz, qp = self.grid_attrs(n, _base(n))
            op = ADD_INT8 if role == "add" else MUL_INT8
            with self.g.inserting_before(n):
                new = op.emit(self.g, a=a, a_scale=as_, a_zp=az, b=b, b_scale=bs, b_zp=bz,
                              y_scale=ys, y_zp=yz, y_qmin=qp.qmin, y_qmax=qp.qmax)
            self.counts[role] += 1
        else:  # cat
            ins = [self.input_codes(v, n) for v in n.args[0]]
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
            ys, yz, qp = self.grid_attrs(n, _base(n))
            with self.g.inserting_before(n):
                new = CAT_INT8.emit(self.g, qs=[i[0] for i in ins], scales=[i[1] for i in ins],
                                    zps=[i[2] for i in ins], dim=dim, y_scale=ys, y_zp=yz,
                                    y_qmin=qp.qmin, y_qmax=qp.qmax)
            self.counts["cat"] += 1
        copy_meta(new, n)
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


def _base(n: fx.Node) -> str:
    return (_label(n)).replace(".", "_")


def _maxpool_args(gm, n: fx.Node) -> tuple:
    """(kernel_size, stride, padding, dilation, ceil_mode) of a max pooling, as pairs."""

    def pair(v):
        return list(v) if isinstance(v, (tuple, list)) else [v, v]

    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        k, s, p, d, c = m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode
    else:  # F.max_pool2d is declared (*args, **kwargs): name its parameters here
        names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode")
        a = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False}
        a.update(zip(names, n.args))
        a.update(n.kwargs)
        k, s, p, d, c = a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"]
    s = s if s not in (None, [], ()) else k
    return pair(k), pair(s), pair(p), pair(d), bool(c)


def _avgpool_size(gm, n: fx.Node) -> list[int]:
    if n.op == "call_module":
        size = gm.get_submodule(n.target).output_size
    else:
        size = n.args[1] if len(n.args) > 1 else n.kwargs["output_size"]
    if isinstance(size, int):
        size = (size, size)
    tm = n.meta.get("tensor_meta")
    return [int(s) if s is not None else int(tm.shape[-2 + i]) for i, s in enumerate(size)]
