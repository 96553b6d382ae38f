"""Automatic leaf modules: a submodule symbolic tracing cannot go through is traced as one call.

torch.fx stops at the first Python branch on a traced value (``if x.shape[-1] % 2``, a
``math.ceil`` of a size, a loop over ``tensor.tolist()``). When that happens inside a submodule,
capture does what a user would do with ``leaf_modules=``: the innermost module on the tracer's
module stack when the error was raised becomes a leaf (a ``call_module`` node that runs its own
eager forward), and the trace starts again, until it goes through or the failure is in the
model's own ``forward`` (no module to make opaque: the typed error with its hint, as before).
The leaves found are named in the report with what they cost: their conv, linear and
BatchNorm layers are not folded, fused, pruned or quantized (``OpaqueLeaf``). The user's
``leaf_modules=`` are leaves from the first attempt on, so they always win.

A leaf is a ``call_module`` of a module type the passes do not know: pruning freezes the
channels at its boundary (no channel rule), int8 quantizes around it (a float island between a
dequantize and a quantize), fold_bn and fuse_act match none of its layers.

    >>> tracer, graph, leaves = trace_with_auto_leaves(new_tracer, trace, work)
    >>> [leaf.describe() for leaf in leaves]
    ["'conv_stem' (Conv2dSame: 1 conv, 864 parameters)"]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.fx as fx
import torch.nn as nn

from fxopt.errors import CaptureError

__all__ = ["OpaqueLeaf", "trace_with_auto_leaves", "innermost_module", "AutoLeafFailure",
           "MAX_AUTO_LEAVES", "layer_counts"]

# A trace is retried at most this many times (each retry makes one more module opaque).
MAX_AUTO_LEAVES = 64

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
         nn.ConvTranspose3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def layer_counts(module: nn.Module) -> dict[str, int]:
    """How many conv, linear and BatchNorm layers ``module`` holds (itself included)."""
    mods = list(module.modules())
    return {"conv": sum(isinstance(m, _CONV) for m in mods),
            "linear": sum(isinstance(m, nn.Linear) for m in mods),
            "bn": sum(isinstance(m, _BN) for m in mods)}


@dataclass
class OpaqueLeaf:
    """A submodule capture traced as one call because its forward cannot be traced."""

    path: str
    type_name: str
    reason: str  # the trace error, first line
    layers: dict[str, int]  # conv / linear / bn layers inside: not folded, pruned or quantized
    params: int

    def describe(self) -> str:
        parts = [f"{n} {k}" for k, n in self.layers.items() if n]
        inside = ", ".join(parts + [f"{self.params} parameters"])
        return f"'{self.path}' ({self.type_name}: {inside})"

    def to_dict(self) -> dict:
        return {"path": self.path, "type": self.type_name, "reason": self.reason,
                "layers": dict(self.layers), "params": self.params}


class AutoLeafFailure(Exception):
    """The trace failed where no module can be made a leaf; carries the tracer and the error."""

    def __init__(self, tracer: fx.Tracer, error: Exception):
        super().__init__(str(error))
        self.tracer, self.error = tracer, error


def innermost_module(tracer: fx.Tracer) -> tuple[str, str] | None:
    """(path, type name) of the innermost module the tracer was in (its ``module_stack``,
    which a failed trace leaves as it was when the error was raised)."""
    stack = getattr(tracer, "module_stack", None)
    if not stack:
        return None
    path, typ = list(stack.values())[-1]
    return path, getattr(typ, "__name__", str(typ))


def _leaf(root: nn.Module, path: str, type_name: str, error: Exception) -> OpaqueLeaf:
    module = root.get_submodule(path)
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return OpaqueLeaf(path, type_name, first, layer_counts(module),
                      sum(p.numel() for p in module.parameters()))


def trace_with_auto_leaves(new_tracer: Callable[[frozenset[str]], fx.Tracer],
                           trace: Callable[[fx.Tracer], fx.Graph], root: nn.Module, *,
                           enabled: bool = True) -> tuple[fx.Tracer, fx.Graph, list[OpaqueLeaf]]:
    """Trace ``root`` with ``trace(new_tracer(leaf_paths))``; on a failure inside a submodule,
    add that module's path to the leaves and try again.

    Returns the tracer that succeeded, its graph and the leaves added. ``AutoLeafFailure`` when
    the failure is in the root's own code, in a module already a leaf, past
    ``MAX_AUTO_LEAVES``, or ``enabled`` is False. A ``CaptureError`` raised by ``trace`` (a
    refusal of fxopt's own) passes through.
    """
    leaves: list[OpaqueLeaf] = []
    while True:
        tracer = new_tracer(frozenset(leaf.path for leaf in leaves))
        try:
            return tracer, trace(tracer), leaves
        except CaptureError:
            raise
        except Exception as e:  # noqa: BLE001 - any trace failure: find the module that failed
            where = innermost_module(tracer)
            known = {leaf.path for leaf in leaves}
            if not enabled or where is None or not where[0] or where[0] in known \
                    or len(leaves) >= MAX_AUTO_LEAVES:
                raise AutoLeafFailure(tracer, e) from e
            try:
                leaves.append(_leaf(root, where[0], where[1], e))
            except AttributeError:  # a path fx made up (a module called through a function)
                raise AutoLeafFailure(tracer, e) from e
