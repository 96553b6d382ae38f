"""``lower_int8_cpu``: the int8 IR onto PyTorch's int8 CPU kernels, on plain uint8 codes.

``quantize_int8`` writes device-neutral ops that carry int8 codes between layers
(``fxopt.ops.int8``). On ``target="cpu"`` this pass maps each onto the ops of
``fxopt.ops.cpu``, which take the same plain uint8 codes and run PyTorch's int8 kernels: no
quantized tensor and no packed-weight ScriptObject in the lowered module, so it saves as int8
weights and scales, ``torch.export``s and ``torch.compile``s (each op has a fake). The lowering
is a table, ``ROWS``: one ``Row(name, ir, emit, fits, tally)`` per IR op (and case), run by the
rewrite engine (``fxopt.infra.rewrite``, ``RULES`` is ``[row.rule() for row in ROWS]``), which
tries the rows in order at each op and rewrites it with the first whose ``fits`` passes:

    row                       an fxopt op ...                       becomes
    conv2d_int8               conv2d_int8(q, ..., act="relu")       onednn_conv2d_int8(q, w_q, ..,
                                                                      act="relu", engine=...)
                              (oneDNN's qconv2d_pointwise, the activation its post-op: relu,
                              relu6/hardtanh/clamp as hardtanh, hardswish, SiLU; or, engine
                              "fbgemm", PyTorch's quantized fbgemm kernel: see ``_engine``)
    linear_int8               linear_int8(q, ..., act="gelu")       onednn_linear_int8(...)
    add_int8_into_conv        add_int8(conv, ..., r, ..., act)      onednn_conv2d_int8(.., residual=
                              (conv: a lowered conv, no act, only     r, act=act): oneDNN's sum
                              the add reads it; its grid at most      post-op (qconv2d_pointwise.
                              RESIDUAL_SCALE_RATIO add steps)         binary), one rounding fewer
    quantize, dequantize,     the op(args)                          cpu_<op>(args): the same
    add_int8, mul_int8,                                               arguments, PyTorch's
    cat_int8, adaptive_avg_                                           quantized kernel on a view of
    pool2d_int8, avg_pool2d_                                          the codes (no copy), plain
    int8, max_pool2d_int8,                                            codes out
    upsample_nearest2d_int8,
    batch_norm2d_int8 (relu)

Which epilogues the kernels take comes from the activation table (``onednn_int8`` and
``quantized_cpu``, read by ``fxopt.ops.onednn.int8_post_op``); a case no row takes (a float
residual or output, sigmoid, an add then SiLU, a grid other than uint8, a nearest scale factor
PyTorch's quantized kernel indexes differently) is rejected with its reason and stays the IR op,
which runs its exact reference on the same plain codes; the report names it (``fallback``).
Flatten and reshape run on the codes unchanged. A new op is a row. Measured per op kind (1
thread, resnet18 / mobilenet_v2 / mobilenet_v3_large layer shapes): ``bench/int8_plain.py``,
``bench/results/int8-plain-lowering-2026-12-06.md``.

The pass's reference is the int8 graph before it run in lockstep with the lowered graph
(``fxopt.passes.lower.lockstep``), which the engine's ``rewrites`` (IR node -> lowered node)
make possible: every lowered op within one code of its IR op, at the example batch and at one
sample more (a kernel can be wrong at one batch size only). An op whose kernel is further off,
and whose inputs were not, is lowered again onto the IR op's reference (``CpuLowering.kept``,
the report's ``kept_on_reference``). Worked example
(``tests/passes/lower/test_cpu.py``'s ``Net``: conv-relu, a residual block, global average
pooling, a linear layer)::

    >>> lower_int8_cpu(int8_graph, ctx).stats
    {'quantize': 1, 'conv2d': 2, 'conv2d_add': 1, 'pool': 1, 'linear': 1, 'dequantize': 1,
     'fallback': 0, 'engine': 'fbgemm 2, onednn 1', 'tie_flips': 130}
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fxopt.infra.direct import DirectRunner
from fxopt.infra.preconditions import EVAL_MODE
from fxopt.infra.registry import PassContext, PassResult, register_pass
from fxopt.infra.rewrite import Builder, Match, apply_rules, op_rule
from fxopt.infra.timing import measure
from fxopt.ir.activations import ACTIVATIONS
from fxopt.ir.graph import get_attr_value, tensor_meta
from fxopt.ops import onednn
from fxopt.ops.cpu import CPU_OF, ONEDNN_CONV2D_INT8, ONEDNN_LINEAR_INT8, quantized_nearest_alike
from fxopt.ops.int8 import (ADD_INT8, AVG_POOL2D_INT8, AVGPOOL_INT8, BATCH_NORM2D_INT8, CAT_INT8,
                            CONV2D_INT8, DEQUANTIZE, INT8_IR_OPS, LINEAR_INT8, MAXPOOL_INT8,
                            MUL_INT8, QUANTIZE, UPSAMPLE_NEAREST2D_INT8, BatchNorm2dInt8,
                            BinaryInt8, Int8Layer, UpsampleNearest2dInt8)
from fxopt.ops.isa import int8_pairs_saturate
from fxopt.ops.schema import schema_of, view_of
from fxopt.passes.lower.lockstep import LockstepReference, off_kernels, who
from fxopt.quant.config import QuantConfig
from fxopt.quant.measure import output_step

__all__ = ["lower_int8_cpu", "quantized_engine_available", "LockstepReference", "RULES",
           "CpuLowering", "SMALL_MACS", "LINEAR_FBGEMM_ROWS", "RESIDUAL_SCALE_RATIO",
           "FUSE_RESIDUAL_ADD", "Row", "ROWS"]

# A layer with at most this many MACs per call is "small" (the digits model's are 0.1-0.3M;
# a ResNet-18 layer at 224x224 has 100M+): engine "auto" runs it on fbgemm.
SMALL_MACS = 2_000_000
# A linear layer called on at most this many rows (tokens times batch) runs on fbgemm under
# engine "auto" whatever its size on a CPU without VNNI, where oneDNN's int8 matrix-vector
# products are slow (measured there only; AVX2 EPYC, 2 threads, 2026-12-07: 4096x4096 at one
# row 2.04 ms against fbgemm's 0.33, 25088x4096 13.3 against 3.3, 4096x4096 at 8 rows 4.6
# against 0.95; 0.65x at 16 rows, 0.86x at 64, equal at 197; alexnet 12.7 -> 6.7 ms, vgg11
# 57.0 -> 44.9: bench/results/int8-linear-rows-2026-12-07.md)
LINEAR_FBGEMM_ROWS = 16
# A conv's output grid may be at most this many times the add's output step for the add to fuse
# into it (oneDNN's sum post-op skips the IR's rounding onto the conv's grid: half a conv step,
# under one add step here, so the fused codes stay within one code of the IR's)
RESIDUAL_SCALE_RATIO = 1.95
# Off: the int8 IR rounds and clamps a conv's output on the conv's own calibrated grid before
# the add; oneDNN's sum post-op skips both, so where an input leaves the calibrated range the
# fused sum is many codes from the IR (15 codes on resnet18 with randomized BatchNorm
# statistics at 64x64, 2026-12-06), which the lockstep check refuses. The row stays for a
# reference the IR does not clamp there (tests turn it on with this flag).
FUSE_RESIDUAL_ADD = False
_UINT8 = (0, 255)  # PyTorch's quint8: the only activation grid its x86 kernels take


def quantized_engine_available() -> bool:
    """Whether PyTorch's int8 CPU kernels (oneDNN / fbgemm / x86) can run here."""
    try:
        return torch.backends.quantized.engine in ("x86", "fbgemm", "onednn") and \
            onednn.onednn_int8_available()
    except RuntimeError:
        return False


@dataclass
class CpuLowering:
    """What the rows share (``m.context``): the engine choice (``QuantConfig``'s
    ``cpu_engine``), the layers each engine took, and the fused residual adds."""

    engine: str = "auto"
    engines: dict[str, int] = field(default_factory=dict)
    # IR node name -> why it stays on fxopt's reference: PyTorch's kernel for it was more than
    # one code from the IR at a batch the pass checks (lower_int8_cpu lowers again without it)
    kept: dict[str, str] = field(default_factory=dict)


def _const(m: Match, node: fx.Node):
    return get_attr_value(m.gm, node.target)


def _grid(m: Match, scale: fx.Node, zp: fx.Node) -> tuple[float, int]:
    """A grid's scale and zero point as the numbers the kernels take (baked into the call)."""
    return float(_const(m, scale)), int(_const(m, zp))


def _is_codes(node) -> bool:
    """Whether ``node`` carries int8 codes: its meta says so."""
    return getattr(tensor_meta(node), "dtype", None) == torch.uint8


def _reject(m: Match, why: str) -> bool:
    return m.reject(f"{schema_of(m.root.target).name} ({who(m.root)}): {why}")


def _uint8(m: Match, lo: int, hi: int) -> bool:
    return (lo, hi) == _UINT8 or _reject(m, f"grid [{lo}, {hi}] (the kernels take uint8 only)")


# -- the rows: what each IR op becomes, and when ------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One row of the table: the IR op (``ir``, a schema of ``fxopt.ops.int8``) becomes
    ``emit(m, b)`` when ``fits(m)`` (a check that calls ``m.reject(why)``); ``tally`` is the
    stats key it counts under. The rows are tried in order at each IR op; an op no row takes
    stays the IR op, its exact reference on plain codes (the report names it)."""

    name: str
    ir: object
    emit: object
    fits: object = None
    tally: str = ""

    def rule(self):
        def replace(m: Match, b: Builder) -> fx.Node:
            b.tally(self.tally or self.name)
            return self.emit(m, b)

        def fits(m: Match) -> bool:
            kept = m.context.kept.get(m.root.name) if m.context is not None else None
            if kept:
                return _reject(m, kept)
            return self.fits is None or self.fits(m)
        return op_rule(self.name, [self.ir.overload], replace, fits)


def _same_call(m: Match, b: Builder) -> fx.Node:
    """The IR op's CPU twin (``fxopt.ops.cpu.CPU_OF``): the same arguments, PyTorch's quantized
    kernel on views of the codes."""
    return CPU_OF[m.root.target].emit(b, **view_of(m.root).values)


def _grid_fits(qmin: str, qmax: str):
    """A check: the op's ``qmin``/``qmax`` arguments are the uint8 grid."""

    def check(m: Match) -> bool:
        v = view_of(m.root)
        return _uint8(m, v.get(qmin), v.get(qmax))

    return check


def _binary_fits(m: Match) -> bool:
    v = BinaryInt8.of(m.root)
    if ACTIVATIONS[v.act].quantized_cpu != "fused":
        return _reject(m, f"no int8 {v.name} kernel with activation {v.act}")
    return _uint8(m, v.y_qmin, v.y_qmax)


def _batch_norm_fits(m: Match) -> bool:
    v = BatchNorm2dInt8.of(m.root)
    if v.act not in ("none", "relu"):
        return _reject(m, f"no int8 batch_norm2d kernel with activation {v.act}")
    return _uint8(m, v.y_qmin, v.y_qmax)


def _upsample_fits(m: Match) -> bool:
    v = UpsampleNearest2dInt8.of(m.root)
    return _uint8(m, v.qmin, v.qmax) and (quantized_nearest_alike(v.scale_factors) or _reject(
        m, f"scale factor {v.scale_factors}: PyTorch's quantized kernel indexes it differently"))


# -- conv2d_int8 / linear_int8 ------------------------------------------------------------------
def _layer_fits(kind: str):
    def check(m: Match) -> bool:
        v = Int8Layer.of(m.root)
        if v.residual is not None or not v.out_int8:
            return _reject(m, "a float residual or output")
        if not (_uint8(m, v.y_qmin, v.y_qmax) and _uint8(m, v.x_qmin, v.x_qmax)):
            return False
        if not _is_codes(v.x):
            return _reject(m, "a float input")
        # every activation: oneDNN's post-op where the activation table has one, else the
        # kernel's float32 output, the activation, then the requantize (fxopt.ops.cpu)
        return True

    return check


def _rows(n: fx.Node) -> int:
    """How many output rows a layer computes per call: batch times output pixels for a conv,
    the leading dimensions' product for a linear."""
    shape = tuple(getattr(tensor_meta(n), "shape", ()) or ())
    rows = 1
    for d in (shape[:1] + shape[2:]) if len(shape) == 4 else shape[:-1]:
        rows *= int(d)
    return rows


def _macs(n: fx.Node, w_q: torch.Tensor) -> int:
    return _rows(n) * w_q[0].numel() * w_q.shape[0]


def _engine(m: Match, v, w_q: torch.Tensor) -> str:
    """The kernel a layer runs: ``cpu_engine`` "onednn" everywhere; "fbgemm" / "x86": that
    engine's quantized kernel wherever it has the activation; "auto": fbgemm for small layers
    (its per-call cost is lower: bench/int8_plain.py) and, on a CPU without VNNI, for linear
    layers on a few rows (``LINEAR_FBGEMM_ROWS``: oneDNN's int8 GEMV is slow there), oneDNN for
    the rest and for every grouped convolution: fbgemm's grouped/depthwise kernels sum u8 x s8
    pairs in int16 and saturate on full 8-bit activation grids (``fxopt.quant.isa``; up to 52
    codes off)."""
    choice = m.context.engine
    grouped = (getattr(v, "groups", 1) or 1) > 1
    quantized = ACTIVATIONS[v.act].quantized_cpu is not None and \
        choice in torch.backends.quantized.supported_engines
    if choice == "auto":
        small = _macs(m.root, w_q) <= SMALL_MACS or (
            w_q.dim() == 2 and _rows(m.root) <= LINEAR_FBGEMM_ROWS and int8_pairs_saturate())
        choice = "fbgemm" if small and not grouped \
            and "fbgemm" in torch.backends.quantized.supported_engines \
            and ACTIVATIONS[v.act].quantized_cpu is not None else "onednn"
    elif not quantized:
        choice = "onednn"
    m.context.engines[choice] = m.context.engines.get(choice, 0) + 1
    return choice


def _layer(kind: str):
    """conv2d_int8 / linear_int8 (codes in, codes out) onto ``fxopt.onednn_<kind>_int8``."""
    op = ONEDNN_CONV2D_INT8 if kind == "conv2d" else ONEDNN_LINEAR_INT8

    def emit(m: Match, b: Builder) -> fx.Node:
        v = Int8Layer.of(m.root)
        (xs, xz), (ys, yz) = _grid(m, v.x_scale, v.x_zp), _grid(m, v.y_scale, v.y_zp)
        values = dict(q=v.x, w_q=v.w_q, w_scale=v.w_scale, bias=v.bias, x_scale=xs, x_zp=xz,
                      y_scale=ys, y_zp=yz, act=v.act, act_args=list(v.act_args),
                      engine=_engine(m, v, _const(m, v.w_q)))
        if kind == "conv2d":
            values.update(stride=v.stride, padding=v.padding, dilation=v.dilation,
                          groups=v.groups)
        return op.emit(b, **values)

    return emit


# -- a residual add into the conv before it: oneDNN's sum post-op -------------------------------
def _fusable_conv(m: Match, conv, other) -> bool:
    """``conv`` is a lowered conv (no residual, no activation) whose only user is this add,
    with the other input of the add on its shape and the grid ratio ``RESIDUAL_SCALE_RATIO``."""
    v = view_of(conv)
    if v is None or v.schema is not ONEDNN_CONV2D_INT8 or v.residual is not None \
            or v.act != "none" or len(conv.users) != 1:
        return False
    add = BinaryInt8.of(m.root)
    if float(v.y_scale) > RESIDUAL_SCALE_RATIO * float(_const(m, add.y_scale)):
        return False
    cs, os = tensor_meta(conv), tensor_meta(other)
    return cs is not None and os is not None and tuple(cs.shape) == tuple(os.shape)


def _residual_fits(m: Match) -> bool:
    v = BinaryInt8.of(m.root)
    if not FUSE_RESIDUAL_ADD or v.name != "add_int8" or v.act not in ("none", "relu") \
            or (v.y_qmin, v.y_qmax) != _UINT8:
        return False
    for conv, other, grid in ((v.a, v.b, (v.b_scale, v.b_zp)), (v.b, v.a, (v.a_scale, v.a_zp))):
        if _fusable_conv(m, conv, other):
            m.data.update(conv=conv, other=other, grid=grid)
            return True
    return False


def _residual(m: Match, b: Builder) -> fx.Node:
    v, conv = BinaryInt8.of(m.root), view_of(m.data["conv"])
    engines = m.context.engines  # the conv is counted once, under the engine it now runs on
    engines[conv.engine] -= 1
    engines["onednn"] = engines.get("onednn", 0) + 1
    rs, rz = _grid(m, *m.data["grid"])
    ys, yz = _grid(m, v.y_scale, v.y_zp)
    return conv.emit(b, residual=m.data["other"], residual_scale=rs, residual_zp=rz,
                     conv_scale=conv.y_scale, conv_zp=conv.y_zp, y_scale=ys, y_zp=yz,
                     act=v.act, act_args=list(v.act_args), engine="onednn")


# -- the table ----------------------------------------------------------------------------------
ROWS = (
    Row("quantize", QUANTIZE, _same_call, _grid_fits("qmin", "qmax")),
    Row("dequantize", DEQUANTIZE, _same_call),
    Row("conv2d_int8", CONV2D_INT8, _layer("conv2d"), _layer_fits("conv2d"), "conv2d"),
    Row("linear_int8", LINEAR_INT8, _layer("linear"), _layer_fits("linear"), "linear"),
    Row("add_int8_into_conv", ADD_INT8, _residual, _residual_fits, "conv2d_add"),
    Row("add_int8", ADD_INT8, _same_call, _binary_fits, "add"),
    Row("mul_int8", MUL_INT8, _same_call, _binary_fits, "mul"),
    Row("cat_int8", CAT_INT8, _same_call, _grid_fits("y_qmin", "y_qmax"), "cat"),
    Row("adaptive_avg_pool2d_int8", AVGPOOL_INT8, _same_call, _grid_fits("qmin", "qmax"),
        "pool"),
    Row("avg_pool2d_int8", AVG_POOL2D_INT8, _same_call, _grid_fits("qmin", "qmax"), "pool"),
    Row("max_pool2d_int8", MAXPOOL_INT8, _same_call, None, "pool"),
    Row("upsample_nearest2d_int8", UPSAMPLE_NEAREST2D_INT8, _same_call, _upsample_fits,
        "upsample"),
    Row("batch_norm2d_int8", BATCH_NORM2D_INT8, _same_call, _batch_norm_fits, "batch_norm"),
)
RULES = [r.rule() for r in ROWS]


# -- the pass -----------------------------------------------------------------------------------
def _affine_uint8_only(gm: fx.GraphModule) -> bool:
    """Every output grid in the int8 IR is uint8 [0, 255]; symmetric int8 grids
    (``QuantConfig(activation_symmetric=True)``) have no x86 kernels for activations."""
    for n in gm.graph.nodes:
        v = view_of(n) if n.op == "call_function" and n.target in INT8_IR_OPS else None
        for lo, hi in (("qmin", "qmax"), ("y_qmin", "y_qmax")):
            if v is not None and lo in v.values and (v.get(lo), v.get(hi)) != _UINT8:
                return False
    return True


# cpu_engine "fastest": the graph lowered with "auto"'s layer choices and with every layer the
# x86 quantized engine takes on x86, and the faster on the example inputs kept. Which is faster
# depends on the model (AVX2 EPYC, batch 1, 2026-12-07: regnet_x_400mf 11.2 ms with auto's
# oneDNN layers, 9.1 with x86's; resnet18 14.5 against 15.5;
# bench/results/int8-linked-2026-12-07.md).
_CHOICE_ROUNDS = 5


def _lowered(gm: fx.GraphModule, engine: str, inputs: tuple):
    """``(gm, state, result, choice)``: ``gm`` lowered with ``engine``; for "fastest", with
    "auto" and (on a copy, where this build has the x86 engine and the CPU no VNNI) with "x86",
    the faster kept (``choice`` says what was measured; "" where nothing was asked)."""
    if engine != "fastest":
        state = CpuLowering(engine=engine)
        return gm, state, apply_rules(gm, RULES, context=state), ""
    candidates = {"auto": gm}
    if "x86" in torch.backends.quantized.supported_engines and int8_pairs_saturate():
        # only on a CPU without VNNI: there fxopt.ops.cpu keeps every engine's sums exact; with
        # VNNI, 8-bit activation grids may saturate in fbgemm's grouped kernels ("auto" keeps
        # those on oneDNN)
        candidates["x86"] = copy.deepcopy(gm)
    built = {}
    for name, graph in candidates.items():
        state = CpuLowering(engine=name)
        built[name] = (graph, state, apply_rules(graph, RULES, context=state))
    if len(built) == 1 or not all(b[2].count for b in built.values()):
        why = ("x86 is measured only on a CPU without VNNI" if not int8_pairs_saturate() else
               "no x86 engine in this PyTorch" if len(built) == 1 else "nothing to compare")
        graph, state, result = built["auto"]
        return graph, state, result, f"auto kept ({why})"
    timings = _timings({name: b[0] for name, b in built.items()}, inputs)
    kept = min(timings, key=timings.get)
    other = next(name for name in timings if name != kept)
    graph, state, result = built[kept]
    # the packed weights of lowerings no longer alive (the one not kept here, once its last
    # reference goes: an earlier "fastest" lowering's at the latest now)
    del built
    onednn.forget_dead_weights()
    choice = (f"{kept} kept ({timings[kept]:.2f} ms against {other}'s {timings[other]:.2f}, "
              f"median of {_CHOICE_ROUNDS} on the example inputs)")
    return graph, state, result, choice


def _timings(graphs: dict[str, fx.GraphModule], inputs: tuple) -> dict[str, float]:
    """Median ms per call of each lowered graph on ``inputs``, run as ``OptimizedModule`` runs
    it without gradients (``fxopt.infra.direct``), the graphs taking turns."""
    def run(graph):
        runner = DirectRunner()
        return lambda *args: runner(graph, args, {})

    # no pause between turns: both are PyTorch's kernels on the same threads
    return measure({name: run(g) for name, g in graphs.items()}, tuple(inputs),
                   repeats=_CHOICE_ROUNDS, warmup=2, pause=0.0)


def _ir_ops(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in INT8_IR_OPS]


# times the lowering is redone at most, each with the ops whose PyTorch kernels the lockstep
# check found wrong (those in a chain show one a time: the first taints the rest) kept on
# fxopt's reference; past it the manager's check of the output judges the lowering
_RELOWERINGS = 8


@register_pass("lower_int8_cpu", requires=(EVAL_MODE,), reference="returned",
               after=("quantize_int8",), batch_check=True)
def lower_int8_cpu(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """The int8 IR onto PyTorch's int8 CPU kernels on plain uint8 codes (target='cpu')."""
    if not any(Int8Layer.matches(n) or n.target is QUANTIZE.overload for n in _ir_ops(gm)):
        return PassResult(gm, modified=False)
    if ctx.target != "cpu":
        return PassResult(gm, modified=False, notes=[f"target is {ctx.target}: nothing to do"])
    if not quantized_engine_available():
        return PassResult(gm, modified=False, notes=[
            f"PyTorch's quantized engine is '{torch.backends.quantized.engine}' here (x86, "
            f"fbgemm or onednn, and oneDNN's int8 kernels, needed): the int8 ops run the exact "
            f"reference (slow)"])
    if not _affine_uint8_only(gm):
        return PassResult(gm, modified=False, notes=[
            "symmetric int8 activation grids have no PyTorch CPU kernels: the int8 ops run the "
            "exact reference (slow); use QuantConfig(activation_symmetric=False) on CPU"])
    with warnings.catch_warnings():  # spend PyTorch's once-per-process deprecation warning of
        warnings.simplefilter("ignore")  # quantized tensors here, where it says nothing
        torch.quantize_per_tensor(torch.zeros(1), 1.0, 0, torch.quint8)
    reference = copy.deepcopy(gm)
    step = output_step(gm)
    gm, state, result, choice = _lowered(gm, ctx.config(QuantConfig).cpu_engine,
                                         ctx.example_inputs)
    if not result.count:
        return PassResult(gm, modified=False, notes=[f"not lowered: {r}" for r in result.rejected])
    kept, notes, relowerings = {}, [], 0
    while True:
        mapping = {matched[-1]: new for _, matched, new in result.rewrites}
        lockstep = LockstepReference(reference, gm, mapping)
        off, flips = off_kernels(lockstep, ctx.example_inputs)
        if not set(off) - set(kept) or relowerings == _RELOWERINGS:
            break
        relowerings += 1
        # PyTorch's kernels for these ops are wrong (maybe at one batch size only): lowered
        # again with them on fxopt's reference, and checked again (later ops see other codes)
        kept.update({name: f"PyTorch's kernel was {why} from the int8 IR: fxopt's reference "
                           f"runs it" for name, (_, why) in off.items()})
        gm = copy.deepcopy(reference)
        state = CpuLowering(engine=state.engine, kept=kept)
        result = apply_rules(gm, RULES, context=state)
    if off:  # still, after _RELOWERINGS: the manager's check of the output judges
        notes.append("lowered ops more than one code from the int8 IR: " + ", ".join(
            f"{name} ({why})" for name, why in off.values()))
    fallback = [who(n) for n in _ir_ops(gm) if n.name not in kept]
    if fallback:
        notes.append(f"no PyTorch int8 kernel, the fxopt reference on the codes: "
                     f"{', '.join(fallback)}")
    notes += [f"not lowered: {r}" for r in result.rejected]
    stats = {**result.tallies, "fallback": len(fallback),
             "engine": ", ".join(f"{k} {v}" for k, v in sorted(state.engines.items())),
             "tie_flips": flips}  # codes one step from the IR's, example inputs
    if kept:
        stats["kept_on_reference"] = len(kept)
    if choice:
        stats["engine_choice"] = choice
        notes.append(f"cpu_engine='fastest': {choice}")
    return PassResult(gm, modified=True, stats=stats, notes=notes, reference=lockstep,
                      max_abs_tolerance=step * (1 + 1e-4),  # one code, float slack
                      shapes_changed=True)
