"""Copies of a module that share its tensors: a reference that only reads the weights.

A pass that rewrites a graph while keeping the graph before it as its reference (the int8
simulation, a decomposition checked against the call it replaces) needs its own copy of the
modules, the graph and the attribute dicts, since the rewrite adds, replaces and deletes
attributes; it does not need its own copy of the weights, which nobody writes into. On the
largest models a deep copy is gigabytes (issue 15: ``vit_h_14``'s 2.5 GB of weights, copied
per reference). ``copy_sharing_tensors`` deep-copies everything but the tensors: the copy's
parameters and buffers are the original's tensor objects.

Sharing is only right while nothing writes into those tensors in place. ``TensorGuard``
records each shared tensor's version counter and storage; ``written()`` names the tensors
something wrote into since (or whose storage was swapped, ``p.data = ...``), and ``check()``
raises a ``VerificationError`` naming them, so a reference that would silently compute on
changed weights fails instead.

    >>> ref = copy_sharing_tensors(gm)         # modules and graph copied, weights shared
    >>> guard = TensorGuard(ref)
    >>> ...                                    # gm rewritten
    >>> guard.check("quantize_int8")           # before the reference runs
"""
from __future__ import annotations

import copy
from typing import Iterator

import torch
import torch.nn as nn

from fxopt.errors import VerificationError

__all__ = ["copy_sharing_tensors", "module_tensors", "TensorGuard"]


def module_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(path, tensor)`` for every parameter, buffer and plain tensor attribute of ``module``
    and its submodules (a tensor reachable twice is named once)."""
    seen: set[int] = set()
    for prefix, mod in module.named_modules(remove_duplicate=False):
        found = list(mod._parameters.items()) + list(mod._buffers.items()) + \
            [(k, v) for k, v in vars(mod).items() if isinstance(v, torch.Tensor)]
        for name, t in found:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                yield (f"{prefix}.{name}" if prefix else name), t


def copy_sharing_tensors(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` (submodules, graph, attribute dicts) whose parameters, buffers
    and tensor attributes are ``module``'s own tensor objects (module doc): for a copy that only
    reads them. Attributes added, replaced or deleted on either side do not reach the other."""
    memo = {id(t): t for _, t in module_tensors(module)}
    return copy.deepcopy(module, memo)


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor keeps no version counter
        return None


def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # no plain storage (sparse): the version only
        return None


class TensorGuard:
    """Records the tensors of ``module`` and ``extra`` (by name) (version counter, storage);
    ``written()`` names those changed in place since, ``check(pass_name)`` raises on any
    (module doc)."""

    def __init__(self, module: nn.Module, extra: dict[str, torch.Tensor] | None = None):
        found = list(module_tensors(module)) + list((extra or {}).items())
        self._tensors = [(name, t, _version(t), _storage(t)) for name, t in found
                         if not t.is_meta]

    def written(self) -> list[str]:
        return [name for name, t, v, ptr in self._tensors
                if _version(t) != v or _storage(t) != ptr]

    def check(self, pass_name: str) -> None:
        written = self.written()
        if written:
            raise VerificationError(
                f"pass '{pass_name}' wrote into weights its reference shares ("
                f"{', '.join(written[:5])}): the reference would compute on the changed values",
                pass_name=pass_name, problems=[f"in-place write into {w}" for w in written],
                hint=f"disable it with disable=['{pass_name}'] (and please report it)")
