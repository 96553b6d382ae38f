"""Writes PyTorch does not version, and the call that tells fxopt about them.

fxopt keeps what it derives from a module's tensors for as long as the tensors are unchanged:
the packed int8 and float weights of the CPU kernels (``fxopt.ops.onednn``,
``fxopt.ops.int8_dynamic``), the bound calls of the direct twin (``fxopt.infra.direct``), an
engine's compiled copy (``fxopt.export.watch``). Unchanged means the same tensor object, the
same memory and the same version counter. Every in-place write through the tensor or a view of
it moves the counter: an optimizer step, ``load_state_dict``, ``p.mul_(2)`` under ``no_grad``.

Two kinds of write do not, and nothing can see them short of reading every weight on every call:

- a write through ``t.data`` (``t.data.copy_(w)``, ``t.data.mul_(0.5)``): ``.data`` is a tensor
  with a version counter of its own;
- a write to memory shared outside PyTorch (``t.numpy()[...] = ...``, DLPack).

After one, call :func:`weights_written` (``fxopt.weights_written()``): every cache above is
dropped and rebuilt from the tensors' current values on the next call, and an engine-backed
module runs its graph from then on, as after any weight change. Without it the module keeps
computing with the values it had, with no error.
"""
from __future__ import annotations

from typing import Callable

__all__ = ["weights_written", "epoch", "on_written"]

_EPOCH = [0]
_CLEARS: list[Callable[[], None]] = []


def weights_written() -> None:
    """Tell fxopt that tensors of its modules were written where PyTorch keeps no version (a
    write through ``t.data``, or through NumPy's view of a tensor): every packed weight, bound
    call and engine built from the old values is dropped (they are rebuilt on the next call;
    an engine-backed module runs its graph instead). Cheap; safe to call at any time."""
    _EPOCH[0] += 1
    for clear in _CLEARS:
        clear()


def epoch() -> int:
    """How many times :func:`weights_written` was called in this process: whatever is built
    from tensors records it and is stale once it moved."""
    return _EPOCH[0]


def on_written(clear: Callable[[], None]) -> Callable[[], None]:
    """Register ``clear`` (a cache's ``clear``) to run on every :func:`weights_written`."""
    _CLEARS.append(clear)
    return clear
