"""Channel dependency analysis: which channels of a captured model must be removed together.

Every tensor in the graph gets a *layout*: the dimension along which it may shrink (``pdim``)
and, for each index along it, a *slot* (an integer naming one channel of one producer). Ops
propagate layouts: a conv or linear layer creates fresh slots for its outputs; BatchNorm,
activations, pooling and dropout pass them on; ``add`` and channel-wise ``mul`` unite the slots
of their operands (a union-find); ``cat`` concatenates them and ``split``/``chunk``/slicing cut
them; reshapes and permutes move them (a flatten before a Linear maps one channel to H*W input
features); a grouped or depthwise conv unites its inputs and outputs group by group, and a
GroupNorm unites the channels of each of its groups, so a whole group goes or stays.
Union-find classes of slots are *units* (what pruning removes at once); the producers that
share units, found with ``networkx`` connected components, are *channel groups*.

An op the analysis does not know freezes every unit that reaches it (and so does the model's
output): frozen units are never removed. That is the safety rule: an unknown op costs pruning
opportunity, never correctness.

    >>> model = torchvision.models.resnet18().eval()
    >>> graph = fxopt.channel_groups(model, torch.randn(1, 3, 64, 64))
    >>> print(graph)            # one row per group: layers, channels, couplings, frozen or not
    >>> graph.groups[0].channels, graph.groups[0].couplings
    (64, ['residual', ...])

The ``prune_channels`` pass (``fxopt.passes.prune``) ranks units, removes them physically and
checks the result against the original model with the removed channels masked to zero.

Modules: ``channel_records`` (layouts, groups, the union-find), ``channel_rules`` (what each op
does to slots: the dispatch, with the rules in ``channel_rules_layers`` and
``channel_rules_shapes`` and the op tables in ``channel_rule_tables``), this one (the analysis as a whole: groups, freezing, what a removal keeps).
"""
from __future__ import annotations

from typing import Any, Iterable

import networkx as nx
import numpy as np
import torch.fx as fx
import torch.nn as nn

from fxopt.prune.records import (
    COUPLING_KINDS,
    LAYER_KINDS,
    ChannelGraph,
    ChannelGroup,
    Layout,
    MacNode,
    Rewrite,
    Space,
    UnionFind,
)
from fxopt.prune.rules import ChannelRules

__all__ = [
    "Layout", "Space", "ChannelGroup", "ChannelGraph", "ChannelAnalysis", "Rewrite",
    "MacNode", "analyze_channels", "channel_groups", "COUPLING_KINDS",
]


class ChannelAnalysis(ChannelRules):
    """Layouts of every node, the weights each unit touches, and the groups (see module doc)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.uf = UnionFind()
        self.spaces: list[Space] = []
        self.layouts: dict[str, Layout] = {}
        self.tuple_layouts: dict[str, list[Layout]] = {}
        # param path -> dim -> slot vector (all requirements on one dim united)
        self.params: dict[str, dict[int, np.ndarray]] = {}
        # weight | bias | bn_weight | norm_weight | stat | constant
        self.param_roles: dict[str, str] = {}
        self.param_owner: dict[str, str] = {}  # param path -> layer path / node name shown to users
        self.module_fixes: dict[str, tuple[str, str]] = {}  # module path -> (kind, node name)
        self.rewrites: list[Rewrite] = []
        self.norm_nodes: dict[str, int] = {}  # LayerNorm over the pruned dim: node -> dim
        self.mac_nodes: list[MacNode] = []
        self.events: list[tuple[str, str, np.ndarray]] = []
        self.unknown_ops: dict[str, int] = {}
        self.graph: nx.Graph = nx.Graph()
        self.groups: list[ChannelGroup] = []
        self._run()
        self.finalize()

    def finalize(self) -> None:
        """Compute units, groups (networkx components of coupled producers) and frozen flags."""
        nslots = len(self.uf.parent)
        roots = np.array([self.uf.find(i) for i in range(nslots)], dtype=np.int64)
        self.slot_root = roots
        starts = np.array([s.start for s in self.spaces], dtype=np.int64)
        space_of = np.searchsorted(starts, np.arange(nslots), side="right") - 1
        self.slot_space = space_of
        frozen_roots: dict[int, list[str]] = {}
        for s, reason in self.uf.frozen.items():
            lst = frozen_roots.setdefault(int(roots[s]), [])
            if reason not in lst:
                lst.append(reason)
        self.frozen_roots = frozen_roots
        g = nx.Graph()
        for sp in self.spaces:
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
        kinds_of: dict[int, set[str]] = {}
        comps = sorted((sorted(c) for c in nx.connected_components(g)), key=lambda c: c[0])
        comp_arr = np.zeros(len(self.spaces), dtype=np.int64)
        for ci, comp in enumerate(comps):
            comp_arr[comp] = ci
        comp_of = {sp: int(comp_arr[sp]) for sp in range(len(self.spaces))}

        def comps_of(slots: np.ndarray):
            slots = slots[slots >= 0]
            return np.unique(comp_arr[space_of[slots]]) if len(slots) else ()

        for kind, _node, slots in self.events:
            for ci in comps_of(slots):
                kinds_of.setdefault(int(ci), set()).add(kind)
        member_of: dict[int, set[str]] = {}
        for path, dims in self.params.items():
            for vec in dims.values():
                for ci in comps_of(vec):
                    member_of.setdefault(int(ci), set()).add(self.param_owner.get(path, path))
        self.comp_of = comp_of
        groups: list[ChannelGroup] = []
        for ci, comp in enumerate(comps):
            layers = [self.spaces[sp] for sp in comp if self.spaces[sp].kind in LAYER_KINDS]
            if not layers:
                continue
            slots = np.concatenate([np.arange(self.spaces[sp].start,
                                              self.spaces[sp].start + self.spaces[sp].size)
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

    # -- helpers for the pruner -----------------------------------------------------------
    def freeze_groups(self, groups: Iterable[ChannelGroup], reason: str) -> None:
        for g in groups:
            self.uf.freeze(g.unit_roots, reason)
        self.finalize()

    def freeze_nodes(self, names: Iterable[str], reason: str) -> None:
        for name in names:
            self._freeze(self.layouts.get(name), reason)
            for lay in self.tuple_layouts.get(name, ()):
                self._freeze(lay, reason)
        self.finalize()

    def removed_mask(self, vec: np.ndarray, removed: set[int] | np.ndarray) -> np.ndarray:
        """True where ``vec``'s slot belongs to a removed unit."""
        removed_arr = np.fromiter(removed, dtype=np.int64) if isinstance(removed, set) \
            else np.asarray(removed, dtype=np.int64)
        out = np.zeros(len(vec), dtype=bool)
        ok = vec >= 0
        out[ok] = np.isin(self.slot_root[vec[ok]], removed_arr)
        return out

    def kept_count(self, vec: np.ndarray, removed) -> int:
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


def analyze_channels(gm: fx.GraphModule) -> ChannelAnalysis:
    """Run the channel analysis over a captured graph (``tensor_meta`` on every node)."""
    return ChannelAnalysis(gm)


def channel_groups(model: nn.Module, example_inputs: Any = None, *, leaf_modules: Iterable = (),
                   concrete_args: dict | None = None) -> ChannelGraph:
    """The channel groups of ``model``: which channels pruning must remove together.

    ``model``: an eval-mode ``nn.Module`` (captured here on ``example_inputs``), or a
    ``GraphModule`` that ``fxopt.capture`` made (analysed as it is).
    """
    from fxopt.ir.capture import capture

    if isinstance(model, fx.GraphModule) and all(
            "tensor_meta" in n.meta for n in model.graph.nodes if n.op == "placeholder"):
        gm = model  # already captured: shapes are on the nodes
    else:
        gm = capture(model, example_inputs, leaf_modules=leaf_modules,
                     concrete_args=concrete_args)
    return ChannelGraph(analyze_channels(gm))
