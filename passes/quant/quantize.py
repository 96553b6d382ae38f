"""``quantize_int8``: post-training int8 quantization with int8 chains between layers.

The analysis is the quantization library's (``fxopt.quant``); this pass drives it and
rewrites the graph.

0. Attention (``passes/quant/attention.py``): a standard ``nn.MultiheadAttention`` leaf call
   and torchvision's ``shifted_window_attention`` are decomposed around their projections
   (checked against the call on the example inputs), so the projections are Linear layers;
   Hugging Face's ``Conv1D`` (GPT-2), exported as ``aten.addmm`` of a transposed weight,
   becomes ``linear_act`` (``passes/quant/addmm.py``).
1. Calibrate (``fxopt.quant.calibrate``): run ``ctx.calibration_data`` (tensors, ``(x, y)``
   tuples, a DataLoader; less the batches held out, step 5) through the float graph once,
   with a progress bar; one observer per candidate value, one per-channel min/max observer per
   weight. A layer whose input or output no batch reached (empty on every batch) stays float,
   named in the report (``stats["uncalibrated"]``); an error only when no layer was reached.
   Bias correction (``fxopt.quant.bias``, ``QuantConfig.bias_correction``, on by default):
   each layer's bias absorbs the mean per-channel error of its int8 form on those batches.
2. Select (``fxopt.quant.select``): ``keep_float`` and the first/last-layer policies, the CPU
   kernel filter, and the sensitivity fallback (``QuantConfig(min_sqnr_db=,
   max_float_layers=)``): the most sensitive layers go back to float, one at a time, until
   the budget holds, judged on the batches the report's figures come from (step 5).
3. Plan the int8 regions (``fxopt.quant.plan.make_plan``) and rewrite them
   (``passes/quant/rewrite.py``) into the int8 IR of
   ``fxopt.ops.int8``: ``quantize`` at each region entry, ``conv2d_int8`` / ``linear_int8``
   writing int8 codes for the next layer (requantized in the epilogue), ``add_int8``,
   ``cat_int8``, ``adaptive_avg_pool2d_int8``, max pooling and flatten on the codes, and
   ``dequantize`` at each exit. Scales and zero points are buffers.
4. Reference (DESIGN.md section 4): ``SimulatedInt8``, the float graph with fake quantization at
   the same points. The int8 graph must equal it within one quantization step of the output
   (``PassResult.max_abs_tolerance``).
5. Report: SQNR (dB), max abs error and top-1 agreement of the int8 graph against the float
   graph on data held out of calibration (``fxopt.quant.accuracy``: the last 20% of the
   calibration batches when there are 5 or more, else the example inputs when they are not a
   calibration batch, else the calibration batches, with a note saying so): ``stats`` with
   ``measured_on`` / ``measured_batches``; the layers kept in float and why. Under the SQNR
   floor (``QuantConfig.min_sqnr_db``, else ``warn_sqnr_db``, 20 dB) the pass warns
   (``fxopt.Int8AccuracyWarning``) with the worst layers and the fix.

    >>> res = quantize_int8(gm, PassContext((x,), calibration_data=batches))
    >>> res.stats["conv2d"], res.stats["sqnr_db"]

``QuantConfig(mode="dynamic")`` (``quantize="int8_dynamic"``) runs
``passes/quant/dynamic.py`` instead: int8 Linear weights, activations quantized at run time, no
calibration data.
"""
from __future__ import annotations

import dataclasses

import torch.fx as fx

from fxopt.errors import InputError
from fxopt.infra.preconditions import EVAL_MODE, Precondition
from fxopt.infra.registry import PassContext, PassResult, register_pass
from fxopt.ir.graph import remove_unused_attributes, tensor_meta
from fxopt.passes.quant.addmm import addmm_as_linear
from fxopt.passes.quant.attention import decompose_attention
from fxopt.passes.quant.dynamic import quantize_dynamic_linear
from fxopt.passes.quant.residual import split_linear_residuals
from fxopt.passes.quant.rewrite import Writer
from fxopt.passes.quant.split_act import split_unfused_activations
from fxopt.quant.accuracy import check_floor, not_held_out_note, split_held_out, sqnr_floor
from fxopt.quant.bias import bias_corrections, with_corrected_bias
from fxopt.quant.calibrate import calibrate, calibration_inputs, uncalibrated
from fxopt.quant.config import QuantConfig
from fxopt.quant.measure import compare, output_step, outputs
from fxopt.quant.plan import find_layers, make_plan, without_cat_grids_before_batch_norms
from fxopt.quant.select import fallback, has_cpu_kernel, select_layers, sensitivity
from fxopt.quant.simulate import SimulatedInt8, simulated_copy, weight_codes
from fxopt.quant.smooth import smooth_layernorms

__all__ = ["quantize_int8", "CALIBRATED_IF_STATIC"]


def _calibrated_if_static(gm: fx.GraphModule, ctx: PassContext) -> str | None:
    if ctx.config(QuantConfig).mode == "dynamic" or ctx.calibration_data is not None:
        return None
    return "no calibration data was given"


CALIBRATED_IF_STATIC = Precondition(
    "calibration_data_if_static", "calibration data for static int8", _calibrated_if_static,
    "pass calibration_data=[batch, ...] (a DataLoader works), or quantize='int8_dynamic' for "
    "Linear layers without it")


def _decomposed_note(attention: list) -> str:
    """The report's line for the attention calls ``decompose_attention`` opened up: an
    ``nn.MultiheadAttention`` call or torchvision's ``shifted_window_attention`` (Swin)."""
    return (f"{len(attention)} attention call(s) decomposed (nn.MultiheadAttention or "
            f"shifted_window_attention: the q/k/v and output projections as Linear layers, "
            f"scaled_dot_product_attention between them) so their projections are int8")


@register_pass("quantize_int8", requires=(EVAL_MODE, CALIBRATED_IF_STATIC), config=QuantConfig,
               reference="returned", after=("fuse_act",))
def quantize_int8(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Post-training int8: calibrate, keep sensitive layers float, rewrite into int8 chains."""
    cfg = ctx.config(QuantConfig).resolved(ctx.target)  # reduce_range="auto" decided here
    original = gm
    gm, linear = addmm_as_linear(gm)  # GPT-2's Conv1D: aten.addmm of a transposed weight
    gm, attention, attention_notes = decompose_attention(gm, ctx.example_inputs)
    if cfg.mode == "dynamic":
        res = quantize_dynamic_linear(gm, ctx, cfg)
        if (linear or attention) and not res.modified:  # the float rewrites are checked
            res = dataclasses.replace(res, modified=True, reference=original)
        if attention:
            res.stats["attention_decomposed"] = len(attention)
            res.notes.append(_decomposed_note(attention))
        res.notes.extend(attention_notes)
        return res
    # a transformer's residual stream stays float
    split = split_linear_residuals(gm) if cfg.linear_residual_add == "float" else 0
    # ONNX Runtime's int8 kernels fuse no activation but ReLU/Clip: the others run after
    split_acts = split_unfused_activations(gm) if ctx.target == "onnxruntime" else 0
    # gm differs from the input even if nothing is int8
    changed = bool(split or split_acts or linear)
    all_layers = find_layers(gm)
    layers, kept = select_layers(all_layers, cfg)
    no_kernel = []
    if ctx.target == "cpu" and cfg.float_without_kernel:
        no_kernel = [l for l in layers if not has_cpu_kernel(l)]
        layers = [l for l in layers if has_cpu_kernel(l)]
        kept = kept + [l.label for l in no_kernel]
    if not layers:
        return PassResult(gm if changed else original, modified=changed,
                          reference=original if changed else None,
                          stats={"kept_float": len(kept)},
                          notes=[f"kept in float: {', '.join(kept)}"] if kept else [])
    batches = calibration_inputs(ctx.calibration_data, ctx.example_inputs, cfg.min_batches)
    batches, held, measured_on = split_held_out(batches, ctx.example_inputs, cfg)
    notes, stats = [], {}
    if cfg.smooth_quant is not None:
        smoothed = smooth_layernorms(gm, layers, batches, cfg.smooth_quant)
        if smoothed:  # the layers' weights are new tensors now
            labels = {l.label for l in layers}
            all_layers = find_layers(gm)
            layers = [l for l in all_layers if l.label in labels]
            stats["smoothed_layernorms"] = smoothed
    grids, weights = calibrate(gm, layers, batches, cfg)
    if ctx.target == "openvino":
        grids, float_cats = without_cat_grids_before_batch_norms(gm, grids)
        if float_cats:
            stats["float_concats"] = float_cats
            notes.append(f"target='openvino': {float_cats} concatenation(s) read only by a "
                         f"BatchNorm kept float (OpenVINO folds their inputs' scales into the "
                         f"BatchNorm; a requantized concat is one more op)")
    unreached = uncalibrated(layers, grids)
    if unreached:
        if len(unreached) == len(layers):
            raise InputError(f"no calibration data reached any layer to quantize (first: "
                             f"{layers[0].label})", hint="pass calibration_data with at least "
                             "one non-empty batch that runs through the model")
        layers = [l for l in layers if l not in unreached]
        kept = kept + [l.label for l in unreached]
        stats["uncalibrated"] = [l.label for l in unreached]
        notes.append("no calibration data reached (empty on every batch), so kept in float: "
                     + ", ".join(l.label for l in unreached))
    if cfg.bias_correction:  # before the fallback, so that it judges the corrected layers
        corrections = bias_corrections(gm, layers, grids, weights, batches)
        if ctx.target == "openvino":
            # OpenVINO drops an add of zeros but does not fuse a bias into its int8
            # FullyConnected on an input of rank > 2 (one more eltwise a layer): a bias where
            # there was none cost convnext_tiny 50.4 vs 43.4 ms for 0.25 dB (1 thread,
            # 2026-12-06). Convs and 2-D Linears (a classifier: its correction is worth dB at
            # the output) fuse it.
            new_bias = [l for l in layers if l.kind == "linear" and l.node in corrections
                        and _rank(l.x) not in (None, 2)
                        and (l.bias is None or not bool(l.bias.any()))]
            for l in new_bias:
                del corrections[l.node]
            if new_bias:
                notes.append(f"target='openvino': {len(new_bias)} Linear layer(s) without a "
                             f"bias not bias-corrected (a new bias is a separate add there)")
        layers = with_corrected_bias(layers, corrections)
        stats["bias_corrected"] = len(corrections)
    held_float = outputs(gm, held)
    if cfg.runs_fallback:
        # judged on the held-out data (the figure the floor is checked on), when there is some
        layers, moved, sens = fallback(gm, layers, grids, weights, held, held_float, cfg)
        if sens:  # none measured when the model met the target all int8
            stats["sensitivity_db"] = {l.label: round(v, 2) for l, v in
                                       ((l, sens[l.node]) for l in all_layers if l.node in sens)}
        stats["fallback"] = [{"layer": l.label, "sensitivity_db": round(s, 2),
                              "model_sqnr_db_after": round(q, 2)} for l, s, q in moved]
        if moved:
            notes.append("kept in float by sensitivity: " + ", ".join(
                f"{l.label} (alone {s:.1f} dB; model {q:.1f} dB after)" for l, s, q in moved))
        target = cfg.fallback_target_db
        if target is not None and sens and (not moved or moved[-1][2] < target):
            notes.append(_not_reached_note(cfg, moved))
        if cfg.min_sqnr_db == "auto":
            stats["auto_target_db"] = target
        kept = kept + [l.label for l, _, _ in moved]
        if not layers:
            return PassResult(gm if changed else original, modified=changed,
                              reference=original if changed else None,
                              stats={**stats, "kept_float": len(kept)},
                              notes=notes)
    plan = make_plan(gm, layers, grids, weights)
    # the int8 weights made once: the reference reads them and the rewrite writes them in
    codes = weight_codes(plan)
    reference = simulated_copy(gm, plan, codes)
    writer = Writer(gm, plan, weight_codes=codes)
    exits = writer.run()
    for n in reversed(list(gm.graph.nodes)):  # the float weights' reads, now dead
        if n.op == "get_attr" and not n.users:
            gm.graph.erase_node(n)
    remove_unused_attributes(gm)
    gm.graph.lint()
    gm.recompile()

    step = output_step(gm, exits)
    if split:
        stats["float_residual_adds"] = split
    if split_acts:
        stats["activations_after_layer"] = split_acts
    if linear:
        stats["addmm_as_linear"] = linear
    stats = {**{k: v for k, v in writer.counts.items() if v}, "kept_float": len(kept),
             "calibration_batches": len(batches), "output_step": float(f"{step:.4g}"),
             "measured_on": measured_on, "measured_batches": len(held),
             "reduce_range": cfg.reduce_range, **stats}
    stats.update(compare(held_float, outputs(gm, held)))
    where = {"held_out": f"{len(held)} batches held out of calibration",
             "example_inputs": "the example inputs (not a calibration batch)",
             "calibration": f"the {len(held)} calibration batches"}[measured_on]
    notes.insert(0, f"int8 vs float on {where}: SQNR "
                    f"{stats['sqnr_db']:.1f} dB, max abs error {stats['max_abs_err']:.3g}"
                 + (f", top-1 agreement {stats['top1_agreement']:.3f}"
                    if "top1_agreement" in stats else ""))
    if measured_on == "calibration":
        notes.insert(1, not_held_out_note(cfg))
    floor = sqnr_floor(cfg)
    if floor is not None:
        stats["sqnr_floor_db"] = floor
        if stats["sqnr_db"] < floor:
            w = check_floor(stats["sqnr_db"], measured_on, cfg,
                            _worst_layers(reference, held, held_float, cfg,
                                          stats.get("sensitivity_db")))
            stats["worst_layers_db"] = dict(w.worst_layers)
            notes.append(f"{w.message}; fix: {w.hint}")
    said = {l.label for l in no_kernel} | set(stats.get("uncalibrated", []))
    explicit = [k for k in kept if k not in said]
    if explicit:
        notes.append(f"kept in float: {', '.join(explicit)}")
    if attention:
        stats["attention_decomposed"] = len(attention)
        notes.append(_decomposed_note(attention))
    notes += attention_notes
    if no_kernel:
        stats["no_cpu_kernel"] = len(no_kernel)
        notes.append("no PyTorch int8 CPU kernel, so kept in float: " + ", ".join(
            f"{l.label} ({l.kind}+{l.act}{'+add' if l.residual is not None else ''})"
            for l in no_kernel))
    return PassResult(gm, modified=True, stats=stats, notes=notes, reference=reference,
                      max_abs_tolerance=step * (1 + 1e-4),  # one code, float slack
                      shapes_changed=True)  # codes are uint8 now


def _worst_layers(reference: SimulatedInt8, held: list, held_float: list, cfg: QuantConfig,
                  known: dict[str, float] | None = None, n: int = 3) -> list[tuple[str, float]]:
    """The ``n`` quantized layers whose int8 form alone hurts most: ``(module path, SQNR dB of
    the simulated model with only that layer int8)``, measured on (some of) the held-out
    batches, worst first. ``known``: the figures the sensitivity fallback already measured on
    the same batches (by module path), used instead of measuring again."""
    plan, k = reference.plan, cfg.sensitivity_batches
    layers = list(plan.layers.values())
    if known is None or any(l.label not in known for l in layers):
        sens = sensitivity(reference.gm, layers, plan.grids, plan.weights, held[:k],
                           held_float[:k])
        known = {l.label: round(sens[l.node], 2) for l in layers}
    return sorted(((l.label, known[l.label]) for l in layers), key=lambda t: t[1])[:n]


def _not_reached_note(cfg: QuantConfig, moved: list) -> str:
    """The report's line when the fallback stopped short of its target."""
    limits = [f"max_float_layers={cfg.max_float_layers}"] if cfg.max_float_layers is not None \
        else []
    if cfg.fallback_mac_share is not None:
        limits.append(f"at most {cfg.fallback_mac_share:.0%} of the int8 MACs float")
    auto = cfg.min_sqnr_db == "auto"
    text = (f"min_sqnr_db={cfg.min_sqnr_db!r}"
            + (f" ({cfg.fallback_target_db:g} dB)" if auto else "") + " not reached"
            + (f" ({moved[-1][2]:.1f} dB with {len(moved)} layer(s) float)" if moved else "")
            + (f" within {' and '.join(limits)}" if limits else ""))
    if auto:
        text += (f"; QuantConfig(min_sqnr_db={cfg.fallback_target_db:g}) lifts the MAC limit, "
                 f"min_sqnr_db=None keeps every layer int8")
    return text


def _rank(n) -> int | None:
    """The rank of the value ``n`` from its shape metadata, or None where unknown."""
    tm = tensor_meta(n)
    return None if tm is None else len(tm.shape)
