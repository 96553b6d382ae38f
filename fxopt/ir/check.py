"""Running a graph on the example inputs, recording what every node produced.

The pass manager uses one recorded run per pass: it refreshes ``tensor_meta`` (catching stale
metadata a pass left behind), gives the outputs to compare with the reference, and keeps the
intermediate values so that a mismatch can be traced to the first node that diverged.

    >>> run = record_run(gm, inputs)
    >>> run.output, run.values["layer1_0_conv1"]
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from fxopt.errors import InputError
from fxopt.ir.graph import module_path, tensor_meta_of
from fxopt.ir.tolerances import CONDITIONING_FACTOR, plain_structure, rel_err, tolerance_for

__all__ = ["RecordedRun", "record_run", "clone_inputs", "grown_inputs", "batch_of",
           "run_in_eval", "seeded",
           "conditioning_floors", "float64_copy", "first_divergence", "value_key", "describe_node"]


def value_key(node: fx.Node) -> str:
    """The identity of the value a node computes, stable across passes.

    It is the last entry of ``fxopt_from`` (the original node whose value this node reproduces),
    so a rewritten node is compared with the node it replaced.
    """
    return node.meta.get("fxopt_from", [node.name])[-1]


@dataclass
class RecordedRun:
    output: Any
    values: dict[str, Any] = field(default_factory=dict)  # value_key -> value (tensors)
    by_node: dict[str, Any] = field(default_factory=dict)  # node name -> the same tensors
    stale_meta: list[str] = field(default_factory=list)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, keep_values: bool, refresh_meta: bool):
        super().__init__(gm, garbage_collect_values=not keep_values)
        self.keep_values = keep_values
        self.refresh_meta = refresh_meta
        self.values: dict[str, Any] = {}
        self.by_node: dict[str, Any] = {}
        self.stale: list[str] = []

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            meta = tensor_meta_of(result)
            old = n.meta.get("tensor_meta")
            if not self.refresh_meta and old is not None and hasattr(old, "shape") and (
                    tuple(old.shape) != tuple(meta.shape) or old.dtype != meta.dtype):
                self.stale.append(f"node '{n.name}': tensor_meta says {tuple(old.shape)} "
                                  f"{old.dtype}, it computes {tuple(meta.shape)} {meta.dtype}")
            if self.refresh_meta or old is None:
                n.meta["tensor_meta"] = meta
            n.meta.pop("fxopt_nontensor", None)
            if self.keep_values and n.op != "placeholder":
                self.values[value_key(n)] = result
                self.by_node[n.name] = result
        elif n.op != "output":
            if self.refresh_meta or "tensor_meta" not in n.meta:
                n.meta.pop("tensor_meta", None)
                if isinstance(result, (tuple, list)) and result and all(
                        isinstance(r, torch.Tensor) for r in result):
                    n.meta["tensor_meta"] = tuple(tensor_meta_of(r) for r in result)
                else:
                    # The value's type: canonicalization tells a size (torch.Size) from an int.
                    n.meta["fxopt_nontensor"] = type(result).__name__
        return result


@contextlib.contextmanager
def seeded(inputs: tuple = ()):
    """Every run fxopt compares starts from the same random state (restored after), so a model
    that draws random numbers in forward (``torch.rand_like``) is compared with itself, not with
    another draw; the caller's random state is left as it was."""
    devices = sorted({x.device.index or 0 for x in inputs
                      if isinstance(x, torch.Tensor) and x.is_cuda})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        yield


def run_in_eval(module: nn.Module, inputs: tuple, *, what: str, hint: str) -> Any:
    """``module(*inputs)`` once in eval mode without gradients (no BatchNorm statistics move),
    every submodule's training flag put back after, on error too; a failure of the run is an
    ``InputError`` (``what`` failed, ``hint``) that keeps it as the cause."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.no_grad():
            return module(*inputs)
    except Exception as e:  # noqa: BLE001 - any failure here is about the inputs
        first = str(e).splitlines()[0] if str(e) else ""
        raise InputError(f"{what}: {type(e).__name__}: {first}", hint=hint) from e
    finally:
        for m, training in flags:
            m.training = training


def clone_inputs(inputs: tuple) -> tuple:
    """Fresh copies of the tensors among ``inputs`` (other values as they are).

    Every run fxopt makes of a model or a graph takes copies: a forward that writes into its
    input (``x.mul_(2)``) must neither change the caller's tensors nor the next run's input.
    """
    return tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x for x in inputs)


def grown_inputs(inputs: tuple) -> tuple:
    """The inputs at one more sample (each tensor's first row repeated at its end): the second
    batch that checks run besides the example inputs' own. A kernel can be right at one batch
    size and wrong at another (PyTorch's oneDNN 1x1 stride-2 int8 conv: exact at batch 1, tens
    of codes off at batch 2 on two threads; ``fxopt/ops/onednn.py``)."""
    return tuple(torch.cat([x, x[:1]]) if isinstance(x, torch.Tensor) and x.dim() > 0 else x
                 for x in inputs)


def batch_of(inputs: tuple) -> int | None:
    """Dim 0 of the first tensor input with a dimension (None: no such input)."""
    return next((x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0), None)


def record_run(gm: fx.GraphModule, inputs: tuple, *, keep_values: bool = True,
               refresh_meta: bool = False) -> RecordedRun:
    """Run ``gm`` on copies of ``inputs`` under no_grad, recording node values and checking
    metadata."""
    rec = _Recorder(gm, keep_values, refresh_meta)
    with torch.no_grad(), seeded(inputs):
        out = rec.run(*clone_inputs(inputs))
    return RecordedRun(plain_structure(out), rec.values, rec.by_node, rec.stale)


def first_divergence(gm: fx.GraphModule, by_node: dict[str, Any],
                     ref_values: dict[str, Any]) -> tuple[fx.Node, float] | None:
    """The first node (graph order) whose value differs from its reference counterpart.

    Nodes are matched by ``value_key`` (the last ``fxopt_from`` entry). Nodes without a
    counterpart of the same shape are skipped.
    """
    for node in gm.graph.nodes:
        val = by_node.get(node.name)
        if not isinstance(val, torch.Tensor):
            continue
        ref = ref_values.get(value_key(node))
        if not isinstance(ref, torch.Tensor) or ref.shape != val.shape or ref.dtype != val.dtype:
            continue
        if ref.numel() == 0:
            continue
        err = rel_err(val, ref)
        if err != err or err > tolerance_for(ref.dtype, ref.device):
            return node, err
    return None


def describe_node(node: fx.Node) -> str:
    path = module_path(node)
    return f"'{node.name}'" + (f" ({path})" if path else "")


def float64_copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model).to(torch.float64)`` without the float32 copy in between: each
    plain floating-point parameter and buffer is converted as it is copied (issue 15: the
    float32 copy was one more copy of the weights at the conversion's peak)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        if type(p) is nn.Parameter and p.is_floating_point():
            memo[id(p)] = nn.Parameter(p.detach().to(torch.float64, copy=True),
                                       requires_grad=p.requires_grad)
    for b in model.buffers():
        if type(b) is torch.Tensor and b.is_floating_point() and b.grad_fn is None:
            memo[id(b)] = b.detach().to(torch.float64, copy=True)
    return copy.deepcopy(model, memo).to(torch.float64)  # the rest as before


def conditioning_floors(model: Any, inputs: tuple, output: Any,
                        kwargs: dict[str, Any] | None = None) -> list[float] | None:
    """Per output leaf, ``CONDITIONING_FACTOR`` times the relative error of ``output`` (the
    model's own float32 output) against a float64 run of a copy of ``model``: how much this
    model amplifies rounding. None when the model does not run in float64."""
    import torch.utils._pytree as pytree

    def to64(v):
        return v.to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    try:
        model64 = float64_copy(model)
        with torch.no_grad(), seeded(inputs):
            out64 = model64(*(to64(x) for x in clone_inputs(inputs)), **(kwargs or {}))
    except Exception:  # noqa: BLE001 - a model that only runs in its own dtype: no allowance
        return None
    leaves = pytree.tree_leaves(plain_structure(output))
    leaves64 = pytree.tree_leaves(plain_structure(out64))
    if len(leaves) != len(leaves64):
        return None
    floors = []
    for a, b in zip(leaves, leaves64):
        ok = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and a.is_floating_point() and a.numel() > 0
        err = rel_err(a, b) if ok else 0.0
        floors.append(CONDITIONING_FACTOR * err if err == err else 0.0)
    return floors
