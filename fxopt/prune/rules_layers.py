"""Channel rules for layers: conv, linear and the norms (batch/instance, layer, group, PReLU).

``LayerRules`` is a mixin of ``fxopt.channel_rules.ChannelRules``: these rules give a layer's
output fresh slots (conv/linear), tie its weights to the slots they index, and record its MACs.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch.fx as fx

from fxopt.ir.graph import get_attr_value, module_path
from fxopt.prune.records import Layout, MacNode, Rewrite
from fxopt.prune.rule_tables import _arg, _arg_where, _describe, _ndim, _Unsupported

__all__ = ["LayerRules"]


class LayerRules:
    """Rules for conv/linear/norm layers, module or functional (a mixin of ``ChannelRules``)."""

    def _param_node(self, n: fx.Node, pos: int, name: str) -> str | None:
        a = _arg(n, pos, name)
        if a is None:
            return None
        if not isinstance(a, fx.Node) or a.op != "get_attr" or len(a.users) != 1:
            raise _Unsupported(f"its {name} is computed, or shared with another op")
        return a.target

    # -- layers ---------------------------------------------------------------------------
    def _conv(self, n, x, cin, cout, groups, transposed, wpath, bpath, owner) -> None:
        vin = self._channel_vector(n, x, 1, cin)
        out = self._fresh(n, cout, "conv", owner)
        if transposed:
            if groups != 1:
                raise _Unsupported("grouped transposed convolution")
            self._param(wpath, 0, vin, "weight", owner)
            self._param(wpath, 1, out, "weight", owner)
        else:
            self._param(wpath, 0, out, "weight", owner)
            if groups == 1:
                self._param(wpath, 1, vin, "weight", owner)
            else:
                a, b = cin // groups, cout // groups
                for j in range(groups):
                    blk = np.concatenate([vin[j * a:(j + 1) * a], out[j * b:(j + 1) * b]])
                    if (vin[j * a:(j + 1) * a] < 0).any():
                        self.uf.freeze(blk, f"grouped conv {_describe(n)} reads a model input")
                    self.uf.unite_all(blk)
                self._event("depthwise" if a == 1 and b == 1 else "grouped", n,
                            np.concatenate([vin, out]))
        if bpath is not None:
            self._param(bpath, 0, out, "bias", owner)
        self._set(n, Layout(1, out))
        self.mac_nodes.append(MacNode(n.name, self._macs(n), out,
                                      vin if groups == 1 else None))

    def _linear(self, n, x, fin, fout, wpath, bpath, owner) -> None:
        nd = _ndim(n)
        lay = self.layout(x)
        if not lay.free and lay.pdim != nd - 1:
            self._freeze(lay, f"{_describe(n)} is applied along another dim")
            vin = np.full(fin, -1, dtype=np.int64)
        else:
            vin = self._channel_vector(n, x, nd - 1, fin)
        out = self._fresh(n, fout, "linear", owner)
        self._param(wpath, 0, out, "weight", owner)
        self._param(wpath, 1, vin, "weight", owner)
        if bpath is not None:
            self._param(bpath, 0, out, "bias", owner)
        self._set(n, Layout(nd - 1, out))
        self.mac_nodes.append(MacNode(n.name, self._macs(n), out, vin))

    def _conv_functional(self, n: fx.Node) -> None:
        w = self._param_node(n, 1, "weight")
        b = self._param_node(n, 2, "bias")
        groups = _arg(n, 6, "groups", 1)
        if w is None or not isinstance(groups, int):
            raise _Unsupported("")
        ws = tuple(get_attr_value(self.gm, w).shape)
        cout, cin = ws[0], ws[1] * groups
        self._conv(n, n.args[0], cin, cout, groups, False, w, b, module_path(n) or n.name)
        if groups > 1:
            self.rewrites.append(Rewrite("groups", n.name, _arg_where(n, 6, "groups"),
                                         vec=self.layouts[n.name].vec, block=cout // groups))

    def _linear_functional(self, n: fx.Node) -> None:
        w = self._param_node(n, 1, "weight")
        b = self._param_node(n, 2, "bias")
        if w is None:
            raise _Unsupported("")
        fout, fin = tuple(get_attr_value(self.gm, w).shape)
        self._linear(n, n.args[0], fin, fout, w, b, module_path(n) or n.name)

    def _per_channel(self, n, x, dim: int, paths: Sequence[str], owner: str) -> None:
        """BatchNorm-like: parameters indexed by the channels along ``dim``."""
        lay = self.layout(x)
        if not lay.free and lay.pdim == dim:
            for p in paths:
                role = "stat" if p.endswith(("running_mean", "running_var")) else (
                    "bn_weight" if p.endswith("weight") else "bias")
                self._param(p, 0, lay.vec, role, owner)
        self._set(n, lay)

    def _batch_norm_functional(self, n: fx.Node) -> None:
        names = [self._param_node(n, i, k) for i, k in
                 ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
        self._per_channel(n, n.args[0], 1, [p for p in names if p], module_path(n) or n.name)

    def _layer_norm(self, n, x, normalized_shape, w, b, pos) -> None:
        lay = self.layout(x)
        nd = _ndim(n)
        ns = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        if lay.free or lay.pdim < nd - len(ns):
            self._set(n, lay)  # normalizes over dims that keep their size
            return
        if len(ns) != 1:
            self._freeze(lay, f"LayerNorm {_describe(n)} normalizes over channels and more")
            self._set(n, lay)
            return
        owner = module_path(n) or n.name
        for p, role in ((w, "norm_weight"), (b, "bias")):
            if p is not None:
                self._param(p, 0, lay.vec, role, owner)
        self.norm_nodes[n.name] = nd - 1
        self._event("norm", n, lay.vec)
        if pos is not None:
            self.rewrites.append(Rewrite("norm_shape", n.name, pos, vec=lay.vec))
        self._set(n, lay)

    def _group_norm(self, n, x, num_groups, w, b, pos) -> None:
        lay = self.layout(x)
        if lay.free:
            self._set(n, lay)
            return
        if lay.pdim != 1 or not isinstance(num_groups, int):
            self._freeze(lay, f"GroupNorm {_describe(n)} over a dim that shrinks")
            self._set(n, lay)
            return
        c = len(lay.vec)
        blk = c // num_groups
        for j in range(num_groups):
            self.uf.unite_all(lay.vec[j * blk:(j + 1) * blk])
        owner = module_path(n) or n.name
        for p, role in ((w, "norm_weight"), (b, "bias")):
            if p is not None:
                self._param(p, 0, lay.vec, role, owner)
        self._event("norm", n, lay.vec)
        if pos is not None:
            self.rewrites.append(Rewrite("groups", n.name, pos, vec=lay.vec, block=blk))
        self._set(n, lay)

    # -- finishing --------------------------------------------------------------------------
    def _macs(self, n: fx.Node) -> int:
        from fxopt.ir.metrics import node_macs

        try:
            return int(node_macs(n, self.gm))
        except Exception:  # noqa: BLE001 - MACs are an estimate; a missing shape counts 0
            return 0
