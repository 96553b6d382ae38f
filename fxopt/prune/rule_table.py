"""The channel rule table: which rule the walk applies to each call, and how users add one.

A row maps what a node calls to a rule ``fn(walk, node)`` (see ``fxopt.prune.walk`` for what a
rule may do). A row is keyed by one of:

- a function (``torch.cat``, ``F.conv2d``, ``operator.add``): ``call_function`` nodes;
- a method name (``"view"``, ``"add"``): ``call_method`` nodes (``x.view(...)``);
- an ``nn.Module`` subclass: ``call_module`` nodes of that class or a subclass (the most
  specific registered class wins, as ``isinstance`` would find it).

The built-in rows are the op families of ``rules_elementwise`` (unary, n-ary, spatial,
reductions), ``rules_shapes`` (reshapes, permutes, cat/split, indexing) and ``rules_layers``
(conv, linear, norms). A call with no row falls under the safety rule: every unit that reaches
it is frozen. Adding an op is one row::

    import fxopt
    from fxopt.prune import register_channel_rule

    @register_channel_rule(my_ops.fast_gelu)          # elementwise: channels pass through
    def fast_gelu_rule(walk, node):
        walk.set(node, walk.layout(node.args[0]))

    @register_channel_rule(MyScale)                   # a leaf module with one weight per channel
    def my_scale_rule(walk, node):
        _mod, x = walk.module_call(node)              # the module and its one input
        lay = walk.layout(x)
        if not lay.free and lay.pdim == 1:            # the weight shrinks with the channels
            walk.param(f"{node.target}.weight", 0, lay.vec, "bn_weight", node.target)
        walk.set(node, lay)

    fxopt.channel_groups(model, x)                    # the groups through them are prunable now

A function or method rule runs only for nodes that produce a tensor (or a tuple of tensors):
sizes and other python values are recomputed from the pruned shapes at run time.
``any_value=True`` runs it for every value (``operator.getitem`` reads tuples and sizes too);
module rules run for every call. Registering a target that already has a row is an error
unless ``override=True``; ``CHANNEL_RULES.remove(target)`` takes a row out again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch.fx as fx
import torch.nn as nn

__all__ = ["ChannelRule", "ChannelRuleTable", "CHANNEL_RULES", "register_channel_rule"]

RuleFn = Callable[[Any, fx.Node], None]  # fn(walk: ChannelWalk, node)


@dataclass(frozen=True)
class ChannelRule:
    """One row: the rule ``fn`` for ``target``."""

    target: Any  # a function, a Tensor method name, or an nn.Module subclass
    fn: RuleFn
    any_value: bool = False  # run for non-tensor values too (getitem)

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


def _is_module_type(target: Any) -> bool:
    return isinstance(target, type) and issubclass(target, nn.Module)


class ChannelRuleTable:
    """Rows keyed by function, method name and module type (see the module doc)."""

    def __init__(self):
        self.functions: dict[Any, ChannelRule] = {}
        self.methods: dict[str, ChannelRule] = {}
        self.modules: dict[type, ChannelRule] = {}

    def _column(self, target: Any) -> dict:
        if isinstance(target, str):
            return self.methods
        if _is_module_type(target):
            return self.modules
        if callable(target):
            return self.functions
        raise TypeError(f"a channel rule is keyed by a function, a Tensor method name or an "
                        f"nn.Module subclass, got {target!r}")

    def register(self, targets, fn: RuleFn, *, any_value: bool = False,
                 override: bool = False) -> None:
        """One row per target of ``targets``, all with the rule ``fn``."""
        if not callable(fn):
            raise TypeError(f"a channel rule must be a function fn(walk, node), got {fn!r}")
        for target in targets:
            column = self._column(target)
            if target in column and not override:
                raise ValueError(f"{target!r} already has the channel rule "
                                 f"{column[target].name}; pass override=True to replace it")
        for target in targets:
            self._column(target)[target] = ChannelRule(target, fn, any_value)

    def remove(self, *targets) -> None:
        for target in targets:
            self._column(target).pop(target, None)

    def lookup(self, node: fx.Node, module: nn.Module | None = None) -> ChannelRule | None:
        """The row for a call node (``module``: the module a ``call_module`` node calls)."""
        if node.op == "call_function":
            return self.functions.get(node.target)
        if node.op == "call_method":
            return self.methods.get(node.target)
        if node.op == "call_module" and module is not None:
            for cls in type(module).__mro__:  # the most specific registered class
                rule = self.modules.get(cls)
                if rule is not None:
                    return rule
        return None

    def __contains__(self, target: Any) -> bool:
        try:
            return target in self._column(target)
        except TypeError:
            return False

    def __iter__(self) -> Iterator[ChannelRule]:
        yield from self.functions.values()
        yield from self.methods.values()
        yield from self.modules.values()

    def __len__(self) -> int:
        return len(self.functions) + len(self.methods) + len(self.modules)


# The table the analysis uses; the rule modules fill it when ``fxopt.prune`` is imported.
CHANNEL_RULES = ChannelRuleTable()


def register_channel_rule(*targets, any_value: bool = False, override: bool = False,
                          table: ChannelRuleTable = CHANNEL_RULES):
    """Decorator: ``fn(walk, node)`` is the channel rule of ``targets`` (see the module doc)."""
    if not targets:
        raise TypeError("register_channel_rule needs at least one target")

    def deco(fn: RuleFn) -> RuleFn:
        table.register(targets, fn, any_value=any_value, override=override)
        return fn

    return deco
