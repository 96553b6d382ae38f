"""``remove_noops``: computations that hand back their input, removed by one table of rules.

Each row of ``RULES`` is one no-op, written as a rule of the shared rewrite engine
(``fxopt.infra.rewrite``): its name, the calls it looks at, the check that proves the call a
no-op here, what stands for it afterwards, and a line of doc. Most rows are one-op rows
(``op_rule``) replaced by their input; two rows match a pair of calls (a permute and its
inverse; a reshape of a reshape). The pass applies the table until nothing fires and reports how
often each row fired (``stats["mul_one"] == 2``). Adding a no-op is adding a row.

    >>> gm.code                                 # before
    y = torch.nn.functional.dropout(x, p=0.1, training=False, inplace=False)
    z = y * 1;  p = z.permute(1, 0);  q = p.permute(1, 0);  return q
    >>> remove_noops(gm, ctx).stats
    {'dropout_function': 1, 'mul_one': 1, 'inverse_permute': 1, 'total': 3}
    >>> gm.code                                 # after
    return x

Shapes follow the batch convention of the whole project: dim 0 may change size between calls,
so a reshape is an identity only when it is one for every batch size (``reshape(x, (-1, 4))``
of an ``(N, 4)`` tensor, not ``reshape(x, (2, 4))``), and a ``contiguous()`` goes only when the
recorded strides prove it for every batch size. No rule touches a value that something writes
into in place (``purity.MutationInfo``, rebuilt before every sweep since rewrites change what
aliases what): bypassing it could change what a later read sees.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from fxopt.infra.registry import PassContext, PassResult, register_pass
from fxopt.infra.rewrite import Builder, Match, RewriteResult, Rule, apply_rules, op, op_rule
from fxopt.ir.canonical import is_size_of
from fxopt.ir.graph import get_attr_value, permutation_of, tensor_meta
from fxopt.ir.purity import DROPOUT_FUNCTIONS, MutationInfo, literal_flag, training_flag

__all__ = ["NoopContext", "RULES", "remove_noops", "apply_noop_rules"]

try:  # torchvision is optional
    from torchvision.ops import StochasticDepth, stochastic_depth
except ImportError:  # pragma: no cover
    StochasticDepth = stochastic_depth = None


@dataclass
class NoopContext:
    """What the rows read besides the node (``m.context``): whether the example batch is 1, and
    which values something writes into in place (``refresh`` rebuilds it before every sweep)."""

    batch_is_one: bool
    mutation: MutationInfo | None = None

    def refresh(self, gm: fx.GraphModule) -> None:
        self.mutation = MutationInfo(gm.graph)

    def written_in_place(self, node: fx.Node) -> bool:
        """The node's value or an input of it may be written in place: its value depends on
        when it is read, so it is never bypassed."""
        if self.mutation is None:
            raise RuntimeError("NoopContext.refresh(gm) must run before the first sweep")
        return self.mutation.touches(node)


def _batch_is_one(example_inputs: tuple) -> bool:
    sizes = [x.shape[0] for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() > 0]
    return not sizes or min(sizes) <= 1


# -- helpers the checks share -------------------------------------------------------------------
def _input(m: Match, b: Builder) -> fx.Node:
    return m.root.args[0]


def _first_is_node(node: fx.Node) -> bool:
    return bool(node.args) and isinstance(node.args[0], fx.Node)


def _single_input(node: fx.Node) -> bool:
    return len(node.args) == 1 and not node.kwargs and _first_is_node(node)


def _module_of(m: Match) -> nn.Module:
    return get_attr_value(m.gm, m.root.target)  # the pattern found it, of an exact type


def _is_number(a: Any, value: float) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool) and a == value


def _is_int(a: Any, value: int | None = None) -> bool:
    return isinstance(a, int) and not isinstance(a, bool) and (value is None or a == value)


def _same_shape(x: fx.Node, node: fx.Node) -> bool:
    tx, tn = tensor_meta(x), tensor_meta(node)
    return tx is not None and tn is not None and tuple(tx.shape) == tuple(tn.shape)


def _same_layout(a: Any, node: fx.Node) -> bool:
    """``a`` has the node's shape, dtype and strides: no broadcast, promotion or relayout."""
    ta, tn = tensor_meta(a), tensor_meta(node)
    return ta is not None and tn is not None and tuple(ta.shape) == tuple(tn.shape) \
        and ta.dtype == tn.dtype and tuple(ta.stride) == tuple(tn.stride)


# -- dropout and identity -----------------------------------------------------------------------
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                    nn.FeatureAlphaDropout)


def _eval_dropout_module(m: Match) -> bool:
    return _single_input(m.root) and not _module_of(m).training


def _dropout_not_training(m: Match) -> bool:
    # training_flag knows each function's default: F.dropout trains unless told otherwise,
    # F.alpha_dropout does not, torch.dropout has no default.
    return _first_is_node(m.root) and training_flag(m.root) is False


def _stochastic_depth_off(m: Match) -> bool:
    node = m.root
    if node.op == "call_module":
        mod = _module_of(m)
        return _single_input(node) and (not mod.training or mod.p == 0.0)
    if not _first_is_node(node):
        return False
    p = literal_flag(node, 1, "p", None)
    mode = literal_flag(node, 2, "mode", None)
    training = literal_flag(node, 3, "training", True)
    # It validates p and mode before returning its input: keep the error for bad values.
    return isinstance(p, (int, float)) and 0.0 <= p <= 1.0 and mode in ("batch", "row") and (
        training is False or p == 0.0)


def _identity_module(m: Match) -> bool:
    return _single_input(m.root)


# -- arithmetic identities ----------------------------------------------------------------------
_MUL = (operator.mul, torch.mul, "mul")
_ADD = (operator.add, torch.add, "add")
_SUB = (operator.sub, torch.sub, "sub")
_DIV = (operator.truediv, torch.div, torch.true_divide, "div", "true_divide")


def _operand_kept(value: float, *, commutes: bool):
    """A check for ``x op value`` (and ``value op x`` when the op commutes) that leaves x as it
    is; ``m.data["x"]`` is x."""

    def check(m: Match) -> bool:
        node = m.root
        if node.kwargs or len(node.args) != 2:
            return False  # alpha=, rounding_mode=: not a plain identity
        a, b = node.args
        if isinstance(a, fx.Node) and _is_number(b, value):
            x = a
        elif commutes and node.op == "call_function" and isinstance(b, fx.Node) \
                and _is_number(a, value):
            x = b  # 1 * x; the method form has no such spelling
        else:
            return False
        m.data["x"] = x
        return _same_layout(x, node)

    return check


def _kept_operand(m: Match, b: Builder) -> fx.Node:
    return m.data["x"]


# -- shapes -------------------------------------------------------------------------------------
_RESHAPES = (torch.reshape, "view", "reshape")
_FLATTENS = (torch.flatten, "flatten")
_PERMUTES = (torch.permute, torch.transpose, torch.t, "permute", "transpose", "t")


def _reshape_parts(node: fx.Node) -> tuple[fx.Node, tuple] | None:
    """(x, spec) for ``torch.reshape(x, spec)`` and ``x.view/reshape(spec or *spec)``."""
    if node.kwargs or len(node.args) < 2 or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_function" and node.target is torch.reshape and len(node.args) == 2:
        spec = node.args[1]
    elif node.op == "call_method" and node.target in ("view", "reshape"):
        spec = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) \
            else node.args[1:]
    else:
        return None
    if not isinstance(spec, (tuple, list)) or any(isinstance(s, torch.dtype) for s in spec):
        return None  # view(dtype) reinterprets bits
    return node.args[0], tuple(spec)


def _flatten_parts(node: fx.Node) -> tuple[fx.Node, int, int] | None:
    """(x, start, end) with non-negative dims for ``torch.flatten`` and ``x.flatten``."""
    is_flatten = (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten")
    if not is_flatten or not _first_is_node(node) or tensor_meta(node.args[0]) is None:
        return None
    start = literal_flag(node, 1, "start_dim", 0)
    end = literal_flag(node, 2, "end_dim", -1)
    if not isinstance(start, int) or not isinstance(end, int):
        return None
    nd = max(len(tensor_meta(node.args[0]).shape), 1)
    return node.args[0], start % nd, end % nd


def _reshape_to_same_shape(m: Match) -> bool:
    node = m.root
    parts = _reshape_parts(node)
    if parts is None or not _same_shape(parts[0], node):
        return False
    x, spec = parts
    shape = tuple(tensor_meta(x).shape)
    if len(spec) != len(shape):
        return False
    if not spec:
        return True  # 0-d to 0-d
    # Dim 0 is the batch: only -1 or x.size(0) follow it whatever its size.
    first_free = _is_int(spec[0], -1)
    if not (first_free or is_size_of(spec[0], x, 0)):
        return False
    free = [i for i, s in enumerate(spec[1:], 1) if _is_int(s, -1)]
    for i, s in enumerate(spec[1:], 1):
        if (_is_int(s) and s == shape[i]) or is_size_of(s, x, i):
            continue
        if i in free and not first_free and len(free) == 1:
            continue  # the one -1 beside x.size(0): it must be shape[i] again
        return False
    return True


def _flatten_of_one_dim(m: Match) -> bool:
    parts = _flatten_parts(m.root)
    # flatten(x, k, k) keeps every dim; start < end always removes at least one.
    return parts is not None and parts[1] == parts[2] and len(tensor_meta(parts[0]).shape) >= 1 \
        and _same_shape(parts[0], m.root)


def _contiguous_for_any_batch(tm, batch_is_one: bool) -> bool:
    """Row-major strides that stay row-major whatever the batch size.

    Strides of size-1 dims do not matter for contiguity. When the example batch is 1, a size-1
    dim may be the batch itself, and then the strides for a bigger batch are not known
    (``w.expand(n, 5)`` is contiguous for n=1 only): refuse any size-1 dim.
    """
    expected = 1
    for size, stride in zip(reversed(tm.shape), reversed(tm.stride)):
        if size == 1 and batch_is_one:
            return False
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _already_contiguous(m: Match) -> bool:
    node = m.root
    if len(node.args) != 1 or not _first_is_node(node):
        return False
    if set(node.kwargs) - {"memory_format"} or node.kwargs.get(
            "memory_format", torch.contiguous_format) is not torch.contiguous_format:
        return False
    tm = tensor_meta(node.args[0])
    return tm is not None and _contiguous_for_any_batch(tm, m.context.batch_is_one)


def _permutes_cancel(m: Match) -> bool:
    outer, inner = permutation_of(m.root), permutation_of(m.nodes["inner"])
    if outer is None or inner is None:
        return False
    p, q = inner[1], outer[1]
    # out[i] = mid[q[i]] = x[p[q[i]]]: the identity when p[q[i]] == i for every i.
    return len(p) == len(q) and all(p[q[i]] == i for i in range(len(q))) \
        and _same_shape(inner[0], m.root)


def _x(m: Match, b: Builder) -> fx.Node:
    return m["x"]


def _reshape_of_reshape(m: Match) -> bool:
    # The pattern keeps the inner call to this one user: otherwise its shape is still needed
    # (or its size() is read) and merging would not remove it.
    inner = m.nodes["inner"]
    return _reshape_parts(m.root) is not None and (
        _reshape_parts(inner) is not None or _flatten_parts(inner) is not None)


def _one_reshape(m: Match, b: Builder) -> fx.Node:
    # Reshapes keep row-major element order, so reshape(reshape(x, a), b) == reshape(x, b).
    _, spec = _reshape_parts(m.root)
    return b.call_function(torch.reshape, (m["x"], spec))


_permute, _inner_permute = op("permute", *_PERMUTES), op("inner", *_PERMUTES)
_reshape, _inner_reshape = op("reshape", *_RESHAPES), op("inner", *_RESHAPES, *_FLATTENS)

# -- the table: one row per no-op ---------------------------------------------------------------
RULES: list[Rule] = [
    op_rule("dropout_module", _DROPOUT_MODULES, _input, _eval_dropout_module,
            doc="nn.Dropout* / AlphaDropout module in eval mode"),
    op_rule("dropout_function", tuple(DROPOUT_FUNCTIONS), _input, _dropout_not_training,
            doc="F.dropout* / torch.dropout with training=False"),
    *([op_rule("stochastic_depth", (StochasticDepth, stochastic_depth), _input,
               _stochastic_depth_off,
               doc="torchvision stochastic_depth with training=False or p=0")]
      if stochastic_depth is not None else []),  # torchvision is optional
    op_rule("identity_module", (nn.Identity,), _input, _identity_module, doc="nn.Identity"),
    op_rule("mul_one", _MUL, _kept_operand, _operand_kept(1, commutes=True),
            doc="x * 1, 1 * x"),
    op_rule("add_zero", _ADD, _kept_operand, _operand_kept(0, commutes=True),
            doc="x + 0, 0 + x (a -0.0 stays -0.0)"),
    op_rule("sub_zero", _SUB, _kept_operand, _operand_kept(0, commutes=False), doc="x - 0"),
    op_rule("div_one", _DIV, _kept_operand, _operand_kept(1, commutes=False), doc="x / 1"),
    op_rule("reshape_identity", _RESHAPES, _input, _reshape_to_same_shape,
            doc="reshape/view to the same shape, for every batch size"),
    op_rule("flatten_identity", _FLATTENS, _input, _flatten_of_one_dim, doc="flatten(x, k, k)"),
    op_rule("contiguous", ("contiguous",), _input, _already_contiguous,
            doc="contiguous() of a contiguous tensor"),
    # The inner permute may have other users: it stays for them, the outer one goes.
    Rule("inverse_permute", lambda x: _permute(_inner_permute(x)), _x, _permutes_cancel,
         allow_external_users=True, doc="permute/transpose/t followed by its inverse"),
    Rule("reshape_chain", lambda x: _reshape(_inner_reshape(x)), _one_reshape,
         _reshape_of_reshape,
         doc="reshape(reshape(x, a), b) or reshape(flatten(x), b) -> reshape(x, b)"),
]


def apply_noop_rules(gm: fx.GraphModule, rules: list[Rule],
                     example_inputs: tuple = ()) -> RewriteResult:
    """Apply ``rules`` (``RULES``, or rows of your own) the way ``remove_noops`` does: until none
    fires, never at a value written in place, with ``m.context`` a ``NoopContext``."""
    state = NoopContext(batch_is_one=_batch_is_one(example_inputs))
    # Every row removes a node, so the sweeps end; the bound only guards a row that does not.
    return apply_rules(gm, rules, max_sweeps=len(gm.graph.nodes) + 1, context=state,
                       skip=state.written_in_place, before_sweep=state.refresh)


@register_pass("remove_noops", reference="exact")
def remove_noops(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Remove no-ops: eval dropout, identities, x*1 and x+0, same-shape reshapes, inverse permutes.

    The rules are the table ``RULES`` in ``fxopt.passes.cleanup.noops``; stats count each rule's
    hits, in table order.
    """
    result = apply_noop_rules(gm, RULES, ctx.example_inputs)
    stats = {r.name: result.counts[r.name] for r in RULES if r.name in result.counts}
    stats["total"] = result.count
    return PassResult(gm, modified=result.count > 0, stats=stats, notes=list(result.notes))
