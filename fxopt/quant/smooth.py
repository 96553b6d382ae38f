"""SmoothQuant scale migration: a LayerNorm's outlier channels moved into the Linear weights
that read it, before calibration.

A trained transformer's LayerNorm output has a few channels many times larger than the rest
(large ``gamma``); one activation grid per tensor then spends its codes on them and rounds the
other channels to a few steps. SmoothQuant (Xiao et al., 2023) divides channel ``j`` of the
activation by ``s_j`` and multiplies column ``j`` of every reading weight by it, an identity in
float::

    s_j = max|X_j| ** alpha / max|W_:,j| ** (1 - alpha)      (alpha = QuantConfig.smooth_quant)

Here the division is folded into the LayerNorm's affine parameters (``gamma / s``, ``beta / s``),
so nothing runs at inference; it applies where every reader of a LayerNorm with affine
parameters is a Linear layer about to be quantized (a ViT's ``norm1 -> qkv``, ``norm2 -> fc1``).
The per-channel weight grids take the larger columns in their stride.

    >>> n = smooth_layernorms(gm, layers, batches, alpha=0.5)   # LayerNorms smoothed
    >>> layers = find_layers(gm)                                # their new weights
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxopt.ir.graph import get_attr_value
from fxopt.quant.plan import Layer, QuantizableFused

__all__ = ["smooth_layernorms", "smoothable"]


def _set(owner_path: str, gm: fx.GraphModule, value: torch.Tensor) -> None:
    """Replace the parameter or buffer at ``owner_path`` by ``value`` (not in place)."""
    owner, _, name = owner_path.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    old = getattr(mod, name)
    if isinstance(old, nn.Parameter):
        setattr(mod, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(mod, name, value)


def _weight_target(gm: fx.GraphModule, layer: Layer) -> str | None:
    """The attribute path of ``layer``'s weight (an ``nn.Linear`` call, or a fused op's
    ``get_attr``)."""
    n = layer.node
    if n.op == "call_module":
        return f"{n.target}.weight"
    v = QuantizableFused.match(n)
    return v.weight.target if v is not None else None


def _layernorm_params(gm: fx.GraphModule, n: fx.Node) -> tuple[str, str] | None:
    """The attribute paths of the affine weight and bias of a LayerNorm over the last
    dimension: an ``nn.LayerNorm`` call or ``F.layer_norm`` with ``get_attr`` parameters (how
    timm's LayerNorm traces); else None."""
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if isinstance(m, nn.LayerNorm) and m.elementwise_affine and m.bias is not None \
                and len(m.normalized_shape) == 1:
            return f"{n.target}.weight", f"{n.target}.bias"
        return None
    if n.op != "call_function" or n.target is not F.layer_norm:
        return None
    a = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), n.args), **n.kwargs)
    w, b, shape = a.get("weight"), a.get("bias"), a.get("normalized_shape")
    if not (isinstance(w, fx.Node) and w.op == "get_attr" and isinstance(b, fx.Node)
            and b.op == "get_attr" and isinstance(shape, (list, tuple)) and len(shape) == 1):
        return None
    return w.target, b.target


def _reads_shape(u: fx.Node) -> bool:
    return (u.op == "call_function" and u.target is getattr and u.args[1:] == ("shape",)) or \
        (u.op == "call_method" and u.target in ("size", "dim"))


def smoothable(gm: fx.GraphModule, layers: list[Layer]) -> dict[fx.Node, list[Layer]]:
    """LayerNorm nodes with affine parameters all of whose readers (but shape reads) are the
    given Linear layers, with those layers."""
    linear_by_x: dict[fx.Node, list[Layer]] = {}
    for l in layers:
        if l.kind == "linear":
            linear_by_x.setdefault(l.x, []).append(l)
    out = {}
    for ln, readers in linear_by_x.items():
        if _layernorm_params(gm, ln) is None:
            continue
        if len([u for u in ln.users if not _reads_shape(u)]) != len(readers):
            continue
        out[ln] = readers
    return out


class _AbsMax(fx.Interpreter):
    def __init__(self, gm, nodes):
        super().__init__(gm)
        self.nodes, self.amax = nodes, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.nodes:
            a = out.detach().abs().reshape(-1, out.shape[-1]).amax(dim=0).float()
            self.amax[n] = a if n not in self.amax else torch.maximum(self.amax[n], a)
        return out


def smooth_layernorms(gm: fx.GraphModule, layers: list[Layer], batches: list[tuple],
                      alpha: float) -> int:
    """Migrates each smoothable LayerNorm's channel scales into its readers' weights (see the
    module doc); returns how many LayerNorms. The graph computes the same function after."""
    groups = smoothable(gm, layers)
    if not groups:
        return 0
    probe = _AbsMax(gm, set(groups))
    with torch.no_grad():
        for args in batches:
            probe.run(*args)
    done = 0
    for ln, readers in groups.items():
        targets = [_weight_target(gm, l) for l in readers]
        if any(t is None for t in targets) or ln not in probe.amax:
            continue
        x_max = probe.amax[ln].clamp(min=1e-5)
        w_max = torch.stack([l.weight.abs().amax(dim=0) for l in readers]).amax(dim=0)
        s = (x_max ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
        w_path, b_path = _layernorm_params(gm, ln)
        with torch.no_grad():
            _set(w_path, gm, (get_attr_value(gm, w_path) / s).detach().clone())
            _set(b_path, gm, (get_attr_value(gm, b_path) / s).detach().clone())
            for l, t in zip(readers, targets):
                _set(t, gm, (l.weight * s).detach().clone())
        done += 1
    return done
