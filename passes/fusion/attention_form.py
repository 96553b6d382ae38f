"""Reading a hand-written attention off the graph: ``softmax(q @ k^T * s [+ mask]) @ v``.

``read_attention(node)`` starts at the second matmul (``p @ v``) and walks back through its
left operand; it returns an ``Attention`` (the nodes ``F.scaled_dot_product_attention`` reads
and the ones it replaces), ``None`` when the matmul is not attention at all (no softmax over a
``q @ k^T`` feeds it: nothing to say), or a string saying why an attention is left alone. The
grammar, outermost first, with the spellings each step accepts::

    o      = p @ v                       matmul: @, torch.matmul, Tensor.matmul, torch.bmm, aten
    p      = same(softmax(logits))       eval dropout (F.dropout(training=False), nn.Dropout,
                                         aten.dropout(train=False)), nn.Identity, contiguous(),
                                         .to(its own dtype); any number of them
    softmax                              F.softmax, torch.softmax, Tensor.softmax, nn.Softmax,
                                         aten.softmax / aten._softmax: over the last dim (-1 or
                                         its positive index), dtype None or the input's own
    logits = logits + mask | mask + logits | timm's maybe_add_mask(logits, mask) | scaled
    scaled = scaled * c | c * scaled | scaled / c | qk      c a Python number, or one the
                                         graph computes from sizes (``q.shape[-1] ** -0.5``)
    qk     = q' @ kt                     q' = q scaled by numbers (``q * s`` before the matmul)
    kt     = k^T scaled by numbers       k^T: transpose / swapaxes of the last two dims, .mT,
                                         a permute (its last two entries swapped gives k), or
                                         any other value (k is then ``kt.transpose(-2, -1)``)

Every node between ``qk`` and ``o`` must be read by the next one only (so the attention
probabilities are not read elsewhere, and nothing else sees the logits); readers that only
assert metadata (export's ``_assert_tensor_metadata``) are dropped with them, and timm's
``resolve_self_attn_mask(N, attn, mask, is_causal)``, which reads the logits for their dtype and
device only, reads ``q`` instead. The mask is added, never scaled: a mask added before the scale
is left alone, as is ``masked_fill``. Shapes must fit SDPA's contract: q ``[*B, L, E]``, k
``[*B, S, E]``, v ``[*B, S, Ev]`` of one floating dtype and one rank >= 3, the same batch dims
``*B`` (no broadcasting); a mask of that dtype that broadcasts to ``[*B, L, S]`` without growing
it (or timm's resolved mask, None unless the caller passes one: SDPA takes the same argument
timm's fused path gives it; added to another mask with timm's own ``maybe_add_mask``).

    >>> a = read_attention(gm.graph.find_nodes(op="call_function", target=operator.matmul)[-1])
    >>> constant_scale(a.scale), [m.name for m in a.masks]
    (0.125, ['rel_pos'])
"""
from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxopt.ir.graph import get_attr_value, tensor_meta
from fxopt.ir.purity import DROPOUT_FUNCTIONS, training_flag

__all__ = ["Attention", "Factor", "read_attention", "constant_scale", "MATMULS", "k_view_value"]

aten = torch.ops.aten
MATMULS = (operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm", aten.matmul.default,
           aten.bmm.default)
_SOFTMAX = {  # target -> its parameters after the input
    F.softmax: ("dim", "_stacklevel", "dtype"), torch.softmax: ("dim", "dtype"),
    "softmax": ("dim", "dtype"), aten.softmax.int: ("dim", "dtype"),
    aten._softmax.default: ("dim", "half_to_float"),
}
_MUL = (operator.mul, torch.mul, "mul", aten.mul.Tensor, aten.mul.Scalar)
_DIV = (operator.truediv, torch.div, torch.true_divide, "div", "true_divide", aten.div.Tensor,
        aten.div.Scalar)
_ADD = (operator.add, torch.add, "add", aten.add.Tensor)
_TRANSPOSE = (torch.transpose, torch.swapaxes, torch.swapdims, "transpose", "swapaxes",
              "swapdims", aten.transpose.int)
_PERMUTE = (torch.permute, "permute", aten.permute.default)
_ASSERT_META = getattr(aten, "_assert_tensor_metadata", None)
_ASSERT_META = getattr(_ASSERT_META, "default", None)


@dataclass(frozen=True)
class Factor:
    """One factor of the scale: ``value`` (a number, or a node computing one from sizes), or its
    inverse when ``divides``."""

    value: Any
    divides: bool = False


def constant_scale(factors: list[Factor]) -> float | None:
    """The scale as a float when every factor is a number (else None: nodes compute it)."""
    if any(isinstance(f.value, fx.Node) for f in factors):
        return None
    scale = 1.0
    for f in factors:
        scale = scale / float(f.value) if f.divides else scale * float(f.value)
    return scale


@dataclass
class Attention:
    """One attention: SDPA reads ``q``, k (``k`` viewed by ``k_view``), ``v``, the sum of
    ``masks`` and ``scale``; it stands for ``root``. ``chain``: the nodes from ``qk`` to the
    probabilities (all go); ``bypass``: eval dropouts with a training flag (aten's), which the
    engine would keep as draws; ``guards``: metadata asserts on chain nodes (dropped);
    ``rewire``: timm's mask resolvers reading ``qk`` (they read ``q`` after); ``scale``: the
    factors of the scale (``constant_scale``)."""

    root: fx.Node
    q: fx.Node
    k: fx.Node
    k_view: tuple | None  # None: k as it is; ("transpose",); ("permute", dims)
    v: fx.Node
    scale: list[Factor] = field(default_factory=list)
    masks: list[Any] = field(default_factory=list)  # fx.Node, or a value that may be None
    optional: dict = field(default_factory=dict)  # mask -> the maybe_add_mask that added it
    chain: list[fx.Node] = field(default_factory=list)
    bypass: list[fx.Node] = field(default_factory=list)
    guards: list[fx.Node] = field(default_factory=list)
    rewire: list[fx.Node] = field(default_factory=list)
    qk: fx.Node | None = None

    @property
    def inputs(self) -> list[fx.Node]:
        """The existing nodes whose values SDPA reads (for the numeric check)."""
        return [self.q, self.k, self.v] + [m for m in self.masks if isinstance(m, fx.Node)] \
            + [f.value for f in self.scale if isinstance(f.value, fx.Node)]


# -- spellings ----------------------------------------------------------------------------------
def _is(node: Any, targets) -> bool:
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") \
        and any(node.target is t or (isinstance(t, str) and node.op == "call_method"
                                     and node.target == t) for t in targets)


def _bound(node: fx.Node, names: tuple[str, ...]) -> dict[str, Any] | None:
    """The call's arguments after its input, by name (None: unexpected arguments)."""
    rest = node.args[1:]
    if len(rest) > len(names) or set(node.kwargs) - set(names):
        return None
    return {**dict(zip(names, rest)), **node.kwargs}


def _number(a: Any) -> bool:
    return isinstance(a, numbers.Real) and not isinstance(a, bool)


def _timm(node: Any, name: str) -> bool:
    """A call of timm's fx-wrapped attention helper ``name`` (matched by name: no timm import)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    fn = node.target
    return getattr(fn, "__name__", None) == name \
        and str(getattr(fn, "__module__", "")).startswith("timm.")


def _module(node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return get_attr_value(node.graph.owning_module, node.target)


def _same_value(node: fx.Node) -> bool:
    """An identity on the values in eval mode (see the module doc's ``same``)."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    mod = _module(node)
    if mod is not None:
        return len(node.args) == 1 and not node.kwargs and (
            type(mod) is nn.Identity
            or (isinstance(mod, nn.modules.dropout._DropoutNd) and not mod.training))
    if node.op == "call_function" and node.target in DROPOUT_FUNCTIONS:
        return training_flag(node) is False
    if node.target is aten.dropout.default:
        return len(node.args) == 3 and node.args[2] is False and not node.kwargs
    if _is(node, ("contiguous", aten.contiguous.default)):
        return len(node.args) == 1 and node.kwargs.get("memory_format", torch.contiguous_format) \
            is torch.contiguous_format
    if _is(node, ("to", aten.to.dtype)):
        tin = tensor_meta(node.args[0])
        rest = list(node.args[1:]) + list(node.kwargs.values())
        return tin is not None and any(isinstance(a, torch.dtype) for a in rest) and all(
            a == tin.dtype if isinstance(a, torch.dtype) else a in (None, False) for a in rest)
    return False


def _softmax_over_last(node: fx.Node) -> bool | str:
    """True for a softmax over the last dim in the input's dtype, a reason for another softmax,
    False for no softmax."""
    mod = _module(node)
    if isinstance(mod, nn.Softmax):
        dim, extra = mod.dim, {}
    elif node.op in ("call_function", "call_method") and any(
            _is(node, (t,)) for t in _SOFTMAX):
        key = next(t for t in _SOFTMAX if _is(node, (t,)))
        extra = _bound(node, _SOFTMAX[key])
        if extra is None:
            return "the softmax has unexpected arguments"
        dim = extra.pop("dim", None)
    else:
        return False
    x = node.args[0] if node.args else None
    tin = tensor_meta(x)
    if tin is None or not isinstance(dim, int) or isinstance(dim, bool):
        return "the softmax's dim is not a constant"
    if dim not in (-1, len(tin.shape) - 1):
        return f"the softmax is over dim {dim}, not the last"
    dtype = extra.get("dtype")
    if dtype is not None and dtype != tin.dtype or extra.get("half_to_float"):
        return f"the softmax computes in {dtype} (its input is {tin.dtype})"
    return True


def _value_readers(node: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """(readers of the values, metadata asserts)."""
    guards = [u for u in node.users if _ASSERT_META is not None and u.target is _ASSERT_META]
    return [u for u in node.users if u not in guards], guards


def _scalar(a: Any) -> bool:
    """A Python number, or a node that computes one (``q.shape[-1] ** -0.5``: the graph's
    arithmetic on sizes), never a tensor."""
    if isinstance(a, fx.Node):
        return a.meta.get("fxopt_nontensor") in ("int", "float") and tensor_meta(a) is None
    return _number(a)


def _scale_of(node: fx.Node) -> tuple[fx.Node, Factor] | None:
    """``(x, factor)`` for ``x * c``, ``c * x`` or ``x / c`` (c a scalar, see ``_scalar``)."""
    if node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if _is(node, _MUL):
        if isinstance(a, fx.Node) and tensor_meta(a) is not None and _scalar(b):
            return a, Factor(b)
        if isinstance(b, fx.Node) and tensor_meta(b) is not None and _scalar(a) \
                and node.op == "call_function":
            return b, Factor(a)
    if _is(node, _DIV) and isinstance(a, fx.Node) and tensor_meta(a) is not None \
            and _scalar(b) and not (_number(b) and b == 0):
        return a, Factor(b, divides=True)
    return None


def _peel_scales(node: fx.Node) -> tuple[fx.Node, list[Factor]]:
    """Strip ``* c`` / ``/ c`` read by one node only; returns the inner value and the factors
    stripped."""
    factors = []
    while isinstance(node, fx.Node) and len(node.users) == 1:
        got = _scale_of(node)
        if got is None:
            break
        node, f = got
        factors.append(f)
    return node, factors


def _last_two(dims: tuple, rank: int) -> bool:
    return rank >= 2 and all(isinstance(d, int) for d in dims) \
        and sorted(d % rank for d in dims) == [rank - 2, rank - 1]


def _k_of(kt: fx.Node) -> tuple[fx.Node, tuple | None]:
    """k (and how it is viewed) for the matmul's right operand ``kt`` (= k^T)."""
    tm = tensor_meta(kt)
    rank = len(tm.shape) if tm is not None else 0
    if _is(kt, _TRANSPOSE) and len(kt.args) == 3 and not kt.kwargs \
            and isinstance(kt.args[0], fx.Node) and _last_two(kt.args[1:], rank):
        return kt.args[0], None
    if kt.op == "call_function" and kt.target is getattr and kt.args[1:] == ("mT",):
        return kt.args[0], None
    if _is(kt, _PERMUTE) and isinstance(kt.args[0], fx.Node) and not kt.kwargs:
        dims = kt.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = tuple(dims[0])
        if len(dims) == rank and all(isinstance(d, int) for d in dims):
            dims = tuple(d % rank for d in dims)
            k_dims = dims[:-2] + (dims[-1], dims[-2])
            if k_dims == tuple(range(rank)):
                return kt.args[0], None
            return kt.args[0], ("permute", k_dims)
    return kt, ("transpose",)


def k_view_value(k: torch.Tensor, view: tuple | None) -> torch.Tensor:
    """The value SDPA reads as k from the value of ``Attention.k``."""
    if view is None:
        return k
    return k.transpose(-2, -1) if view[0] == "transpose" else k.permute(*view[1])


# -- the walk -----------------------------------------------------------------------------------
def _only_reader(node: fx.Node, reader: fx.Node, att: Attention) -> bool:
    readers, guards = _value_readers(node)
    att.guards += guards
    return readers == [reader]


def _logits(node: Any, reader: fx.Node, att: Attention) -> fx.Node | str | None:
    """Walk ``logits`` (module doc) down to ``qk``; fills ``att.masks``, ``att.scale`` and
    ``att.chain``. Returns the qk matmul, a reason, or None (no qk matmul here)."""
    if not isinstance(node, fx.Node):
        return None
    mask_pairs, why = [], None
    if _is(node, _ADD) and len(node.args) == 2 and not node.kwargs:
        mask_pairs = [(node.args[0], node.args[1]), (node.args[1], node.args[0])]
    elif _timm(node, "maybe_add_mask") and len(node.args) + len(node.kwargs) == 2:
        mask_pairs = [(node.args[0], node.args[1] if len(node.args) > 1
                       else node.kwargs.get("attn_mask"))]
    for inner, mask in mask_pairs:
        trial = Attention(att.root, att.root, att.root, None, att.root)
        found = _logits(inner, node, trial)
        if isinstance(found, fx.Node):
            if not _only_reader(node, reader, att):
                return "the logits are read elsewhere"
            att.scale += trial.scale
            att.masks += trial.masks + [mask]
            att.optional.update(trial.optional)
            if isinstance(mask, fx.Node) and not _is(node, _ADD):
                att.optional[mask] = node.target  # timm's: None at run time adds nothing
            att.chain += trial.chain + [node]
            att.guards += trial.guards
            att.rewire += trial.rewire
            return found
        why = why or found  # the other operand may still be the logits
    if mask_pairs:
        return why
    got = _scale_of(node) if isinstance(node, fx.Node) else None
    if got is not None:
        found = _logits(got[0], node, att)
        if isinstance(found, fx.Node):
            if att.masks:
                return "a mask is added before the scale"
            if not _only_reader(node, reader, att):
                return "the logits are read elsewhere"
            att.scale.append(got[1])
            att.chain.append(node)
        return found
    if not _is(node, MATMULS) or len(node.args) != 2 or node.kwargs:
        return None
    readers, guards = _value_readers(node)
    att.guards += guards
    resolvers = [u for u in readers if _timm(u, "resolve_self_attn_mask")
                 and len(u.args) > 1 and u.args[1] is node and node not in u.args[2:]
                 and node not in u.kwargs.values()]
    if [u for u in readers if u not in resolvers] != [reader]:
        return "the logits q @ k^T are read elsewhere"
    att.rewire += resolvers
    att.chain.append(node)
    return node


def read_attention(root: fx.Node) -> Attention | str | None:
    """The attention whose output is the matmul ``root`` (module doc), why not, or None."""
    if not _is(root, MATMULS) or len(root.args) != 2 or root.kwargs \
            or not all(isinstance(a, fx.Node) for a in root.args):
        return None
    p, v = root.args
    att = Attention(root, root, root, None, v)
    same, reader = [], root
    while isinstance(p, fx.Node) and _same_value(p):
        if not _only_reader(p, reader, att):
            return "the attention probabilities are read elsewhere"
        same.append(p)
        reader, p = p, p.args[0]
    soft = _softmax_over_last(p) if isinstance(p, fx.Node) else False
    if soft is False:
        return None
    found = _logits(p.args[0], p, att)
    if not isinstance(found, fx.Node):
        return found
    if soft is not True:
        return soft
    if not _only_reader(p, reader, att):
        return "the attention probabilities are read elsewhere"
    att.chain += [p] + same[::-1]
    att.bypass = [n for n in same if n.op == "call_function"
                  and n.target is aten.dropout.default]
    att.qk = found
    a, b = found.args
    att.q, on_q = _peel_scales(a)
    kt, on_kt = _peel_scales(b)
    k, att.k_view = _k_of(kt)
    on_k = _peel_scales(k)[1] if att.k_view is None else []
    if on_k:
        k = _peel_scales(k)[0]
    att.k, att.scale = k, on_q + on_kt + on_k + att.scale
    why = _shapes(att)
    return why if why is not None else att


def _shapes(att: Attention) -> str | None:
    """Why the shapes do not fit SDPA's contract (module doc), or None."""
    tq, tk, tv, ts = (tensor_meta(n) for n in (att.q, att.k, att.v, att.qk))
    if None in (tq, tk, tv, ts):
        return "shapes unknown"
    kshape = list(tk.shape)
    if att.k_view is not None:
        kshape = list(k_view_value(torch.empty(tk.shape, device="meta"), att.k_view).shape)
    q, k, v = list(tq.shape), kshape, list(tv.shape)
    if not (len(q) == len(k) == len(v) >= 3):
        return f"q, k, v have ranks {len(q)}, {len(k)}, {len(v)} (SDPA: one rank >= 3)"
    if not (q[:-2] == k[:-2] == v[:-2]):
        return f"q, k, v batch dims differ ({q[:-2]}, {k[:-2]}, {v[:-2]})"
    if q[-1] != k[-1] or k[-2] != v[-2]:
        return f"q {q}, k {k}, v {v} do not fit [*B, L, E], [*B, S, E], [*B, S, Ev]"
    dtypes = {tq.dtype, tk.dtype, tv.dtype, ts.dtype}
    if len(dtypes) != 1 or not tq.dtype.is_floating_point:
        return f"q, k, v dtypes {sorted(map(str, dtypes))}"
    scores = q[:-1] + [k[-2]]
    if len(att.optional) > 1:
        return "two masks that may be None (timm's maybe_add_mask)"
    for mask in att.masks:
        tm = tensor_meta(mask)
        if mask is None or (tm is None and mask in att.optional
                            and _timm(mask, "resolve_self_attn_mask")):
            continue  # None, or a float mask timm resolves at run time (None here)
        if tm is None:
            return "the added mask is not a tensor here (None, or of any dtype at run time)"
        if tm.dtype != tq.dtype:
            return f"the added mask is {tm.dtype}, the logits {tq.dtype}"
        try:
            grown = list(torch.broadcast_shapes(tuple(tm.shape), tuple(scores)))
        except RuntimeError:
            grown = None
        if grown != scores:
            return f"the added mask {list(tm.shape)} does not broadcast to {scores}"
    return None
