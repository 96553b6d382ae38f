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
attribute reassigned on the graph module, rebuilds it, and so does ``fxopt.weights_written()``
(``fxopt.ops.unversioned``: a write through ``t.data``, which no version counter sees). In-place
updates of weights (``load_state_dict``, an optimizer step) need nothing more: both graphs read
the same tensors, and the bound calls below check the versions.

Bound calls. An op whose schema has a ``cpu_bind`` (the int8 CPU conv and linear layers,
``fxopt.ops.cpu``) gets a :class:`BoundCall` of its own as the twin's target, where its
arguments past the weights are literals: the op's one kernel call with its weight packed and
its arguments converted once, guarded by the input's shape and dtype and by the weight
tensors' identity, version counters and memory.
The Python a layer's kernel wrapper runs on every call (the post-op lookup, the packed-weight
cache key, the scalar conversions) cost ~7 us of a 28-56 us oneDNN call at batch 1 (one
thread); the bound call's guard costs ~2. Measured against the unbound layers in one process
(batch 1, 2 threads, 60 interleaved rounds, 2026-12-07): regnet_x_400mf 7.96 -> 7.45 ms,
mobilenet_v2 5.79 -> 5.58, resnet18 7.11 -> 6.99; efficientnet_b0 no faster (17.3 / 17.9,
faster in 34 of 60). Each binding is checked once: the bound call's codes must equal the
kernel's on the call that bound it, else the node stays unbound.

Linked calls. The graph passes plain uint8 codes; a layer on PyTorch's quantized engines
(``engine="x86"`` / ``"fbgemm"``) makes a quint8 view of its input and a uint8 view of its
output around every kernel call, four tensor calls that cost more than PyTorch's own modules,
which pass quantized tensors (~15-20 us a layer at batch 1). A node whose every use is an input
that takes a quint8 tensor (``quantized_inputs``: a bound layer's codes, the int8 add's and
mul's operands) is linked: a bound quantized kernel returns its quint8 output
(``BoundCall.q_out``), an add or mul its quint8 sum, and the next op uses that tensor as its
input where it is on the op's own grid (checked each call; else its codes, as the graph would
pass them). The kernels and their inputs are the same: the outputs are the graph's. Concats,
pools and int8 batch norms take and pass quint8 tensors the same way (``linkable`` kernels),
and a oneDNN layer, whose kernel returns plain codes, views them once for two or more users
that all take quint8 (``BoundCall.view_out``): a DenseNet layer's output is read by every later
concat of its block, each of which made a view of its own (densenet121, batch 1: 42.48 ->
38.45 ms with engine "auto", 42.41 -> 35.14 with "x86";
bench/results/int8-linked-dense-2026-12-07.md).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxopt.ops.qviews import as_quantized as _as_quantized
from fxopt.ops.qviews import codes_of as _codes_of
from fxopt.ops.schema import schema_of
from fxopt.ops.unversioned import epoch

__all__ = ["DirectRunner", "direct_graph", "BoundCall"]

_QUINT8 = torch.quint8


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
            bound = op.cpu_bind is not None and _literals(node)
            node.target = BoundCall(op.cpu_impl, op.cpu_bind) if bound else op.cpu_impl
            swapped += 1
    _link(graph)
    direct = fx.GraphModule(gm, graph, class_name="DirectGraph")
    # Its own tensors as plain attributes: the generated forward reads each with one instance
    # dict lookup instead of nn.Module.__getattr__ (~0.7 us each; a lowered MobileNetV3 reads
    # 316 a call). The same tensor objects: in-place updates show; a reassignment on ``gm``
    # rebuilds the twin (DirectRunner._twin).
    for table in (direct._parameters, direct._buffers):
        for name in list(table):
            direct.__dict__[name] = table.pop(name)
    return direct, swapped


def _link(graph: fx.Graph) -> None:
    """Link the nodes whose every use is an input that takes a quint8 tensor (a target's
    ``quantized_inputs`` positions, ``fxopt.ops.qviews.linkable``: a bound layer's codes, the
    int8 add's and mul's operands, a concat's inputs, a pool's or batch norm's input): a bound
    layer passes its quantized kernel's quint8 output along (``BoundCall.q_out``), an add, a
    concat, a pool or a batch norm its quint8 result (``quantized_out=True``), instead of a view
    of the codes, and the next op uses it without a view of its own. A layer on oneDNN takes
    codes: handed a quint8 tensor it views the codes, so a node with two or more such users is
    not linked (that would be a view each instead of one). A bound layer whose kernel returns
    plain codes (oneDNN's) views them as quint8 once (``BoundCall.view_out``) where two or more
    users would each make that view: none of them a layer on oneDNN (with one user the view is
    made once either way)."""
    for node in graph.nodes:
        if not node.users or not all(_takes_quantized(user, node) for user in node.users):
            continue
        on_onednn = sum(isinstance(user.target, BoundCall) and
                        user.kwargs.get("engine", "onednn") == "onednn" for user in node.users)
        if on_onednn > 1:
            continue
        if isinstance(node.target, BoundCall):
            node.target.q_out = True
            node.target.view_out = on_onednn == 0 and len(node.users) > 1
        elif getattr(node.target, "quantized_output", False):
            node.kwargs = {**node.kwargs, "quantized_out": True}


def _takes_quantized(user: fx.Node, node: fx.Node) -> bool:
    """Whether every use of ``node`` by ``user`` is a position that may be a quint8 tensor:
    the argument itself, or an element of a list there (a concat's inputs)."""
    positions = getattr(user.target, "quantized_inputs", ())
    for i, arg in enumerate((*user.args, user.kwargs)):
        found: list = []
        fx.node.map_arg(arg, found.append)
        uses = sum(n is node for n in found)
        if not uses:
            continue
        direct = arg is node or (isinstance(arg, (list, tuple)) and
                                 sum(a is node for a in arg) == uses)
        if not (direct and i in positions):
            return False
    return True


class BoundCall:
    """One node's op, called as ``impl(q, w_q, w_scale, bias, *rest, **kwargs)`` where ``rest``
    and ``kwargs`` are the node's literals (``direct_graph`` makes one only for such a node:
    the generated code passes the same values on every call). It runs the kernel call that
    ``bind`` (same arguments) returns for them, or None where ``impl`` makes no single kernel
    call, while the call is the one it was bound for: the same weight tensors, their version
    counters (an in-place update: ``load_state_dict``) and memory (``t.data = ...``)
    unchanged, the input's shape, dtype uint8. Otherwise ``impl`` runs and the call binds for
    these arguments, checked: the bound function's result must equal ``impl``'s exactly
    (values, dtype, strides), else this node never binds again."""

    def __init__(self, impl, bind):
        self.impl, self.bind = impl, bind
        # what torch.fx's code generation names a call target by
        self.__name__, self.__module__ = impl.__name__, impl.__module__
        self.call = self.quantized = self.shape = self.weights = None
        # (tensor, version, data_ptr) for the weights that have a version counter
        self.versions: tuple = ()
        self.off = False
        # Linked (``direct_graph``): every user of this node takes a quint8 tensor, so where
        # the bound call is a quantized kernel (``call.quantized``) it returns its quint8
        # output, not a view of its codes; ``linked``: whether the last quint8 input was on
        # this call's x grid (then used as it is)
        self.q_out = False
        self.linked: bool | None = None
        # ``view_out``: every user would view this layer's codes as quint8; where the bound call
        # returns plain codes (``call.y_grid``: oneDNN's), they are viewed here, once
        self.view_out = False
        self.y_grid: tuple | None = None

    # the quantized input types a BoundCall takes at position 0 (see ``direct_graph``)
    quantized_inputs = (0,)

    def __call__(self, q, w_q, w_scale, bias, *rest, **kwargs):
        call, weights = self.call, self.weights
        if call is not None and w_q is weights[0] and w_scale is weights[1] and \
                bias is weights[2] and q.shape == self.shape:
            for t, v, ptr in self.versions:
                if t._version != v or t.data_ptr() != ptr:
                    break
            else:
                y = self._bound(call, self.quantized, q)
                if y is not None:
                    return y
        if q.dtype is _QUINT8:
            q = _codes_of(q)
        y = self.impl(q, w_q, w_scale, bias, *rest, **kwargs)
        if not self.off:
            self._bind(q, (w_q, w_scale, bias), rest, kwargs, y)
        return y

    def _bound(self, call, quantized, q):
        """The bound call's output for ``q`` (uint8 codes, or a linked layer's quint8 output),
        quint8 where this node is linked to its users and the call is a quantized kernel
        (``quantized``: its quint8 -> quint8 form, or None); None where the call refuses."""
        if q.dtype is _QUINT8:
            # on this call's x grid (a layer's output grid is a literal, an add's a tensor that
            # may have been written in place): used as it is; else its codes, as the graph
            self.linked = quantized is not None and \
                (q.q_scale(), q.q_zero_point()) == call.x_grid
            if self.linked:
                y = quantized(q)
                return y if self.q_out else _codes_of(y)
            q = _codes_of(q)
        if q.dtype is not torch.uint8:
            return None
        if self.q_out and quantized is not None:
            return quantized(_as_quantized(q, *call.x_grid))
        y = call(q)
        if self.view_out and y is not None and self.y_grid is not None:
            return _as_quantized(y, *self.y_grid)
        return y

    def _bind(self, q, weights, rest, kwargs, y) -> None:
        # An inference tensor has no version counter: written in inference mode, it is not seen
        # (nor by the packed-weight cache, fxopt.ops.onednn).
        versions = tuple((t, t._version, t.data_ptr()) for t in weights
                         if t is not None and not t.is_inference())
        if self.shape == q.shape and self.weights is not None and \
                all(a is b for a, b in zip(self.weights, weights)) and \
                [v[1:] for v in self.versions] == [v[1:] for v in versions]:
            return  # tried for these arguments already (and got no call)
        self.call, self.quantized, self.y_grid = None, None, None
        self.shape, self.weights, self.versions = q.shape, weights, versions
        if q.dtype is not torch.uint8 or not isinstance(y, torch.Tensor):
            return
        call = self.bind(q, *weights, *rest, **kwargs)
        if call is None:
            return
        got = call(q)
        if isinstance(got, torch.Tensor) and got.dtype == y.dtype and \
                got.stride() == y.stride() and torch.equal(got, y):
            self.call, self.quantized = call, getattr(call, "quantized", None)
            self.y_grid = getattr(call, "y_grid", None)
        else:
            self.off = True


def _literals(node: fx.Node) -> bool:
    """Whether every argument of ``node`` after the first four is a literal (no node)."""
    found: list = []
    fx.node.map_arg((node.args[4:], node.kwargs), found.append)
    return not found


def _attrs(gm: fx.GraphModule) -> tuple:
    # What the direct graph copied by reference: a reassignment shows up as a new object. Read
    # on every call, so the big tables go through C (map): 21 against 48 us on regnet_x_400mf's
    # 318 buffers.
    return tuple((tuple(t), tuple(map(id, t.values())))
                 for t in (gm._modules, gm._parameters, gm._buffers)) + \
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
        # this one's, which would point at the old module's tensors); its notes are the copy's
        # report's (the memo makes them one list)
        fresh = DirectRunner(copy.deepcopy(self.notes, memo))
        fresh.enabled = self.enabled
        return fresh

    def __getstate__(self) -> dict:
        # Pickled (torch.save of the whole module) without the twin, a cache of the module's
        # own tensors whose targets are kernel closures: the loaded module builds its own.
        return {"notes": self.notes, "enabled": self.enabled, "_key": None, "_direct": None,
                "_proven": False}

    @staticmethod
    def applies(args: tuple, kwargs: dict) -> bool:
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return False
        if not kwargs and all(type(t) is torch.Tensor for t in args):  # the common call
            return all(t.device.type == "cpu" for t in args)
        leaves = pytree.tree_leaves((args, kwargs))
        return all(not isinstance(t, torch.Tensor) or
                   (t.device.type == "cpu" and type(t) is torch.Tensor) for t in leaves)

    def _twin(self, gm: fx.GraphModule) -> fx.GraphModule | None:
        # fxopt.weights_written() (a write PyTorch does not version) rebuilds it: new bindings
        key = (id(gm), id(gm.graph), gm.code, _attrs(gm), epoch())
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
