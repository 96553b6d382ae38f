"""``quantize_int8``: post-training int8 quantization with int8 chains between layers.

1. Calibrate: run ``ctx.calibration_data`` (tensors, ``(x, y)`` tuples, a DataLoader) through
   the float graph once, with a progress bar; one observer per candidate value
   (``quantize_plan.observed_values``), one per-channel min/max observer per weight.
2. Sensitivity fallback (``QuantConfig(min_sqnr_db=, max_float_layers=)``): each layer's
   sensitivity is the SQNR of the simulated model with only that layer quantized; the most
   sensitive layers go back to float, one at a time, until the budget holds.
3. Plan the int8 regions (``quantize_plan.make_plan``) and rewrite them into the int8 IR of
   ``fxopt.ops_int8``: ``quantize`` at each region entry, ``conv2d_int8`` / ``linear_int8``
   writing int8 codes for the next layer (requantized in the epilogue), ``add_int8``,
   ``cat_int8``, ``adaptive_avg_pool2d_int8``, max pooling and flatten on the codes, and
   ``dequantize`` at each exit. Scales and zero points are buffers.
4. Reference (DESIGN.md section 4): ``SimulatedInt8``, the float graph with fake quantization at
   the same points. The int8 graph must equal it within one quantization step of the output
   (``PassResult.max_abs_tolerance``).
5. Report: SQNR (dB), max abs error and top-1 agreement of the int8 graph against the float
   graph on the calibration batches (``stats``), the layers kept in float and why.

    >>> res = quantize_int8(gm, PassContext((x,), calibration_data=batches))
    >>> res.stats["conv2d"], res.stats["sqnr_db"]

``QuantConfig(mode="dynamic")`` (``quantize="int8_dynamic"``) runs ``quantize_dynamic`` instead:
int8 Linear weights, activations quantized at run time, no calibration data.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

import fxopt.ops  # noqa: F401 - defines torch.ops.fxopt.* (int8 ops included)
from fxopt.errors import InputError, PreconditionError
from fxopt.infra.progress import progress
from fxopt.infra.registry import PassContext, PassResult, register_pass
from fxopt.ir.graph import remove_unused_attributes
from fxopt.passes.quant.rewrite import Writer, output_step
from fxopt.quant.config import QuantConfig
from fxopt.quant.observers import PerChannelMinMaxObserver, make_observer
from fxopt.quant.plan import (
    CONV2D,
    PRE,
    Layer,
    Plan,
    SimulatedInt8,
    find_layers,
    make_plan,
    observed_values,
)
from fxopt.quant.qparams import QParams

__all__ = ["quantize_int8", "calibration_inputs", "sqnr_db"]



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
    """Runs the float graph; feeds each watched value (and each residual layer's pre-add
    value: the layer run without its residual and activation) to its observer."""

    def __init__(self, gm, observers: dict, pre: dict):
        super().__init__(gm)
        self.observers, self.pre = observers, pre

    def run_node(self, n):
        out = super().run_node(n)
        obs = self.observers.get(n)
        if obs is not None:
            obs.observe(out)
        pre = self.pre.get(n)
        if pre is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            nfixed = 7 if n.target is CONV2D else 3
            args = list(args[:nfixed])
            kwargs = {k: v for k, v in kwargs.items() if k not in ("residual", "act", "act_args")}
            pre.observe(n.target(*args, **kwargs))
        return out


def _observer(cfg: QuantConfig, label: str):
    kw = dict(cfg.observer_options)
    if cfg.activation_symmetric:
        return make_observer(cfg.activation_observer, label=label, dtype=torch.int8,
                             symmetric=True, **kw)
    return make_observer(cfg.activation_observer, label=label, dtype=torch.uint8,
                         reduce_range=cfg.reduce_range, **kw)


def _grid(obs) -> QParams:
    """The observer's grid. A 7-bit (reduce_range) uint8 grid keeps its scale but clamps at
    [0, 255], as PyTorch's quantized kernels do: the range only leaves headroom."""
    qp = obs.qparams()
    if qp.dtype == torch.uint8 and not qp.symmetric:
        qp = QParams(qp.scale, qp.zero_point, 0, 255, torch.uint8)
    return qp


def _label(n: fx.Node) -> str:
    from fxopt.ir.graph import module_path
    return module_path(n) or n.name


def calibrate(gm: fx.GraphModule, layers: list[Layer], batches: list[tuple],
              cfg: QuantConfig) -> tuple[dict, dict]:
    """Observed grids for every value any plan over ``layers`` may need, and the weights'."""
    keys, pre_nodes = observed_values(gm, layers)
    observers = {k: _observer(cfg, f"the value of {_label(k)}") for k in keys}
    pre = {n: _observer(cfg, f"the output of {_label(n)} before its residual add")
           for n in pre_nodes}
    calib = _Calibrator(gm, observers, pre)
    with torch.no_grad():
        for args in progress(batches, "calibrating"):
            calib.run(*args)
    grids = {k: _grid(o) for k, o in observers.items()}
    grids.update({(PRE, n): _grid(o) for n, o in pre.items()})
    weights = {}
    for layer in layers:
        w_obs = PerChannelMinMaxObserver(axis=0, label=f"the weight of {layer.label}")
        w_obs.observe(layer.weight)
        weights[layer.node] = w_obs.qparams()
    return grids, weights


# -- measures -------------------------------------------------------------------------------
def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(||ref||^2 / ||ref - out||^2)`` in dB."""
    r, o = ref.detach().double(), out.detach().double()
    noise = float(((r - o) ** 2).sum())
    signal = float((r ** 2).sum())
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def _flat(o) -> torch.Tensor:
    leaves = [t for t in torch.utils._pytree.tree_leaves(o) if isinstance(t, torch.Tensor)]
    return torch.cat([t.detach().reshape(-1).double() for t in leaves]) if leaves \
        else torch.zeros(0, dtype=torch.float64)


def _outputs(module, batches) -> list:
    with torch.no_grad():
        outs = []
        for args in batches:
            o = module(*args)
            outs.append((_flat(o), o.argmax(dim=1)) if isinstance(o, torch.Tensor) and o.dim() == 2
                        else _flat(o))
        return outs


def _sqnr_of(module, batches, float_outs) -> float:
    return _compare(float_outs, _outputs(module, batches))["sqnr_db"]


# -- sensitivity ----------------------------------------------------------------------------
def sensitivity(gm, layers, grids, weights, batches, float_outs) -> dict[fx.Node, float]:
    """SQNR (dB) of the simulated model with only each layer quantized, by layer node."""
    out = {}
    for layer in progress(layers, "int8 sensitivity"):
        plan = make_plan(gm, [layer], grids, weights)
        out[layer.node] = _sqnr_of(SimulatedInt8(gm, plan), batches, float_outs)
    return out


def _fallback(gm, layers, grids, weights, batches, float_outs, cfg) -> tuple[list, list, dict]:
    """Move the most sensitive layers to float until the simulated SQNR reaches
    ``cfg.min_sqnr_db`` (or ``cfg.max_float_layers`` are float). Returns the layers to quantize,
    the (layer, sensitivity dB, model SQNR after) moved to float, and every layer's figure."""
    sens = sensitivity(gm, layers, grids, weights, batches, float_outs)
    order = sorted(layers, key=lambda l: sens[l.node])
    budget = len(layers) if cfg.max_float_layers is None else int(cfg.max_float_layers)
    target = cfg.min_sqnr_db
    chosen, moved = list(layers), []
    sqnr = _sqnr_of(SimulatedInt8(gm, make_plan(gm, chosen, grids, weights)), batches, float_outs)
    for layer in order:
        if len(moved) >= budget or (target is not None and sqnr >= target):
            break
        chosen.remove(layer)
        if chosen:
            plan = make_plan(gm, chosen, grids, weights)
            sqnr = _sqnr_of(SimulatedInt8(gm, plan), batches, float_outs)
        else:
            sqnr = math.inf
        moved.append((layer, sens[layer.node], sqnr))
    return chosen, moved, sens


@register_pass("quantize_int8", requires=("eval",), reference="returned", after=("fuse_act",))
def quantize_int8(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Post-training int8: calibrate, keep sensitive layers float, rewrite into int8 chains."""
    cfg = QuantConfig.coerce(ctx.options.get("quantize") or "int8")
    if cfg.mode == "dynamic":
        from fxopt.passes.quant.dynamic import quantize_dynamic_linear
        return quantize_dynamic_linear(gm, ctx, cfg)
    if ctx.calibration_data is None:
        raise PreconditionError("static int8 quantization needs calibration data",
                                hint="pass calibration_data=[batch, ...] (a DataLoader works), "
                                     "or quantize='int8_dynamic' for Linear layers without it")
    all_layers = find_layers(gm)
    layers, kept = _select(all_layers, cfg)
    no_kernel = []
    if ctx.target == "cpu" and cfg.float_without_kernel:
        no_kernel = [l for l in layers if not _cpu_kernel(l)]
        layers = [l for l in layers if _cpu_kernel(l)]
        kept = kept + [l.label for l in no_kernel]
    if not layers:
        return PassResult(gm, modified=False, stats={"kept_float": len(kept)},
                          notes=[f"kept in float: {', '.join(kept)}"] if kept else [])
    batches = calibration_inputs(ctx.calibration_data, ctx.example_inputs, cfg.min_batches)
    grids, weights = calibrate(gm, layers, batches, cfg)
    float_outs = _outputs(gm, batches)
    notes, stats = [], {}
    if cfg.min_sqnr_db is not None or cfg.max_float_layers is not None:
        sens_batches = batches[:cfg.sensitivity_batches]
        layers, moved, sens = _fallback(gm, layers, grids, weights, sens_batches,
                                        float_outs[:len(sens_batches)], cfg)
        stats["sensitivity_db"] = {l.label: round(v, 2) for l, v in
                                   ((l, sens[l.node]) for l in all_layers if l.node in sens)}
        stats["fallback"] = [{"layer": l.label, "sensitivity_db": round(s, 2),
                              "model_sqnr_db_after": round(q, 2)} for l, s, q in moved]
        if moved:
            notes.append("kept in float by sensitivity: " + ", ".join(
                f"{l.label} (alone {s:.1f} dB; model {q:.1f} dB after)" for l, s, q in moved))
        if cfg.min_sqnr_db is not None and moved and moved[-1][2] < cfg.min_sqnr_db:
            notes.append(f"min_sqnr_db={cfg.min_sqnr_db} not reached with max_float_layers="
                         f"{cfg.max_float_layers}")
        kept = kept + [l.label for l, _, _ in moved]
        if not layers:
            return PassResult(gm, modified=False, stats={**stats, "kept_float": len(kept)},
                              notes=notes)
    plan = make_plan(gm, layers, grids, weights)
    reference = _reference(gm, plan)
    writer = Writer(gm, plan)
    exits = writer.run()
    for n in reversed(list(gm.graph.nodes)):  # the float weights' reads, now dead
        if n.op == "get_attr" and not n.users:
            gm.graph.erase_node(n)
    remove_unused_attributes(gm)
    gm.graph.lint()
    gm.recompile()

    step = output_step(gm, exits)
    q_outs = _outputs(gm, batches)
    stats = {**{k: v for k, v in writer.counts.items() if v}, "kept_float": len(kept),
             "calibration_batches": len(batches), "output_step": float(f"{step:.4g}"), **stats}
    stats.update(_compare(float_outs, q_outs))
    notes.insert(0, f"int8 vs float on {len(batches)} calibration batches: SQNR "
                    f"{stats['sqnr_db']:.1f} dB, max abs error {stats['max_abs_err']:.3g}"
                 + (f", top-1 agreement {stats['top1_agreement']:.3f}"
                    if "top1_agreement" in stats else ""))
    explicit = [k for k in kept if k not in {l.label for l in no_kernel}]
    if explicit:
        notes.append(f"kept in float: {', '.join(explicit)}")
    if no_kernel:
        stats["no_cpu_kernel"] = len(no_kernel)
        notes.append("no PyTorch int8 CPU kernel, so kept in float: " + ", ".join(
            f"{l.label} ({l.kind}+{l.act}{'+add' if l.residual is not None else ''})"
            for l in no_kernel))
    return PassResult(gm, modified=True, stats=stats, notes=notes, reference=reference,
                      max_abs_tolerance=step * (1 + 1e-4),  # one code, float slack
                      shapes_changed=True)  # codes are uint8 now


def _reference(gm: fx.GraphModule, plan: Plan) -> SimulatedInt8:
    """The simulated model on a copy of the float graph (the rewrite then changes ``gm``)."""
    import copy
    from dataclasses import replace

    ref = copy.deepcopy(gm)
    by_name = {n.name: n for n in ref.graph.nodes}

    def m(key):
        if isinstance(key, fx.Node):
            return by_name[key.name]
        if isinstance(key, tuple) and len(key) == 2 and isinstance(key[1], fx.Node):
            return (key[0], by_name[key[1].name])
        return key

    layers = {m(n): replace(l, node=m(l.node), x=m(l.x),
                            residual=None if l.residual is None else m(l.residual))
              for n, l in plan.layers.items()}
    return SimulatedInt8(ref, Plan(layers, {m(k): v for k, v in plan.roles.items()},
                                   {m(k): v for k, v in plan.grids.items()},
                                   {m(k): v for k, v in plan.weights.items()}))


# Epilogues PyTorch's quantized CPU kernels cover (lower_int8_cpu): relu fused, clamps after.
_CPU_ACTS = ("none", "relu", "relu6", "hardtanh", "clamp")


def _cpu_kernel(layer: Layer) -> bool:
    """Whether ``lower_int8_cpu`` can map ``layer`` onto a PyTorch int8 kernel."""
    if layer.residual is not None:
        return layer.act in ("none", "relu")  # quantized.add / add_relu
    return layer.act in _CPU_ACTS


def _select(layers: list[Layer], cfg: QuantConfig) -> tuple[list[Layer], list[str]]:
    keep = set()
    for i, layer in enumerate(layers):
        if cfg.keeps_float(layer.path, layer.module_type):
            keep.add(i)
    if layers and cfg.first_layer == "float":
        keep.add(0)
    if layers and cfg.last_layer == "float":
        keep.add(len(layers) - 1)
    return ([l for i, l in enumerate(layers) if i not in keep],
            [layers[i].label for i in sorted(keep)])


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
