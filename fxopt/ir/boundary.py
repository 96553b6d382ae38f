"""The model and its example inputs at fxopt's boundary, before any tracing.

Every public entry point takes a user's model and example inputs; this module is what it does
with them first: refuse what fxopt cannot work on (``check_model``: an ``nn.Module`` in eval
mode; ``normalize_inputs``: a tensor or a tuple of tensors; ``check_finite``: no NaN/Inf or
meta tensors), run the model once on copies of the inputs (``run_eager``: a failure is the
inputs' fault, an ``InputError``), and make fxopt's one deep copy of the model
(``copy_model``). Each refusal is a typed error with a hint; nothing here touches the user's
model. ``fxopt.ir.capture`` traces the copy.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.nn as nn

from fxopt.errors import CaptureError, InputError, ModelTypeError, PreconditionError

__all__ = ["check_model", "normalize_inputs", "describe_inputs", "run_eager", "copy_model",
           "check_finite", "static_input_shapes", "check_static_shapes"]


def check_model(model: Any) -> None:
    """Raise a typed error unless ``model`` is an ``nn.Module`` in eval mode."""
    if not isinstance(model, nn.Module):
        raise ModelTypeError(
            f"expected a torch.nn.Module, got {type(model).__name__}",
            hint="pass the model object itself (for a TorchScript or exported program, pass the "
                 "original nn.Module)",
        )
    for name, mod in model.named_modules():
        if mod.training:
            where = f"submodule '{name}' ({type(mod).__name__}) is" if name else "the model is"
            raise PreconditionError(
                f"{where} in training mode; fxopt optimizes for inference (BatchNorm statistics "
                f"and dropout are frozen)",
                hint="call model.eval() first",
            )


def normalize_inputs(example_inputs: Any) -> tuple:
    """A tensor or a tuple/list of tensors (other values allowed beside them) -> tuple."""
    if example_inputs is None:
        raise InputError(
            "example_inputs is required: fxopt records shapes and checks every pass on them",
            hint="pass one batch of real-shaped input, e.g. torch.randn(1, 3, 224, 224)",
        )
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        if len(example_inputs) == 0:
            raise InputError("example_inputs is empty", hint="pass at least one input tensor")
        if not any(isinstance(x, torch.Tensor) for x in example_inputs):
            raise InputError(
                f"example_inputs holds no tensor "
                f"(got {[type(x).__name__ for x in example_inputs]})",
                hint="pass tensors, e.g. (torch.randn(1, 3, 224, 224),)",
            )
        return tuple(example_inputs)
    kind = type(example_inputs).__name__
    hint = "convert it with torch.from_numpy(...)" if kind == "ndarray" else \
        "pass a tensor or a tuple of tensors (keyword inputs: use concrete_args)"
    raise InputError(f"example_inputs must be a tensor or a tuple of tensors, got {kind}",
                     hint=hint)


def describe_inputs(inputs: tuple) -> str:
    """Shapes and dtypes of ``inputs``, for error messages."""
    return ", ".join(f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
                     if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs)


def run_eager(model: nn.Module, inputs: tuple, kwargs: dict[str, Any] | None = None) -> Any:
    """Run ``model`` on the example inputs; a failure becomes an InputError saying so.

    A forward that writes into its own buffers (a step counter, running statistics kept by
    hand) cannot be captured faithfully: the graph would freeze the value seen while tracing.
    That gets a warning naming the buffers.
    """
    from fxopt.ir.check import clone_inputs, seeded  # check imports nothing from capture

    before = {k: v.clone() for k, v in model.named_buffers()}
    try:
        with torch.no_grad(), seeded(inputs):
            out = model(*clone_inputs(inputs), **(kwargs or {}))  # forward may write into x
        changed = [k for k, v in model.named_buffers()
                   if k in before and (v.shape != before[k].shape or not torch.equal(v, before[k]))]
        if changed:
            warnings.warn(
                f"fxopt: the model's forward changes its buffers {changed[:5]}; the captured graph "
                f"computes with their values at capture time and will not update them",
                stacklevel=3)
        return out
    except Exception as e:  # noqa: BLE001 - any failure here is about the inputs
        raise InputError(
            f"the model failed on the example inputs ({describe_inputs(inputs)}): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            hint="pass inputs of the shape, dtype and device the model expects",
        ) from e


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``, fxopt's only one. Tensors a hook derived with autograd
    (``torch.nn.utils.prune``'s ``weight = weight_orig * mask``, old-style weight norm) cannot be
    deep-copied; the copy gets them detached (the hooks recompute them on the next call)."""
    memo: dict[int, Any] = {}
    for mod in model.modules():
        for value in vars(mod).values():
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
    try:
        return copy.deepcopy(model, memo)
    except Exception as e:  # noqa: BLE001 - a model that cannot be copied is refused, typed
        raise CaptureError(
            f"the model cannot be copied (fxopt never touches the user's model, so it works on "
            f"a deep copy): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            hint="make the model deep-copyable (copy.deepcopy(model) must work): no open "
                 "files, locks or generators among its attributes") from e


def check_finite(values: Any, what: str) -> None:
    """InputError unless every floating tensor among ``values`` (nested) is finite."""
    import torch.utils._pytree as pytree

    for leaf in pytree.tree_leaves(values):
        if isinstance(leaf, torch.Tensor) and leaf.is_meta:
            raise InputError(f"{what} holds a tensor on the meta device (shape "
                             f"{tuple(leaf.shape)}), which has no values to compare",
                             hint="pass real tensors on the CPU or a CUDA device")
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.numel() \
                and not bool(torch.isfinite(leaf).all()):
            bad = int((~torch.isfinite(leaf)).sum())
            raise InputError(
                f"{what} holds {bad} NaN/Inf value(s) (a tensor of shape {tuple(leaf.shape)}): "
                f"fxopt checks every step by comparing outputs, and NaN/Inf cannot be compared",
                hint="pass finite example inputs (e.g. a real batch, or torch.randn of its "
                     "shape); if the model itself overflows on them, scale the inputs down")


def static_input_shapes(inputs: tuple, *, dynamic_batch: bool = False) -> list:
    """The shapes a graph captured with ``torch.export`` was specialized to: one list per
    tensor input (None for other values; a None size with ``dynamic_batch``: dim 0 is free).
    ``torch.export`` bakes the example's sizes into reshapes and constants unless they are
    declared dynamic (and every size-1 dim always), so the graph may fail, or broadcast, at
    any other shape."""
    return [None if not isinstance(x, torch.Tensor) else
            [None if dynamic_batch and i == 0 else s for i, s in enumerate(x.shape)]
            for x in inputs]


def check_static_shapes(expected: list, args: tuple) -> None:
    """``InputError`` unless the tensor ``args`` have the ``expected`` shapes (a None size: any).
    Called by ``OptimizedModule`` before every call of a graph with export-specialized shapes:
    a wrong shape must be a typed error, never a raw one from inside the graph or a silent
    broadcast against a constant that holds the example's sizes."""
    ok = len(args) == len(expected) and all(
        want is None or (isinstance(x, torch.Tensor) and x.dim() == len(want)
                         and all(w is None or w == s for w, s in zip(want, x.shape)))
        for want, x in zip(expected, args))
    if ok:
        return
    got = [list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in args]
    shown = [["*" if w is None else w for w in want] if want is not None else "any"
             for want in expected]
    raise InputError(
        f"this model was captured with torch.export, which specialized it to the example "
        f"inputs' shapes {shown}; called with {got}",
        hint="call it with inputs of those shapes, or optimize again with example inputs of the "
             "shape you will run (capture='symbolic_trace' keeps shapes free where the model "
             "traces: pass leaf_modules=[...] for the modules that could not)")
