"""Dynamic int8 for Linear layers: int8 weights, activations quantized at run time.

``quantize_int8`` calls :func:`quantize_dynamic_linear` when ``QuantConfig.mode == "dynamic"``
(``optimize(..., quantize="int8_dynamic")``). No calibration data is needed, which suits
transformer blocks and other models whose activation ranges vary per input.

1. Every ``nn.Linear`` call and every fused ``torch.ops.fxopt.linear_act`` whose weight is a
   graph attribute becomes ``torch.ops.fxopt.linear_int8_dynamic`` (``fxopt.ops.int8_dynamic``)
   (Hugging Face's ``Conv1D``, ``aten.addmm`` of a transposed weight, is made a
   ``linear_act`` first: ``passes/quant/addmm.py``), with a per-channel symmetric int8 weight
   (``PerChannelMinMaxObserver``) and its scales as buffers; the bias, residual and activation
   of a fused op are kept. Each call picks its input's uint8 grid from the input's own min/max,
   as PyTorch's dynamic quantized linear does.
2. Reference (DESIGN.md section 4): the graph before the pass with each rewritten layer's
   weight fake-quantized and its input fake-quantized on the same run-time grid
   (``fake_quantize_dynamic``), all in float.
3. Report: SQNR (dB) and max abs error of the int8 graph against the float graph on the
   example inputs; which Linear layers stay float and why.

    >>> res = quantize_dynamic_linear(gm, PassContext((x,)), QuantConfig(mode="dynamic"))
    >>> res.stats      # x + fc2(gelu(fc1(ln(x)))), then a head (the tests' Block), x: 2x16x32
    {'linear': 3, 'kept_float': 0, 'output_step': 0.01421, 'sqnr_db': 36.39, 'max_abs_err': 0.02791}

Only Linear layers are quantized in this mode: convolutions stay float, and so do the
projections inside leaf modules (``nn.MultiheadAttention`` is a leaf in fxopt's capture;
``quantize_int8`` decomposes the standard self-attention call first,
``passes/quant/attention.py``, so its in_proj and out_proj are Linear layers here).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxopt.infra.registry import PassContext, PassResult
from fxopt.ir.graph import (add_buffer, copy_meta, get_attr_value, module_path,
                            remove_unused_attributes, tensor_meta_of)
from fxopt.ops.fused import FusedConv, FusedLinear
from fxopt.ops.int8_dynamic import (LINEAR_INT8_DYNAMIC, LinearInt8Dynamic, dynamic_qparams,
                                    fake_quantize_dynamic, fake_quantize_token, token_qparams)
from fxopt.passes.lower.lockstep import LockstepReference
from fxopt.quant.measure import sqnr_db
from fxopt.quant.config import QuantConfig
from fxopt.quant.isa import int8_dot_product_isa
from fxopt.quant.observers import PerChannelMinMaxObserver
from fxopt.quant.qparams import QParams

__all__ = ["quantize_dynamic_linear"]

_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class _Linear:
    node: fx.Node
    x: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None
    bias_node: fx.Node | None  # the fused op's bias attribute (reused, not copied)
    residual: object
    act: str
    act_args: list
    path: str


def _candidate(gm: fx.GraphModule, n: fx.Node) -> _Linear | None:
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if type(m) is not nn.Linear or len(n.args) != 1 or n.kwargs \
                or not isinstance(n.args[0], fx.Node) or m.weight.dtype != torch.float32:
            return None
        return _Linear(n, n.args[0], m.weight.detach(), None if m.bias is None else
                       m.bias.detach(), None, None, "none", [], module_path(n) or str(n.target))
    v = FusedLinear.match(n)
    if v is None:
        return None
    w_node, b_node = v.weight, v.bias
    if not (isinstance(w_node, fx.Node) and w_node.op == "get_attr"):
        return None
    if b_node is not None and not (isinstance(b_node, fx.Node) and b_node.op == "get_attr"):
        return None
    weight = get_attr_value(gm, w_node.target).detach()
    if weight.dtype != torch.float32 or weight.dim() != 2:
        return None
    return _Linear(n, v.x, weight, None if b_node is None else
                   get_attr_value(gm, b_node.target).detach(), b_node, v.residual, v.act,
                   list(v.act_args),
                   module_path(n) or str(w_node.target).rpartition(".")[0] or n.name)


def _select(gm: fx.GraphModule, cfg: QuantConfig) -> tuple[list[_Linear], list[str]]:
    """The layers to rewrite and the paths kept float (``keep_float``, first/last policy).

    The policies count layers already rewritten by an earlier run, so a second run keeps
    exactly what the first kept (idempotence)."""
    order: list[_Linear | None] = []  # None: a layer that is int8 already
    for n in gm.graph.nodes:
        if LinearInt8Dynamic.matches(n):
            order.append(None)
            continue
        c = _candidate(gm, n)
        if c is not None:
            order.append(c)
    keep = {i for i, c in enumerate(order)
            if c is not None and cfg.keeps_float(c.path, nn.Linear)}
    if order and cfg.first_layer == "float":
        keep.add(0)
    if order and cfg.last_layer == "float":
        keep.add(len(order) - 1)
    chosen = [c for i, c in enumerate(order) if c is not None and i not in keep]
    kept = [order[i].path for i in sorted(keep) if order[i] is not None]
    return chosen, kept


def _float_notes(gm: fx.GraphModule) -> list[str]:
    """Why Linear work the pass cannot reach stays float: leaf modules, convolutions."""
    notes, leaves, convs = [], [], 0
    for n in gm.graph.nodes:
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            if isinstance(m, _CONV_MODULES):
                convs += 1
            elif isinstance(m, nn.MultiheadAttention):
                leaves.append(f"{n.target} (MultiheadAttention: its q/k/v input projection and "
                              f"out_proj)")
            elif type(m) is not nn.Linear and any(isinstance(s, nn.Linear) for s in m.modules()):
                leaves.append(f"{n.target} ({type(m).__name__})")
        elif FusedConv.matches(n):
            convs += 1
    if leaves:
        notes.append("leaf modules are called whole, so the Linear layers inside them stay "
                     "float: " + ", ".join(leaves))
    if convs:
        notes.append(f"dynamic mode quantizes Linear layers only: {convs} convolution(s) stay "
                     f"float (quantize='int8' with calibration_data covers them)")
    return notes


# -- the rewrite ----------------------------------------------------------------------------
def _attr(gm: fx.GraphModule, prefix: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    name = add_buffer(gm, prefix, value)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["tensor_meta"] = tensor_meta_of(value)
    return node


def _weight_qparams(layer: _Linear, reduce_range: bool) -> QParams:
    obs = PerChannelMinMaxObserver(axis=0, label=f"the weight of {layer.path}",
                                   reduce_range=reduce_range)
    obs.observe(layer.weight)
    return obs.qparams()


def _rewrite(gm: fx.GraphModule, layer: _Linear, w_qp: QParams, reduce_range: bool,
             per_token: bool, replaced: dict) -> fx.Node:
    g, n = gm.graph, layer.node
    x = replaced.get(layer.x, layer.x)  # an earlier layer may have been rewritten already
    residual = replaced.get(layer.residual, layer.residual)
    base = layer.path.replace(".", "_")
    w_q = _attr(gm, f"{base}_w_int8_", w_qp.quantize(layer.weight), n)
    w_s = _attr(gm, f"{base}_w_scale_", w_qp.scale.clone(), n)
    if layer.bias_node is not None:
        b = layer.bias_node
    else:
        b = None if layer.bias is None else _attr(gm, f"{base}_bias_", layer.bias.clone(), n)
    with g.inserting_before(n):
        new = LINEAR_INT8_DYNAMIC.emit(g, x=x, w_q=w_q, w_scale=w_s, bias=b, residual=residual,
                                       act=layer.act, act_args=list(layer.act_args),
                                       reduce_range=bool(reduce_range),
                                       **({"per_token": True} if per_token else {}))
    copy_meta(new, n)
    old_weight = FusedLinear.of(n).weight if n.op == "call_function" else None
    n.replace_all_uses_with(new)
    g.erase_node(n)
    replaced[n] = new
    if isinstance(old_weight, fx.Node) and old_weight.op == "get_attr" and not old_weight.users:
        g.erase_node(old_weight)
    return new


def _fake_quantize(per_token: bool):
    return fake_quantize_token if per_token else fake_quantize_dynamic


def _input_step(x: torch.Tensor, reduce_range: bool, per_token: bool) -> float:
    """The run-time input step of a layer (per token: the largest row's)."""
    if per_token:
        return float(token_qparams(x, reduce_range)[0].max()) if x.numel() else 0.0
    return dynamic_qparams(x, reduce_range)[0]


def _simulated(gm: fx.GraphModule, plans: list[tuple[str, QParams]], reduce_range: bool,
               per_token: bool = False):
    """A copy of the float graph with each planned layer's input fake-quantized on its
    run-time grid and its weight fake-quantized (float math throughout). Also returns, per
    fake-quant node, the largest dequantized weight of its layer, and per planned layer the
    name of the reference node computing it."""
    ref = copy.deepcopy(gm)
    g = ref.graph
    nodes = {n.name: n for n in g.nodes}
    w_max, outputs = {}, {}
    for name, w_qp in plans:
        n = nodes[name]
        x = n.args[0] if n.op == "call_module" else FusedLinear.of(n).x
        with g.inserting_before(n):
            fq_x = g.call_function(_fake_quantize(per_token), (x, bool(reduce_range)))
        w_max[fq_x.name] = float(w_qp.scale.max()) * w_qp.qmax
        if n.op == "call_module":
            m = ref.get_submodule(n.target)
            w = _attr(ref, "fq_weight_", w_qp.fake_quantize(m.weight.detach()), n)
            b = None if m.bias is None else _attr(ref, "fq_bias_", m.bias.detach().clone(), n)
            with g.inserting_before(n):
                new = g.call_function(F.linear, (fq_x, w, b))
            copy_meta(new, n)
            n.replace_all_uses_with(new)
            g.erase_node(n)
            outputs[name] = (new.name, fq_x.name)
        else:
            v = FusedLinear.of(n)
            weight = get_attr_value(ref, v.weight.target).detach()
            v.apply(x=fq_x, weight=_attr(ref, "fq_weight_", w_qp.fake_quantize(weight), n))
            outputs[name] = (n.name, fq_x.name)
    g.lint()
    remove_unused_attributes(ref)
    ref.recompile()
    return ref, w_max, outputs


# A rewritten layer may differ from its simulated form, on the same input, by this many "flips"
# (its run-time input step times its largest weight: one input code rounded the other way at a
# tie) plus float32 rounding, and the reference still follows it (see _DynamicLockstep)
LAYER_FLIPS = 2.0


class _DynamicLockstep(LockstepReference):
    """The simulated reference run in lockstep with the int8 graph: after each rewritten layer
    it carries on from the int8 layer's output where the two differ by at most ``LAYER_FLIPS``
    flips of that layer (plus 1e-5 of its largest output), so a tie rounded one way by the
    reference and the other by the op stays one layer's difference instead of spreading
    through every later run-time grid (vit_b_16: 0.0388 at the logits against a bound of 0.019
    end to end). A layer further off is not followed: its error reaches the output, which the
    pass manager checks against the pass's bound (a wrong weight, bias or grid is many flips).
    ``flips``: the layers followed with a difference; ``off``: the layers not followed, with
    their difference in flips; ``worst``: the largest difference followed, in flips;
    ``scales``: each fake-quant node's run-time input step (the pass's bound reads them)."""

    def __init__(self, reference: fx.GraphModule, int8: fx.GraphModule, mapping: dict,
                 layers: dict, reduce_range: bool, per_token: bool = False):
        super().__init__(reference, int8, mapping)
        self.layers, self.reduce_range = layers, reduce_range  # ref node -> (fq node, |w| max)
        self.per_token = per_token
        self.scales: dict[str, float] = {}
        self.worst = 0.0

    def judge(self, follow, n: fx.Node, out):
        if n.op == "call_function" and n.target is _fake_quantize(self.per_token):
            self.scales[n.name] = _input_step(follow.env[n.args[0]], self.reduce_range,
                                              self.per_token)
            return out
        layer, low = self.layers.get(n.name), follow.lowered(n)
        if layer is None or not (isinstance(low, torch.Tensor) and isinstance(out, torch.Tensor)
                                 and low.shape == out.shape and low.dtype == out.dtype):
            return out
        fq_name, w_max = layer
        flip = self.scales[fq_name] * w_max
        slack = 1e-5 * float(out.abs().max()) if out.numel() else 0.0
        diff = float((low - out).abs().max()) if out.numel() else 0.0
        in_flips = max(diff - slack, 0.0) / flip if flip > 0 else (0.0 if diff <= slack
                                                                  else float("inf"))
        if in_flips > LAYER_FLIPS:
            follow.off[module_path(n) or n.name] = round(in_flips, 2)
            return out
        if diff > slack:
            follow.flips += 1
            self.worst = max(self.worst, in_flips)
        return low


# -- measures -------------------------------------------------------------------------------
def _leaves(out) -> list[torch.Tensor]:
    return [t.detach() for t in torch.utils._pytree.tree_leaves(out)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]


def _flat(out) -> torch.Tensor:
    leaves = _leaves(out)
    return torch.cat([t.reshape(-1).double() for t in leaves]) if leaves \
        else torch.zeros(0, dtype=torch.float64)


def _output_step(out) -> float:
    """One 8-bit step of the output's range: ``max over outputs of (max - min) / 255``."""
    steps = [float(t.max() - t.min()) / 255.0 for t in _leaves(out)]
    return max(steps, default=0.0)


def quantize_dynamic_linear(gm: fx.GraphModule, ctx: PassContext, cfg: QuantConfig) -> PassResult:
    """Linear layers (plain or fused) become dynamic int8 ``linear_int8_dynamic`` calls."""
    layers, kept = _select(gm, cfg)
    notes = _float_notes(gm)
    if kept:
        notes.append(f"kept in float: {', '.join(kept)}")
    if not layers:
        return PassResult(gm, modified=False, stats={"linear": 0, "kept_float": len(kept)},
                          notes=notes)
    inputs = tuple(ctx.example_inputs)
    plans = [(layer.node.name, _weight_qparams(layer, cfg.weights_7bit)) for layer in layers]
    reference, w_max, outputs = _simulated(gm, plans, cfg.activations_7bit, cfg.per_token)
    with torch.no_grad():
        float_out = gm(*inputs)

    replaced: dict[fx.Node, fx.Node] = {}
    for layer, (_, w_qp) in zip(layers, plans):
        _rewrite(gm, layer, w_qp, cfg.activations_7bit, cfg.per_token, replaced)
    remove_unused_attributes(gm)
    gm.graph.lint()
    gm.recompile()
    lockstep = _DynamicLockstep(
        reference, gm, {outputs[layer.node.name][0]: replaced[layer.node].name
                        for layer in layers},
        {ref_name: (fq_name, w_max[fq_name]) for ref_name, fq_name in outputs.values()},
        cfg.activations_7bit, cfg.per_token)

    with torch.no_grad():
        q_out = gm(*inputs)
        ref_out = lockstep(*inputs)  # also each layer's run-time input step (lockstep.scales)
    f, q = _flat(float_out), _flat(q_out)
    # Tolerance of the check against the simulated reference. The int8 graph and the reference
    # share every grid decision but not the float rounding: the reference multiplies
    # fake-quantized floats in float32 (F.linear), the op accumulates integers exactly. That
    # ~1e-7 relative difference reaches the next quantized layer's input and can move a value
    # across a rounding boundary of its run-time grid, which changes that layer's output by
    # one input step times a weight ("a flip"). Run end to end, the flip reaches later layers'
    # inputs and flips codes there too: 12 blocks of vit_b_16 at 224 took it to 2x the bound
    # below. So the reference runs in lockstep with the int8 graph (_DynamicLockstep): after
    # each layer within LAYER_FLIPS flips of its simulated form on the same input, it carries
    # on from the int8 layer's output. The bound at the output: one 8-bit step of the
    # reference output's range (the static pass allows one step of its output grid) plus two
    # flips of the largest, plus float32 slack. A wrong weight, bias, activation or grid is
    # many times the bound and is not followed (test_check_catches_a_wrong_bias).
    step = _output_step(ref_out)
    flip = max((lockstep.scales[k] * w for k, w in w_max.items() if k in lockstep.scales),
               default=0.0)
    tol = step + 2.0 * flip + 1e-5 * max((float(t.abs().max()) for t in _leaves(ref_out)),
                                         default=0.0)
    stats = {"linear": len(layers), "kept_float": len(kept), "reduce_range": cfg.reduce_range,
             "output_step": float(f"{step:.4g}"),
             "sqnr_db": round(sqnr_db(f, q), 2),
             "max_abs_err": float(f"{float((f - q).abs().max()):.4g}") if f.numel() else 0.0,
             "tie_layers": lockstep.flips, "tie_flips_max": round(lockstep.worst, 3)}
    if cfg.per_token:
        stats["per_token"] = True
        if ctx.target == "cpu" and int8_dot_product_isa() is None:
            notes.append("per-token int8 on this CPU (no VNNI or AMX, no fast int8 product): "
                         "the codes are multiplied in float32 (exact), slower than float here "
                         "(vit_b_16 304 against 253 ms eager on an AVX2 EPYC); per-tensor "
                         "dynamic or static int8 (quantize='int8') run int8 kernels")
    notes.insert(0, f"dynamic int8 on {len(layers)} Linear layer(s), inputs quantized at run time "
                    f"(uint8, {'7' if cfg.activations_7bit else '8'}-bit range"
                    f"{', one grid per token' if cfg.per_token else ''}); vs float on the "
                    f"example inputs: SQNR {stats['sqnr_db']:.1f} dB, max abs error "
                    f"{stats['max_abs_err']:.3g}")
    if lockstep.off:
        notes.append(f"int8 layers more than {LAYER_FLIPS:g} flips from their simulated form "
                     "on the example inputs: " + ", ".join(f"{k} ({v} flips)"
                                                           for k, v in lockstep.off.items()))
    return PassResult(gm, modified=True, stats=stats, notes=notes, reference=lockstep,
                      max_abs_tolerance=tol)
