"""Importance of each pruning unit (a set of channels removed together), per criterion.

Every criterion scores a unit from the weights it owns: the slices of every tensor the channel
analysis tied to it (the producer's output filters, the consumers' input columns, BatchNorm and
LayerNorm scales, layer-scale constants).

- ``l1`` / ``l2``: per tensor, the L1 (L2) norm of the unit's slice, divided by that tensor's mean
  over its units (so a wide consumer does not drown a narrow producer), averaged over tensors;
- ``bn_scale``: |gamma| of the BatchNorms in the unit (network slimming); L1 where none;
- ``taylor``: |sum over the unit's weights of w * dL/dw|, summed over calibration batches: the
  first-order change of the loss when the unit is zeroed (Molchanov et al. 2019);
- ``random``: a seeded baseline.

    >>> scores = unit_scores(gm, analysis, PruneConfig(importance="l2"), calibration_data=None)
    >>> scores[root]        # one float per unit root
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fxopt.errors import InputError, PreconditionError
from fxopt.ir.graph import get_attr_value
from fxopt.prune.channels import ChannelAnalysis
from fxopt.prune.config import PruneConfig

__all__ = ["unit_scores"]

_MAGNITUDE_ROLES = ("weight", "bn_weight", "norm_weight", "constant")
_TAYLOR_ROLES = ("weight", "bias", "bn_weight", "norm_weight", "constant")


def _per_index(t: torch.Tensor, dim: int, fn) -> np.ndarray:
    """fn(t) reduced over every dim but ``dim``: one value per index along ``dim``."""
    others = [d for d in range(t.dim()) if d != dim]
    v = fn(t.detach())
    return (v.sum(dim=others, dtype=torch.float64) if others else v.double()).cpu().numpy()


def _unit_sums(analysis: ChannelAnalysis, vec: np.ndarray, values: np.ndarray,
               index: dict[int, int], n_units: int):
    """Sum ``values`` (one per position of ``vec``) per unit; (sums, present)."""
    ok = vec >= 0
    units = np.array([index.get(int(r), -1) for r in analysis.slot_root[vec[ok]]], dtype=np.int64)
    vals = values[ok]
    keep = units >= 0
    sums = np.zeros(n_units)
    present = np.zeros(n_units, dtype=bool)
    np.add.at(sums, units[keep], vals[keep])
    present[units[keep]] = True
    return sums, present


def _magnitude(gm, analysis, index, n_units, roles, p: int) -> tuple[np.ndarray, np.ndarray]:
    total = np.zeros(n_units)
    count = np.zeros(n_units)
    for path, dims in analysis.params.items():
        if analysis.param_roles.get(path) not in roles:
            continue
        t = get_attr_value(gm, path)
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            continue
        for dim, vec in dims.items():
            per = _per_index(t, dim, torch.abs if p == 1 else torch.square)
            sums, present = _unit_sums(analysis, vec, per, index, n_units)
            if p == 2:
                sums = np.sqrt(sums)
            if not present.any():
                continue
            mean = sums[present].mean()
            if mean > 0:
                total[present] += sums[present] / mean
                count[present] += 1
    return total, count


def _split_batch(batch: Any) -> tuple[tuple, Any]:
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


def _taylor(gm, analysis, index, n_units, cfg: PruneConfig, data) -> np.ndarray:
    if data is None:
        raise PreconditionError(
            "importance='taylor' needs calibration data (batches of inputs and targets)",
            hint="pass calibration_data=[(x, y), ...] to optimize, or PruneConfig("
                 "calibration_data=..., loss=...)")
    work = copy.deepcopy(gm)
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
    scores = np.zeros(n_units)
    used = 0
    for batch in data:
        if used >= cfg.max_batches:
            break
        xs, y = _split_batch(batch)
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
        per_batch = np.zeros(n_units)
        for path, t in params.items():
            if t.grad is None:
                continue
            wg = (t.detach() * t.grad).to(torch.float64)
            for dim, vec in analysis.params[path].items():
                others = [d for d in range(wg.dim()) if d != dim]
                vals = (wg.sum(dim=others) if others else wg).cpu().numpy()
                sums, _ = _unit_sums(analysis, vec, vals, index, n_units)
                per_batch += sums
        scores += np.abs(per_batch)
        used += 1
    if used == 0:
        raise InputError("importance='taylor' got no calibration batches")
    return scores


def unit_scores(gm, analysis: ChannelAnalysis, cfg: PruneConfig,
                calibration_data: Any = None) -> dict[int, float]:
    """One importance score per unit root of the prunable groups (higher: keep first)."""
    roots = [int(r) for g in analysis.groups if g.prunable for r in g.unit_roots]
    index = {r: i for i, r in enumerate(roots)}
    n = len(roots)
    if n == 0:
        return {}
    if cfg.importance == "random":
        rng = np.random.default_rng(cfg.seed)
        scores = rng.random(n)
    elif cfg.importance in ("l1", "l2"):
        total, count = _magnitude(gm, analysis, index, n, _MAGNITUDE_ROLES,
                                  1 if cfg.importance == "l1" else 2)
        scores = total / np.maximum(count, 1)
    elif cfg.importance == "bn_scale":
        bn_total, bn_count = _magnitude(gm, analysis, index, n, ("bn_weight",), 1)
        l1_total, l1_count = _magnitude(gm, analysis, index, n, _MAGNITUDE_ROLES, 1)
        scores = np.where(bn_count > 0, bn_total / np.maximum(bn_count, 1),
                          l1_total / np.maximum(l1_count, 1))
        # a group mixes criteria only if some of its units lack a BatchNorm: use L1 throughout
        for g in analysis.groups:
            if not g.prunable:
                continue
            idx = [index[int(r)] for r in g.unit_roots]
            if (bn_count[idx] == 0).any():
                scores[idx] = l1_total[idx] / np.maximum(l1_count[idx], 1)
    elif cfg.importance == "taylor":
        scores = _taylor(gm, analysis, index, n, cfg, calibration_data)
    else:  # PruneConfig validates the name
        raise InputError(f"unknown importance {cfg.importance!r}")
    return {r: float(scores[i]) for r, i in index.items()}
