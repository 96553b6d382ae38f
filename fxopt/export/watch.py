"""Whether a module's weights are still the ones an engine was built from, in O(1) a call.

An engine (``fxopt.export.engines``) holds its own copy of the weights; the module it serves
keeps the graph, which runs for training and once the weights change. A call must therefore know
whether any weight was written in place or replaced since the engine was built. Checking each
tensor's version and identity touches every tensor on every call: on mobilenet_v3_large's 376
tensors that took ~0.4 ms with the caches cold from the inference, 10% of its int8 latency on
OpenVINO.

``WeightWatch`` makes it one comparison per dtype:

- **In place.** The module's plain tensors are moved into one flat storage per (dtype, device,
  layout), each weight becoming a view of it (64-byte aligned). PyTorch shares one version
  counter between a base and all its views, so a write through any weight (an optimizer step,
  ``load_state_dict``'s ``copy_``, ``p.mul_(2)`` under ``no_grad``) moves the
  base's version. Tensors that cannot be views (sparse, MKL-DNN, quantized, meta) keep a check of
  their own.
- **Replaced.** Each submodule's ``_parameters`` and ``_buffers`` dicts become ``_WatchedDict``,
  a ``dict`` that records any store or delete (``setattr``, ``register_buffer``,
  ``load_state_dict(assign=True)``, ``Module._apply``'s ``self._buffers[key] = fn(buf)``,
  ``del``), and a ``_modules`` change does the same (a submodule swapped in).
- **Unversioned.** A write through ``t.data`` moves no version counter; after one the user
  calls ``fxopt.weights_written()`` (``fxopt.ops.unversioned``), which every watch sees.

The module is the engine's own graph module (fxopt's copy, never the user's model); its weights
keep their values, names, ``requires_grad`` and sharing (a tied weight stays one tensor).
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn as nn

from fxopt.ops.unversioned import epoch

__all__ = ["WeightWatch"]

_ALIGN_BYTES = 64


class _WatchedDict(dict):
    """A module's ``_parameters``/``_buffers``/``_modules`` that flags every change."""

    __slots__ = ("changed",)

    def __init__(self, items, changed: list):
        super().__init__(items)
        self.changed = changed  # a one-item list shared by the module's dicts: [bool]

    def __setitem__(self, key, value):
        if self.get(key, _ABSENT) is not value:
            self.changed[0] = True
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self.changed[0] = True
        super().__delitem__(key)

    def __reduce__(self):  # a copy or pickle is a plain dict: its own module is not watched
        return dict, (dict(self),)


_ABSENT = object()


def _flagging(name: str):
    method = getattr(dict, name)

    def flagged(self, *args, **kwargs):
        self.changed[0] = True
        return method(self, *args, **kwargs)

    flagged.__name__ = name
    return flagged


for _name in ("pop", "popitem", "clear", "update", "setdefault"):
    setattr(_WatchedDict, _name, _flagging(_name))
del _name


def _flattenable(t: torch.Tensor) -> bool:
    return (t.layout == torch.strided and not t.is_quantized and not t.is_mkldnn
            and t.device.type != "meta" and type(t) in (torch.Tensor, nn.Parameter))


class WeightWatch:
    """Watches ``module``'s weights; ``unchanged()`` is False once any was written or replaced.

    Building it moves the weights into shared storages (see the module docstring), so build it
    once, on a module fxopt owns."""

    def __init__(self, module: nn.Module):
        self.module = module
        self._changed = [False]
        self._epoch = epoch()  # fxopt.weights_written(): a write no version counter sees
        slots = [(m, kind) for m in module.modules() for kind in ("_parameters", "_buffers")]
        views = self._share_storage(slots)
        self._bases = [(base, base._version) for base in views]
        self._loose = [(t, t._version) for m, kind in slots
                       for t in getattr(m, kind).values()
                       if t is not None and not _flattenable(t)]
        for m in module.modules():
            for kind in ("_parameters", "_buffers", "_modules"):
                object.__setattr__(m, kind, _WatchedDict(getattr(m, kind), self._changed))

    @staticmethod
    def _share_storage(slots: list) -> list[torch.Tensor]:
        """Moves each flattenable weight into a view of one flat tensor per (dtype, device);
        returns the flat tensors."""
        groups: dict = defaultdict(dict)  # (dtype, device) -> {id(tensor): tensor}
        for m, kind in slots:
            for t in getattr(m, kind).values():
                if t is not None and _flattenable(t):
                    groups[(t.dtype, t.device)][id(t)] = t
        replaced: dict[int, torch.Tensor] = {}
        bases = []
        for (dtype, device), tensors in groups.items():
            align = max(1, _ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
            offsets, total = {}, 0
            for key, t in tensors.items():
                offsets[key] = total
                total += -(-max(t.numel(), 1) // align) * align
            with torch.no_grad():
                base = torch.empty(total, dtype=dtype, device=device)
                for key, t in tensors.items():
                    view = base[offsets[key]:offsets[key] + t.numel()].view(t.shape)
                    view.copy_(t)
                    if isinstance(t, nn.Parameter):
                        new = nn.Parameter(view, requires_grad=t.requires_grad)
                        new.__dict__.update(t.__dict__)
                    else:
                        new = view
                    replaced[key] = new
            bases.append(base)
        for m, kind in slots:
            d = getattr(m, kind)
            for name, t in d.items():
                if t is not None and id(t) in replaced:
                    d[name] = replaced[id(t)]
        return bases

    def unchanged(self) -> bool:
        """True while no weight was written in place, replaced, added or deleted."""
        if self._changed[0] or self._epoch != epoch():
            return False
        for base, version in self._bases:
            if base._version != version:
                return False
        for t, version in self._loose:
            if t._version != version:
                return False
        return True
