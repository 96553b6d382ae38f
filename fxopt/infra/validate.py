"""Argument checks shared by the public entry points (``optimize``, ``channel_groups``, ...).

Each function takes one argument as the user gave it and returns it in the form the code below
expects, or raises a typed error (``PipelineError`` / ``InputError``) whose hint says what to
pass. They run before anything is copied, traced or executed, so a bad argument never costs a
capture and never reaches the user's model. A lone string or class where a list is expected is
taken as a list of one (``passes="fold_bn"``, ``leaf_modules=MyBlock``): that is what the user
meant, never its letters.

    >>> names_arg(["cleanup"], "passes")          # ['cleanup']
    >>> names_arg("fold_bn", "disable")           # ['fold_bn']
    >>> choice_arg("every", "check", ("each", "end", "none"))   # PipelineError, with a hint
"""
from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
import torch.nn as nn

from fxopt.errors import FxoptError, InputError, PipelineError

__all__ = ["names_arg", "pipeline_arg", "choice_arg", "leaf_modules_arg", "concrete_args_arg",
           "instruments_arg", "calibration_arg", "calibration_batch", "INSTRUMENT_METHODS"]

INSTRUMENT_METHODS = ("on_start", "before_pass", "after_pass", "on_end")


_LISTING = "`fxopt passes` lists the passes, groups and pipelines"


def names_arg(value: Any, what: str) -> list[str]:
    """``passes=`` / ``disable=``: None, one name, or a list/tuple of names -> a list of names."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple, set, frozenset)):
        bad = [v for v in value if not isinstance(v, str)]
        if bad:
            raise PipelineError(f"{what}= holds pass or group names, got {bad[0]!r} "
                                f"({type(bad[0]).__name__})",
                                hint=f"pass names as strings, e.g. {what}=['fold_bn']; "
                                     f"{_LISTING}")
        return list(value)
    raise PipelineError(f"{what}= must be a pass name or a list of names, got "
                        f"{type(value).__name__}",
                        hint=f"e.g. {what}=['fold_bn'] ({_LISTING})")


def pipeline_arg(value: Any) -> str | list[str]:
    """``pipeline=``: None (``"default"``), a pipeline name, or a list of pass/group names."""
    if value is None:
        return "default"
    if isinstance(value, str):
        if not value:
            raise PipelineError("pipeline= is an empty string",
                                hint="leave pipeline unset for the default, or name one of "
                                     "fxopt.PIPELINES")
        return value
    if isinstance(value, (list, tuple)):
        return names_arg(value, "pipeline")
    raise PipelineError(f"pipeline= must be a pipeline name or a list of pass names, got "
                        f"{type(value).__name__}",
                        hint="e.g. pipeline='default' or pipeline=['cleanup', 'fold_bn'] "
                             f"({_LISTING})")


def choice_arg(value: Any, what: str, allowed: Sequence[str], *,
               error: type[FxoptError] = PipelineError, also: str | None = None) -> str:
    """One of ``allowed`` (``check=``, ``on_mismatch=``, ``target=``, a config's field named
    ``what``), or ``error`` with a hint listing them (``also``: another way out)."""
    if not isinstance(value, str) or value not in allowed:
        near = [a for a in allowed if isinstance(value, str) and a[:2] == value[:2]]
        guess = f"did you mean {what.split('.')[-1]}={near[0]!r}? " if near else ""
        choices = " or ".join(repr(a) for a in allowed)
        raise error(f"{what} must be one of {tuple(allowed)}, got {value!r}",
                    hint=f"{guess}pass {what.split('.')[-1]}={choices}"
                         + (f"; or {also}" if also else ""))
    return value


def leaf_modules_arg(value: Any) -> list:
    """``leaf_modules=``: module classes and module paths; one class or path alone is a list of
    one. Entries are checked by the capture (``fxopt.ir.capture``)."""
    if value is None:
        return []
    if isinstance(value, (str, type)):
        return [value]
    if isinstance(value, nn.Module):
        raise InputError(f"leaf_modules= takes module classes or paths, got a "
                         f"{type(value).__name__} instance",
                         hint=f"pass its class: leaf_modules=[{type(value).__name__}]")
    try:
        items = list(value)
    except TypeError:
        raise InputError(f"leaf_modules= must be a list of module classes or module paths, got "
                         f"{type(value).__name__}",
                         hint="e.g. leaf_modules=[MyBlock] or leaf_modules=['layer3.1']") from None
    for item in items:
        if isinstance(item, nn.Module):
            raise InputError(f"leaf_modules= takes module classes or paths, got a "
                             f"{type(item).__name__} instance",
                             hint=f"pass its class: leaf_modules=[{type(item).__name__}]")
    return items


def concrete_args_arg(model: nn.Module, value: Any) -> dict | None:
    """``concrete_args=``: a dict from names of ``model.forward``'s parameters to values."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InputError(f"concrete_args= must be a dict of forward() arguments, got "
                         f"{type(value).__name__}",
                         hint="e.g. concrete_args={'return_loss': False}")
    try:
        params = inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):  # a builtin or C forward: nothing to check against
        return value
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return value
    names = [n for n in params if n != "self"]
    unknown = [k for k in value if k not in names]
    if unknown:
        raise InputError(f"concrete_args names {unknown}, which {type(model).__name__}.forward "
                         f"does not take (it takes {names})",
                         hint="name parameters of forward(), e.g. "
                              f"concrete_args={{{names[-1]!r}: ...}}" if names else
                              "drop concrete_args: forward() takes no parameters")
    return value


def instruments_arg(value: Any) -> list:
    """``instruments=``: ``fxopt.Instrument`` objects (anything with its four methods)."""
    if value is None:
        return []
    items = [value] if _is_instrument(value) else value
    try:
        items = list(items)
    except TypeError:
        raise PipelineError(f"instruments= must be a list of fxopt.Instrument objects, got "
                            f"{type(value).__name__}",
                            hint="subclass fxopt.Instrument and pass instruments=[MyInstrument()]"
                            ) from None
    for item in items:
        if not _is_instrument(item):
            raise PipelineError(f"instruments= holds a {type(item).__name__}, which is not an "
                                f"fxopt.Instrument (no {', '.join(INSTRUMENT_METHODS)})",
                                hint="subclass fxopt.Instrument and override the hooks you need")
    return items


def _is_instrument(obj: Any) -> bool:
    return not isinstance(obj, type) and all(callable(getattr(obj, m, None))
                                             for m in INSTRUMENT_METHODS)


def calibration_arg(data: Any, example_inputs: tuple) -> None:
    """Structural checks of ``calibration_data=`` that consume nothing: a tensor alone or a
    non-iterable is refused, and a list/tuple of batches is checked batch by batch (a tensor,
    or ``(inputs..., target)`` whose inputs are tensors shaped like the example inputs up to
    the batch size). Iterators and DataLoaders are checked where they are read."""
    if data is None:
        return
    if isinstance(data, torch.Tensor):
        raise InputError("calibration_data is one tensor, not a collection of batches",
                         hint="pass calibration_data=[batch1, batch2, ...] or a DataLoader")
    if isinstance(data, (str, bytes, dict)) or not hasattr(data, "__iter__"):
        raise InputError(f"calibration_data must be an iterable of batches, not "
                         f"{type(data).__name__}", hint="pass a list of tensors or a DataLoader")
    if not isinstance(data, (list, tuple)):
        return
    if not data:
        raise InputError("calibration_data is empty",
                         hint="pass at least one batch shaped like the example inputs")
    for i, batch in enumerate(data):
        calibration_batch(batch, i, example_inputs)


def calibration_batch(batch: Any, i: int, example_inputs: tuple) -> tuple:
    """The model's arguments in calibration batch ``i`` (a tensor, or ``(inputs..., target)``),
    checked against the example inputs (tensors, as many, shaped alike up to the batch size, not
    empty); an ``InputError`` with a hint otherwise. ``calibration_data=`` lists are checked with
    it up front, and the quantizer reads every batch through it."""
    n = len(example_inputs)
    args = (batch,) if isinstance(batch, torch.Tensor) else \
        tuple(batch[:n]) if isinstance(batch, (tuple, list)) else None
    if args is None or not args or not all(isinstance(a, torch.Tensor) for a in args):
        got = type(batch).__name__ if args is None else \
            f"({', '.join(type(a).__name__ for a in batch)})"
        raise InputError(f"calibration batch {i} is {got}; expected a tensor or an "
                         f"(inputs..., target) tuple of tensors",
                         hint="pass batches like the example inputs, e.g. "
                              "calibration_data=[torch.randn(8, 3, 224, 224), ...]")
    if len(args) != n:
        raise InputError(f"calibration batch {i} has {len(args)} inputs; the model takes {n}",
                         hint="give each batch as (input1, ..., input{n}) or "
                              "(input1, ..., input{n}, target)".replace("{n}", str(n)))
    for a, ex in zip(args, example_inputs):
        if isinstance(ex, torch.Tensor) and a.numel() == 0:
            raise InputError(f"calibration batch {i} is empty (shape {tuple(a.shape)})",
                             hint="drop empty batches from calibration_data")
        if isinstance(ex, torch.Tensor) and (a.dim() != ex.dim()
                                             or a.shape[1:] != ex.shape[1:]):
            raise InputError(f"calibration batch {i} has shape {tuple(a.shape)}, but the "
                             f"example input has {tuple(ex.shape)} (only the batch size may "
                             f"differ)",
                             hint="calibrate on batches shaped like the model's inputs")
    return args