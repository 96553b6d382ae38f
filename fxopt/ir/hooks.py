"""Module forward hooks as capture sees them: found, probed, stripped, refused.

Eager runs an ``nn.Module``'s forward hooks and pre-hooks around its forward; a traced graph must
compute them too. This module finds them (``hooks_of``, ``hooked_modules``, ``describe_hooks``
for messages), learns which ones are observers while the eager model runs (``HookProbe``: a hook
that returned None on every call is a feature tap or logger, left out of the trace), removes them
from fxopt's copy once the graph computes them (``strip_hooks`` / ``restore_hooks``), and refuses
global module hooks, which no graph can reproduce (``refuse_global_hooks``). Tracing them into
the graph is ``fxopt.ir.capture``'s tracer.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from fxopt.errors import CaptureError

__all__ = ["hooks_of", "hooked_modules", "describe_hooks", "strip_hooks", "restore_hooks",
           "HookProbe", "refuse_global_hooks"]

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks")
_HOOK_SETS = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
              "_forward_hooks_always_called")


def hooks_of(mod: nn.Module) -> list[str]:
    """``mod``'s forward hooks and pre-hooks, described (kind and function name)."""
    found = []
    for kind in _HOOK_DICTS:
        for fn in getattr(mod, kind, {}).values():
            name = getattr(fn, "__qualname__", None) or type(fn).__name__
            found.append(f"{kind[1:-1].replace('_', ' ')} {name}")
    return found


def hooked_modules(model: nn.Module) -> dict[str, list[str]]:
    return {path: hooks for path, mod in model.named_modules() if (hooks := hooks_of(mod))}


def strip_hooks(model: nn.Module) -> list[tuple[Any, Any]]:
    """Remove the forward hooks of the captured copy: the graph now computes them. Returns
    what was removed (``restore_hooks`` puts it back)."""
    removed = []
    for mod in model.modules():
        for attr in _HOOK_DICTS + _HOOK_SETS:
            container = getattr(mod, attr, None)
            if container:
                removed.append((container, copy.copy(container)))
                container.clear()
    return removed


def restore_hooks(removed: list[tuple[Any, Any]]) -> None:
    for container, saved in removed:
        container.update(saved)


class HookProbe:
    """Wraps the hooks of fxopt's copy while the eager model runs, to learn which ones are
    observers (they returned None on every call: feature taps, loggers). Those are left out
    of the trace (``drop_observers``): run on fx proxies they would hand proxies to the user's
    own lists, and their side effects cannot live in a graph anyway."""

    def __init__(self, model: nn.Module):
        self.returned: dict[int, bool] = {}
        self.originals: list[tuple[dict, Any, Any]] = []
        for mod in model.modules():
            for attr in _HOOK_DICTS:
                hooks = getattr(mod, attr, {})
                for key, fn in list(hooks.items()):
                    self.originals.append((hooks, key, fn))
                    hooks[key] = self._wrap(key, fn)

    def _wrap(self, key, fn):
        def probe(*args, **kwargs):
            result = fn(*args, **kwargs)
            self.returned[key] = self.returned.get(key, False) or result is not None
            return result
        return probe

    def drop_observers(self) -> list[str]:
        """Put the hooks back, less the observers; returns the observers' names."""
        dropped = []
        for hooks, key, fn in self.originals:
            if self.returned.get(key, True):
                hooks[key] = fn
            else:
                del hooks[key]
                dropped.append(getattr(fn, "__qualname__", None) or type(fn).__name__)
        return dropped


def refuse_global_hooks() -> None:
    module_mod = torch.nn.modules.module
    names = [n for n in ("_global_forward_pre_hooks", "_global_forward_hooks")
             if getattr(module_mod, n, None)]
    if names:
        raise CaptureError(
            "global module hooks are registered (torch.nn.modules.module."
            "register_module_forward_hook / _pre_hook): they run on every module call, so a "
            "graph cannot reproduce them", hint="remove them (handle.remove()) before optimize")


def describe_hooks(hooks: dict[str, list[str]]) -> str:
    return "; ".join(f"'{p or '(the model)'}': {', '.join(h)}" for p, h in hooks.items())
