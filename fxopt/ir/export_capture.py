"""The torch.export front end: ``capture="export"`` brings an exported graph into fxopt's IR.

``torch.export.export(model, inputs, strict=False)`` traces through Python control flow that
``symbolic_trace`` cannot (it runs the code on fake tensors: a branch on a size takes the
example's side, with a guard), and hands back an aten-level graph with the parameters lifted to
inputs. No decomposition is run (``run_decompositions`` would split ``conv2d`` and
``batch_norm`` into the ops the passes do not know); the graph is then brought into the
conventions the passes read, so every pass runs unchanged:

- the root is fxopt's copy of the model (``fx.GraphModule(work, graph)``): submodules keep
  their paths and types, parameters and buffers are ``get_attr`` nodes of their own paths
  (lifted constants become buffers under ``_export_constants``, the subgraphs of higher-order
  ops such as an autocast region submodules under ``_export_submodules``);
- ``aten.conv1d/conv2d`` and ``aten.linear`` whose weight and bias are a module's own
  parameters, with that module's settings, become ``call_module`` of the module (fold_bn,
  fuse_act, pruning and int8 match modules); ``aten.batch_norm`` becomes ``F.batch_norm`` on
  ``get_attr`` statistics (fold_bn's functional form); activations, ``+``/``*``, pooling,
  flatten and reshape become the torch calls capture's canonical forms start from (``_TORCH``);
  every other aten op stays an ``OpOverload`` call (it runs; the passes leave it alone);
- ``fxopt_path`` from export's ``nn_module_stack``, ``fxopt_from``, ``tensor_meta`` from a run,
  then ``canonicalize`` and the check against eager, as for a symbolic trace.

``capture="auto"`` uses it twice (``capture_with``): each module symbolic tracing had to make
an opaque leaf (``fxopt.ir.leaves``) is exported on the inputs it saw and inlined in place of its
call (``inline_leaves``: its layers are folded, fused, pruned and quantized like the others; one
that cannot be exported stays a leaf), and the whole model is exported when its own forward
cannot be traced or the leaves left hide over half of the parameters.

``dynamic_batch=True`` exports dim 0 of every tensor input as a symbolic ``batch`` dimension
(the graph keeps ``sym_size`` reads). Refused with a typed error (``NotAvailableError``) for
now: outputs that are not a tensor or a flat tuple/list of tensors, graphs that mutate buffers
(export's buffer-mutation outputs), and models ``torch.export`` itself cannot export.

    >>> captured = capture_exported(copy_model(model), (x,))
    >>> captured.method
    'export'
"""
from __future__ import annotations

import copy
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxopt.errors import CaptureError, NotAvailableError
from fxopt.ir.canonical import canonicalize
from fxopt.ir.boundary import check_finite, run_eager
from fxopt.ir.capture import Captured, annotate_paths, check_against_eager, propagate_shapes
from fxopt.ir.graph import remove_unused_attributes

__all__ = ["capture_exported", "capture_with", "inline_leaves", "export_graph", "CAPTURE_METHODS",
           "EXPORT_FALLBACK_SHARE"]

CAPTURE_METHODS = ("auto", "symbolic_trace", "export")

aten = torch.ops.aten

# aten op -> the torch call capture's canonical forms start from (same positional arguments).
_TORCH = {
    aten.relu.default: F.relu, aten.hardtanh.default: F.hardtanh, aten.silu.default: F.silu,
    aten.hardswish.default: F.hardswish, aten.hardsigmoid.default: F.hardsigmoid,
    aten.sigmoid.default: torch.sigmoid, aten.tanh.default: torch.tanh,
    aten.gelu.default: F.gelu, aten.leaky_relu.default: F.leaky_relu,
    aten.add.Tensor: operator.add, aten.mul.Tensor: operator.mul, aten.sub.Tensor: operator.sub,
    aten.max_pool2d.default: F.max_pool2d, aten.avg_pool2d.default: F.avg_pool2d,
    aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    aten.flatten.using_ints: torch.flatten, aten.reshape.default: torch.reshape,
    aten.view.default: torch.reshape, aten.cat.default: torch.cat, aten.mean.dim: torch.mean,
    aten.conv2d.default: F.conv2d, aten.conv1d.default: F.conv1d, aten.linear.default: F.linear,
}
# in-place aten op -> the tensor method (canonicalize makes it out of place, aliases redirected)
_METHODS = {aten.relu_.default: "relu_", aten.add_.Tensor: "add_", aten.mul_.Tensor: "mul_",
            aten.sub_.Tensor: "sub_", aten.sigmoid_.default: "sigmoid_",
            aten.clamp_.default: "clamp_", aten.hardtanh_.default: "hardtanh_"}
# in-place aten activation -> its F function, called with inplace=True
_INPLACE_F = {aten.silu_.default: F.silu, aten.hardswish_.default: F.hardswish,
              aten.hardsigmoid_.default: F.hardsigmoid, aten.elu_.default: F.elu,
              aten.leaky_relu_.default: F.leaky_relu}
_LAYERS = {aten.conv2d.default: nn.Conv2d, aten.conv1d.default: nn.Conv1d,
           aten.linear.default: nn.Linear}


def export_graph(work: nn.Module, inputs: tuple, *, dynamic_batch: bool = False):
    """``torch.export.export(work, inputs, strict=False)``; a failure is a CaptureError."""
    dynamic = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic = tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() else None
                        for x in inputs)
    try:
        return torch.export.export(work, inputs, strict=False, dynamic_shapes=dynamic)
    except Exception as e:  # noqa: BLE001 - every export failure gets a typed error and a hint
        first = str(e).splitlines()[0] if str(e) else ""
        raise CaptureError(f"torch.export could not export the model: {type(e).__name__}: "
                           f"{first}",
                           hint="use capture='symbolic_trace' (automatic leaves), or make the "
                                "model exportable (torch.export's error names the line)") from e


def _owner(path: str, work: nn.Module) -> tuple[str, nn.Module | None]:
    owner = path.rpartition(".")[0]
    try:
        return owner, work.get_submodule(owner)
    except AttributeError:
        return owner, None


def _as_module_call(node: fx.Node, attrs: dict[fx.Node, str], work: nn.Module) -> str | None:
    """The module path when ``node`` (aten conv/linear) computes exactly that module's call."""
    cls = _LAYERS.get(node.target)
    if cls is None or len(node.args) < 2 or node.kwargs:
        return None
    weight, bias = node.args[1], node.args[2] if len(node.args) > 2 else None
    if weight not in attrs:
        return None
    path, mod = _owner(attrs[weight], work)
    if type(mod) is not cls or attrs[weight] != f"{path}.weight" or \
            (bias is None) != (mod.bias is None) or \
            (bias is not None and attrs.get(bias) != f"{path}.bias"):
        return None
    if cls is nn.Linear:
        return path
    if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
        return None
    rest = list(node.args[3:]) + [None] * (4 - len(node.args[3:]))
    want = [list(mod.stride), list(mod.padding), list(mod.dilation), mod.groups]
    defaults = [[1] * len(mod.stride), [0] * len(mod.stride), [1] * len(mod.stride), 1]
    got = [d if r is None else (list(r) if isinstance(r, (list, tuple)) else r)
           for r, d in zip(rest, defaults)]
    return path if got == want else None


def _rewrite(graph: fx.Graph, attrs: dict[fx.Node, str], work: nn.Module) -> None:
    """aten calls -> module calls and torch calls (the module docstring's table)."""
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        path = _as_module_call(node, attrs, work)
        if path is not None:
            node.op, node.target, node.args = "call_module", path, (node.args[0],)
        elif node.target is aten.batch_norm.default:
            x, w, b, mean, var, training, momentum, eps = node.args[:8]
            node.target = F.batch_norm
            node.args, node.kwargs = (x, mean, var, w, b, training, momentum, eps), {}
        elif node.target in _TORCH and not (set(node.kwargs) - {"approximate"}):
            node.target = _TORCH[node.target]
        elif node.target in _METHODS and not node.kwargs:
            node.op, node.target = "call_method", _METHODS[node.target]
        elif node.target in _INPLACE_F and not node.kwargs and len(node.args) == 1:
            node.target, node.kwargs = _INPLACE_F[node.target], {"inplace": True}


def _lifted(ep, work: nn.Module) -> tuple[fx.GraphModule, dict[fx.Node, str]]:
    """The exported graph on ``work``: lifted parameters, buffers and constants -> get_attr."""
    from torch.export.graph_signature import InputKind, OutputKind

    sig = ep.graph_signature
    if any(o.kind != OutputKind.USER_OUTPUT for o in sig.output_specs):
        raise NotAvailableError(
            "capture='export' does not handle models that write into their buffers yet",
            hint="use capture='symbolic_trace' (the default 'auto' tries it first)")
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    attrs: dict[fx.Node, str] = {}
    targets, holder = {}, None
    for spec in sig.input_specs:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            targets[spec.arg.name] = spec.target
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            if holder is None:
                holder = nn.Module().eval()
                work.add_module("_export_constants", holder)
            key = spec.target.replace(".", "_")
            holder.register_buffer(key, ep.constants[spec.target].detach().clone())
            targets[spec.arg.name] = f"_export_constants.{key}"
    for node in ep.graph_module.graph.nodes:
        target = targets.get(node.name) if node.op == "placeholder" else None
        if target is not None:
            new = graph.get_attr(target)
            attrs[new] = target
        elif node.op == "get_attr":  # a higher-order op's subgraph (an autocast region)
            new = graph.node_copy(node, lambda n: env[n])
            if not hasattr(work, "_export_submodules"):
                work.add_module("_export_submodules", nn.Module().eval())
            work._export_submodules.add_module(node.target, getattr(ep.graph_module,
                                                                    node.target).eval())
            new.target = f"_export_submodules.{node.target}"
        elif node.op == "output":
            outs = node.args[0]
            out = outs[0] if _single_output(ep) else tuple(env[o] for o in outs)
            new = graph.output(env[out] if isinstance(out, fx.Node) else out)
        else:
            new = graph.node_copy(node, lambda n: env[n])
        new.meta = dict(node.meta)
        env[node] = new
    _rewrite(graph, attrs, work)  # before the GraphModule: it copies the modules the calls name
    return fx.GraphModule(work, graph, type(work).__name__), attrs


def _single_output(ep) -> bool:
    import torch.utils._pytree as pytree

    spec = ep.call_spec.out_spec
    if spec is None or spec.is_leaf():
        return True
    if spec.type in (tuple, list) and all(c.is_leaf() for c in spec.children_specs):
        return False
    raise NotAvailableError(
        f"capture='export' handles a tensor or a flat tuple of tensors as output, not "
        f"{pytree.treespec_pprint(spec)}", hint="use capture='symbolic_trace', or return a tuple")


def capture_exported(work: nn.Module, inputs: tuple, *, check: bool = True,
                     eager_output: Any = None, dynamic_batch: bool = False) -> Captured:
    """Capture ``work`` (fxopt's copy) with torch.export, in fxopt's IR, checked against eager."""
    if check:
        check_finite(inputs, "the example inputs")
    if eager_output is None:
        eager_output = run_eager(work, inputs)
    if isinstance(eager_output, list):
        eager_output = tuple(eager_output)
    ep = export_graph(work, inputs, dynamic_batch=dynamic_batch)
    gm, _ = _lifted(ep, work)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    gm.train(False)
    annotate_paths(gm)
    try:
        propagate_shapes(gm, inputs)
    except Exception as e:  # noqa: BLE001
        raise CaptureError(f"the exported graph does not run on the example inputs: "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                           hint="use capture='symbolic_trace'") from e
    canonicalize(gm)
    remove_unused_attributes(gm)
    gm.recompile()
    if check:
        check_against_eager(gm, work, inputs, eager_output)
    notes = ["capture: torch.export (strict=False)" +
             (", dynamic batch" if dynamic_batch else "")]
    return Captured(gm, eager_output, notes, [], "export", dynamic_batch=dynamic_batch)


# "auto" falls back to torch.export when the automatic leaves hide more than this share of the
# model's parameters (their layers would be neither folded, pruned nor quantized).
EXPORT_FALLBACK_SHARE = 0.5


def capture_with(method: str, work: nn.Module, inputs: tuple, *, leaf_modules=(),
                 concrete_args: dict | None = None, check: bool = True,
                 pristine: nn.Module | None = None, dynamic_batch: bool = False) -> Captured:
    """Capture by ``method``: ``"symbolic_trace"`` (automatic leaves), ``"export"``, or
    ``"auto"``: symbolic trace, its automatic leaves inlined through torch.export where export
    takes them (``inline_leaves``), then torch.export when the trace fails in the model's own
    forward (no module to make a leaf) or the leaves it needed hide more than
    ``EXPORT_FALLBACK_SHARE`` of the parameters, and export succeeds (a note says which; when
    export fails too, the symbolic trace's result or error stands)."""
    from fxopt.ir.capture import capture_model

    if method == "export":
        if leaf_modules or concrete_args:
            raise NotAvailableError(
                "capture='export' does not take leaf_modules= or concrete_args= yet",
                hint="drop them (torch.export traces through branches), or use "
                     "capture='symbolic_trace'")
        return capture_exported(work, inputs, check=check, dynamic_batch=dynamic_batch)
    try:
        captured = capture_model(work, inputs, leaf_modules=leaf_modules,
                                 concrete_args=concrete_args, check=check, pristine=pristine)
    except CaptureError as e:  # the model's own forward cannot be traced: no leaf helps
        if method != "auto" or not getattr(e, "trace_failure", False) or concrete_args:
            raise
        try:
            exported = capture_exported(work, inputs, check=check, dynamic_batch=dynamic_batch)
        except (CaptureError, NotAvailableError):
            raise e from None
        exported.notes.append(f"capture: symbolic tracing failed ({str(e).splitlines()[0]}); "
                              f"captured with torch.export instead")
        return exported
    if method == "auto":
        captured = _inline_or_keep(captured, work, inputs, check)
    total = sum(p.numel() for p in work.parameters()) or 1
    hidden = sum(leaf.params for leaf in captured.leaves)
    if method != "auto" or hidden / total <= EXPORT_FALLBACK_SHARE or leaf_modules \
            or concrete_args:
        return captured
    try:
        exported = capture_exported(work, inputs, check=check,
                                    eager_output=captured.eager_output,
                                    dynamic_batch=dynamic_batch)
    except (CaptureError, NotAvailableError) as e:
        captured.notes.append(f"capture: torch.export was tried as well (the leaves hide "
                              f"{hidden / total:.0%} of the parameters) and failed: "
                              f"{str(e).splitlines()[0]}")
        return captured
    exported.notes.append(f"capture: symbolic tracing needed leaves holding {hidden / total:.0%} "
                          f"of the parameters; captured with torch.export instead")
    return exported


def _inline_or_keep(captured: Captured, work: nn.Module, inputs: tuple,
                    check: bool) -> Captured:
    """``inline_leaves`` on a copy of the capture; the capture as it was when that fails."""
    if not captured.leaves:
        return captured
    saved = copy.deepcopy(captured.gm)
    try:
        return inline_leaves(captured, work, inputs, check=check)
    except Exception as e:  # noqa: BLE001 - the leaves stay leaves
        captured.gm = saved
        captured.notes.append(f"capture: inlining the leaves through torch.export failed "
                              f"({type(e).__name__}): they stay opaque")
        return captured


def _leaf_inputs(work: nn.Module, inputs: tuple, paths: list[str]) -> dict[str, tuple]:
    """The positional tensor arguments each leaf module is called with on ``inputs`` (a module
    called more than once, or with keyword arguments, is left out)."""
    from fxopt.ir.check import clone_inputs, seeded

    seen: dict[str, list] = {p: [] for p in paths}
    handles = []
    for path in paths:
        def hook(mod, args, kwargs, path=path):
            seen[path].append(None if kwargs else tuple(
                a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args))
        handles.append(work.get_submodule(path).register_forward_pre_hook(hook,
                                                                          with_kwargs=True))
    try:
        with torch.no_grad(), seeded(inputs):
            work(*clone_inputs(inputs))
    finally:
        for h in handles:
            h.remove()
    return {p: v[0] for p, v in seen.items()
            if len(v) == 1 and v[0] is not None and all(isinstance(a, torch.Tensor) for a in v[0])}


def _inline(gm: fx.GraphModule, node: fx.Node, sub: fx.GraphModule, path: str) -> bool:
    """Replace the call of leaf ``path`` by ``sub``'s graph (targets under ``path``)."""
    out = next(n for n in sub.graph.nodes if n.op == "output").args[0]
    if not isinstance(out, fx.Node):
        return False
    env: dict[fx.Node, Any] = {}
    args = iter(node.args)
    graph = gm.graph
    with graph.inserting_before(node):
        for n in sub.graph.nodes:
            if n.op == "placeholder":
                env[n] = next(args)
                continue
            if n.op == "output":
                break
            new = graph.node_copy(n, lambda a: env[a])
            if n.op in ("get_attr", "call_module"):
                new.target = f"{path}.{n.target}"
            new.meta = dict(n.meta)
            inner = n.meta.get("fxopt_path", "")
            new.meta["fxopt_path"] = f"{path}.{inner}" if inner else path
            new.meta["fxopt_from"] = [new.name]
            env[n] = new
    node.replace_all_uses_with(env[out])
    graph.erase_node(node)
    return True


def inline_leaves(captured: Captured, work: nn.Module, inputs: tuple, *,
                  check: bool = True) -> Captured:
    """Each opaque leaf of a symbolic trace is captured by torch.export on the inputs it saw
    and inlined in place of its call, so the passes see its layers; a leaf export cannot take
    (or whose output is not one tensor) stays a leaf. The whole graph is checked again."""
    paths = [leaf.path for leaf in captured.leaves]
    if not paths:
        return captured
    gm = captured.gm
    calls = {n.target: n for n in gm.graph.nodes if n.op == "call_module" and n.target in paths}
    seen = _leaf_inputs(work, inputs, paths)
    done = []
    for path in paths:
        node = calls.get(path)
        if node is None or path not in seen or node.kwargs or len(node.args) != len(seen[path]):
            continue
        try:
            sub = capture_exported(work.get_submodule(path), seen[path], check=check).gm
        except Exception:  # noqa: BLE001 - the leaf stays a leaf
            continue
        if _inline(gm, node, sub, path):
            done.append(path)
    if not done:
        return captured
    gm.graph.lint()
    gm.recompile()
    propagate_shapes(gm, inputs)
    canonicalize(gm)
    remove_unused_attributes(gm)
    gm.recompile()
    if check:
        check_against_eager(gm, work, inputs, captured.eager_output)
    captured.leaves = [leaf for leaf in captured.leaves if leaf.path not in done]
    captured.inlined = done
    captured.notes.append(f"capture: {len(done)} module(s) symbolic tracing could not go "
                          f"through were captured with torch.export and inlined: " +
                          ", ".join(done))
    return captured
