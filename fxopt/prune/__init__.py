"""The pruning library: the channel dependency analysis, importance criteria, ``PruneConfig``.

The analysis is kept apart from the pruning actions (the ``prune_channels`` pass in
``fxopt.passes.prune`` slices the weights); both ends are tables users extend::

    from fxopt.prune import register_channel_rule, register_importance

    @register_channel_rule(my_ops.fast_gelu)     # channels pass through this op
    def fast_gelu_rule(walk, node):
        walk.set(node, walk.layout(node.args[0]))

    @register_importance("filter_l1")            # score units by their filters only
    def filter_l1(ctx):
        total, count = ctx.magnitude(roles=("weight",), p=1)
        return total / np.maximum(count, 1)

Modules, lowest first: ``records`` (layouts, spaces, groups: plain values), ``nodes``
(reading fx nodes), ``walk`` (``ChannelWalk``: the walk state and the API rules use),
``attention`` (opens ``nn.MultiheadAttention`` leaves into layers the rules know),
``rule_table`` (the rows and ``register_channel_rule``), the rule rows by what they do
(``rules_elementwise``: unary, n-ary, spatial, reductions; ``rules_shapes``: reshapes,
permutes, cat/split, indexing; ``rules_layers``: conv, linear, norms), ``channels`` (units,
groups, ``channel_groups``), ``importance`` (the criteria registry), ``config``.
"""
from fxopt.prune.channels import ChannelAnalysis, ChannelGraph, analyze_channels, channel_groups
from fxopt.prune.config import PruneConfig
from fxopt.prune.importance import (IMPORTANCE, ImportanceContext, register_importance,
                                    unit_scores)
from fxopt.prune.records import FREE, ChannelGroup, Layout, Rewrite
from fxopt.prune.rule_table import CHANNEL_RULES, ChannelRuleTable, register_channel_rule
from fxopt.prune.walk import ChannelWalk, Unsupported

__all__ = ["ChannelAnalysis", "ChannelGraph", "ChannelGroup", "analyze_channels",
           "channel_groups", "PruneConfig", "IMPORTANCE", "ImportanceContext",
           "register_importance", "unit_scores", "Layout", "FREE", "Rewrite", "CHANNEL_RULES",
           "ChannelRuleTable", "register_channel_rule", "ChannelWalk", "Unsupported"]
