"""Capture: an ``nn.Module`` becomes a ``torch.fx.GraphModule`` in canonical form.

The captured module is a deep copy: nothing fxopt does afterwards can reach the user's
parameters, buffers or training flags. Every tensor node carries ``tensor_meta`` (shapes from
running the example inputs), ``fxopt_path`` (the user's module path) and ``fxopt_from``.

The capture is a checked step, like a pass: the captured graph is run on (copies of) the example
inputs and compared with the eager model; a divergence is a ``CaptureError`` that names the
likely cause. Where torch.fx alone would diverge, capture does what eager does:

- forward hooks and pre-hooks (of the model and of its submodules, leaf ones included) are
  traced into the graph, and removed from the captured copy (global module hooks are refused);
- a model that overrides ``__call__`` is traced through its ``__call__``;
- non-tensor example inputs (``None``, numbers, strings, flags) become ``concrete_args``: the
  graph is specialized on them (fx guards the value) instead of tracing them as proxies;
- in-place ops are made out-of-place with every alias redirected (``canonical.py``).

Non-finite example inputs, or a model whose eager output on them is not finite, are refused
(``InputError``): no check can compare NaNs.

    >>> gm = fxopt.capture(model.eval(), torch.randn(1, 3, 224, 224), leaf_modules=[MyBlock])
    >>> gm.graph.print_tabular()
"""
from __future__ import annotations

import functools
import inspect
import operator as _operator
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from fxopt.errors import CaptureError, InputError
from fxopt.ir.boundary import (check_finite, check_model, copy_model, normalize_inputs,
                               run_eager)
from fxopt.ir.canonical import canonicalize
from fxopt.ir.graph import remove_unused_attributes
from fxopt.ir.hooks import (HookProbe, describe_hooks, hooked_modules, hooks_of,
                             refuse_global_hooks, restore_hooks, strip_hooks)
from fxopt.ir.leaves import AutoLeafFailure, OpaqueLeaf, innermost_module, trace_with_auto_leaves

__all__ = ["capture", "capture_model", "Captured", "constant_inputs", "DEFAULT_LEAF_MODULES",
           "propagate_shapes", "annotate_paths", "check_against_eager", "opaque_note"]

# Modules traced as one call: their forward branches on tensor properties, and the passes
# treat them whole (MACs are counted for MultiheadAttention).
DEFAULT_LEAF_MODULES: tuple[type, ...] = (nn.MultiheadAttention, nn.RNNBase, nn.RNNCellBase)


class _StateGuard:
    """Puts back the parameters and buffers a forward wrote into (their version counters moved)
    from the pristine model, so every run starts from the user's state."""

    def __init__(self, work: nn.Module, pristine: nn.Module | None):
        self.tensors = dict(work.named_parameters())
        self.tensors.update(work.named_buffers())
        self.versions = {k: t._version for k, t in self.tensors.items()}
        self.pristine = pristine

    def reset(self) -> None:
        moved = [k for k, t in self.tensors.items() if t._version != self.versions[k]]
        if not moved or self.pristine is None:
            return
        source = dict(self.pristine.named_parameters())
        source.update(self.pristine.named_buffers())
        with torch.no_grad():
            for k in moved:
                if k in source and source[k].shape == self.tensors[k].shape:
                    self.tensors[k].copy_(source[k])
                    self.versions[k] = self.tensors[k]._version


def _overrides_call(mod: nn.Module) -> bool:
    return type(mod).__call__ is not nn.Module.__call__


class _Tracer(fx.Tracer):
    """fx's tracer with fxopt's leaf modules; it traces forward hooks into the graph.

    Hooks of a traced-through module run on the proxies already (fx calls the module's
    ``__call__``); those of a leaf module run here around its ``call_module`` node.
    """

    # Defaults: saved GraphModules re-create their tracer class when they are loaded.
    def __init__(self, leaf_types: tuple[type, ...] = DEFAULT_LEAF_MODULES,
                 leaf_names: frozenset[str] = frozenset()):
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_names = set(leaf_names)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if m is getattr(self, "root", None):
            return False  # the root is traced through when fxopt traces its __call__
        if isinstance(m, self.leaf_types) or qualname in self.leaf_names:
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        if m is self.root or not hooks_of(m) or not self.is_leaf_module(m, self.path_of_module(m)):
            return super().call_module(m, forward, args, kwargs)
        outer = super()

        def leaf(*a, **k):
            return outer.call_module(m, forward, a, k)  # the call_module node, hooks apart

        m.forward = leaf  # _call_impl reads self.forward: hooks run on proxies around the node
        try:
            return nn.Module._call_impl(m, *args, **kwargs)
        finally:
            del m.forward


def _trace(tracer: _Tracer, work: nn.Module, concrete_args: dict | None) -> fx.Graph:
    """Trace ``work`` the way eager calls it: through ``__call__`` (hooks, an overridden
    ``__call__``) when plain ``forward`` would miss something."""
    cls = type(work)
    if not (hooks_of(work) or _overrides_call(work)):
        return tracer.trace(work, concrete_args=concrete_args)
    forward = cls.forward
    if inspect.unwrap(forward).__code__.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS):
        raise CaptureError(
            f"{cls.__name__} has forward hooks or overrides __call__, and its forward takes "
            f"*args/**kwargs: fxopt cannot trace its __call__",
            hint="give forward named arguments, or move what the hooks / __call__ do into "
                 "forward")

    @functools.wraps(forward)  # fx reads forward's signature through __wrapped__
    def traced_call(self, *args, **kwargs):
        return cls.__call__(self, *args, **kwargs)  # fx has patched nn.Module.__call__ by now

    sub = type(cls.__name__, (cls,), {"_fxopt_traced_call": traced_call,
                                      "__module__": cls.__module__})
    tracer.traced_func_name = "_fxopt_traced_call"
    work.__class__ = sub
    try:
        return tracer.trace(work, concrete_args=concrete_args)
    finally:
        work.__class__ = cls
        tracer.traced_func_name = "forward"


_CONSTANT_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device)


def _is_constant(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_constant(v) for v in value)
    return isinstance(value, _CONSTANT_TYPES)


def constant_inputs(model: nn.Module, inputs: tuple) -> dict[str, Any]:
    """The example inputs that are constants (``None``, numbers, strings, flags), by the name
    of the ``forward`` parameter they bind: fx would trace them as proxies (``if z is None``
    then takes the wrong branch), so capture specializes the graph on them."""
    if all(not _is_constant(x) for x in inputs):
        return {}
    try:
        params = list(inspect.signature(inspect.unwrap(type(model).forward)).parameters.values())
    except (TypeError, ValueError):
        return {}
    params = params[1:]  # self
    out = {}
    for p, value in zip(params, inputs):
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        if _is_constant(value):
            out[p.name] = value
    return out


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


def annotate_paths(gm: fx.GraphModule) -> None:
    """``fxopt_path`` (the module path, from the node or its ``nn_module_stack``) and
    ``fxopt_from`` on every node."""
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


def _none_guards_as_asserts(graph: fx.Graph) -> None:
    """fx guards an argument specialized to None with a private helper; ``torch._assert`` of
    ``operator.is_`` says the same, and every pass knows to keep it (it has an effect)."""
    helper = getattr(fx._symbolic_trace, "_assert_is_none", None)
    for node in list(graph.find_nodes(op="call_function", target=helper) if helper else []):
        value, message = node.args[0], node.args[1] if len(node.args) > 1 else ""
        with graph.inserting_before(node):
            test = graph.call_function(_operator.is_, (value, None))
            guard = graph.call_function(torch._assert, (test, message))
        node.replace_all_uses_with(guard)
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


@dataclass
class Captured:
    """What ``capture_model`` hands back: the checked graph, the eager output it was compared
    with, and notes for the report (hooks traced in, inputs specialized on)."""

    gm: fx.GraphModule
    eager_output: Any
    notes: list[str] = field(default_factory=list)
    leaves: list[OpaqueLeaf] = field(default_factory=list)  # made leaves automatically
    method: str = "symbolic_trace"  # or "export" (ir/export_capture.py)
    inlined: list[str] = field(default_factory=list)  # leaves inlined through torch.export
    dynamic_batch: bool = False  # exported with dim 0 of every tensor input symbolic


def capture(model: nn.Module, example_inputs: Any, *, leaf_modules: Iterable = (),
            concrete_args: dict[str, Any] | None = None, check: bool = True,
            auto_leaves: bool = True) -> fx.GraphModule:
    """Trace a copy of ``model`` into a canonical ``GraphModule`` with full metadata.

    ``leaf_modules``: module types or module paths traced as single calls (for modules whose
    forward has data-dependent control flow). ``concrete_args``: forward arguments fixed to
    constants while tracing (flags such as ``return_loss=False``). ``check``: compare the
    captured graph with the eager model on the example inputs (``CaptureError`` when they
    differ). ``auto_leaves``: a submodule whose forward cannot be traced becomes a leaf by
    itself (``fxopt.ir.leaves``); False raises the trace error instead.
    """
    check_model(model)
    inputs = normalize_inputs(example_inputs)
    return capture_model(copy_model(model), inputs, leaf_modules=leaf_modules,
                         concrete_args=concrete_args, check=check, pristine=model,
                         auto_leaves=auto_leaves).gm


def capture_model(work: nn.Module, inputs: tuple, *, leaf_modules: Iterable = (),
                  concrete_args: dict[str, Any] | None = None, check: bool = True,
                  eager_output: Any = None, pristine: nn.Module | None = None,
                  auto_leaves: bool = True) -> Captured:
    """``capture`` of fxopt's own copy ``work`` (its hooks are removed once traced in).

    ``eager_output``: the eager model's output on ``inputs`` when the caller has it already.
    ``pristine``: the model ``work`` was copied from (read only): a forward that writes into its
    own parameters or buffers (a counter) gets them reset from it after every run, so the graph
    is compared with eager from the same state and starts from the user's.
    ``auto_leaves``: a submodule symbolic tracing cannot go through becomes a leaf
    (``fxopt.ir.leaves``; named in ``Captured.leaves`` and the notes); False: the trace error.
    """
    types, names = _split_leaves(leaf_modules)
    refuse_global_hooks()
    if check:
        check_finite(inputs, "the example inputs")
    hooks = hooked_modules(work)
    state = _StateGuard(work, pristine)
    probe = HookProbe(work) if hooks else None
    try:
        if eager_output is None or probe is not None:
            # A clear InputError for wrong inputs first; concrete_args are forward's arguments.
            eager_output = run_eager(work, inputs, concrete_args)
    finally:
        observers = probe.drop_observers() if probe is not None else []
    state.reset()
    if check:
        check_finite(eager_output, "the model's output on the example inputs")
    notes = []
    auto = {k: v for k, v in constant_inputs(work, inputs).items()
            if k not in (concrete_args or {})}
    if auto:
        notes.append("capture: the graph is specialized on the non-tensor example inputs " +
                     ", ".join(f"{k}={v!r}" for k, v in auto.items()))
    if hooks:
        notes.append("capture: forward hooks traced into the graph: " + describe_hooks(hooks))
    if observers:
        notes.append("capture: hooks that returned None (observers) are not part of the "
                     "optimized model: " + ", ".join(observers))
    fixed = {**auto, **(concrete_args or {})} or None
    try:  # a submodule that cannot be traced becomes a leaf (ir/leaves.py), hooks apart
        tracer, graph, leaves = trace_with_auto_leaves(
            lambda found: _Tracer(types, frozenset(names | found)),
            lambda tracer: _trace(tracer, work, fixed), work, enabled=auto_leaves and not hooks)
    except AutoLeafFailure as failure:  # every trace failure gets a typed error and a hint
        error = _trace_error(failure.tracer, failure.error, hooks)
        error.trace_failure = True  # capture="auto" may try torch.export on it
        raise error from failure.error
    if leaves:
        notes.append(opaque_note(leaves))
    stripped = strip_hooks(work)  # the graph computes them now: leaf modules must not rerun them
    name = type(work).__name__
    _none_guards_as_asserts(graph)
    if concrete_args:
        _bind_concrete_args(graph, concrete_args)
    gm = fx.GraphModule(tracer.root, graph, name)
    # fx re-creates the containers on module paths (Sequential, blocks) as fresh nn.Modules,
    # which start in training mode; every real module is in eval mode (check_model above).
    gm.train(False)
    annotate_paths(gm)
    # Tensor shapes first: canonicalization reads them (flatten/reshape).
    try:
        propagate_shapes(gm, inputs)
        state.reset()
    except Exception as e:  # noqa: BLE001
        raise CaptureError(
            f"the traced graph does not run on the example inputs: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}" + _causes(work, hooks, inputs, gm),
            hint="mark the module that misbehaves under tracing as a leaf (leaf_modules=[...])",
        ) from e
    canonicalize(gm)  # rewritten nodes carry over the tensor_meta of the nodes they replace
    remove_unused_attributes(gm)
    gm.recompile()
    if check:
        _check_against_eager(gm, work, inputs, eager_output, hooks, stripped, concrete_args,
                             state)
    return Captured(gm, eager_output, notes, leaves)


def opaque_note(leaves: list[OpaqueLeaf]) -> str:
    """The report's note on the modules made leaves, and what they cost."""
    kept = {k: sum(leaf.layers[k] for leaf in leaves) for k in ("conv", "linear", "bn")}
    cost = ", ".join(f"{n} {k}" for k, n in kept.items() if n) or "no conv/linear/BN"
    return (f"capture: {len(leaves)} module(s) could not be traced and run as opaque leaves "
            f"(their eager forward): " + "; ".join(leaf.describe() for leaf in leaves) +
            f". Their layers ({cost}) are not folded, fused, pruned or quantized; pruning "
            f"freezes the channels at their boundary and int8 runs them in float")


def _trace_error(tracer: _Tracer, e: Exception, hooks: dict) -> CaptureError:
    where = innermost_module(tracer)
    loc = f" in module '{where[0]}' ({where[1]})" if where and where[0] else ""
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, fx.proxy.TraceError) or "symbolically traced variables" in str(e):
        msg = f"data-dependent control flow{loc} cannot be traced: {first}"
    else:
        msg = f"tracing failed{loc}: {type(e).__name__}: {first}"
    if hooks:
        msg += "; the model has forward hooks, traced with it: " + describe_hooks(hooks)
        return CaptureError(msg, hint="remove the hooks (handle.remove()) or make them "
                                      "traceable by torch.fx (no Python branches on tensors)")
    if where and where[0]:
        hint = f"mark the module as a leaf: leaf_modules=[{where[1]}] (or ['{where[0]}'])"
    else:
        hint = "fix the branch with concrete_args={...}, or move it into a submodule and " \
               "pass that module in leaf_modules"
    return CaptureError(msg, hint=hint)


def _causes(work: nn.Module, hooks: dict, inputs: tuple, gm: fx.GraphModule | None) -> str:
    """What fxopt knows can make a traced graph differ from eager, as a sentence."""
    found = []
    if hooks:
        found.append("forward hooks (" + describe_hooks(hooks) + ")")
    calls = sorted({type(m).__name__ for m in work.modules() if _overrides_call(m)})
    if calls:
        found.append(f"modules overriding __call__ ({', '.join(calls)})")
    others = [type(x).__name__ for x in inputs
              if not isinstance(x, torch.Tensor) and not _is_constant(x)]
    if others:
        found.append(f"non-tensor example inputs traced as proxies ({', '.join(others)})")
    if gm is not None:
        kept = [n.name for n in gm.graph.nodes if n.op in ("call_method", "call_function")
                and isinstance(n.target, str) and n.target.endswith("_")
                and not n.target.startswith("__")]
        if kept:
            found.append(f"in-place ops on aliased tensors left in place ({', '.join(kept[:5])})")
    return ("; possible causes: " + "; ".join(found)) if found else ""


def check_against_eager(gm: fx.GraphModule, work: nn.Module, inputs: tuple,
                        eager_output: Any) -> None:
    """CaptureError unless ``gm`` computes ``eager_output`` (a model without hooks)."""
    _check_against_eager(gm, work, inputs, eager_output, {}, [], None, _StateGuard(work, None))


def _check_against_eager(gm: fx.GraphModule, work: nn.Module, inputs: tuple, eager_output: Any,
                         hooks: dict, stripped: list, concrete_args: dict | None,
                         state: "_StateGuard") -> None:
    """CaptureError unless the captured graph computes what the eager model computed."""
    from fxopt.ir.check import clone_inputs, seeded
    from fxopt.ir.tolerances import compare_outputs

    try:
        with torch.no_grad(), seeded(inputs):
            out = gm(*clone_inputs(inputs))
    except Exception as e:  # noqa: BLE001
        raise CaptureError(
            f"the captured graph does not run on the example inputs: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}" + _causes(work, hooks, inputs, gm),
            hint="mark the module that misbehaves under tracing as a leaf "
                 "(leaf_modules=[...])") from e
    state.reset()
    stats = compare_outputs(out, eager_output)
    if stats.ok:
        return
    detail = stats.reason or f"rel err {stats.rel_err:.2e} (max abs {stats.max_abs:.2e}) above " \
                             f"the {stats.dtype} tolerance {stats.tolerance:.0e}"
    restore_hooks(stripped)  # eager again, as the user runs it: is the model deterministic?
    try:
        again = compare_outputs(run_eager(work, inputs, concrete_args), eager_output)
    finally:
        strip_hooks(work)
        state.reset()
    if not again.ok:
        raise CaptureError(
            f"the model is not deterministic: two eager runs on the same inputs differ "
            f"({again.reason or f'rel err {again.rel_err:.2e}'}), so no graph can be checked "
            f"against it", hint="remove the randomness from forward (torch.rand*, training-mode "
                                "dropout in functional form: F.dropout(x, training=self.training))")
    causes = _causes(work, hooks, inputs, gm)
    raise CaptureError(
        f"the captured graph differs from the eager model on the example inputs: {detail}"
        + (causes or "; torch.fx traced forward into something else (Python state, "
                     "non-tensor control flow, or mutation it cannot see)"),
        hint="move what hooks or __call__ do into forward, pass non-tensor arguments through "
             "concrete_args, or mark the module that misbehaves as a leaf (leaf_modules=[...])")
