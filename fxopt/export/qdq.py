"""Int8 graphs as ONNX QDQ: a table of one-op rewrites, run by the rewrite engine.

``export_onnx`` calls :func:`qdq_rewrite` on a copy of an int8 graph before handing it to
``torch.onnx.export``. Both forms of an int8 graph are read, each by its own rows:

- the device-neutral int8 IR that ``quantize_int8`` / ``quantize_int8_dynamic`` write (codes
  between ops, grids as buffers): ``fxopt.export.qdq_ir.IR_RULES``, one row per op of the
  schema's int8 family, its arguments read through the op's view;
- that IR lowered by ``lower_int8_cpu`` onto PyTorch's int8 CPU kernels (fxopt's CPU ops on
  plain codes; before them, quantized tensors and prepacked weights):
  ``fxopt.export.qdq_cpu.CPU_RULES``.

Every row turns one call into "dequantize the inputs, the float op, quantize the output", the
pattern ONNX Runtime fuses back into its own int8 kernels. ``RULES`` is both tables, run with
``apply_rules(gm, RULES, context=QDQState(gm))`` in one graph-order sweep: a row reads the grid
of its input codes from the state (written there by the rows that produced them) and records
the grid of the codes it writes. Codes still flow between the ops, so the ops that only move
codes (flatten, reshape, ``contiguous``) stay as they are (``fxopt.export.qdq_state``). Weights
become int8 initializers with per-output-channel scales (DequantizeLinear ``axis=0``, opset
>= 13); biases stay float. ONNX Runtime rounds a float bias onto the int32 grid
``x_scale * w_scale`` when it fuses the layer (QLinearConv / QGemm); ``make_plan`` puts the
IR's biases on that grid already (``fxopt.quant.qparams.on_accumulator_grid``), so that
rounding changes nothing (off that grid, ResNet-18 ran 3-6 output steps off fxopt's graph).

Worked example, the int8 IR of a conv, a max pooling, a flatten and a linear (rows in [ ])::

    q = quantize(x, s0, z0, 0, 255)                                        [quantize]
        ->  Q(x; s0, z0)
    c = conv2d_int8(q, w, ws, b, ..., s0, z0, s1, z1, act="relu", out_int8=True)  [conv2d_int8]
        ->  Q(Relu(Conv(DQ(q; s0, z0), DQ(w; ws, 0, axis=0), b)); s1, z1)
    p = max_pool2d_int8(c, [2, 2], [2, 2], [0, 0], [1, 1], False)          [max_pool2d_int8]
        ->  Q(MaxPool(DQ(c; s1, z1)); s1, z1)        (the grid of its input codes)
    f = flatten(p, 1)                                (no row: the codes move, grid s1, z1)
    y = linear_int8(f, w2, ws2, b2, s1, z1, s2, z2)                        [linear_int8]
        ->  DQ(Q(Gemm(DQ(f; s1, z1), DQ(w2; ws2, 0, axis=0), b2); s2, z2); s2, z2)

    >>> rw = qdq_rewrite(copy.deepcopy(opt.graph_module))
    >>> rw.translated, rw.kept, rw.output_step
    ({'quantize': 1, 'conv2d_int8': 1, 'max_pool2d_int8': 1, 'linear_int8': 1}, [], 0.0021)

``translated`` counts the rewrites per row (a row is named after its source op).
``output_step`` is the scale of the coarsest dequantized grid that reaches the graph output:
ONNX Runtime's file must match the fxopt module within it. ``kept`` names the ops that read
codes but have no row (``export_onnx`` warns about each). A new int8 op is a new row.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fxopt.export.qdq_cpu import CPU_RULES, quantized_op_name
from fxopt.export.qdq_ir import IR_RULES
from fxopt.export.qdq_state import QDQState, moves_codes
from fxopt.infra.rewrite import Rule, apply_rules
from fxopt.ir.graph import remove_unused_attributes
from fxopt.ir.tolerances import ErrorStats, rel_err
from fxopt.ops.schema import ops_of

__all__ = ["RULES", "QDQRewrite", "qdq_rewrite", "has_rule", "is_int8_op", "is_int8_graph",
           "untranslated", "compare_within_step", "drop_initializer_identities",
           "MIN_QDQ_OPSET"]

MIN_QDQ_OPSET = 13  # per-axis DequantizeLinear

RULES: tuple[Rule, ...] = IR_RULES + CPU_RULES


@dataclass
class QDQRewrite:
    """What :func:`qdq_rewrite` did: the rewritten graph, rewrites per row, the ops on codes
    that have no row, and the tolerance of the ONNX Runtime check."""

    gm: fx.GraphModule
    translated: dict[str, int] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    output_step: float = 0.0


def has_rule(target) -> bool:
    """Whether the QDQ table has a row for calls of ``target`` (a function or op overload)."""
    return not isinstance(target, str) and any(target in rule.root.targets for rule in RULES)


def is_int8_op(target) -> bool:
    """Whether ``target`` is an int8 op of any form: the fxopt int8 IR (the schema's
    ``int8`` family), the CPU lowering's ops on codes (``cpu``) or PyTorch's quantized ops."""
    return (target in ops_of(("int8", "cpu")) or target is torch.quantize_per_tensor
            or (quantized_op_name(target) or "").startswith("quantized::"))


def is_int8_graph(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` holds int8 ops of either form (fxopt int8 IR or PyTorch quantized)."""
    return any(n.op == "call_function" and is_int8_op(n.target) for n in gm.graph.nodes)


def _kept(gm: fx.GraphModule, state: QDQState, sources: list[fx.Node]) -> list[str]:
    """The source ops no row rewrote that read codes (other than the ops that move codes):
    their meaning on codes is unknown, so they are exported as they are."""
    alive = set(gm.graph.nodes)
    return [f"{n.name} ({n.target})" for n in sources
            if n in alive and not moves_codes(n) and not _reads_shape(n)
            and any(state.grid_of(x) is not None for x in n.all_input_nodes)]


def _reads_shape(n: fx.Node) -> bool:
    """``codes.size()``, ``codes.dim()``, ``codes.shape``: the codes have the value's shape
    (ShuffleNet's channel shuffle reads it)."""
    return (n.op == "call_method" and n.target in ("size", "dim")) or \
        (n.op == "call_function" and n.target is getattr and n.args[1:] == ("shape",))


def qdq_rewrite(gm: fx.GraphModule) -> QDQRewrite:
    """Rewrite ``gm`` (in place: pass a copy) into float ops between QuantizeLinear and
    DequantizeLinear calls, ready for ``torch.onnx.export``."""
    state = QDQState(gm)
    sources = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    result = apply_rules(gm, RULES, context=state)
    kept = _kept(gm, state, sources)
    gm.graph.eliminate_dead_code()
    remove_unused_attributes(gm)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, value in list(vars(gm).items()):  # the prepacked weights, unpacked by the rows
        if isinstance(value, torch.ScriptObject) and name not in used:
            delattr(gm, name)
    gm.graph.lint()
    gm.recompile()
    return QDQRewrite(gm, dict(result.counts), kept, state.output_step())


def untranslated(gm: fx.GraphModule) -> list[str]:
    """The int8 ops still in ``gm`` after :func:`qdq_rewrite` (no QDQ translation)."""
    return [f"{n.name} ({n.target})" for n in gm.graph.nodes
            if n.op == "call_function" and is_int8_op(n.target)]


def compare_within_step(out: list, ref: list, step: float) -> ErrorStats:
    """ErrorStats of ``out`` against ``ref``: ok when every element is within one output
    quantization step (``step``; float slack 1e-4 relative plus 1e-6)."""
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
