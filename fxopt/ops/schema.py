"""The op schema: every op in the ``fxopt`` torch.library namespace is declared here, once.

A declaration is the op's signature (torch's schema language) with everything else fxopt needs
to know about it: its family (and whether it works on int8 codes, ``quantized``), its
reference math (the CPU and CUDA implementation unless a faster one is given), its fake
implementation (shapes, dtypes, strides for ``torch.compile``, ``torch.export`` and
``FakeTensorMode``), how it decomposes into standard ops (the ONNX export and
quantization-aware training run that), its gradient, and its MAC count::

    CONV2D_ACT = define_op(
        "conv2d_act(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups, Tensor? residual=None, *, str act='none', "
        "float[] act_args=[]) -> Tensor",
        family="fused", reference=conv_act_reference, fake=conv_act_fake,
        decompose=conv_act_decomposed, macs=weight_macs("weight"), cpu=conv2d_act_cpu)

Nobody reads a call's arguments by position. A view names them, defaults filled in::

    class FusedConv(OpView):            # one view may cover several ops
        ops = (CONV1D_ACT, CONV2D_ACT)

    v = FusedConv.of(node)              # TypeError if node is not a call of those ops
    v.residual, v.act, v.act_args       # not node.args[7], node.kwargs.get("act", "none")
    v.emit(builder, act="relu")         # the same call with ``act`` changed
    CONV2D_ACT.emit(graph, x=x, weight=w, bias=None, stride=[1, 1], padding=[0, 0],
                    dilation=[1, 1], groups=1)          # a new call, arguments by name

Gradients come from the declaration too (``torch.library.register_autograd``, once per op): a
float op's backward is the vector-Jacobian product (``torch.func.vjp``) of its differentiable
form, ``differentiable=`` or else ``decompose``, recomputed from the saved inputs (one extra
forward of the layer per backward, as activation checkpointing does), so training through an
optimized graph gives eager's gradients for the input, weight, bias and residual. An op on int8
codes (``quantized``) has no gradient: its backward raises ``UnsupportedOpError`` pointing at
quantization-aware training (``fxopt.prepare_qat``), and so does a float op declared with no
differentiable form. Nothing trains silently wrong.

Emitted calls have one spelling: positional parameters by position up to the last one that
differs from its default, keyword-only ones as keywords when they differ from their default.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable

import torch
import torch.fx as fx

from fxopt.errors import UnsupportedOpError
from fxopt.ir.graph import tensor_meta
from fxopt.ir.metrics import MAC_COUNTERS

__all__ = ["LIB", "QAT_HINT", "OpSchema", "OpView", "Param", "define_op", "OPS", "schema_of",
           "view_of", "is_fxopt_op", "weight_macs", "ops_of", "FAMILIES"]

LIB = torch.library.Library("fxopt", "FRAGMENT")
# fused: float layers with their epilogue; int8: the device-neutral int8 IR; triton and cpu:
# what the lowerings write (fxopt's Triton kernels; oneDNN int8 kernels on the CPU).
FAMILIES = ("fused", "int8", "triton", "cpu")
_NO_DEFAULT = object()


@dataclass(frozen=True)
class Param:
    """One parameter of an op: its name, torch type, position and default."""

    name: str
    type: str  # torch's spelling: "Tensor", "Optional[Tensor]", "List[int]", "float", ...
    kwarg_only: bool
    default: Any = _NO_DEFAULT

    @property
    def required(self) -> bool:
        return self.default is _NO_DEFAULT

    @property
    def is_list(self) -> bool:
        return self.type.startswith("List[") and "Tensor" not in self.type

    def is_default(self, value: Any) -> bool:
        if self.required:
            return False
        d = self.default
        if isinstance(d, (list, tuple)):
            return isinstance(value, (list, tuple)) and list(value) == list(d)
        return value is d or (not isinstance(value, fx.Node) and type(value) is type(d)
                              and value == d)


class OpSchema:
    """One declared op (see the module docstring); ``OPS[name]`` holds them all."""

    def __init__(self, signature: str, *, family: str, reference: Callable, fake: Callable,
                 cpu: Callable | None = None, cuda: Callable | None = None,
                 decompose: Callable | None = None, differentiable: Callable | None = None,
                 macs: Callable[["OpView", fx.GraphModule], int] | None = None,
                 quantized: bool | None = None, cpu_bind: Callable | None = None,
                 doc: str = ""):
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        parsed = torch._C.parse_schema(f"fxopt::{signature}")
        self.name = parsed.name.split("::", 1)[1]
        if self.name in OPS:
            raise ValueError(f"fxopt op '{self.name}' is declared twice")
        self.signature = signature
        self.family = family
        # Whether the op reads or writes int8 codes (the int8 IR, and the Triton ops that run
        # it); the pictures colour these as quantized.
        self.quantized = family == "int8" if quantized is None else bool(quantized)
        self.params = tuple(
            Param(a.name, str(a.type), a.kwarg_only,
                  a.default_value if a.has_default_value() else _NO_DEFAULT)
            for a in parsed.arguments)
        self.param_names = tuple(p.name for p in self.params)
        self.reference, self.fake, self.decompose, self.doc = reference, fake, decompose, doc
        # The same math in differentiable standard ops (the backward's formula); None for int8.
        self.differentiable = None if self.quantized else (differentiable or decompose)
        self._macs = macs
        LIB.define(signature)
        self.cpu_impl = cpu or reference  # the CPU kernel, also what a direct call runs
        # cpu_bind(*args, **kwargs): the one kernel call cpu_impl makes for these arguments, as
        # a function of the first (the input), or None; the direct twin binds through it
        # (fxopt.infra.direct.BoundCall)
        self.cpu_bind = cpu_bind
        LIB.impl(self.name, self.cpu_impl, "CPU")
        LIB.impl(self.name, cuda or reference, "CUDA")
        torch.library.register_fake(f"fxopt::{self.name}", fake, lib=LIB)
        _register_autograd(self)
        self.packet = getattr(torch.ops.fxopt, self.name)
        self.overload = self.packet.default
        self.view = type(_camel(self.name), (OpView,), {"ops": (self,), "__slots__": ()})
        OPS[self.name] = self
        _BY_TARGET[self.packet] = _BY_TARGET[self.overload] = self
        if macs is not None:
            MAC_COUNTERS[self.packet] = self.count_macs

    def __repr__(self) -> str:
        return f"<fxopt op {self.name} ({self.family})>"

    def __call__(self, *args, **kwargs):
        return self.overload(*args, **kwargs)

    def count_macs(self, node: fx.Node, gm: fx.GraphModule) -> int:
        return self._macs(self.view.of(node), gm) if self._macs is not None else 0

    # -- building calls ----------------------------------------------------------------------
    def bind(self, values: dict[str, Any]) -> dict[str, Any]:
        """All parameters by name: ``values`` checked against the signature, defaults added."""
        unknown = set(values) - set(self.param_names)
        if unknown:
            raise TypeError(f"fxopt.{self.name} has no parameter(s) {sorted(unknown)} "
                            f"(signature: {self.signature})")
        out = {}
        for p in self.params:
            if p.name in values:
                v = values[p.name]
                out[p.name] = list(v) if p.is_list and isinstance(v, tuple) else v
            elif p.required:
                raise TypeError(f"fxopt.{self.name}: missing argument '{p.name}'")
            else:
                d = p.default
                out[p.name] = list(d) if isinstance(d, (list, tuple)) else d
        return out

    def bind_call(self, args: tuple | list, kwargs: dict[str, Any], *,
                  where: str = "a call") -> dict[str, Any]:
        """All parameters by name from a call's positional and keyword arguments."""
        positional = [p for p in self.params if not p.kwarg_only]
        if len(args) > len(positional):
            raise TypeError(f"{where}: fxopt.{self.name} takes {len(positional)} positional "
                            f"arguments, got {len(args)}")
        values = {p.name: v for p, v in zip(positional, args)}
        for k, v in kwargs.items():
            if k not in self.param_names:
                raise TypeError(f"{where}: fxopt.{self.name} has no parameter '{k}'")
            values[k] = v
        return self.bind(values)

    def call(self, values: dict[str, Any], **changes) -> Any:
        """Run the op on argument values by name (``changes`` applied)."""
        args, kwargs = self.args_kwargs({**values, **changes})
        return self.overload(*args, **kwargs)

    def args_kwargs(self, values: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """The canonical spelling of a call with these argument values (see the docstring)."""
        bound = self.bind(values)
        positional = [p for p in self.params if not p.kwarg_only]
        last = max((i for i, p in enumerate(positional) if not p.is_default(bound[p.name])),
                   default=-1)
        args = tuple(bound[p.name] for p in positional[:last + 1])
        kwargs = {p.name: bound[p.name] for p in self.params
                  if p.kwarg_only and not p.is_default(bound[p.name])}
        return args, kwargs

    def emit(self, where, *, name: str | None = None, **values) -> fx.Node:
        """A call of this op in ``where`` (an ``fx.Graph`` or a rewrite ``Builder``), at its
        insertion point, with the arguments given by name."""
        args, kwargs = self.args_kwargs(values)
        if name is None:
            return where.call_function(self.overload, args, kwargs)
        return where.call_function(self.overload, args, kwargs, name=name)


OPS: dict[str, OpSchema] = {}
_BY_TARGET: dict[Any, OpSchema] = {}


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in re.split(r"_+", name)) + "View"


# -- gradients ---------------------------------------------------------------------------------
QAT_HINT = ("train the float model, or the int8 model with fake quantization: "
            "qat = fxopt.prepare_qat(model, x, calibration_data=batches), fxopt.finetune(qat, "
            "...), then fxopt.qat.convert(qat)")


def _register_autograd(op: OpSchema) -> None:
    """The op's backward: the vjp of its differentiable form, or a typed refusal."""
    def setup(ctx, inputs, output, keyword_only_inputs=None):
        tensors = [i for i, v in enumerate(inputs) if isinstance(v, torch.Tensor)]
        ctx.save_for_backward(*(inputs[i] for i in tensors))
        ctx.fxopt_tensors = tensors
        ctx.fxopt_others = [None if isinstance(v, torch.Tensor) else v for v in inputs]
        ctx.fxopt_kwargs = dict(keyword_only_inputs or {})

    def backward(ctx, *grads):
        if op.differentiable is None:
            raise _no_gradient(op)
        args = list(ctx.fxopt_others)
        for i, t in zip(ctx.fxopt_tensors, ctx.saved_tensors):
            args[i] = t
        wanted = [i for i in ctx.fxopt_tensors if ctx.needs_input_grad[i]]

        def form(*diff):
            full = list(args)
            for i, t in zip(wanted, diff):
                full[i] = t
            return op.differentiable(*full, **ctx.fxopt_kwargs)

        _, vjp = torch.func.vjp(form, *(args[i] for i in wanted))
        out = [None] * len(args)
        # one gradient per output: an op with several outputs (add_layer_norm) gets a tuple
        for i, g in zip(wanted, vjp(grads[0] if len(grads) == 1 else tuple(grads))):
            out[i] = g
        return tuple(out)

    torch.library.register_autograd(f"fxopt::{op.name}", backward, lib=LIB, setup_context=setup)


def _no_gradient(op: OpSchema) -> UnsupportedOpError:
    if op.quantized:
        return UnsupportedOpError(
            f"fxopt.{op.name} runs on int8 codes and has no gradient: an int8 graph cannot be "
            f"trained by backpropagation", hint=QAT_HINT)
    return UnsupportedOpError(
        f"fxopt.{op.name} declares no differentiable form, so it has no gradient",
        hint=f"declare it with define_op(..., decompose=...) or differentiable=..., or "
             f"fine-tune the model before the pass that wrote fxopt.{op.name}")


def define_op(signature: str, **kw) -> OpSchema:
    """Declare an op of the ``fxopt`` namespace (see :class:`OpSchema`)."""
    return OpSchema(signature, **kw)


def schema_of(target: Any) -> OpSchema | None:
    """The schema of an fxopt op (an overload or an overload packet), else None."""
    try:
        return _BY_TARGET.get(target)
    except TypeError:  # unhashable targets
        return None


def is_fxopt_op(target: Any) -> bool:
    """Whether ``target`` is an op of the ``fxopt`` namespace (declared here or not)."""
    if schema_of(target) is not None:
        return True
    ns = getattr(target, "namespace", None)
    if ns is None:  # an OpOverloadPacket
        ns = getattr(getattr(target, "default", None), "namespace", None)
    return ns == "fxopt"


class OpView:
    """A call of an fxopt op with its arguments by name (defaults filled in).

    Subclasses say which ops they cover (``ops``; a view of several ops is read through the
    parameters they share); every declared op also has its own view, ``SCHEMA.view``.
    Attribute access reads an argument: ``FusedConv.of(node).residual``.
    """

    ops: ClassVar[tuple[OpSchema, ...]] = ()
    __slots__ = ("node", "schema", "values")

    def __init__(self, node: fx.Node | None, schema: OpSchema, values: dict[str, Any]):
        object.__setattr__(self, "node", node)
        object.__setattr__(self, "schema", schema)
        object.__setattr__(self, "values", values)

    @classmethod
    def targets(cls) -> tuple:
        return tuple(op.overload for op in cls.ops)

    @classmethod
    def match(cls, node: Any) -> "OpView | None":
        """The view of ``node`` when it calls one of ``cls.ops``, else None."""
        if not (isinstance(node, fx.Node) and node.op == "call_function"):
            return None
        schema = schema_of(node.target)
        if schema is None or schema not in cls.ops:
            return None
        return cls(node, schema, schema.bind_call(node.args, node.kwargs, where=node.name))

    @classmethod
    def of(cls, node: fx.Node) -> "OpView":
        """The view of ``node``; ``TypeError`` when it does not call one of ``cls.ops``."""
        view = cls.match(node)
        if view is None:
            raise TypeError(f"{getattr(node, 'name', node)!s} is not a call of "
                            f"{', '.join('fxopt.' + op.name for op in cls.ops)}")
        return view

    @classmethod
    def matches(cls, node: Any) -> bool:
        return (isinstance(node, fx.Node) and node.op == "call_function"
                and schema_of(node.target) in cls.ops)

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "values")
        if name in values:
            return values[name]
        raise AttributeError(f"fxopt.{self.schema.name} has no parameter '{name}' "
                             f"(parameters: {', '.join(values)})")

    def __setattr__(self, name, value):
        raise AttributeError("an OpView is read-only: use emit(..., name=value) for a changed call")

    @property
    def name(self) -> str:
        """The op's name (``conv2d_act``)."""
        return self.schema.name

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)

    def replaced(self, **changes) -> dict[str, Any]:
        """The argument values with ``changes`` applied (names checked)."""
        return self.schema.bind({**self.values, **changes})

    def args_kwargs(self, **changes) -> tuple[tuple, dict[str, Any]]:
        return self.schema.args_kwargs(self.replaced(**changes))

    def emit(self, where, *, name: str | None = None, **changes) -> fx.Node:
        """A call of the same op with ``changes`` applied, in ``where`` (a graph or Builder)."""
        return self.schema.emit(where, name=name, **self.replaced(**changes))

    def apply(self, **changes) -> None:
        """Rewrite the viewed node in place to the canonical spelling with ``changes``."""
        self.node.args, self.node.kwargs = self.args_kwargs(**changes)

    def nodes(self) -> list[fx.Node]:
        """The graph nodes among the arguments (lists flattened)."""
        out: list[fx.Node] = []
        fx.node.map_arg(list(self.values.values()), out.append)
        return out

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={getattr(v, 'name', v)!s}" for k, v in self.values.items())
        return f"{type(self).__name__}({shown})"


def view_of(node: Any) -> OpView | None:
    """The view of any declared fxopt op call (its own schema's view), else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function"):
        return None
    schema = schema_of(node.target)
    return None if schema is None else schema.view.match(node)


# -- MAC counters -----------------------------------------------------------------------------
def _shape(value) -> tuple | None:
    tm = tensor_meta(value)
    return tuple(tm.shape) if tm is not None else None


def weight_macs(weight: str, *, depthwise_kernel: str | None = None):
    """A MAC counter for ops that take a weight: output elements times the weight elements per
    output channel (``[O, I/g, kh, kw]`` convolutions, ``[N, K]`` linears). With
    ``depthwise_kernel``, the weight is the Triton ``[KH*KW, C]`` layout: output elements times
    ``KH*KW``."""

    def count(view: OpView, gm: fx.GraphModule) -> int:
        out, w = _shape(view.node), _shape(getattr(view, weight))
        if not out or not w:
            return 0
        per_output = w[0] if depthwise_kernel else math.prod(w[1:])
        return math.prod(out) * per_output

    return count


def ops_of(families: Iterable[str]) -> tuple:
    """The overloads of every declared op in ``families``."""
    fams = set(families)
    return tuple(op.overload for op in OPS.values() if op.family in fams)
