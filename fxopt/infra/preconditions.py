"""Preconditions: what a pass needs before it runs, each a small object with its own fix.

A pass lists them when it registers (``requires=(EVAL_MODE,)``, or by name: ``("eval",)``);
the pass manager checks each before the pass runs and raises ``PreconditionError`` with the
precondition's message and hint. A new precondition is one object, no manager change::

    ON_CUDA = Precondition("cuda", "a CUDA device is the target",
                           lambda gm, ctx: None if ctx.target == "cuda" else "the target is "
                           f"{ctx.target}", hint="use target='cuda' or disable the pass")
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.fx as fx

__all__ = ["Precondition", "PRECONDITIONS", "EVAL_MODE", "CALIBRATION_DATA", "CUDA_TARGET",
           "precondition"]


@dataclass(frozen=True)
class Precondition:
    """``check(gm, ctx)`` returns None when the precondition holds, else what is wrong
    (``ctx``: the pass's ``PassContext``; the registry imports this module, so not its type)."""

    name: str
    doc: str  # "the model is in eval mode": what holds when it is met
    check: Callable[[fx.GraphModule, Any], str | None]
    hint: str  # how the user makes it hold

    def __repr__(self) -> str:
        return f"<precondition {self.name}: {self.doc}>"


def _eval_mode(gm: fx.GraphModule, ctx) -> str | None:
    training = [n for n, m in gm.named_modules() if m.training]
    if training:
        return f"'{training[0] or 'the model'}' is in training mode"
    return None


def _calibration_data(gm: fx.GraphModule, ctx) -> str | None:
    return None if ctx.calibration_data is not None else "no calibration data was given"


def _cuda_target(gm: fx.GraphModule, ctx) -> str | None:
    return None if ctx.target == "cuda" else f"the target is '{ctx.target}'"


EVAL_MODE = Precondition("eval", "an eval-mode model", _eval_mode, "call model.eval() first")
CALIBRATION_DATA = Precondition(
    "calibration_data", "calibration data", _calibration_data,
    "pass calibration_data=[batch, ...] (a DataLoader works)")
CUDA_TARGET = Precondition("cuda", "target='cuda'", _cuda_target,
                           "use target='cuda' or disable the pass")

# By name, for ``register_pass(requires=("eval",))``.
PRECONDITIONS: dict[str, Precondition] = {p.name: p for p in (EVAL_MODE, CALIBRATION_DATA,
                                                               CUDA_TARGET)}


def precondition(value: str | Precondition) -> Precondition:
    """A precondition object from itself or its registered name (``KeyError`` if unknown)."""
    return value if isinstance(value, Precondition) else PRECONDITIONS[value]
