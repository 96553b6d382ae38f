"""``fuse_attention``: a hand-written attention becomes one ``F.scaled_dot_product_attention``.

    s = q @ k.transpose(-2, -1) * scale              o = F.scaled_dot_product_attention(
    p = softmax(s + bias, dim=-1)            ->          q, k, v, attn_mask=bias, scale=scale)
    o = dropout(p) @ v          (eval)

Models that spell attention out (timm with ``fused_attn=False``, LeViT's attention biases,
BoTNet's and HaloNet's relative position logits, Hugging Face's ``attn_implementation="eager"``)
write the ``[L, S]`` logits and probabilities to memory three or four times; SDPA is one fused
kernel (flash / memory-efficient on CUDA, the flash kernel on the CPU), and one op that
pruning's channel rule (``fxopt/prune/rules_attention.py``) and the int8 planner see whole.

One ``op_rule`` anchored at the second matmul (``p @ v``); ``attention_form.read_attention``
reads the spellings (its docstring has the grammar and what is left alone: softmax not over the
last dim, probabilities or logits read elsewhere, a scale that is a tensor, a mask added before
the scale, ``masked_fill``, shapes outside SDPA's contract). The scale is always written into
the call (``scale=``: SDPA's default ``1/sqrt(E)`` would follow a pruned head dim; the user's
number must not), the masks added to the logits are its ``attn_mask`` (their sum when there are
several), and an eval dropout between softmax and ``@ v`` goes.

What SDPA is given, so that PyTorch runs a fused kernel (its math fallback is the hand-written
ops plus overhead: 1.9x slower than them at LeViT's shapes on the CPU, one thread): a mask of
fewer dims than q is unsqueezed to q's rank (the CPU flash kernel takes ``[1, H, L, S]``, not
``[H, L, S]``); a q, k or v whose last dim is not contiguous (BoTNet's and HaloNet's q from a
conv's ``[B, C, HW]``) is copied with ``.contiguous()``. Then PyTorch's own dispatch is asked
(``torch._fused_sdp_choice`` on the recorded values, on their device): where it still picks
the math path (v's head dim not q's, LeViT; a mask that requires grad, a trainable bias read
directly) the attention is left as it is, with a note (``left_math_fallback``). The figures:
``bench/results/attention-sdpa-2026-12-06.md``.

Each rewrite is checked against the nodes it replaces on the example inputs: one run of the
graph records q, k, v, the masks and the attention's output (only those values), and SDPA of
the recorded inputs, as it will be called, must equal the recorded output to the dtype's
tolerance (``fxopt.ir.tolerances``; NaNs in the same places). One that does not stays as it was
and a note says why; the pass manager then checks the whole graph against the one before
(``"exact"``).

Where it runs (``fxopt/pipelines.py``): the default pipeline, right after the first ``cleanup``
(eval dropouts gone, constant masks folded) and before ``prune_channels`` and the rest, so every
later pass sees SDPA. On an eager-attention BERT layer::

    >>> fuse_attention(gm, ctx).stats      # worst_rel_err: the largest check of one rewrite
    {'attention': 2, 'masked': 2, 'worst_rel_err': 4.1e-08}
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxopt.infra.preconditions import EVAL_MODE
from fxopt.infra.registry import PassContext, PassResult, register_pass
from fxopt.infra.rewrite import Builder, Match, apply_rules, op_rule
from fxopt.ir.check import clone_inputs, seeded, value_key
from fxopt.ir.graph import module_path, tensor_meta_of
from fxopt.ir.tolerances import rel_err, tolerance_for
from fxopt.passes.fusion.attention_form import (MATMULS, Attention, Factor, constant_scale,
                                                k_view_value, read_attention)

__all__ = ["fuse_attention", "RULES", "Recorded", "record_values", "math_fallback"]


def record_values(gm: fx.GraphModule, inputs: tuple, names: set[str]) -> dict[str, Any]:
    """The tensors (and numbers) the nodes ``names`` compute on ``inputs``, by ``value_key``;
    nothing else is kept while the graph runs."""
    kept: dict[str, Any] = {}

    class _Keep(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n.name in names and isinstance(out, (torch.Tensor, int, float)):
                kept[value_key(n)] = out
            return out

    with torch.no_grad(), seeded(inputs):
        _Keep(gm).run(*clone_inputs(inputs))
    return kept


def _value(values: dict[str, Any], x: Any) -> Any:
    return values.get(value_key(x)) if isinstance(x, fx.Node) else x


def _sdpa_of_recorded(att: Attention, values: dict[str, Any]) -> tuple | str:
    """SDPA of the recorded inputs, with k and the mask sum it reads; or why not."""
    q, k, v = (_value(values, n) for n in (att.q, att.k, att.v))
    scalars = [_value(values, f.value) for f in att.scale]
    if any(t is None for t in (q, k, v, _value(values, att.root), *scalars)):
        return "no recorded value to check it with"
    # a last dim that is not contiguous (BoTNet's q from a conv's [B, C, HW]) is made so, as
    # _replace writes it: PyTorch's fused kernels need it (else the math path)
    k = k_view_value(k, att.k_view)
    copied = tuple(t.stride(-1) != 1 for t in (q, k, v))
    q, k, v = (t.contiguous() if c else t for t, c in zip((q, k, v), copied))
    scale = constant_scale([Factor(_value(values, f.value), f.divides) for f in att.scale])
    mask = None
    for m in att.masks:
        t = _value(values, m)
        if t is not None:
            mask = t if mask is None else mask + t
    if mask is not None and mask.dim() < q.dim():  # as _replace writes it (module doc)
        mask = mask.reshape((1,) * (q.dim() - mask.dim()) + tuple(mask.shape))
    with torch.no_grad():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out, (q, k, v, mask, scale), copied


def math_fallback(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any,
                  scale: float) -> bool:
    """True when SDPA would run its math fallback for these values on their device (PyTorch's
    own dispatch, ``torch._fused_sdp_choice``; False where that is not there to ask)."""
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is None:
        return False
    try:
        from torch.nn.attention import SDPBackend

        return int(choose(q, k, v, mask, 0.0, False, scale=scale)) == int(SDPBackend.MATH)
    except Exception:  # noqa: BLE001 - a private helper: when it cannot say, rewrite
        return False


@dataclass
class Recorded:
    """The rule's context: the recorded values (by ``value_key``) and the largest relative error
    of a rewrite so far."""

    values: dict[str, Any]
    worst: float = 0.0
    math_fallback: int = 0  # attentions left because SDPA would take its math path


def _disagrees(att: Attention, rec: Recorded) -> tuple[str | None, dict]:
    """Why SDPA does not reproduce the attention on the example inputs (None: it does), and
    the recorded k and mask sum (for the new nodes' metadata)."""
    got = _sdpa_of_recorded(att, rec.values)
    if isinstance(got, str):
        return got, {}
    out, sdpa_args, copied = got
    ref = _value(rec.values, att.root)
    data = {"sdpa_args": sdpa_args, "copied": copied, "err": 0.0}
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return f"SDPA gives {list(out.shape)} {out.dtype}, it {list(ref.shape)} {ref.dtype}", data
    nan = torch.isnan(ref)
    if not torch.equal(nan, torch.isnan(out)):
        return "SDPA and the attention have NaNs in different places", data
    err = rel_err(torch.where(nan, 0.0, out), torch.where(nan, 0.0, ref))
    tol = tolerance_for(ref.dtype, ref.device)
    if not err <= tol:
        return f"SDPA differs by {err:.2g} (relative; allowed {tol:g})", data
    data["err"] = err
    return None, data


def _where(node: fx.Node) -> str:
    return f"'{module_path(node) or node.name}' ({node.name})"


def _check(m: Match) -> bool:
    att = read_attention(m.root)
    if att is None:
        return False
    if isinstance(att, str):
        return m.reject(f"attention at {_where(m.root)} left as matmul/softmax: {att}")
    why, data = _disagrees(att, m.context)
    if why is not None:
        return m.reject(f"attention at {_where(m.root)} left as matmul/softmax: {why} on the "
                        f"example inputs")
    if math_fallback(*data["sdpa_args"]):
        m.context.math_fallback += 1
        return m.reject(f"attention at {_where(m.root)} left as matmul/softmax: SDPA would run "
                        f"its math fallback on {data['sdpa_args'][0].device.type} (slower than "
                        f"the hand-written ops there)")
    m.data.update(att=att, **data)
    m.context.worst = max(m.context.worst, data["err"])
    return True


def _replace(m: Match, b: Builder) -> fx.Node:
    att: Attention = m.data["att"]
    q_value, k_value, v_value, mask_value, _ = m.data["sdpa_args"]
    q, k, v = att.q, att.k, att.v
    if att.k_view is not None:
        args = (k, -2, -1) if att.k_view[0] == "transpose" else (k, *att.k_view[1])
        k = b.call_method(att.k_view[0], args)
        k.meta["tensor_meta"] = tensor_meta_of(k_view_value(m.context.values[value_key(att.k)],
                                                            att.k_view))
    q, k, v = (_contiguous(n, t, b) if c else n
               for n, t, c in zip((q, k, v), (q_value, k_value, v_value), m.data["copied"]))
    mask, shape = None, ()
    for x in att.masks:
        if x is None:
            continue
        shape = torch.broadcast_shapes(shape, _shape(x)) if isinstance(x, fx.Node) else shape
        if mask is None:
            mask = x
            continue
        if x in att.optional:  # timm's maybe_add_mask(mask, x): x may be None at run time
            mask = b.call_function(att.optional[x], (mask, x))
        elif mask in att.optional:
            mask = b.call_function(att.optional[mask], (x, mask))
        else:
            mask = b.call_function(operator.add, (mask, x))
        _set_meta(mask, shape, q_value.dtype)
    if mask_value is not None:
        # as many dims as q: PyTorch's CPU flash kernel takes no [H, L, S] mask (math path)
        while len(shape) < q_value.dim():
            shape = (1, *shape)
            mask = b.call_method("unsqueeze", (mask, 0))
            _set_meta(mask, shape, q_value.dtype)
    for resolver in att.rewire:  # timm's mask resolver reads q's dtype and device, as before
        resolver.update_arg(1, att.q)
    g = m.gm.graph
    for guard in dict.fromkeys(att.guards):
        g.erase_node(guard)
    for drop in att.bypass:  # aten.dropout(train=False): the identity, which DCE would keep
        drop.replace_all_uses_with(drop.args[0])
        g.erase_node(drop)
    kwargs = {"attn_mask": mask} if mask is not None else {}
    b.tally("masked", int(mask_value is not None))  # a tensor on the example inputs
    return b.call_function(F.scaled_dot_product_attention, (q, k, v),
                           {**kwargs, "scale": _scale_node(att.scale, b)})


def _contiguous(node: fx.Node, value: torch.Tensor, b: Builder) -> fx.Node:
    """``node.contiguous()``; ``value``: its value (what SDPA was checked with)."""
    new = b.call_method("contiguous", (node,))
    new.meta["tensor_meta"] = tensor_meta_of(value)
    return new


def _shape(node: fx.Node) -> tuple:
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else ()


def _set_meta(node: fx.Node, shape: tuple, dtype: torch.dtype) -> None:
    """``tensor_meta`` of a new mask node (a sum or an unsqueeze: contiguous strides)."""
    node.meta["tensor_meta"] = tensor_meta_of(torch.empty(shape, dtype=dtype, device="meta"))


def _scale_node(factors: list[Factor], b: Builder) -> float | fx.Node:
    """The scale: a float, or (factors the graph computes from sizes) a node computing it."""
    numbers = [f for f in factors if not isinstance(f.value, fx.Node)]
    scale: float | fx.Node = constant_scale(numbers)
    for f in factors:
        if isinstance(f.value, fx.Node):
            scale = b.call_function(operator.truediv if f.divides else operator.mul,
                                    (scale, f.value))
            scale.meta["fxopt_nontensor"] = "float"
    return scale


RULES = [op_rule("attention", MATMULS, _replace, _check,
                 doc="softmax(q @ k^T * s [+ mask]) [eval dropout] @ v")]


@register_pass("fuse_attention", requires=(EVAL_MODE,), reference="exact")
def fuse_attention(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Hand-written attention, softmax(q @ k^T * s [+ mask]) @ v, becomes one SDPA call.

    Each rewrite is checked on the example inputs; where PyTorch would run SDPA's math
    fallback the attention is left as it is (see the module docstring)."""
    found = [a for a in map(read_attention, gm.graph.nodes) if isinstance(a, Attention)]
    if not found:
        notes = [f"attention at {_where(n)} left as matmul/softmax: {why}"
                 for n, why in ((n, read_attention(n)) for n in gm.graph.nodes)
                 if isinstance(why, str)]
        return PassResult(gm, modified=False, notes=notes)
    names = {n.name for a in found for n in a.inputs + [a.root]}
    rec = Recorded(record_values(gm, tuple(ctx.example_inputs), names))
    result = apply_rules(gm, RULES, context=rec)
    stats = {"attention": result.count} if result.count else {}
    if result.tallies.get("masked"):
        stats["masked"] = result.tallies["masked"]
    if result.count:
        stats["worst_rel_err"] = float(f"{rec.worst:.3g}")
    if result.rejected:
        stats["left"] = len(result.rejected)
    if rec.math_fallback:
        stats["left_math_fallback"] = rec.math_fallback
    return PassResult(gm, modified=result.count > 0, stats=stats, notes=list(result.notes))
