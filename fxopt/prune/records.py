"""Records of the channel analysis: slots, layouts, spaces, groups, and the union-find.

A *slot* names one channel of one producer; a ``Layout`` says along which dim a tensor may
shrink and which slot each index along it holds; the union-find unites slots that must go
together (its classes are the *units* pruning removes); a ``Space`` is one allocation of fresh
slots (a layer's output channels); a ``ChannelGroup`` gathers the producers that share units.
See ``fxopt.channels`` for the analysis itself.

    >>> lay = Layout(1, np.array([0, 1, 2, 3]))    # dim 1, four channels of one producer
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

import networkx as nx
import numpy as np

if TYPE_CHECKING:
    from fxopt.prune.channels import ChannelAnalysis

__all__ = ["Layout", "FREE", "Space", "MacNode", "Rewrite", "ChannelGroup", "ChannelGraph",
           "COUPLING_KINDS", "LAYER_KINDS", "UnionFind"]

COUPLING_KINDS = ("residual", "channel-mul", "elementwise", "constant", "concat", "split",
                  "slice", "flatten", "reshape", "shuffle", "depthwise", "grouped", "norm",
                  "shared")
LAYER_KINDS = ("conv", "linear")


# -- union-find over slots --------------------------------------------------------------------
_PINNED = "tied to a channel that cannot be removed"


class UnionFind:
    def __init__(self):
        self.parent: list[int] = []
        self.frozen: dict[int, str] = {}  # slot -> first reason

    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, x: int) -> int:
        p = self.parent
        root = x
        while p[root] != root:
            root = p[root]
        while p[x] != root:
            p[x], x = root, p[x]
        return root

    def union(self, a: int, b: int) -> None:
        if a < 0 or b < 0:
            return
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # the older slot stays the root: roots are then stable and deterministic
            if rb < ra:
                ra, rb = rb, ra
            self.parent[rb] = ra

    def union_vectors(self, a: np.ndarray, b: np.ndarray, reason: str = _PINNED) -> None:
        """Unite ``a[i]`` with ``b[i]``; a slot paired with -1 (never removed) is frozen."""
        mixed = (a < 0) != (b < 0)
        if mixed.any():
            self.freeze(np.concatenate([a[mixed], b[mixed]]), reason)
        pairs = np.unique(np.stack([a, b], axis=1), axis=0) if len(a) else ()
        for x, y in pairs:
            if x != y:
                self.union(int(x), int(y))

    def unite_all(self, slots: np.ndarray, reason: str = _PINNED) -> None:
        """Unite all of ``slots``; if one of them is -1 (never removed), freeze them all."""
        if (slots < 0).any():
            self.freeze(slots, reason)
        slots = np.unique(slots[slots >= 0])
        for s in slots[1:]:
            self.union(int(slots[0]), int(s))

    def freeze(self, slots: Iterable[int], reason: str) -> None:
        for s in np.unique(np.asarray(list(slots) if not isinstance(slots, np.ndarray) else slots)):
            s = int(s)
            if s >= 0 and s not in self.frozen:
                self.frozen[s] = reason

    def roots(self, slots: np.ndarray) -> np.ndarray:
        out = np.empty_like(slots)
        for i, s in enumerate(slots.ravel()):
            out.flat[i] = self.find(int(s)) if s >= 0 else -1
        return out


# -- records ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Where a tensor may shrink: along ``pdim``, index ``i`` belongs to slot ``vec[i]`` (-1: never
    removed). ``pdim is None``: nothing in this tensor can be removed (model inputs, outputs of
    ops the analysis does not understand)."""

    pdim: int | None = None
    vec: np.ndarray | None = None

    @property
    def free(self) -> bool:
        return self.pdim is None


FREE = Layout()


@dataclass
class Space:
    """One allocation of fresh slots: the output channels of a layer, or a constant's dim."""

    id: int
    kind: str  # conv | linear | constant
    node: str
    path: str
    size: int
    start: int


@dataclass
class MacNode:
    """A conv/linear node and the slots of its output and (ungrouped) input channels."""

    node: str
    macs: int
    out_vec: np.ndarray
    in_vec: np.ndarray | None


@dataclass
class Rewrite:
    """An argument of a node that must change when channels go (applied by the prune pass).

    kind: ``shape`` (args at ``pos`` is an int literal of the output's pdim size),
    ``split`` (chunk/split: become ``torch.split`` with the kept sizes of ``pieces``),
    ``slice`` (a basic-index slice at ``pos`` along the pruned dim of ``vec``),
    ``norm_shape`` (``normalized_shape`` at ``pos`` from ``vec``),
    ``groups`` (an int at ``pos``: kept slots of ``vec`` // ``block``).
    ``pos`` is a path into ``node.args`` (ints) or a kwarg name first.
    """

    kind: str
    node: str
    pos: tuple = ()
    vec: np.ndarray | None = None
    pieces: list[np.ndarray] | None = None
    dim: int = 0
    block: int = 1
    start: int | None = None
    stop: int | None = None


@dataclass
class ChannelGroup:
    """Producers whose output channels are coupled, and what pruning may do to them."""

    id: int
    name: str  # the reference layer (its output channels are the group's channels)
    layers: list[str]  # producer layers (module paths or node names)
    members: list[str]  # every layer or tensor whose weights change with the group
    channels: int  # output channels of the reference layer
    units: int  # independently removable units
    couplings: list[str]
    frozen: bool
    reasons: list[str]
    kept: int | None = None  # channels kept, after pruning
    # internals for the pruner
    unit_roots: np.ndarray = field(default=None, repr=False)
    unit_widths: np.ndarray = field(default=None, repr=False)
    spaces: list[int] = field(default_factory=list, repr=False)

    @property
    def prunable(self) -> bool:
        return not self.frozen and self.units > 1

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "layers": self.layers, "channels": self.channels,
                "units": self.units, "couplings": self.couplings, "frozen": self.frozen,
                "reasons": self.reasons, "kept": self.kept}


class ChannelGraph:
    """What ``fxopt.channel_groups`` returns: the groups and the networkx graph behind them."""

    def __init__(self, analysis: "ChannelAnalysis"):
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
