"""Capture: an ``nn.Module`` becomes a ``torch.fx.GraphModule`` in canonical form.

The captured module is a deep copy: nothing fxopt does afterwards can reach the user's
parameters, buffers or training flags. Every tensor node carries ``tensor_meta`` (shapes from
running the example inputs), ``fxopt_path`` (the user's module path) and ``fxopt_from``.

    >>> gm = fxopt.capture(model.eval(), torch.randn(1, 3, 224, 224), leaf_modules=[MyBlock])
    >>> gm.graph.print_tabular()
"""
from __future__ import annotations

import copy
import operator as _operator
import re
import warnings
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from fxopt.errors import CaptureError, InputError, ModelTypeError, PreconditionError
from fxopt.ir.canonical import canonicalize
from fxopt.ir.graph import remove_unused_attributes

__all__ = ["capture", "normalize_inputs", "check_model", "DEFAULT_LEAF_MODULES", "propagate_shapes"]

# Modules traced as one call: their forward branches on tensor properties, and the passes
# treat them whole (MACs are counted for MultiheadAttention).
DEFAULT_LEAF_MODULES: tuple[type, ...] = (nn.MultiheadAttention, nn.RNNBase, nn.RNNCellBase)


def check_model(model: Any) -> None:
    """Raise a typed error unless ``model`` is an ``nn.Module`` in eval mode."""
    if not isinstance(model, nn.Module):
        raise ModelTypeError(
            f"expected a torch.nn.Module, got {type(model).__name__}",
            hint="pass the model object itself (for a TorchScript or exported program, pass the "
                 "original nn.Module)",
        )
    for name, mod in model.named_modules():
        if mod.training:
            where = f"submodule '{name}' ({type(mod).__name__}) is" if name else "the model is"
            raise PreconditionError(
                f"{where} in training mode; fxopt optimizes for inference (BatchNorm statistics "
                f"and dropout are frozen)",
                hint="call model.eval() first",
            )


def normalize_inputs(example_inputs: Any) -> tuple:
    """A tensor or a tuple/list of tensors (other values allowed beside them) -> tuple."""
    if example_inputs is None:
        raise InputError(
            "example_inputs is required: fxopt records shapes and checks every pass on them",
            hint="pass one batch of real-shaped input, e.g. torch.randn(1, 3, 224, 224)",
        )
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        if len(example_inputs) == 0:
            raise InputError("example_inputs is empty", hint="pass at least one input tensor")
        if not any(isinstance(x, torch.Tensor) for x in example_inputs):
            raise InputError(
                f"example_inputs holds no tensor "
                f"(got {[type(x).__name__ for x in example_inputs]})",
                hint="pass tensors, e.g. (torch.randn(1, 3, 224, 224),)",
            )
        return tuple(example_inputs)
    kind = type(example_inputs).__name__
    hint = "convert it with torch.from_numpy(...)" if kind == "ndarray" else \
        "pass a tensor or a tuple of tensors (keyword inputs: use concrete_args)"
    raise InputError(f"example_inputs must be a tensor or a tuple of tensors, got {kind}",
                     hint=hint)


def _describe(inputs: tuple) -> str:
    return ", ".join(f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
                     if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs)


def run_eager(model: nn.Module, inputs: tuple) -> Any:
    """Run ``model`` on the example inputs; a failure becomes an InputError saying so.

    A forward that writes into its own buffers (a step counter, running statistics kept by
    hand) cannot be captured faithfully: the graph would freeze the value seen while tracing.
    That gets a warning naming the buffers.
    """
    before = {k: v.clone() for k, v in model.named_buffers()}
    try:
        with torch.no_grad():
            out = model(*inputs)
        changed = [k for k, v in model.named_buffers()
                   if k in before and (v.shape != before[k].shape or not torch.equal(v, before[k]))]
        if changed:
            warnings.warn(
                f"fxopt: the model's forward changes its buffers {changed[:5]}; the captured graph "
                f"computes with their values at capture time and will not update them",
                stacklevel=3)
        return out
    except Exception as e:  # noqa: BLE001 - any failure here is about the inputs
        raise InputError(
            f"the model failed on the example inputs ({_describe(inputs)}): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            hint="pass inputs of the shape, dtype and device the model expects",
        ) from e


class _Tracer(fx.Tracer):
    # Defaults: saved GraphModules re-create their tracer class when they are loaded.
    def __init__(self, leaf_types: tuple[type, ...] = DEFAULT_LEAF_MODULES,
                 leaf_names: frozenset[str] = frozenset()):
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_names = set(leaf_names)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self.leaf_types) or qualname in self.leaf_names:
            return True
        return super().is_leaf_module(m, qualname)


def _split_leaves(leaf_modules: Iterable) -> tuple[tuple[type, ...], set[str]]:
    types, names = list(DEFAULT_LEAF_MODULES), set()
    for item in leaf_modules or ():
        if isinstance(item, type) and issubclass(item, nn.Module):
            types.append(item)
        elif isinstance(item, str):
            names.add(item)
        else:
            raise InputError(
                f"leaf_modules entries must be nn.Module subclasses or module paths, got {item!r}",
                hint="e.g. leaf_modules=[MyBlock] or leaf_modules=['layer3.1']",
            )
    return tuple(types), names


def _innermost(tracer: _Tracer) -> tuple[str, str] | None:
    stack = getattr(tracer, "module_stack", None)
    if not stack:
        return None
    path, typ = list(stack.values())[-1]
    return path, getattr(typ, "__name__", str(typ))


def _annotate(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_module":
            path = node.target
        elif node.op == "get_attr":
            path = node.target.rpartition(".")[0]
        else:
            stack = node.meta.get("nn_module_stack")
            path = list(stack.values())[-1][0] if stack else ""
        node.meta["fxopt_path"] = path
        node.meta["fxopt_from"] = [node.name]


def _bind_concrete_args(graph: fx.Graph, concrete_args: dict[str, Any]) -> None:
    """Turn the placeholders fx keeps for concrete arguments into constants.

    fx keeps them as inputs guarded by ``torch._assert(arg == value)``; the captured module
    takes only the example inputs, so the guards and the placeholders go.
    """
    for node in list(graph.nodes):
        if node.op != "placeholder":
            continue
        key = next((k for k in concrete_args
                    if node.target == k or re.fullmatch(rf"{re.escape(k)}_\d+", node.target)), None)
        if key is None:
            continue
        value = concrete_args[key]
        for user in list(node.users):
            if user.op == "call_function" and user.target is _operator.eq:
                for guard in list(user.users):
                    if guard.op == "call_function" and guard.target is torch._assert:
                        graph.erase_node(guard)
                if not user.users:
                    graph.erase_node(user)
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda a: value if a is node else a)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)
        if not node.users:
            graph.erase_node(node)


def propagate_shapes(gm: fx.GraphModule, inputs: Sequence) -> None:
    """Fill ``tensor_meta`` on every tensor node by running ``inputs`` through ``gm``.

    Nodes that produce no tensor (sizes, flags) are marked ``fxopt_nontensor`` instead, so the
    verifier knows their missing ``tensor_meta`` is right.
    """
    from fxopt.ir.check import (
        record_run,  # check imports nothing from capture; kept local for clarity
    )

    record_run(gm, tuple(inputs), keep_values=False, refresh_meta=True)


def capture(model: nn.Module, example_inputs: Any, *, leaf_modules: Iterable = (),
            concrete_args: dict[str, Any] | None = None, _copy: bool = True,
            _eager_checked: bool = False) -> fx.GraphModule:
    """Trace a copy of ``model`` into a canonical ``GraphModule`` with full metadata.

    ``leaf_modules``: module types or module paths traced as single calls (for modules whose
    forward has data-dependent control flow). ``concrete_args``: forward arguments fixed to
    constants while tracing (flags such as ``return_loss=False``).
    """
    check_model(model)
    inputs = normalize_inputs(example_inputs)
    types, names = _split_leaves(leaf_modules)
    work = copy.deepcopy(model) if _copy else model
    if not _eager_checked:
        run_eager(work, inputs)  # a clear InputError for wrong inputs, before tracing
    tracer = _Tracer(types, names)
    try:
        graph = tracer.trace(work, concrete_args=concrete_args)
    except Exception as e:  # noqa: BLE001 - every trace failure gets a typed error and a hint
        where = _innermost(tracer)
        loc = f" in module '{where[0]}' ({where[1]})" if where and where[0] else ""
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, fx.proxy.TraceError) or "symbolically traced variables" in str(e):
            msg = f"data-dependent control flow{loc} cannot be traced: {first}"
        else:
            msg = f"tracing failed{loc}: {type(e).__name__}: {first}"
        if where and where[0]:
            hint = f"mark the module as a leaf: leaf_modules=[{where[1]}] (or ['{where[0]}'])"
        else:
            hint = "fix the branch with concrete_args={...}, or move it into a submodule and " \
                   "pass that module in leaf_modules"
        raise CaptureError(msg, hint=hint) from e
    name = type(work).__name__
    if concrete_args:
        _bind_concrete_args(graph, concrete_args)
    gm = fx.GraphModule(tracer.root, graph, name)
    # fx re-creates the containers on module paths (Sequential, blocks) as fresh nn.Modules,
    # which start in training mode; every real module is in eval mode (check_model above).
    gm.train(False)
    _annotate(gm)
    # Tensor shapes first: canonicalization reads them (flatten/reshape).
    try:
        propagate_shapes(gm, inputs)
    except Exception as e:  # noqa: BLE001
        raise CaptureError(
            f"the traced graph does not run on the example inputs: {type(e).__name__}: {e}",
            hint="mark the module that misbehaves under tracing as a leaf (leaf_modules=[...])",
        ) from e
    canonicalize(gm)  # rewritten nodes carry over the tensor_meta of the nodes they replace
    remove_unused_attributes(gm)
    gm.recompile()
    return gm
