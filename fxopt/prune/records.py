"""Records of the channel analysis: the plain values the walk writes and the pruner reads.

A *slot* is an integer naming one channel of one producer. A ``Layout`` says along which dim a
tensor may shrink (``pdim``) and which slot each index along it holds (-1: never removed); a
``Space`` is one allocation of fresh slots (a layer's output channels, a constant's dim); a
``Rewrite`` is a node argument that spells a channel count; a ``MacNode`` is a conv/linear
layer's MACs with the slots of its output and input channels; a ``ChannelGroup`` gathers the
producers that share units (the classes of slots pruning removes at once).

    >>> lay = Layout(1, np.array([0, 1, 2, 3]))   # dim 1: four channels of one producer
    >>> lay.free, FREE.free
    (False, True)

This module imports nothing from the rest of the analysis: ``fxopt.prune.walk`` fills these
records, ``fxopt.prune.channels`` groups them, the ``prune_channels`` pass acts on them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Layout", "FREE", "Space", "MacNode", "Rewrite", "ChannelGroup", "COUPLING_KINDS",
           "LAYER_KINDS"]

# what a group's ``couplings`` may name (the events the rules record)
COUPLING_KINDS = ("residual", "channel-mul", "elementwise", "constant", "concat", "split",
                  "slice", "flatten", "reshape", "shuffle", "depthwise", "grouped", "norm",
                  "shared", "reduce", "attention")
# the spaces that are layers (a group needs one): the rest are constants
LAYER_KINDS = ("conv", "linear")


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
    ``groups`` (an int at ``pos``: kept slots of ``vec`` // ``block``),
    ``value`` (the argument at ``pos`` becomes ``value``: a default that depends on a size),
    ``scale_rows`` (the first kept rows of tensor ``value`` times ``sqrt(kept / len(vec))``),
    ``mean`` (a mean over the pruned dim ``dim`` becomes a sum divided by the original count
    ``value``: the removed channels are zeros in the masked reference).
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
    value: Any = None


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
