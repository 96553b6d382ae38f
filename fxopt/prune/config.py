"""``PruneConfig``: what the ``prune_channels`` pass removes, and how it chooses.

``optimize(..., prune=0.5)`` is ``PruneConfig(ratio=0.5)``: remove half of the channels of every
prunable channel group (see ``fxopt.prune.channels``), least important first by the L1 norm of
their weights. Everything else is a field::

    fxopt.optimize(model, x, prune=fxopt.PruneConfig(
        ratio=0.6, by="macs",          # remove 60% of the multiply-accumulates instead
        importance="taylor",           # |sum w * dL/dw| over calibration batches (or any
                                       # criterion registered with register_importance)
        scope="global",                # one ranking over all groups instead of the same ratio each
        round_to=8,                    # kept channel counts are multiples of 8 (GPU kernels)
        ignore=["layer4.*"],           # never prune the outputs of these layers
    ), calibration_data=[(x, y), ...])

The classifier's output (any channel that reaches the model's output) is never pruned.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

from fxopt.errors import InputError
from fxopt.infra.validate import choice_arg
from fxopt.prune.importance import IMPORTANCE

__all__ = ["PruneConfig", "SCOPES", "RATIO_KINDS"]

SCOPES = ("uniform", "global")
RATIO_KINDS = ("channels", "macs")


@dataclass(frozen=True)
class PruneConfig:
    """Structured channel pruning settings (``optimize(prune=PruneConfig(...))``).

    ratio: fraction removed, in ``[0, 1)``: of the channels (``by="channels"``) or of the
        model's MACs (``by="macs"``, found by bisection on the channel ratio).
    importance: ``"l1"``, ``"l2"`` (weight magnitude over every tensor of the group),
        ``"bn_scale"`` (|BatchNorm gamma|; L1 where a group has no BatchNorm), ``"taylor"``
        (first-order Taylor, needs labelled calibration data or ``loss``), ``"random"``, or
        any name registered with ``fxopt.prune.register_importance``.
    scope: ``"uniform"`` (the same ratio in every group) or ``"global"`` (one ranking of
        group-normalized importance over all groups, at most ``max_group_ratio`` per group).
    round_to: kept channel counts are multiples of this (where a group has at least that many).
    min_channels: every pruned group keeps at least this many channels.
    ignore: module paths or ``fnmatch`` patterns; groups produced by a matching layer are kept.
    calibration_data / loss: batches ``(inputs, target)`` (or inputs alone with a ``loss`` that
        takes only the output) for ``importance="taylor"``; ``calibration_data`` defaults to the
        one given to ``optimize``; ``loss`` to cross-entropy.
    seed: for ``importance="random"``.
    """

    ratio: float = 0.5
    by: str = "channels"
    importance: str = "l1"
    scope: str = "uniform"
    round_to: int = 1
    min_channels: int = 1
    ignore: tuple[str, ...] = ()
    max_group_ratio: float = 0.9
    calibration_data: Any = field(default=None, compare=False, repr=False)
    loss: Callable | None = field(default=None, compare=False, repr=False)
    max_batches: int = 8
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.ignore, str):
            object.__setattr__(self, "ignore", (self.ignore,))
        else:
            try:
                object.__setattr__(self, "ignore", tuple(self.ignore))
            except TypeError:
                raise InputError(f"PruneConfig.ignore must be a list of module paths or "
                                 f"patterns, got {type(self.ignore).__name__}",
                                 hint="e.g. ignore=['fc', 'layer4.*']") from None
        bad = [p for p in self.ignore if not isinstance(p, str)]
        if bad:
            raise InputError(f"PruneConfig.ignore holds module paths or fnmatch patterns, not "
                             f"{type(bad[0]).__name__}", hint="e.g. ignore=['fc', 'layer4.*']")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or \
                not 0.0 <= float(self.ratio) < 1.0:
            raise InputError(f"prune ratio must be a number in [0, 1), got {self.ratio!r}",
                             hint="e.g. prune=0.5 removes half of the channels")
        choice_arg(self.by, "PruneConfig.by", RATIO_KINDS, error=InputError)
        choice_arg(self.importance, "PruneConfig.importance", tuple(IMPORTANCE), error=InputError,
                   also="add a criterion with fxopt.prune.register_importance(name)")
        choice_arg(self.scope, "PruneConfig.scope", SCOPES, error=InputError)
        for name in ("round_to", "min_channels", "max_batches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"PruneConfig.{name} must be an integer >= 1, got {v!r}",
                                 hint=f"e.g. {name}={8 if name == 'round_to' else 1}")
        g = self.max_group_ratio
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0.0 < float(g) <= 1.0:
            raise InputError(f"PruneConfig.max_group_ratio must be a number in (0, 1], got "
                             f"{g!r}", hint="e.g. max_group_ratio=0.9 (at most 90% of a group)")
        if self.loss is not None and not callable(self.loss):
            raise InputError("PruneConfig.loss must be callable: loss(output, target) -> scalar",
                             hint="e.g. loss=torch.nn.functional.cross_entropy")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InputError(f"PruneConfig.seed must be an integer, got {self.seed!r}",
                             hint="e.g. seed=0")

    @classmethod
    def coerce(cls, value: Any) -> "PruneConfig":
        """``prune=`` as the user gave it: a ratio, a dict of fields, or a PruneConfig."""
        if isinstance(value, PruneConfig):
            return value
        if value is None or value is True:
            return cls()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls(ratio=float(value))
        if isinstance(value, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise InputError(f"unknown PruneConfig fields {unknown}",
                                 hint=f"known fields: {sorted(known)}")
            return cls(**value)
        raise InputError(f"prune= must be a ratio, a dict or a fxopt.PruneConfig, got "
                         f"{type(value).__name__}", hint="e.g. prune=0.5")

    def with_(self, **changes) -> "PruneConfig":
        return replace(self, **changes)

    def describe(self) -> str:
        parts = [f"{self.ratio:g} of {self.by}", self.importance, self.scope]
        if self.round_to > 1:
            parts.append(f"round_to {self.round_to}")
        return ", ".join(parts)

