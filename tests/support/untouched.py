"""The check that a call left the user's objects alone (fxopt never modifies the user's model):
``snapshot`` records every part of a module, tensor, or tuple/list/dict of them a call could
change (parameters and buffers: identity, values, dtype, device, ``requires_grad``; the training
flag and hook dictionaries of every submodule), ``assert_same`` compares the objects with it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["snapshot", "assert_same", "obj_tensors"]

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
               "_state_dict_hooks", "_load_state_dict_pre_hooks")


def _tensor_state(t: torch.Tensor) -> tuple:
    return (id(t), t.detach().clone(), t.dtype, t.device, t.requires_grad)


def snapshot(obj: Any) -> Any:
    """Everything of ``obj`` (a module, a tensor, or a tuple/list/dict of them) a bad call
    must leave alone."""
    if isinstance(obj, nn.Module):
        return {
            "params": {k: _tensor_state(p) for k, p in obj.named_parameters()},
            "buffers": {k: _tensor_state(b) for k, b in obj.named_buffers()},
            "training": {k: m.training for k, m in obj.named_modules()},
            "hooks": {k: {d: [(h, id(f)) for h, f in getattr(m, d, {}).items()]
                          for d in _HOOK_DICTS} for k, m in obj.named_modules()},
            "type": type(obj),
        }
    if isinstance(obj, torch.Tensor):
        return _tensor_state(obj)
    if isinstance(obj, (tuple, list)):
        return [snapshot(o) for o in obj]
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    return None


def assert_same(before: Any, after_obj: Any, where: str = "") -> None:
    now = snapshot(after_obj)
    if isinstance(before, tuple):  # one tensor
        assert now[0] == before[0], f"{where}: a different tensor object"
        assert now[2] == before[2] and now[3] == before[3], f"{where}: dtype/device changed"
        assert now[4] == before[4], f"{where}: requires_grad changed"
        assert now[1].shape == before[1].shape, f"{where}: shape changed"
        if now[3].type != "meta":
            assert torch.equal(now[1], before[1]), f"{where}: values changed"
        return
    if isinstance(before, dict) and "params" in before:
        assert now["type"] is before["type"]
        for kind in ("params", "buffers"):
            assert list(now[kind]) == list(before[kind]), f"{where}: {kind} added or removed"
            for k in before[kind]:
                assert_same(before[kind][k], dict(obj_tensors(after_obj, kind))[k],
                            f"{where}{k}")
        assert now["training"] == before["training"], f"{where}: a training flag changed"
        assert now["hooks"] == before["hooks"], f"{where}: hooks changed"
        return
    if isinstance(before, list):
        assert len(now) == len(before)
        for i, (b, o) in enumerate(zip(before, after_obj)):
            assert_same(b, o, f"{where}[{i}]")
        return
    if isinstance(before, dict):
        assert list(now) == list(before)
        for k in before:
            assert_same(before[k], after_obj[k], f"{where}[{k!r}]")


def obj_tensors(module: nn.Module, kind: str):
    return module.named_parameters() if kind == "params" else module.named_buffers()
