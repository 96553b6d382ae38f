"""``prune_channels``: structured channel pruning that makes the model physically smaller.

0. ``nn.MultiheadAttention`` self-attention leaves are opened into layers the rules know
   (``attention``: in_proj, SDPA, out_proj), so that whole heads can go;
1. ``fxopt.prune.channels`` finds the channel groups (what must go together) and the frozen
   ones;
2. ``fxopt.prune.importance`` scores every unit with the criterion the config names (``l1``,
   ``l2``, ``bn_scale``, ``taylor``, ``random``, or one registered with
   ``register_importance``);
3. a plan picks the units to remove: the same ratio in every group (``scope="uniform"``) or one
   ranking over all groups (``"global"``), by channels or by a MAC target (``by="macs"``,
   bisection on the channel ratio), with ``round_to`` and ``min_channels`` per group;
4. ``rewrite`` (this package) slices the weights, fixes modules and arguments, and checks every
   shape; a node it cannot rewrite consistently freezes the groups there and the plan is made
   again;
5. the pass returns the masked model (the original with the removed channels zeroed in every
   tensor of their group) as its reference: the manager checks that the pruned model equals it.

    >>> opt = fxopt.optimize(model.eval(), x, prune=0.5)
    >>> opt.report.record("prune_channels").stats
    {'groups': 13, 'pruned': 12, 'frozen': 1, 'channels_before': 4800, 'channels_after': 2400}

Running it again on a pruned graph does nothing (``modified=False``): a mark in ``gm.meta``.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import numpy as np
import torch.fx as fx

from fxopt.infra.preconditions import EVAL_MODE
from fxopt.infra.registry import PassContext, PassResult, register_pass
from fxopt.ir.graph import remove_unused_attributes
from fxopt.ir.metrics import count_macs
from fxopt.passes.prune.rewrite import apply_removal, check_shapes, fork, masked_reference
from fxopt.prune.attention import open_attention
from fxopt.prune.channels import ChannelAnalysis, analyze_channels
from fxopt.prune.config import PruneConfig
from fxopt.prune.importance import unit_scores
from fxopt.prune.records import ChannelGroup

__all__ = ["prune_channels", "PrunePlan", "plan_removal", "PRUNED_MARK"]

PRUNED_MARK = "fxopt_pruned"
_MAX_ATTEMPTS = 6


@dataclass
class PrunePlan:
    removed: set[int] = field(default_factory=set)  # unit roots
    kept: dict[int, int] = field(default_factory=dict)  # group id -> channels kept
    macs_before: int = 0
    macs_after: int = 0
    channel_ratio: float = 0.0  # the per-group ratio used (by="macs": found by bisection)
    notes: list[str] = field(default_factory=list)


def _round_keep(c: int, keep: float, cfg: PruneConfig) -> int:
    k = int(math.floor(keep + 0.5))
    if cfg.round_to > 1 and c >= cfg.round_to:
        k = max(cfg.round_to, int(math.floor(k / cfg.round_to + 0.5)) * cfg.round_to)
    return int(min(max(k, cfg.min_channels, 1), c))


def _ranked(g: ChannelGroup, scores: dict[int, float]) -> list[tuple[int, int]]:
    """(root, width) of the group's units, most important first (ties: older unit first)."""
    units = [(int(r), int(w)) for r, w in zip(g.unit_roots, g.unit_widths)]
    return sorted(units, key=lambda u: (-scores.get(u[0], 0.0), u[0]))


def _keep_top(g: ChannelGroup, scores, k: int) -> tuple[set[int], int]:
    """Remove all but the most important units covering at least ``k`` channels."""
    kept = 0
    removed: set[int] = set()
    for root, width in _ranked(g, scores):
        if kept >= k:
            removed.add(root)
        else:
            kept += width
    return removed, kept


def _plan_uniform(groups, scores, cfg: PruneConfig, ratio: float) -> PrunePlan:
    plan = PrunePlan(channel_ratio=ratio)
    for g in groups:
        k = _round_keep(g.channels, g.channels * (1.0 - ratio), cfg)
        removed, kept = _keep_top(g, scores, k)
        plan.removed |= removed
        plan.kept[g.id] = kept
    return plan


def _plan_global(groups, scores, cfg: PruneConfig, ratio: float) -> PrunePlan:
    cand = []
    floor: dict[int, int] = {}
    for g in groups:
        s = np.array([scores.get(int(r), 0.0) for r in g.unit_roots])
        mean = s.mean() if s.size and s.mean() > 0 else 1.0
        for r, sc, w in zip(g.unit_roots, s / mean, g.unit_widths):
            cand.append((float(sc), int(r), g.id, int(w)))
        floor[g.id] = max(cfg.min_channels, 1,
                          int(math.ceil(g.channels * (1.0 - cfg.max_group_ratio))))
    cand.sort()
    total = sum(g.channels for g in groups)
    budget = ratio * total
    removed_ch = {g.id: 0 for g in groups}
    size = {g.id: g.channels for g in groups}
    done = 0
    for _sc, _r, gid, w in cand:
        if done >= budget:
            break
        if size[gid] - removed_ch[gid] - w < floor[gid]:
            continue
        removed_ch[gid] += w
        done += w
    plan = PrunePlan(channel_ratio=ratio)
    for g in groups:
        k = _round_keep(g.channels, g.channels - removed_ch[g.id], cfg)
        removed, kept = _keep_top(g, scores, k)
        plan.removed |= removed
        plan.kept[g.id] = kept
    return plan


def plan_removal(analysis: ChannelAnalysis, scores: dict[int, float], cfg: PruneConfig,
                 total_macs: int | None = None) -> PrunePlan:
    """Which units to remove, for the prunable groups of ``analysis``."""
    groups = [g for g in analysis.groups if g.prunable]
    make = _plan_uniform if cfg.scope == "uniform" else _plan_global
    layer_before, _ = analysis.macs_after(set())
    total = total_macs if total_macs is not None else layer_before

    def with_macs(plan: PrunePlan) -> PrunePlan:
        _keep_every_tensor_nonempty(analysis, plan, scores)
        _, after = analysis.macs_after(plan.removed)
        plan.macs_before = total
        plan.macs_after = total - (layer_before - after)
        return plan

    if cfg.by == "channels":
        return with_macs(make(groups, scores, cfg, cfg.ratio))
    target = cfg.ratio  # fraction of the MACs to remove
    lo, hi = 0.0, 0.99 if cfg.scope == "uniform" else cfg.max_group_ratio
    best = with_macs(make(groups, scores, cfg, hi))
    if total and 1.0 - best.macs_after / total < target:
        best.notes.append(f"MAC target {target:.0%} not reachable: at most "
                          f"{1.0 - best.macs_after / total:.1%} with the unfrozen groups")
        return best
    for _ in range(24):
        mid = (lo + hi) / 2
        plan = with_macs(make(groups, scores, cfg, mid))
        if total and 1.0 - plan.macs_after / total >= target:
            best, hi = plan, mid
        else:
            lo = mid
    return best


def _keep_every_tensor_nonempty(analysis: ChannelAnalysis, plan: PrunePlan, scores) -> None:
    """Give back the best unit of any tensor that would lose all its channels (a conv with no
    output channel, an empty split piece), then count what each group keeps."""
    vecs = [lay.vec for lay in analysis.layouts.values() if not lay.free]
    vecs += [lay.vec for lays in analysis.tuple_layouts.values() for lay in lays if not lay.free]
    vecs += [v for dims in analysis.params.values() for v in dims.values()]
    changed = bool(plan.removed)
    while changed:
        changed = False
        removed = np.fromiter(plan.removed, dtype=np.int64)
        for vec in vecs:
            if len(vec) and analysis.removed_mask(vec, removed).all():
                roots = np.unique(analysis.slot_root[vec[vec >= 0]])
                best = max((int(r) for r in roots), key=lambda r: (scores.get(r, 0.0), -r))
                plan.removed.discard(best)
                plan.notes.append("kept a unit that would have emptied a tensor")
                changed = True
                break
    for g in analysis.groups:
        if g.id in plan.kept:
            gone = np.isin(g.unit_roots, np.fromiter(plan.removed, dtype=np.int64))
            plan.kept[g.id] = int(g.unit_widths[~gone].sum())


def _ignore(analysis: ChannelAnalysis, patterns) -> int:
    if not patterns:
        return 0
    hit = [g for g in analysis.groups if not g.frozen and any(
        fnmatch.fnmatchcase(layer, p) for layer in g.layers for p in patterns)]
    if hit:
        analysis.freeze_groups(hit, "ignored (PruneConfig.ignore)")
    return len(hit)


def _summary(analysis: ChannelAnalysis, plan: PrunePlan | None, cfg: PruneConfig):
    groups = analysis.groups
    for g in groups:
        g.kept = plan.kept.get(g.id, g.channels) if plan is not None else g.channels
    pruned = [g for g in groups if g.kept < g.channels]
    frozen = [g for g in groups if g.frozen]
    stats = {"groups": len(groups), "pruned": len(pruned), "frozen": len(frozen),
             "channels_before": sum(g.channels for g in groups),
             "channels_after": sum(g.kept for g in groups)}
    notes = [f"config: {cfg.describe()}"]
    if frozen:
        notes.append("frozen: " + "; ".join(f"{g.name} ({', '.join(g.reasons)})" for g in frozen))
    if pruned:
        notes.append("channels kept/had: " + ", ".join(f"{g.name} {g.kept}/{g.channels}"
                                                       for g in pruned))
    if plan is not None:
        notes.extend(plan.notes)
    return stats, notes


def _input_names(gm: fx.GraphModule, name: str) -> list[str]:
    node = next((n for n in gm.graph.nodes if n.name == name), None)
    if node is None:
        return [name]
    ins: list[str] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: ins.append(a.name))
    return [name] + ins


@register_pass("prune_channels", requires=(EVAL_MODE,), config=PruneConfig, reference="returned",
               before=("fold_bn", "fuse_act", "quantize_int8", "lower_to_triton"))
def prune_channels(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Structured channel pruning: remove the least important channels of each channel group."""
    if gm.meta.get(PRUNED_MARK):
        return PassResult(gm, modified=False,
                          notes=[f"already pruned ({gm.meta[PRUNED_MARK]}); not pruned again"])
    cfg = ctx.config(PruneConfig)
    original = gm
    gm, opened = open_attention(gm, ctx.example_inputs)
    analysis = analyze_channels(gm)
    ignored = _ignore(analysis, cfg.ignore)
    if cfg.ratio == 0.0 or not any(g.prunable for g in analysis.groups):
        stats, notes = _summary(analysis, None, cfg)
        notes.append("nothing to prune" if cfg.ratio else "ratio 0: nothing to prune")
        return PassResult(original, modified=False, stats=stats, notes=notes)
    scores = unit_scores(gm, analysis, cfg, cfg.calibration_data if cfg.calibration_data
                         is not None else ctx.calibration_data)
    total_macs = count_macs(gm)
    retries: list[str] = []
    for _attempt in range(_MAX_ATTEMPTS):
        plan = plan_removal(analysis, scores, cfg, total_macs)
        if not plan.removed:
            stats, notes = _summary(analysis, None, cfg)
            return PassResult(original, modified=False, stats=stats,
                              notes=notes + retries + ["no channel left to remove"])
        pruned = fork(gm)
        try:
            apply_removal(pruned, analysis, plan.removed, original=gm)
        except Exception as e:  # noqa: BLE001 - a rewrite that fails leaves the model whole
            stats, notes = _summary(analysis, None, cfg)
            return PassResult(original, modified=False, stats=stats, notes=notes + retries + [
                f"gave up: the rewrite failed ({type(e).__name__}: {e}); please report it"])
        bad = check_shapes(pruned, analysis, plan.removed, ctx.example_inputs)
        if bad is None:
            break
        node, problem = bad
        reason = f"node '{node}' could not be rewritten consistently ({problem})"
        before = sum(g.frozen for g in analysis.groups)
        analysis.freeze_nodes(_input_names(gm, node), reason)
        if sum(g.frozen for g in analysis.groups) == before:
            retries.append(f"gave up: {reason}")
            stats, notes = _summary(analysis, None, cfg)
            return PassResult(original, modified=False, stats=stats, notes=notes + retries)
        retries.append(f"froze the groups at {reason}")
    else:
        stats, notes = _summary(analysis, None, cfg)
        return PassResult(original, modified=False, stats=stats,
                          notes=notes + retries + ["gave up: no consistent pruning found"])
    reference = masked_reference(gm, analysis, plan.removed)
    remove_unused_attributes(pruned)
    pruned.recompile()
    stats, notes = _summary(analysis, plan, cfg)
    if ignored:
        stats["ignored"] = ignored
    if opened:
        stats["attention_opened"] = opened
        notes.append(f"opened {opened} nn.MultiheadAttention call(s) into in_proj, SDPA and "
                     f"out_proj so that their heads can be pruned")
    stats["macs_est_ratio"] = (round(plan.macs_after / plan.macs_before, 4)
                               if plan.macs_before else 1.0)
    pruned.meta[PRUNED_MARK] = cfg.describe()
    pruned.meta["fxopt_prune_groups"] = [g.as_dict() for g in analysis.groups]
    return PassResult(pruned, modified=True, stats=stats, notes=notes + retries,
                      reference=reference, shapes_changed=True)
