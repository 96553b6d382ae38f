"""Importance criteria: a registry of functions that score pruning units, which users extend.

A *unit* is a set of channels removed together (a union-find class of the channel analysis).
A criterion scores every unit of the prunable groups from an ``ImportanceContext`` (the graph,
the analysis, the units, the ``PruneConfig`` and the calibration data) and returns one float
per unit, in ``ctx.roots`` order; higher is kept first. ``PruneConfig(importance=name)``
accepts every registered name. The built-ins:

- ``l1`` / ``l2``: per tensor, the L1 (L2) norm of the unit's slice, divided by that tensor's
  mean over its units (so a wide consumer does not drown a narrow producer), averaged over the
  tensors the analysis tied to the unit (the producer's filters, the consumers' input columns,
  BatchNorm and LayerNorm scales, layer-scale constants);
- ``bn_scale``: |gamma| of the BatchNorms in the unit (network slimming); L1 for a group where
  some unit has none;
- ``taylor``: |sum over the unit's weights of w * dL/dw|, summed over calibration batches: the
  first-order change of the loss when the unit is zeroed (Molchanov et al. 2019);
- ``random``: a seeded baseline.

A criterion of your own is one function::

    from fxopt.prune import register_importance

    @register_importance("filter_l1")           # the producers' output filters only
    def filter_l1(ctx):
        total, count = ctx.magnitude(roles=("weight",), p=1)
        return total / np.maximum(count, 1)

    fxopt.optimize(model, x, prune=fxopt.PruneConfig(importance="filter_l1"))

``unit_scores`` is what the ``prune_channels`` pass calls::

    >>> scores = unit_scores(gm, analysis, PruneConfig(importance="l2"))
    >>> scores[root]        # one float per unit root
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from fxopt.errors import InputError, PreconditionError
from fxopt.ir.graph import get_attr_value
from fxopt.prune.channels import ChannelAnalysis
from fxopt.prune.records import ChannelGroup

__all__ = ["IMPORTANCE", "Criterion", "ImportanceContext", "register_importance", "unit_scores",
           "MAGNITUDE_ROLES", "split_batch"]

# the tensors whose magnitude speaks for a unit (biases and BatchNorm statistics do not)
MAGNITUDE_ROLES = ("weight", "bn_weight", "norm_weight", "constant")
_TAYLOR_ROLES = ("weight", "bias", "bn_weight", "norm_weight", "constant")

# criterion(ctx) -> one score per unit, in ctx.roots order
Criterion = Callable[["ImportanceContext"], np.ndarray]
IMPORTANCE: dict[str, Criterion] = {}


def register_importance(name: str, *, override: bool = False):
    """Decorator: ``fn(ctx) -> scores`` is the importance criterion ``name``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"an importance criterion needs a name, got {name!r}")

    def deco(fn: Criterion) -> Criterion:
        if name in IMPORTANCE and not override:
            raise ValueError(f"importance {name!r} is already registered; pass override=True "
                             f"to replace it")
        IMPORTANCE[name] = fn
        return fn

    return deco


def _per_index(t: torch.Tensor, dim: int, fn) -> np.ndarray:
    """fn(t) reduced over every dim but ``dim``: one value per index along ``dim``."""
    others = [d for d in range(t.dim()) if d != dim]
    v = fn(t.detach())
    return (v.sum(dim=others, dtype=torch.float64) if others else v.double()).cpu().numpy()


@dataclass
class ImportanceContext:
    """What a criterion sees: the units to score and everything they are scored from."""

    gm: fx.GraphModule
    analysis: ChannelAnalysis
    groups: list[ChannelGroup]  # the prunable groups
    roots: list[int]  # their unit roots, group by group: the order of the scores
    config: Any  # the PruneConfig (seed, loss, max_batches, ...)
    calibration_data: Any = None

    def __post_init__(self):
        self.index = {r: i for i, r in enumerate(self.roots)}  # unit root -> position

    def unit_sums(self, vec: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sum ``values`` (one per position of slot vector ``vec``) per unit: (sums, present)."""
        n_units = len(self.roots)
        ok = vec >= 0
        units = np.array([self.index.get(int(r), -1) for r in self.analysis.slot_root[vec[ok]]],
                         dtype=np.int64)
        vals = values[ok]
        keep = units >= 0
        sums = np.zeros(n_units)
        present = np.zeros(n_units, dtype=bool)
        np.add.at(sums, units[keep], vals[keep])
        present[units[keep]] = True
        return sums, present

    def magnitude(self, roles=MAGNITUDE_ROLES, p: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(sum over tensors of the unit's normalized Lp norm, number of tensors) per unit."""
        analysis = self.analysis
        total = np.zeros(len(self.roots))
        count = np.zeros(len(self.roots))
        for path, dims in analysis.params.items():
            if analysis.param_roles.get(path) not in roles:
                continue
            t = get_attr_value(self.gm, path)
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                continue
            for dim, vec in dims.items():
                per = _per_index(t, dim, torch.abs if p == 1 else torch.square)
                sums, present = self.unit_sums(vec, per)
                if p == 2:
                    sums = np.sqrt(sums)
                if not present.any():
                    continue
                mean = sums[present].mean()
                if mean > 0:
                    total[present] += sums[present] / mean
                    count[present] += 1
        return total, count


# -- the built-in criteria ----------------------------------------------------------------------
@register_importance("l1")
def l1(ctx: ImportanceContext) -> np.ndarray:
    total, count = ctx.magnitude(MAGNITUDE_ROLES, 1)
    return total / np.maximum(count, 1)


@register_importance("l2")
def l2(ctx: ImportanceContext) -> np.ndarray:
    total, count = ctx.magnitude(MAGNITUDE_ROLES, 2)
    return total / np.maximum(count, 1)


@register_importance("bn_scale")
def bn_scale(ctx: ImportanceContext) -> np.ndarray:
    bn_total, bn_count = ctx.magnitude(("bn_weight",), 1)
    l1_total, l1_count = ctx.magnitude(MAGNITUDE_ROLES, 1)
    scores = np.where(bn_count > 0, bn_total / np.maximum(bn_count, 1),
                      l1_total / np.maximum(l1_count, 1))
    # a group mixes criteria only if some of its units lack a BatchNorm: use L1 throughout
    for g in ctx.groups:
        idx = [ctx.index[int(r)] for r in g.unit_roots]
        if (bn_count[idx] == 0).any():
            scores[idx] = l1_total[idx] / np.maximum(l1_count[idx], 1)
    return scores


def split_batch(batch: Any) -> tuple[tuple, Any]:
    """A calibration batch as (inputs, target or None)."""
    if isinstance(batch, torch.Tensor):
        return (batch,), None
    if isinstance(batch, dict):
        raise InputError("calibration batches must be tensors or (inputs, target) pairs, "
                         "got a dict")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        *xs, y = batch
        return tuple(xs), y
    if isinstance(batch, (tuple, list)) and len(batch) == 1:
        return (batch[0],), None
    raise InputError(f"cannot read a calibration batch of type {type(batch).__name__}",
                     hint="pass batches as tensors or (inputs, target) pairs")


@register_importance("taylor")
def taylor(ctx: ImportanceContext) -> np.ndarray:
    cfg, data, analysis = ctx.config, ctx.calibration_data, ctx.analysis
    if data is None:
        raise PreconditionError(
            "importance='taylor' needs calibration data (batches of inputs and targets)",
            hint="pass calibration_data=[(x, y), ...] to optimize, or PruneConfig("
                 "calibration_data=..., loss=...)")
    work = copy.deepcopy(ctx.gm)  # gradients on a copy: the graph being pruned stays as it is
    work.eval()
    params = {}
    for path in analysis.params:
        if analysis.param_roles.get(path) in _TAYLOR_ROLES:
            t = get_attr_value(work, path)
            if isinstance(t, torch.nn.Parameter):
                params[path] = t
    for t in work.parameters():
        t.requires_grad_(False)
    for t in params.values():
        t.requires_grad_(True)
    scores = np.zeros(len(ctx.roots))
    used = 0
    for batch in data:
        if used >= cfg.max_batches:
            break
        xs, y = split_batch(batch)
        for t in params.values():
            t.grad = None
        with torch.enable_grad():
            out = work(*xs)
            if cfg.loss is not None:
                loss = cfg.loss(out, y) if y is not None else cfg.loss(out)
            elif y is not None:
                loss = F.cross_entropy(out, y)
            else:
                raise PreconditionError(
                    "importance='taylor' needs a loss: the calibration batches have no targets",
                    hint="pass (inputs, target) batches, or PruneConfig(loss=lambda out: ...)")
            loss.backward()
        per_batch = np.zeros(len(ctx.roots))
        for path, t in params.items():
            if t.grad is None:
                continue
            wg = (t.detach() * t.grad).to(torch.float64)
            for dim, vec in analysis.params[path].items():
                others = [d for d in range(wg.dim()) if d != dim]
                vals = (wg.sum(dim=others) if others else wg).cpu().numpy()
                sums, _ = ctx.unit_sums(vec, vals)
                per_batch += sums
        scores += np.abs(per_batch)
        used += 1
    if used == 0:
        raise InputError("importance='taylor' got no calibration batches")
    return scores


@register_importance("random")
def random_scores(ctx: ImportanceContext) -> np.ndarray:
    return np.random.default_rng(ctx.config.seed).random(len(ctx.roots))


# -- scoring ------------------------------------------------------------------------------------
def unit_scores(gm: fx.GraphModule, analysis: ChannelAnalysis, cfg: Any,
                calibration_data: Any = None) -> dict[int, float]:
    """One importance score per unit root of the prunable groups (higher: keep first).

    ``cfg``: the ``PruneConfig``; its ``importance`` names the criterion.
    """
    groups = [g for g in analysis.groups if g.prunable]
    roots = [int(r) for g in groups for r in g.unit_roots]
    if not roots:
        return {}
    criterion = IMPORTANCE.get(cfg.importance)
    if criterion is None:  # PruneConfig validates the name; a criterion removed since then
        raise InputError(f"unknown importance {cfg.importance!r}",
                         hint=f"registered: {sorted(IMPORTANCE)}")
    ctx = ImportanceContext(gm, analysis, groups, roots, cfg, calibration_data)
    scores = np.asarray(criterion(ctx), dtype=np.float64)
    if scores.shape != (len(roots),):
        raise InputError(f"importance {cfg.importance!r} returned scores of shape "
                         f"{tuple(scores.shape)} for {len(roots)} units",
                         hint="return one score per unit, in ctx.roots order")
    return {r: float(scores[i]) for i, r in enumerate(roots)}
