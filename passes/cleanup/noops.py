"""``remove_noops``: small node-local rewrites declared as data, one table row per rule.

A rule is a name, a ``match(node, env)`` predicate and a ``replace(node, env)`` function that
returns the node now standing for the matched one (usually its input; a rule may build a new
node). The pass applies the rules, in table order, to every node until none fires, and reports
how often each fired (``stats["mul_one"] == 2``). Adding a rule is adding a row to ``RULES``.

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
into in place (``purity.MutationInfo``): bypassing it could change what a later read sees.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from fxopt.infra.registry import PassContext, PassResult, register_pass
from fxopt.ir.canonical import is_size_of
from fxopt.ir.graph import (
    copy_meta,
    get_attr_value,
    remove_unused_attributes,
    set_provenance,
    tensor_meta,
)
from fxopt.ir.purity import (
    DROPOUT_FUNCTIONS,
    MutationInfo,
    erase_dead,
    literal_flag,
    node_inputs,
    training_flag,
)

__all__ = ["NoopRule", "RuleEnv", "RULES", "remove_noops", "apply_rules"]

try:  # torchvision is optional
    from torchvision.ops import StochasticDepth, stochastic_depth
except ImportError:  # pragma: no cover
    StochasticDepth = stochastic_depth = None


@dataclass
class RuleEnv:
    """What rules may look at besides the node: the module, the inputs' batch size, aliasing."""

    gm: fx.GraphModule
    batch_is_one: bool
    mutation: MutationInfo

    def module(self, node: fx.Node) -> nn.Module | None:
        if node.op != "call_module":
            return None
        try:
            return get_attr_value(self.gm, node.target)
        except AttributeError:
            return None


@dataclass(frozen=True)
class NoopRule:
    """One row of the table: ``replace`` runs only where ``match`` holds."""

    name: str
    match: Callable[[fx.Node, RuleEnv], bool]
    replace: Callable[[fx.Node, RuleEnv], fx.Node]
    doc: str = ""


def _input(node: fx.Node, env: RuleEnv) -> fx.Node:
    return node.args[0]


def _first_is_node(node: fx.Node) -> bool:
    return bool(node.args) and isinstance(node.args[0], fx.Node)


# -- dropout and identity ---------------------------------------------------------------------
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                    nn.FeatureAlphaDropout)


def _single_input_module(node: fx.Node, env: RuleEnv, types: tuple) -> bool:
    mod = env.module(node)
    # Exact types: a subclass may override forward.
    return mod is not None and type(mod) in types and len(node.args) == 1 \
        and not node.kwargs and _first_is_node(node)


def _match_dropout_module(node, env):
    return _single_input_module(node, env, _DROPOUT_MODULES) and not env.module(node).training


def _match_dropout_function(node, env):
    # training_flag knows each function's default: F.dropout trains unless told otherwise,
    # F.alpha_dropout does not, torch.dropout has no default.
    return node.op == "call_function" and node.target in DROPOUT_FUNCTIONS \
        and _first_is_node(node) and training_flag(node) is False


def _match_stochastic_depth(node, env):
    if stochastic_depth is None:
        return False
    if node.op == "call_module":
        return _single_input_module(node, env, (StochasticDepth,)) and (
            not env.module(node).training or env.module(node).p == 0.0)
    if node.op != "call_function" or node.target is not stochastic_depth \
            or not _first_is_node(node):
        return False
    p = literal_flag(node, 1, "p", None)
    mode = literal_flag(node, 2, "mode", None)
    training = literal_flag(node, 3, "training", True)
    # It validates p and mode before returning its input: keep the error for bad values.
    return isinstance(p, (int, float)) and 0.0 <= p <= 1.0 and mode in ("batch", "row") and (
        training is False or p == 0.0)


def _match_identity_module(node, env):
    return _single_input_module(node, env, (nn.Identity,))


# -- arithmetic identities ----------------------------------------------------------------------
_MUL = ({operator.mul, torch.mul}, {"mul"})
_ADD = ({operator.add, torch.add}, {"add"})
_SUB = ({operator.sub, torch.sub}, {"sub"})
_DIV = ({operator.truediv, torch.div, torch.true_divide}, {"div", "true_divide"})


def _is_number(a: Any, value: float) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool) and a == value


def _same_layout(a: Any, node: fx.Node) -> bool:
    """``a`` has the node's shape, dtype and strides: no broadcast, promotion or relayout."""
    ta, tn = tensor_meta(a), tensor_meta(node)
    return ta is not None and tn is not None and tuple(ta.shape) == tuple(tn.shape) \
        and ta.dtype == tn.dtype and tuple(ta.stride) == tuple(tn.stride)


def _binary_identity(ops: tuple[set, set], value: float, commutes: bool):
    """Match ``x op value`` (and ``value op x`` when the op commutes), returning x."""
    functions, methods = ops

    def operand(node: fx.Node):
        if node.kwargs or len(node.args) != 2:
            return None  # alpha=, rounding_mode=: not a plain identity
        if not ((node.op == "call_function" and node.target in functions)
                or (node.op == "call_method" and node.target in methods)):
            return None
        a, b = node.args
        if isinstance(a, fx.Node) and _is_number(b, value):
            return a
        if commutes and node.op == "call_function" and isinstance(b, fx.Node) \
                and _is_number(a, value):
            return b
        return None

    def match(node, env):
        x = operand(node)
        return x is not None and _same_layout(x, node)

    return match, lambda node, env: operand(node)


_mul_one = _binary_identity(_MUL, 1, commutes=True)
_add_zero = _binary_identity(_ADD, 0, commutes=True)
_sub_zero = _binary_identity(_SUB, 0, commutes=False)
_div_one = _binary_identity(_DIV, 1, commutes=False)


# -- shapes -------------------------------------------------------------------------------------
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


def _is_int(a: Any, value: int | None = None) -> bool:
    return isinstance(a, int) and not isinstance(a, bool) and (value is None or a == value)


def _match_reshape_identity(node, env):
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


def _same_shape(x: fx.Node, node: fx.Node) -> bool:
    tx, tn = tensor_meta(x), tensor_meta(node)
    return tx is not None and tn is not None and tuple(tx.shape) == tuple(tn.shape)


def _match_flatten_identity(node, env):
    parts = _flatten_parts(node)
    # flatten(x, k, k) keeps every dim; start < end always removes at least one.
    return parts is not None and parts[1] == parts[2] and len(tensor_meta(parts[0]).shape) >= 1 \
        and _same_shape(parts[0], node)


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


def _match_contiguous(node, env):
    if node.op != "call_method" or node.target != "contiguous" or len(node.args) != 1 \
            or not _first_is_node(node):
        return False
    if set(node.kwargs) - {"memory_format"} or node.kwargs.get(
            "memory_format", torch.contiguous_format) is not torch.contiguous_format:
        return False
    tm = tensor_meta(node.args[0])
    return tm is not None and _contiguous_for_any_batch(tm, env.batch_is_one)


def _permutation(node: fx.Node) -> tuple[fx.Node, list[int]] | None:
    """(x, p) when the node is ``x.permute(p)``, a transpose or ``t()`` of a tensor x."""
    if not _first_is_node(node) or node.kwargs or tensor_meta(node.args[0]) is None:
        return None
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function" and node.target in (torch.permute, torch.transpose, torch.t):
        name = node.target.__name__
    else:
        return None
    x, rest = node.args[0], node.args[1:]
    nd = len(tensor_meta(x).shape)
    if name == "permute":
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        if len(dims) != nd or not all(_is_int(d) for d in dims):
            return None
        perm = [d % nd for d in dims]
        return (x, perm) if sorted(perm) == list(range(nd)) else None
    if name in ("transpose", "t"):
        if name == "t":
            if nd > 2 or rest:
                return None
            a, b = (0, 1) if nd == 2 else (0, 0)
        elif len(rest) == 2 and all(_is_int(d) for d in rest) and nd > 0:
            a, b = rest[0] % nd, rest[1] % nd
        else:
            return None
        perm = list(range(nd))
        perm[a], perm[b] = perm[b], perm[a]
        return x, perm
    return None


def _match_inverse_permute(node, env):
    outer = _permutation(node)
    if outer is None:
        return False
    inner = _permutation(outer[0])
    if inner is None:
        return False
    p, q = inner[1], outer[1]
    # out[i] = mid[q[i]] = x[p[q[i]]]: the identity when p[q[i]] == i for every i.
    return len(p) == len(q) and all(p[q[i]] == i for i in range(len(q))) \
        and _same_shape(inner[0], node)


def _replace_inverse_permute(node, env):
    return _permutation(_permutation(node)[0])[0]


def _match_reshape_chain(node, env):
    parts = _reshape_parts(node)
    if parts is None:
        return False
    inner = parts[0]
    if len(inner.users) != 1:
        return False  # the inner shape is still needed (or its size() is read)
    return _reshape_parts(inner) is not None or _flatten_parts(inner) is not None


def _replace_reshape_chain(node, env):
    inner, spec = _reshape_parts(node)
    x = inner.args[0]
    # Reshapes keep row-major element order, so reshape(reshape(x, a), b) == reshape(x, b).
    with env.gm.graph.inserting_before(node):
        new = env.gm.graph.call_function(torch.reshape, (x, spec))
    copy_meta(new, node)
    set_provenance(new, [inner, node])
    return new


RULES: list[NoopRule] = [
    NoopRule("dropout_module", _match_dropout_module, _input,
             "nn.Dropout* / AlphaDropout module in eval mode"),
    NoopRule("dropout_function", _match_dropout_function, _input,
             "F.dropout* / torch.dropout with training=False"),
    NoopRule("stochastic_depth", _match_stochastic_depth, _input,
             "torchvision stochastic_depth with training=False or p=0"),
    NoopRule("identity_module", _match_identity_module, _input, "nn.Identity"),
    NoopRule("mul_one", _mul_one[0], _mul_one[1], "x * 1, 1 * x"),
    NoopRule("add_zero", _add_zero[0], _add_zero[1], "x + 0, 0 + x (a -0.0 stays -0.0)"),
    NoopRule("sub_zero", _sub_zero[0], _sub_zero[1], "x - 0"),
    NoopRule("div_one", _div_one[0], _div_one[1], "x / 1"),
    NoopRule("reshape_identity", _match_reshape_identity, _input,
             "reshape/view to the same shape, for every batch size"),
    NoopRule("flatten_identity", _match_flatten_identity, _input, "flatten(x, k, k)"),
    NoopRule("contiguous", _match_contiguous, _input, "contiguous() of a contiguous tensor"),
    NoopRule("inverse_permute", _match_inverse_permute, _replace_inverse_permute,
             "permute/transpose/t followed by its inverse"),
    NoopRule("reshape_chain", _match_reshape_chain, _replace_reshape_chain,
             "reshape(reshape(x, a), b) or reshape(flatten(x), b) -> reshape(x, b)"),
]

def _batch_is_one(example_inputs: tuple) -> bool:
    sizes = [x.shape[0] for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() > 0]
    return not sizes or min(sizes) <= 1


def apply_rules(gm: fx.GraphModule, rules: list[NoopRule],
                example_inputs: tuple = ()) -> dict[str, int]:
    """Apply ``rules`` until none fires; returns how many times each rule fired.

    A rule must make progress: once replaced, a node no longer matches. The table's rules all
    remove a node, so the sweeps end; the bound only guards against a rule that does not.
    """
    graph = gm.graph
    fired = {r.name: 0 for r in rules}
    batch_is_one = _batch_is_one(example_inputs)
    for _ in range(len(graph.nodes) + 1):
        env = RuleEnv(gm, batch_is_one, MutationInfo(graph))
        changed = False
        for node in list(graph.nodes):
            if getattr(node, "_erased", False) or node.op in ("placeholder", "output", "get_attr"):
                continue
            if env.mutation.touches(node):
                continue  # its value depends on when it is read
            for rule in rules:
                if not rule.match(node, env):
                    continue
                new = rule.replace(node, env)
                if new is not node:
                    inputs = node_inputs(node)
                    node.replace_all_uses_with(new)
                    graph.erase_node(node)
                    erase_dead(graph, inputs)  # x.size(0) of a reshape spec, an inner reshape
                fired[rule.name] += 1
                changed = True
                break
        if not changed:
            break
    return fired


@register_pass("remove_noops", reference="exact")
def remove_noops(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Remove no-ops: eval dropout, identities, x*1 and x+0, same-shape reshapes, inverse permutes.

    The rules are the table ``RULES`` in ``fxopt.passes.noops``; stats count each rule's hits.
    """
    fired = apply_rules(gm, RULES, ctx.example_inputs)
    total = sum(fired.values())
    stats = {name: n for name, n in fired.items() if n}
    stats["total"] = total
    if total:
        remove_unused_attributes(gm)  # dropped nn.Identity / nn.Dropout submodules
        gm.recompile()
    return PassResult(gm, modified=total > 0, stats=stats)
