"""``quantize_int8``: post-training int8 quantization of convolutions and linear layers.

1. Calibrate: run ``ctx.calibration_data`` (tensors, ``(x, y)`` tuples, a DataLoader) through
   the graph; an observer per layer watches its input and its output (after the fused
   activation), one per-channel min/max observer watches each weight.
2. Rewrite every ``nn.Conv2d`` / ``nn.Linear`` call and every fused ``conv2d_act`` /
   ``linear_act`` into ``torch.ops.fxopt.conv2d_int8`` / ``linear_int8`` (``fxopt.ops_int8``)
   with per-channel symmetric int8 weights and per-tensor activation grids, all stored as
   buffers. First cut: every op quantizes its input and dequantizes its output (one
   quantized region per op); int8 chains between ops and int8 pooling/add/cat come later.
3. Reference (DESIGN.md section 4): the graph before the pass with fake quantization at the
   same points (input, weight, output of each layer), in float. The int8 graph must equal it
   within one quantization step of the output (``PassResult.max_abs_tolerance``).
4. Report: SQNR (dB), max abs error and top-1 agreement of the int8 graph against the float
   graph on the calibration batches (``stats``).

    >>> res = quantize_int8(gm, PassContext((x,), calibration_data=batches))
    >>> res.stats      # the digits ResNet after fuse_act, 8 calibration batches of 32
    {'conv2d': 8, 'linear': 1, 'kept_float': 0, 'calibration_batches': 8, 'output_step': 0.06223,
     'sqnr_db': 32.76, 'max_abs_err': 0.2573, 'top1_agreement': 1.0}

Conv1d layers, grouped convolutions and layers in ``QuantConfig.keep_float`` stay float.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

import fxopt.ops  # noqa: F401 - defines torch.ops.fxopt.* (int8 ops included)
from fxopt.errors import InputError
from fxopt.graph_utils import add_buffer, copy_meta, get_attr_value, module_path, \
    remove_unused_attributes
from fxopt.observers import PerChannelMinMaxObserver, make_observer
from fxopt.quant_config import QuantConfig
from fxopt.quant_params import QParams
from fxopt.registry import PassContext, PassResult, register_pass

__all__ = ["quantize_int8", "calibration_inputs", "sqnr_db", "INT8_OPS"]

CONV2D = torch.ops.fxopt.conv2d_act.default
LINEAR = torch.ops.fxopt.linear_act.default
CONV2D_INT8 = torch.ops.fxopt.conv2d_int8.default
LINEAR_INT8 = torch.ops.fxopt.linear_int8.default
INT8_OPS = (CONV2D_INT8, LINEAR_INT8)


@dataclass
class _Layer:
    node: fx.Node
    kind: str  # "conv2d" | "linear"
    x: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None
    conv: tuple | None  # (stride, padding, dilation, groups)
    residual: object
    act: str
    act_args: list
    path: str
    module_type: type


def _find_layers(gm: fx.GraphModule) -> list[_Layer]:
    layers = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            if len(n.args) != 1 or n.kwargs or not isinstance(n.args[0], fx.Node):
                continue
            if isinstance(m, nn.Conv2d) and type(m) is nn.Conv2d and m.padding_mode == "zeros" \
                    and not isinstance(m.padding, str):
                layers.append(_Layer(n, "conv2d", n.args[0], m.weight.detach(),
                                     None if m.bias is None else m.bias.detach(),
                                     (list(m.stride), list(m.padding), list(m.dilation), m.groups),
                                     None, "none", [], str(n.target), type(m)))
            elif type(m) is nn.Linear:
                layers.append(_Layer(n, "linear", n.args[0], m.weight.detach(),
                                     None if m.bias is None else m.bias.detach(), None, None,
                                     "none", [], str(n.target), type(m)))
        elif n.op == "call_function" and n.target in (CONV2D, LINEAR):
            conv = n.target is CONV2D
            nfixed = 7 if conv else 3
            args = list(n.args)
            w_node, b_node = args[1], args[2]
            if not (isinstance(w_node, fx.Node) and w_node.op == "get_attr"):
                continue
            if b_node is not None and not (isinstance(b_node, fx.Node) and b_node.op == "get_attr"):
                continue
            residual = args[nfixed] if len(args) > nfixed else n.kwargs.get("residual")
            weight = get_attr_value(gm, w_node.target).detach()
            bias = None if b_node is None else get_attr_value(gm, b_node.target).detach()
            layers.append(_Layer(n, "conv2d" if conv else "linear", args[0], weight, bias,
                                 tuple(args[3:7]) if conv else None, residual,
                                 n.kwargs.get("act", "none"), list(n.kwargs.get("act_args", [])),
                                 module_path(n), nn.Conv2d if conv else nn.Linear))
    return [l for l in layers if l.weight.dtype == torch.float32 and
            (l.conv is None or l.conv[3] == 1)]


def _select(layers: list[_Layer], cfg: QuantConfig) -> tuple[list[_Layer], list[str]]:
    keep = set()
    for i, layer in enumerate(layers):
        if cfg.keeps_float(layer.path, layer.module_type):
            keep.add(i)
    if layers and cfg.first_layer == "float":
        keep.add(0)
    if layers and cfg.last_layer == "float":
        keep.add(len(layers) - 1)
    return ([l for i, l in enumerate(layers) if i not in keep],
            [layers[i].path or layers[i].node.name for i in sorted(keep)])


# -- calibration ----------------------------------------------------------------------------
def calibration_inputs(data, example_inputs: tuple, min_batches: int = 1) -> list[tuple]:
    """The calibration batches as argument tuples, checked against the example inputs."""
    if isinstance(data, torch.Tensor):
        raise InputError("calibration_data is one tensor, not a collection of batches",
                         hint="pass calibration_data=[batch1, batch2, ...] or a DataLoader")
    try:
        it = iter(data)
    except TypeError:
        raise InputError(f"calibration_data must be an iterable of batches, not "
                         f"{type(data).__name__}", hint="pass a list of tensors or a DataLoader")
    n = len(example_inputs)
    batches = []
    for i, batch in enumerate(it):
        if isinstance(batch, torch.Tensor):
            args = (batch,)
        elif isinstance(batch, (tuple, list)) and batch and \
                all(isinstance(b, torch.Tensor) for b in batch[:n]):
            args = tuple(batch[:n])  # (x, y): the inputs first, targets ignored
        else:
            raise InputError(f"calibration batch {i} is a {type(batch).__name__}; expected a "
                             f"tensor or an (inputs..., target) tuple of tensors")
        if len(args) != n:
            raise InputError(f"calibration batch {i} has {len(args)} inputs; the model takes {n}")
        for a, ex in zip(args, example_inputs):
            if isinstance(ex, torch.Tensor) and (a.dim() != ex.dim() or a.shape[1:] != ex.shape[1:]):
                raise InputError(f"calibration batch {i} has shape {tuple(a.shape)}, but the "
                                 f"example input has {tuple(ex.shape)} (only the batch size may "
                                 f"differ)", hint="calibrate on batches shaped like the model's "
                                                  "inputs")
            if isinstance(ex, torch.Tensor) and a.numel() == 0:
                raise InputError(f"calibration batch {i} is empty")
        batches.append(tuple(a.to(ex.device) if isinstance(ex, torch.Tensor) else a
                             for a, ex in zip(args, example_inputs)))
    if len(batches) < min_batches:
        raise InputError(f"calibration_data holds {len(batches)} batches; at least "
                         f"{min_batches} needed", hint="pass more calibration batches")
    return batches


class _Calibrator(fx.Interpreter):
    def __init__(self, gm, watch: dict):
        super().__init__(gm)
        self.watch = watch  # node -> (input observer, output observer)

    def run_node(self, n):
        out = super().run_node(n)
        obs = self.watch.get(n)
        if obs is not None:
            obs[0].observe(self.env[n.args[0]])
            obs[1].observe(out)
        return out


def _activation_observers(cfg: QuantConfig, label: str):
    kw = dict(cfg.observer_options)
    if cfg.activation_symmetric:
        grid_in = dict(dtype=torch.int8, symmetric=True)
        grid_out = dict(dtype=torch.int8, symmetric=True)
    else:
        # 7-bit uint8 inputs: fbgemm's u8 x s8 pair sums then stay inside int16 on every CPU.
        grid_in = dict(dtype=torch.uint8, reduce_range=True)
        grid_out = dict(dtype=torch.uint8)
    return (make_observer(cfg.activation_observer, label=f"the input of {label}", **grid_in, **kw),
            make_observer(cfg.activation_observer, label=f"the output of {label}", **grid_out, **kw))


# -- measures -------------------------------------------------------------------------------
def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(||ref||^2 / ||ref - out||^2)`` in dB."""
    r, o = ref.detach().double(), out.detach().double()
    noise = float(((r - o) ** 2).sum())
    signal = float((r ** 2).sum())
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def _outputs(gm, batches) -> list[torch.Tensor]:
    with torch.no_grad():
        outs = []
        for args in batches:
            o = gm(*args)
            leaves = [t for t in torch.utils._pytree.tree_leaves(o) if isinstance(t, torch.Tensor)]
            outs.append(torch.cat([t.detach().reshape(-1).double() for t in leaves]) if leaves
                        else torch.zeros(0, dtype=torch.float64))
            if isinstance(o, torch.Tensor) and o.dim() == 2:
                outs[-1] = (outs[-1], o.argmax(dim=1))
        return outs


# -- the rewrite ----------------------------------------------------------------------------
def _attr(gm, graph: fx.Graph, prefix: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    name = add_buffer(gm, prefix, value)
    with graph.inserting_before(before):
        node = graph.get_attr(name)
    node.meta["tensor_meta"] = _extract_tensor_metadata(value)
    return node


def _rewrite(gm: fx.GraphModule, layer: _Layer, w_qp: QParams, x_qp: QParams, y_qp: QParams,
             replaced: dict) -> fx.Node:
    g, n = gm.graph, layer.node
    x = replaced.get(layer.x, layer.x)  # an earlier layer may have been rewritten already
    residual = replaced.get(layer.residual, layer.residual)
    base = (layer.path or n.name).replace(".", "_")
    w_q = _attr(gm, g, f"{base}_w_int8_", w_qp.quantize(layer.weight), n)
    w_s = _attr(gm, g, f"{base}_w_scale_", w_qp.scale.clone(), n)
    b = None if layer.bias is None else _attr(gm, g, f"{base}_bias_", layer.bias.clone(), n)
    xs = _attr(gm, g, f"{base}_x_scale_", x_qp.scale.clone(), n)
    xz = _attr(gm, g, f"{base}_x_zp_", x_qp.zero_point.clone(), n)
    ys = _attr(gm, g, f"{base}_y_scale_", y_qp.scale.clone(), n)
    yz = _attr(gm, g, f"{base}_y_zp_", y_qp.zero_point.clone(), n)
    kwargs = dict(act=layer.act, act_args=list(layer.act_args), x_qmin=x_qp.qmin,
                  x_qmax=x_qp.qmax, y_qmin=y_qp.qmin, y_qmax=y_qp.qmax)
    if layer.kind == "conv2d":
        stride, padding, dilation, groups = layer.conv
        args = (x, w_q, w_s, b, list(stride), list(padding), list(dilation), groups,
                xs, xz, ys, yz, residual)
        target = CONV2D_INT8
    else:
        args = (x, w_q, w_s, b, xs, xz, ys, yz, residual)
        target = LINEAR_INT8
    with g.inserting_before(n):
        new = g.call_function(target, args, kwargs)
    copy_meta(new, n)
    n.replace_all_uses_with(new)
    g.erase_node(n)
    replaced[n] = new
    return new


def _fake_quant(graph: fx.Graph, x, qp: QParams) -> fx.Node:
    return graph.call_function(torch.fake_quantize_per_tensor_affine,
                               (x, float(qp.scale), int(qp.zero_point), qp.qmin, qp.qmax))


def _simulated(ref: fx.GraphModule, plans: list[tuple[str, QParams, QParams, QParams, bool]]):
    """The float graph with fake quantization at each quantized layer's input, weight and output."""
    nodes = {n.name: n for n in ref.graph.nodes}
    g = ref.graph
    for name, w_qp, x_qp, y_qp, _ in plans:
        n = nodes[name]
        with g.inserting_before(n):
            fx_in = _fake_quant(g, n.args[0], x_qp)
        args = list(n.args)
        args[0] = fx_in
        if n.op == "call_module":
            m = ref.get_submodule(n.target)
            m.weight = nn.Parameter(w_qp.fake_quantize(m.weight.detach()), requires_grad=False)
        else:
            w = get_attr_value(ref, args[1].target).detach()
            args[1] = _attr(ref, g, "fq_weight_", w_qp.fake_quantize(w), n)
        n.args = tuple(args)
        with g.inserting_after(n):
            fq_out = _fake_quant(g, n, y_qp)
        n.replace_all_uses_with(fq_out, delete_user_cb=lambda u: u is not fq_out)
    ref.recompile()
    return ref


@register_pass("quantize_int8", requires=("eval", "calibration_data"), reference="returned",
               after=("fuse_act",))
def quantize_int8(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Post-training int8: calibrate, then conv2d/linear (fused or not) become int8 ops."""
    cfg = QuantConfig.coerce(ctx.options.get("quantize") or "int8")
    layers, kept = _select(_find_layers(gm), cfg)
    if not layers:
        return PassResult(gm, modified=False, stats={"kept_float": len(kept)},
                          notes=[f"kept in float: {', '.join(kept)}"] if kept else [])
    batches = calibration_inputs(ctx.calibration_data, ctx.example_inputs, cfg.min_batches)
    watch = {l.node: _activation_observers(cfg, l.path or l.node.name) for l in layers}
    calib = _Calibrator(gm, watch)
    with torch.no_grad():
        for args in batches:
            calib.run(*args)
    float_outs = _outputs(gm, batches)
    plans = []
    for layer in layers:
        w_obs = PerChannelMinMaxObserver(axis=0, label=f"the weight of {layer.path}")
        w_obs.observe(layer.weight)
        x_obs, y_obs = watch[layer.node]
        plans.append((layer.node.name, w_obs.qparams(), x_obs.qparams(), y_obs.qparams(),
                      layer.residual is not None))
    reference = _simulated(copy.deepcopy(gm), plans)

    counts = {"conv2d": 0, "linear": 0}
    new_nodes, replaced = [], {}
    for layer, (_, w_qp, x_qp, y_qp, _) in zip(layers, plans):
        new_nodes.append(_rewrite(gm, layer, w_qp, x_qp, y_qp, replaced))
        counts[layer.kind] += 1
    remove_unused_attributes(gm)
    gm.graph.lint()
    gm.recompile()

    # One quantization step of the output: the coarsest output grid among the int8 ops whose
    # results reach the graph output without passing through another int8 op.
    step = max(float(get_attr_value(gm, n.args[10 if n.target is CONV2D_INT8 else 6].target))
               for n in _last_int8(gm, new_nodes))
    q_outs = _outputs(gm, batches)
    stats = {**counts, "kept_float": len(kept), "calibration_batches": len(batches),
             "output_step": float(f"{step:.4g}")}
    stats.update(_compare(float_outs, q_outs))
    notes = [f"int8 vs float on {len(batches)} calibration batches: SQNR {stats['sqnr_db']:.1f} "
             f"dB, max abs error {stats['max_abs_err']:.3g}"
             + (f", top-1 agreement {stats['top1_agreement']:.3f}" if "top1_agreement" in stats
                else ""),
             "first cut: each int8 op quantizes its input and dequantizes its output"]
    if kept:
        notes.append(f"kept in float: {', '.join(kept)}")
    return PassResult(gm, modified=True, stats=stats, notes=notes, reference=reference,
                      max_abs_tolerance=step)


def _last_int8(gm: fx.GraphModule, int8_nodes: list[fx.Node]) -> list[fx.Node]:
    """The int8 nodes with no other int8 node downstream (those that set the output's grid)."""
    ints = set(int8_nodes)
    downstream_int8: dict[fx.Node, bool] = {}
    for n in reversed(list(gm.graph.nodes)):
        downstream_int8[n] = any(u in ints or downstream_int8.get(u, False) for u in n.users)
    last = [n for n in int8_nodes if not downstream_int8[n]]
    return last or int8_nodes


def _compare(float_outs, q_outs) -> dict:
    ref = torch.cat([o[0] if isinstance(o, tuple) else o for o in float_outs])
    out = torch.cat([o[0] if isinstance(o, tuple) else o for o in q_outs])
    res = {"sqnr_db": round(sqnr_db(ref, out), 2),
           "max_abs_err": float(f"{float((ref - out).abs().max()):.4g}") if ref.numel() else 0.0}
    if all(isinstance(o, tuple) for o in float_outs + q_outs):
        a = torch.cat([o[1] for o in float_outs])
        b = torch.cat([o[1] for o in q_outs])
        res["top1_agreement"] = round(float((a == b).float().mean()), 4)
    return res
