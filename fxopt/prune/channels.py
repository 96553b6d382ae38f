"""Channel dependency analysis: which channels of a captured model must be removed together.

Every tensor in the graph gets a *layout*: the dimension along which it may shrink (``pdim``)
and, for each index along it, a *slot* (an integer naming one channel of one producer). One walk
over the graph (``fxopt.prune.walk``) applies each node's rule from the rule table
(``fxopt.prune.rule_table``): a conv or linear layer creates fresh slots for its outputs;
BatchNorm, activations, pooling and dropout pass them on; ``add`` and channel-wise ``mul``
unite the slots of their operands (a union-find); ``cat`` concatenates them and
``split``/``chunk``/slicing cut them; reshapes and permutes move them (a flatten before a Linear
maps one channel to H*W input features); a grouped or depthwise conv unites its inputs and
outputs group by group, and a GroupNorm unites the channels of each of its groups, so a whole
group goes or stays. Union-find classes of slots are *units* (what pruning removes at once);
the producers that share units, found with ``networkx`` connected components, are *channel
groups* (this module).

An op with no rule freezes every unit that reaches it (and so does the model's output): frozen
units are never removed. That is the safety rule: an unknown op costs pruning opportunity,
never correctness. A rule for a new op is one row (``register_channel_rule``).

    >>> model = torchvision.models.resnet18().eval()
    >>> graph = fxopt.channel_groups(model, torch.randn(1, 3, 64, 64))
    >>> print(graph)            # one row per group: layers, channels, couplings, frozen or not
    >>> graph.groups[0].channels, graph.groups[0].couplings
    (64, ['residual', ...])

The ``prune_channels`` pass (``fxopt.passes.prune``) ranks units (``fxopt.prune.importance``),
removes them physically and checks the result against the original model with the removed
channels masked to zero.
"""
from __future__ import annotations

from typing import Any, Iterable

import networkx as nx
import numpy as np
import torch.fx as fx
import torch.nn as nn

import fxopt.prune.rules_aten  # noqa: F401  (the built-in rows of the rule table)
import fxopt.prune.rules_attention  # noqa: F401
import fxopt.prune.rules_elementwise  # noqa: F401
import fxopt.prune.rules_layers  # noqa: F401
import fxopt.prune.rules_shapes  # noqa: F401
from fxopt.infra.validate import concrete_args_arg, leaf_modules_arg
from fxopt.ir.boundary import normalize_inputs
from fxopt.ir.capture import capture
from fxopt.prune.attention import open_attention
from fxopt.prune.records import LAYER_KINDS, ChannelGroup
from fxopt.prune.rule_table import CHANNEL_RULES, ChannelRuleTable
from fxopt.prune.walk import ChannelWalk

__all__ = ["ChannelAnalysis", "ChannelGraph", "analyze_channels", "channel_groups"]


class ChannelAnalysis:
    """Units, groups and frozen flags over one walk of ``gm`` (see the module doc).

    ``walk`` is the finished ``ChannelWalk``; the records the pruner acts on (``layouts``,
    ``params``, ``rewrites``, ...) are its own objects, shown here so the pruner reads one.
    ``slot_root[s]`` is the unit (root slot) of slot ``s``; ``frozen_roots`` maps a frozen
    unit to its reasons.
    """

    def __init__(self, gm: fx.GraphModule, rules: ChannelRuleTable = CHANNEL_RULES):
        self.gm = gm
        self.walk = w = ChannelWalk(gm).run(rules)
        self.layouts, self.tuple_layouts = w.layouts, w.tuple_layouts
        self.params, self.param_roles = w.params, w.param_roles
        self.rewrites, self.module_fixes = w.rewrites, w.module_fixes
        self.norm_nodes, self.mac_nodes = w.norm_nodes, w.mac_nodes
        self.graph: nx.Graph = nx.Graph()
        self.groups: list[ChannelGroup] = []
        self.regroup()

    def regroup(self) -> None:
        """Compute units, groups (networkx components of coupled producers) and frozen flags."""
        uf, spaces = self.walk.uf, self.walk.spaces
        nslots = len(uf.parent)
        roots = np.array([uf.find(i) for i in range(nslots)], dtype=np.int64)
        self.slot_root = roots
        starts = np.array([s.start for s in spaces], dtype=np.int64)
        space_of = np.searchsorted(starts, np.arange(nslots), side="right") - 1
        frozen_roots: dict[int, list[str]] = {}
        for s, reason in uf.frozen.items():
            lst = frozen_roots.setdefault(int(roots[s]), [])
            if reason not in lst:
                lst.append(reason)
        self.frozen_roots = frozen_roots
        g = nx.Graph()
        for sp in spaces:
            g.add_node(sp.id, kind=sp.kind, node=sp.node, path=sp.path, size=sp.size)
        # producers that share a unit are one group
        if nslots:
            pairs = np.unique(np.stack([roots, space_of], axis=1), axis=0)
            first_space: dict[int, int] = {}
            for r, sp in pairs:
                f = first_space.setdefault(int(r), int(sp))
                if f != sp:
                    g.add_edge(f, int(sp))
        self.graph = g
        comps = sorted((sorted(c) for c in nx.connected_components(g)), key=lambda c: c[0])
        comp_arr = np.zeros(len(spaces), dtype=np.int64)
        for ci, comp in enumerate(comps):
            comp_arr[comp] = ci

        def comps_of(slots: np.ndarray):
            slots = slots[slots >= 0]
            return np.unique(comp_arr[space_of[slots]]) if len(slots) else ()

        kinds_of: dict[int, set[str]] = {}
        for kind, _node, slots in self.walk.events:
            for ci in comps_of(slots):
                kinds_of.setdefault(int(ci), set()).add(kind)
        member_of: dict[int, set[str]] = {}
        owner = self.walk.param_owner
        for path, dims in self.params.items():
            for vec in dims.values():
                for ci in comps_of(vec):
                    member_of.setdefault(int(ci), set()).add(owner.get(path, path))
        groups: list[ChannelGroup] = []
        for ci, comp in enumerate(comps):
            layers = [spaces[sp] for sp in comp if spaces[sp].kind in LAYER_KINDS]
            if not layers:
                continue  # constants alone: nothing produces these channels
            slots = np.concatenate([np.arange(spaces[sp].start, spaces[sp].start + spaces[sp].size)
                                    for sp in comp])
            unit_roots = np.unique(roots[slots])
            # the reference layer: the producer covering the most units (first on ties)
            best = max(layers, key=lambda s: (len(np.unique(roots[s.start:s.start + s.size])),
                                              -s.id))
            ref_roots = roots[best.start:best.start + best.size]
            if len(np.unique(ref_roots)) == len(unit_roots):
                widths = np.array([(ref_roots == r).sum() for r in unit_roots], dtype=np.int64)
                channels = best.size
            else:
                widths = np.ones(len(unit_roots), dtype=np.int64)
                channels = len(unit_roots)
            reasons: list[str] = []
            for r in unit_roots:
                for reason in frozen_roots.get(int(r), ()):
                    if reason not in reasons:
                        reasons.append(reason)
            groups.append(ChannelGroup(
                id=len(groups), name=best.path, layers=[s.path for s in layers],
                members=sorted(member_of.get(ci, set())), channels=int(channels),
                units=len(unit_roots), couplings=sorted(kinds_of.get(ci, ())),
                frozen=bool(reasons), reasons=reasons[:3] + ([f"and {len(reasons) - 3} more"]
                                                             if len(reasons) > 3 else []),
                unit_roots=unit_roots, unit_widths=widths, spaces=list(comp)))
        self.groups = groups

    # -- for the pruner -------------------------------------------------------------------------
    def freeze_groups(self, groups: Iterable[ChannelGroup], reason: str) -> None:
        """Freeze whole groups (``PruneConfig.ignore``) and group again."""
        for g in groups:
            self.walk.freeze_slots(g.unit_roots, reason)
        self.regroup()

    def freeze_nodes(self, names: Iterable[str], reason: str) -> None:
        """Freeze what the named nodes carry (a node the rewrite got wrong) and group again."""
        for name in names:
            self.walk.freeze_node(name, reason)
        self.regroup()

    def removed_mask(self, vec: np.ndarray, removed: set[int] | np.ndarray) -> np.ndarray:
        """True where ``vec``'s slot belongs to a removed unit."""
        removed_arr = np.fromiter(removed, dtype=np.int64) if isinstance(removed, set) \
            else np.asarray(removed, dtype=np.int64)
        out = np.zeros(len(vec), dtype=bool)
        ok = vec >= 0
        out[ok] = np.isin(self.slot_root[vec[ok]], removed_arr)
        return out

    def kept_count(self, vec: np.ndarray, removed) -> int:
        """How many of ``vec``'s positions survive removing ``removed``."""
        return int(len(vec) - self.removed_mask(vec, removed).sum())

    def macs_after(self, removed) -> tuple[int, int]:
        """(MACs before, MACs after removing ``removed`` units) for the conv/linear layers."""
        before = after = 0
        for m in self.mac_nodes:
            before += m.macs
            frac = self.kept_count(m.out_vec, removed) / max(len(m.out_vec), 1)
            if m.in_vec is not None and len(m.in_vec):
                frac *= self.kept_count(m.in_vec, removed) / len(m.in_vec)
            after += m.macs * frac
        return before, int(after)


def analyze_channels(gm: fx.GraphModule, rules: ChannelRuleTable = CHANNEL_RULES
                     ) -> ChannelAnalysis:
    """Run the channel analysis over a captured graph (``tensor_meta`` on every node)."""
    return ChannelAnalysis(gm, rules)


class ChannelGraph:
    """What ``fxopt.channel_groups`` returns: the groups and the networkx graph behind them."""

    def __init__(self, analysis: ChannelAnalysis):
        self.analysis = analysis
        self.graph: nx.Graph = analysis.graph
        self.groups: list[ChannelGroup] = analysis.groups

    @property
    def frozen(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.frozen]

    @property
    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def group_of(self, layer: str) -> ChannelGroup | None:
        """The group whose channels ``layer`` produces (a module path or node name)."""
        for g in self.groups:
            if layer in g.layers:
                return g
        return None

    def table(self):
        from rich.table import Table

        t = Table(title=f"channel groups: {len(self.groups)} ({len(self.prunable)} prunable, "
                        f"{len(self.frozen)} frozen)", title_justify="left")
        for col in ("#", "layer", "layers", "channels", "units", "couplings", "status"):
            t.add_column(col, overflow="fold")
        for g in self.groups:
            status = "frozen: " + "; ".join(g.reasons) if g.frozen else (
                "prunable" if g.prunable else "single unit")
            ch = f"{g.channels}" if g.kept is None else f"{g.channels}->{g.kept}"
            t.add_row(str(g.id), g.name, str(len(g.layers)), ch, str(g.units),
                      ", ".join(g.couplings), status)
        return t

    def __str__(self) -> str:
        import io

        from rich.console import Console

        buf = io.StringIO()
        Console(file=buf, width=160, color_system=None).print(self.table())
        return buf.getvalue()

    __repr__ = __str__


def channel_groups(model: nn.Module, example_inputs: Any = None, *, leaf_modules: Iterable = (),
                   concrete_args: dict | None = None) -> ChannelGraph:
    """The channel groups of ``model``: which channels pruning must remove together.

    ``model``: an eval-mode ``nn.Module`` (captured here on ``example_inputs``, its
    ``nn.MultiheadAttention`` leaves opened as the ``prune_channels`` pass opens them), or a
    ``GraphModule`` that ``fxopt.capture`` made (analysed as it is).
    """
    leaf_modules = leaf_modules_arg(leaf_modules)
    if isinstance(model, nn.Module):
        concrete_args = concrete_args_arg(model, concrete_args)
    if isinstance(model, fx.GraphModule) and all(
            "tensor_meta" in n.meta for n in model.graph.nodes if n.op == "placeholder"):
        gm = model  # already captured: shapes are on the nodes
    else:
        gm = capture(model, example_inputs, leaf_modules=leaf_modules,
                     concrete_args=concrete_args)
        # what the prune_channels pass analyses: attention leaves opened into their heads
        gm, _ = open_attention(gm, normalize_inputs(example_inputs))
    return ChannelGraph(analyze_channels(gm))
