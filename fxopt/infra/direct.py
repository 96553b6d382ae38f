"""Direct calls: run a lowered graph's fxopt ops as plain Python calls, past the dispatcher.

Every op fxopt writes into a graph is a ``torch.library`` op (``torch.ops.fxopt.*``), which is
what lets the graph be saved, exported (``torch.export``), compiled (``torch.compile``) and
differentiated. The price is the dispatcher: a call into an op whose kernel is a Python function
goes through argument parsing, the dispatch keys and back into Python, about 15 us a call on
this project's 2-core CPU machine. A lowered int8 MobileNetV2 makes ~150 such calls, so the
dispatch alone was 15% of its batch-1 latency (29.3 -> 24.5 ms, measured 2026-12-06, 1 thread).

``DirectRunner`` keeps a second ``GraphModule`` over the same modules and tensors whose fxopt
nodes call each op's CPU kernel (``OpSchema.cpu_impl``) directly. It serves only what the
dispatcher would send to those kernels anyway:

- no gradient wanted (``OptimizedModule`` calls it under ``torch.no_grad`` only), every input
  tensor on the CPU, and no tracing (``torch.compiler.is_compiling()`` / ``is_exporting()``
  are false, so ``torch.export`` and ``torch.compile`` see the dispatcher's graph);
- and only after it proved itself: its first call runs both graphs and compares the outputs
  exactly; any difference or error turns it off for good (one note in the report) and the
  graph's own result is returned. So a kernel whose Python signature does not take the graph's
  arguments as written costs one call, never a wrong result.

It follows the graph: a new graph or a recompile (``graph_module.code`` changes), or an
attribute reassigned on the graph module, rebuilds it. In-place updates of weights
(``load_state_dict``, an optimizer step) need nothing: both graphs read the same tensors.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxopt.ops.schema import schema_of

__all__ = ["DirectRunner", "direct_graph"]


def direct_graph(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A GraphModule over ``gm``'s modules and tensors whose fxopt nodes call their CPU kernels;
    and how many nodes were redirected."""
    graph = copy.deepcopy(gm.graph)
    swapped = 0
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        op = schema_of(node.target)
        if op is not None:
            node.target = op.cpu_impl
            swapped += 1
    direct = fx.GraphModule(gm, graph, class_name="DirectGraph")
    # Its own tensors as plain attributes: the generated forward reads each with one instance
    # dict lookup instead of nn.Module.__getattr__ (~0.7 us each; a lowered MobileNetV3 reads
    # 316 a call). The same tensor objects: in-place updates show; a reassignment on ``gm``
    # rebuilds the twin (DirectRunner._twin).
    for table in (direct._parameters, direct._buffers):
        for name in list(table):
            direct.__dict__[name] = table.pop(name)
    return direct, swapped


def _attrs(gm: fx.GraphModule) -> tuple:
    # What the direct graph copied by reference: a reassignment shows up as a new object.
    return tuple((name, id(v)) for table in (gm._modules, gm._parameters, gm._buffers)
                 for name, v in table.items()) + \
        tuple((name, id(v)) for name, v in gm.__dict__.items() if isinstance(v, torch.Tensor))


class DirectRunner:
    """Runs ``graph_module`` through its direct twin where that is safe (see the module doc)."""

    def __init__(self, notes: list | None = None):
        self.notes = notes if notes is not None else []
        self.enabled = True
        self._key: tuple | None = None
        self._direct: fx.GraphModule | None = None
        self._proven = False

    def __deepcopy__(self, memo: dict) -> "DirectRunner":
        # A copy of the module gets its own twin, built on its first call (not a deep copy of
        # this one's, which would point at the old module's tensors).
        fresh = DirectRunner([])
        fresh.enabled = self.enabled
        return fresh

    @staticmethod
    def applies(args: tuple, kwargs: dict) -> bool:
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return False
        leaves = pytree.tree_leaves((args, kwargs))
        return all(not isinstance(t, torch.Tensor) or
                   (t.device.type == "cpu" and type(t) is torch.Tensor) for t in leaves)

    def _twin(self, gm: fx.GraphModule) -> fx.GraphModule | None:
        key = (id(gm), id(gm.graph), gm.code, _attrs(gm))
        if key != self._key:
            direct, swapped = direct_graph(gm)
            self._key, self._direct, self._proven = key, (direct if swapped else None), False
        return self._direct

    def __call__(self, gm: fx.GraphModule, args: tuple, kwargs: dict) -> Any:
        if not self.enabled or not self.applies(args, kwargs):
            return gm(*args, **kwargs)
        direct = self._twin(gm)
        if direct is None:
            return gm(*args, **kwargs)
        if self._proven:
            return direct(*args, **kwargs)
        # the twin's trial runs on copies: a graph may write into its inputs (x.mul_(gate)), and
        # the caller's tensors must be written once, by the graph, as without this runner
        trial_args, trial_kwargs = pytree.tree_map(
            lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, (args, kwargs))
        try:
            got = direct(*trial_args, **trial_kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure turns the direct path off
            got, why = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        else:
            why = "its outputs differ from the graph's"
        expected = gm(*args, **kwargs)
        same = got is not None and _equal(got, expected)
        if same:
            self._proven = True
        else:
            self.enabled = False
            self.notes.append(f"direct calls off: {why}; the graph runs through the "
                              "dispatcher (same results, ~15 us more per fxopt op)")
        return expected


def _equal(a: Any, b: Any) -> bool:
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if sa != sb or len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.dtype != y.dtype or x.shape != y.shape or \
                    not torch.equal(torch.nan_to_num(x), torch.nan_to_num(y)):
                return False
            if torch.isnan(x).ne(torch.isnan(y)).any():
                return False
        elif x != y:
            return False
    return True
