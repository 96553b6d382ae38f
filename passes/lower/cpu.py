"""``lower_int8_cpu``: the int8 IR onto PyTorch's quantized CPU kernels (x86 / fbgemm / onednn).

``quantize_int8`` writes device-neutral ops that carry int8 codes between layers
(``fxopt.ops_int8``). On ``target="cpu"`` this pass maps each onto PyTorch's quantized kernels,
with quantized tensors (``torch.quint8``, the grid travels with the tensor) flowing between
them, weights prepacked once into attributes of the module:

    fxopt.quantize(x, s, zp, 0, 255)            -> torch.quantize_per_tensor(x, s, zp, quint8)
    fxopt.conv2d_int8(q, ..., act="relu")        -> quantized.conv2d_relu(q, packed, s_y, zp_y)
    fxopt.conv2d_int8(q, ..., act="relu6")       -> quantized.conv2d(...), then hardtanh(0, 6)
    fxopt.linear_int8(q, ...)                    -> quantized.linear(_relu)(q, packed, s_y, zp_y)
    fxopt.add_int8(a, ..., b, ..., act="relu")   -> quantized.add_relu(a, b, s_y, zp_y)
    fxopt.adaptive_avg_pool2d_int8(q, size, ...) -> F.adaptive_avg_pool2d(q, size)
    fxopt.max_pool2d_int8(q, k, s, p, d, ceil)    -> F.max_pool2d(q, k, s, p, d, ceil)
    fxopt.cat_int8(qs, ..., dim, s_y, zp_y)      -> quantized.cat(qs, dim, s_y, zp_y)
    fxopt.dequantize(q, s, zp)                   -> q.dequantize()

Flatten and reshape run on quantized tensors unchanged. An
op PyTorch has no int8 kernel for (an activation other than relu/relu6/hardtanh/clamp in a
layer's epilogue, a symmetric int8 grid) runs the fxopt reference on the dequantized input
and quantizes its result (exact: dequantizing and requantizing on one grid is the identity);
the report names each such op. PyTorch's kernels round their requantization in their own
order, so a value at a tie can land one code away from the IR's; in a deep network such a
flip spreads (ResNet-50: one flipped code in layer1 became six output steps by the logits).
The pass's reference is therefore the int8 graph before it run in lockstep with the lowered
graph (:class:`LockstepReference`): every lowered op is compared with its IR op on the same
inputs, and where it is within one code of it the IR run carries on from the lowered codes.
A kernel off by more than one code is not carried over, so its error reaches the output,
which must equal the reference within one quantization step of the output.
"""
from __future__ import annotations

import contextlib
import copy
import warnings

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxopt.infra.preconditions import EVAL_MODE
from fxopt.infra.registry import PassContext, PassResult, register_pass
from fxopt.quant.config import QuantConfig
from fxopt.ir.graph import copy_meta, get_attr_value, module_path, remove_unused_attributes
from fxopt.ops import int8 as _int8_ops

# TEMPORARY (layout refactor): op handles as overloads until this pass reads the schema
(ADD_INT8, AVGPOOL_INT8, CAT_INT8, CONV2D_INT8, DEQUANTIZE, LINEAR_INT8, MAXPOOL_INT8, QUANTIZE) = (
    getattr(_int8_ops, _n).overload for _n in ('ADD_INT8', 'AVGPOOL_INT8', 'CAT_INT8', 'CONV2D_INT8', 'DEQUANTIZE', 'LINEAR_INT8', 'MAXPOOL_INT8', 'QUANTIZE'))

__all__ = ["lower_int8_cpu", "quantized_engine_available", "LockstepReference"]

_QUANTIZED = {"none": "conv2d", "relu": "conv2d_relu"}
_CLAMPS = ("relu6", "hardtanh", "clamp")


def quantized_engine_available() -> bool:
    """Whether PyTorch's quantized CPU kernels (fbgemm / x86 / onednn) can run here."""
    try:
        return torch.backends.quantized.engine in ("x86", "fbgemm", "onednn")
    except RuntimeError:
        return False


def _quiet():
    """PyTorch deprecates quantized tensor creation (the kernels stay): its warning is
    printed once per process, so trigger it here, where it says nothing to the user."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.quantize_per_tensor(torch.zeros(1), 1.0, 0, torch.quint8)
        torch._make_per_tensor_quantized_tensor(torch.zeros(1, dtype=torch.uint8), 1.0, 0)


def _value(gm, node) -> torch.Tensor:
    return get_attr_value(gm, node.target)


def _is_codes(node) -> bool:
    """Whether ``node`` carries int8 codes (a quantized tensor once lowered): its meta says so."""
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tm is not None and getattr(tm, "dtype", None) in (torch.uint8, torch.quint8)


def _affine_uint8_only(gm: fx.GraphModule) -> bool:
    """Every int8 grid in the graph is uint8 [0, 255] (PyTorch's quint8); symmetric int8 grids
    (``QuantConfig(activation_symmetric=True)``) have no x86 kernels for activations."""
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target is QUANTIZE and tuple(n.args[3:5]) != (0, 255):
            return False
        if n.target is AVGPOOL_INT8 and tuple(n.args[4:6]) != (0, 255):
            return False
        if n.target is CAT_INT8 and tuple(n.args[6:8]) != (0, 255):
            return False
        if n.target in (CONV2D_INT8, LINEAR_INT8, ADD_INT8) and \
                (n.kwargs.get("y_qmin", 0), n.kwargs.get("y_qmax", 255)) != (0, 255):
            return False
    return True


def _clamp_bounds(act: str, act_args) -> tuple[float, float] | None:
    if act == "relu6":
        return 0.0, 6.0
    if act in ("hardtanh", "clamp"):
        return float(act_args[0]), float(act_args[1])
    return None


@contextlib.contextmanager
def _engine(name: str | None):
    """Pack under quantized engine ``name`` (the packed params keep their implementation)."""
    before = torch.backends.quantized.engine
    if name and name != before and name in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def _auto_engine(n: fx.Node, w_q: torch.Tensor) -> str | None:
    """The engine to pack ``n``'s weights with: fbgemm for tiny layers (its per-call cost is
    lower: the digits model at batch 1 ran 0.22 ms against 0.28 ms with x86), else PyTorch's own
    choice (``x86``: oneDNN or fbgemm by its heuristics; faster on ResNet-scale layers, 4.2 ms
    against 5.7 ms for resnet18 at batch 1; both measured on the 2-core CPU machine)."""
    tm = n.meta.get("tensor_meta")
    shape = tuple(getattr(tm, "shape", ()) or ())
    if "fbgemm" not in torch.backends.quantized.supported_engines or len(shape) < 2:
        return None
    rows = 1
    for d in (shape[:1] + shape[2:]) if len(shape) == 4 else shape[:-1]:
        rows *= int(d)
    return "fbgemm" if rows * w_q.numel() <= SMALL_MACS else None


# A layer with at most this many MACs per call is "small" (the digits model's are 0.1-0.3M;
# a ResNet-18 layer at 224x224 has 100M+).
SMALL_MACS = 2_000_000


class _Lowering:
    def __init__(self, gm: fx.GraphModule, engine: str = "auto"):
        self.gm, self.g = gm, gm.graph
        self.engine = engine
        self.lowered: dict[str, int] = {}
        self.fallback: list[str] = []
        self.mapping: dict[str, str] = {}  # IR node name -> name of the node replacing it

    def _const(self, name: str, value) -> fx.Node:
        i = 0
        while hasattr(self.gm, f"{name}{i}"):
            i += 1
        setattr(self.gm, f"{name}{i}", value)  # a ScriptObject: fx warns it is not a buffer
        first = next(n for n in self.g.nodes if n.op != "placeholder")
        with self.g.inserting_before(first), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Attempted to insert a get_attr")
            return self.g.get_attr(f"{name}{i}")

    def _count(self, what: str) -> None:
        self.lowered[what] = self.lowered.get(what, 0) + 1

    def _uint8(self, n: fx.Node, qmin_key: str = "y_qmin", qmax_key: str = "y_qmax") -> bool:
        return n.kwargs.get(qmin_key, 0) == 0 and n.kwargs.get(qmax_key, 255) == 255

    def node(self, n: fx.Node) -> fx.Node | None:
        """The replacement of ``n`` (inserted before it), or None to leave it."""
        t, a, g = n.target, n.args, self.g
        if t is QUANTIZE:
            if (a[3], a[4]) != (0, 255):
                return None
            self._count("quantize")
            return g.call_function(torch.quantize_per_tensor,
                                   (a[0], float(_value(self.gm, a[1])), int(_value(self.gm, a[2])),
                                    torch.quint8))
        if t is DEQUANTIZE:
            self._count("dequantize")
            return g.call_method("dequantize", (a[0],))
        if t in (CONV2D_INT8, LINEAR_INT8):
            return self._layer(n)
        if t is ADD_INT8:
            act = n.kwargs.get("act", "none")
            if act not in ("none", "relu") or not self._uint8(n):
                return self._fallback(n, [a[0], a[3]], [(a[1], a[2]), (a[4], a[5])], (a[6], a[7]))
            self._count("add")
            fn = torch.ops.quantized.add_relu if act == "relu" else torch.ops.quantized.add
            return g.call_function(fn, (a[0], a[3], float(_value(self.gm, a[6])),
                                        int(_value(self.gm, a[7]))))
        if t is AVGPOOL_INT8:
            if (a[4], a[5]) != (0, 255):
                return None
            self._count("pool")
            return g.call_function(F.adaptive_avg_pool2d, (a[0], list(a[1])))
        if t is MAXPOOL_INT8:
            self._count("pool")
            return g.call_function(F.max_pool2d, (a[0], list(a[1]), list(a[2]), list(a[3]),
                                                  list(a[4]), a[5]))
        if t is CAT_INT8:
            if (a[6], a[7]) != (0, 255):
                return None
            self._count("cat")
            return g.call_function(torch.ops.quantized.cat,
                                   (list(a[0]), a[3], float(_value(self.gm, a[4])),
                                    int(_value(self.gm, a[5]))))
        return None

    def _layer(self, n: fx.Node) -> fx.Node | None:
        kw, a, g = n.kwargs, n.args, self.g
        conv = n.target is CONV2D_INT8
        xs, xz, ys, yz = a[8:12] if conv else a[4:8]
        residual = (a[12] if len(a) > 12 else kw.get("residual")) if conv else \
            (a[8] if len(a) > 8 else kw.get("residual"))
        act, act_args = kw.get("act", "none"), list(kw.get("act_args", []))
        out_int8 = kw.get("out_int8", False)
        clamp = _clamp_bounds(act, act_args)
        ok = (residual is None and out_int8 and self._uint8(n) and self._uint8(n, "x_qmin", "x_qmax")
              and (act in _QUANTIZED or clamp is not None) and _is_codes(a[0]))
        if not ok:
            return self._fallback(n, [a[0]], [(xs, xz)], (ys, yz) if out_int8 else None)
        w_q, w_s = _value(self.gm, a[1]), _value(self.gm, a[2])
        bias = None if a[3] is None else _value(self.gm, a[3]).float()
        engine = _auto_engine(n, w_q) if self.engine == "auto" else self.engine
        with _quiet_ctx(), _engine(engine):
            wq = torch._make_per_channel_quantized_tensor(
                w_q.to(torch.int8), w_s.double(), torch.zeros_like(w_s, dtype=torch.int64), 0)
            if conv:
                stride, padding, dilation, groups = a[4], a[5], a[6], a[7]
                packed = torch.ops.quantized.conv2d_prepack(wq, bias, list(stride), list(padding),
                                                            list(dilation), groups)
            else:
                packed = torch.ops.quantized.linear_prepack(wq, bias)
        base = (module_path(n) or n.name).replace(".", "_")
        p = self._const(f"{base}_packed_", packed)
        kind = "conv2d" if conv else "linear"
        name = _QUANTIZED.get(act, "conv2d")
        if not conv:
            name = name.replace("conv2d", "linear")
        fn = getattr(torch.ops.quantized, name)
        s, z = float(_value(self.gm, ys)), int(_value(self.gm, yz))
        out = g.call_function(fn, (a[0], p, s, z))
        self._count(kind)
        if clamp is not None:
            copy_meta(out, n)
            out = g.call_function(torch.clamp, (out, clamp[0], clamp[1]))
        return out

    def _fallback(self, n, code_args, grids, out_grid) -> fx.Node:
        """``n`` on the dequantized inputs (float in, float out), requantized when its output
        is int8: the fxopt reference, exact. ``add_int8`` reads the codes themselves."""
        g = self.g
        args = list(n.args)
        if n.target is ADD_INT8:
            for i in (0, 3):
                args[i] = g.call_method("int_repr", (args[i],))
            codes = g.call_function(n.target, tuple(args), dict(n.kwargs))
            self.fallback.append(module_path(n) or n.name)
            s, z = float(_value(self.gm, args[6])), int(_value(self.gm, args[7]))
            return g.call_function(torch._make_per_tensor_quantized_tensor, (codes, s, z))
        for x in code_args:
            deq = g.call_method("dequantize", (x,))
            if x.meta.get("tensor_meta") is not None:
                deq.meta["tensor_meta"] = x.meta["tensor_meta"]
            idx = args.index(x)
            args[idx] = deq
        kwargs = dict(n.kwargs)
        kwargs["out_int8"] = False
        y = g.call_function(n.target, tuple(args), kwargs)
        self.fallback.append(module_path(n) or n.name)
        if out_grid is None:
            return y
        s, z = float(_value(self.gm, out_grid[0])), int(_value(self.gm, out_grid[1]))
        return g.call_function(torch.quantize_per_tensor, (y, s, z, torch.quint8))

    def run(self) -> None:
        for n in list(self.g.nodes):
            if n.op != "call_function":
                continue
            with self.g.inserting_before(n):
                new = self.node(n)
            if new is None:
                continue
            copy_meta(new, n)
            self.mapping[n.name] = new.name
            n.replace_all_uses_with(new)
            self.g.erase_node(n)


class _Follow(fx.Interpreter):
    """Runs the int8 IR graph, taking over the lowered graph's codes wherever a lowered op is
    within one code of the IR op on the same inputs."""

    def __init__(self, gm, lowered_env: dict, mapping: dict):
        super().__init__(gm)
        self.lowered_env, self.mapping = lowered_env, mapping
        self.flips, self.off = 0, {}

    def run_node(self, n):
        out = super().run_node(n)
        low = self.lowered_env.get(self.mapping.get(n.name))
        if not (isinstance(low, torch.Tensor) and low.is_quantized and isinstance(out, torch.Tensor)
                and out.dtype in (torch.uint8, torch.int8) and low.shape == out.shape):
            return out
        codes = low.int_repr()
        diff = int((codes.to(torch.int64) - out.to(torch.int64)).abs().max()) if out.numel() else 0
        if diff > 1:  # not a tie rounded the other way: let the error reach the output
            self.off[module_path(n) or n.name] = diff
            return out
        self.flips += int((codes != out).sum())
        return codes.to(out.dtype)


class LockstepReference(torch.nn.Module):
    """The int8 IR graph ``ir`` run in lockstep with its lowering ``lowered`` (``mapping``: IR
    node name -> lowered node name). After a call, ``flips`` counts the codes a lowered op put
    one step away from its IR op (ties), ``off`` names the ops off by more, with the codes."""

    def __init__(self, ir: fx.GraphModule, lowered: fx.GraphModule, mapping: dict):
        super().__init__()
        self.ir = ir
        self.__dict__["lowered"] = lowered  # not a submodule: the pass's own result
        self.mapping = dict(mapping)
        self.flips, self.off = 0, {}

    def forward(self, *args):
        with torch.no_grad():
            low = fx.Interpreter(self.lowered, garbage_collect_values=False)
            low.run(*args)
            follow = _Follow(self.ir, {n.name: v for n, v in low.env.items()}, self.mapping)
            out = follow.run(*args)
        self.flips, self.off = follow.flips, follow.off
        return out


def _quiet_ctx():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")

    class _C:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return ctx.__exit__(*exc)
    return _C()


@register_pass("lower_int8_cpu", requires=(EVAL_MODE,), reference="returned",
               after=("quantize_int8",))
def lower_int8_cpu(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """The int8 ops onto PyTorch's quantized CPU kernels (target='cpu')."""
    has_int8 = any(n.op == "call_function" and n.target in (QUANTIZE, CONV2D_INT8, LINEAR_INT8)
                   for n in gm.graph.nodes)
    if not has_int8:
        return PassResult(gm, modified=False)
    if ctx.target != "cpu":
        return PassResult(gm, modified=False, notes=[f"target is {ctx.target}: nothing to do"])
    if not quantized_engine_available():
        return PassResult(gm, modified=False, notes=[
            f"PyTorch's quantized engine is '{torch.backends.quantized.engine}' here (x86, "
            f"fbgemm or onednn needed): the int8 ops run the exact reference (slow)"])
    if not _affine_uint8_only(gm):
        return PassResult(gm, modified=False, notes=[
            "symmetric int8 activation grids have no PyTorch CPU kernels: the int8 ops run the "
            "exact reference (slow); use QuantConfig(activation_symmetric=False) on CPU"])
    _quiet()
    reference = copy.deepcopy(gm)
    from fxopt.quant.measure import output_step as _output_step
    exits = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is DEQUANTIZE]
    step = _output_step(gm, exits)
    cfg = ctx.config(QuantConfig)
    low = _Lowering(gm, cfg.cpu_engine)
    low.run()
    for n in reversed(list(gm.graph.nodes)):  # the weights now live in the packed params
        if n.op == "get_attr" and not n.users:
            gm.graph.erase_node(n)
    remove_unused_attributes(gm)
    gm.graph.lint()
    gm.recompile()
    lockstep = LockstepReference(reference, gm, low.mapping)
    lockstep(*ctx.example_inputs)
    notes = []
    if lockstep.off:
        notes.append("lowered ops more than one code from the int8 IR on the example inputs: "
                     + ", ".join(f"{k} ({v} codes)" for k, v in lockstep.off.items()))
    if low.fallback:
        notes.append(f"no PyTorch int8 kernel, fxopt reference on dequantized input: "
                     f"{', '.join(low.fallback)}")
    stats = {**low.lowered, "fallback": len(low.fallback),
             "engine": torch.backends.quantized.engine,
             "tie_flips": lockstep.flips}  # codes one step from the IR's, example inputs
    return PassResult(gm, modified=True, stats=stats, notes=notes, reference=lockstep,
                      max_abs_tolerance=step * (1 + 1e-4),  # one code, float slack
                      shapes_changed=True)
