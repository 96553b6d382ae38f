"""Which int8 activation grid this CPU's kernels take: full 8-bit, or 7-bit (``reduce_range``).

x86 int8 kernels multiply uint8 activations by int8 weights. Without VNNI they use
``vpmaddubsw``, which adds two products in int16 and saturates: ``255 * 127 * 2 > 32767``, so
activations get 7-bit grids (``reduce_range=True``: ``127 * 127 * 2`` fits). With AVX-512 VNNI
(``vpdpbusd``) or AMX (``tdpbusd``) the products are summed in int32 and the full 8-bit range
is exact: on the digits ResNet 39.3 dB SQNR against 35.0 dB with 7-bit grids (issue 13).

Detection is at run time, from PyTorch's cpuinfo (``torch.cpu.get_capabilities()``), else the
``flags`` line of ``/proc/cpuinfo``. AVX-VNNI (the 256-bit form, ``avx_vnni``: Alder Lake and
later without AVX-512) does not count: fbgemm's AVX2 kernels do not use it, and PyTorch's own
check (``at::cpu::is_cpu_support_vnni``) asks for ``avx512_vnni`` too.

One kernel family saturates even with VNNI: fbgemm's grouped and depthwise convolutions (and
the ``x86`` engine's, which hands depthwise convolutions with more than 100 groups to fbgemm):
up to 52 codes off with full-range inputs, measured on this CPU. ``lower_int8_cpu`` packs
grouped convolutions with oneDNN for that reason (exact, as fast at one thread), and
``resolve_reduce_range`` keeps 7-bit grids when the user forces ``cpu_engine="fbgemm"`` or
``"x86"``.

    >>> int8_dot_product_isa()          # "amx_int8", "avx512_vnni" or None
    >>> resolve_reduce_range("auto")    # False on a VNNI/AMX CPU, True elsewhere
"""
from __future__ import annotations

import functools

import torch

__all__ = ["int8_dot_product_isa", "cpu_flags", "resolve_reduce_range", "FULL_RANGE_ISAS"]

# strongest first: what ``int8_dot_product_isa`` reports
FULL_RANGE_ISAS = ("amx_int8", "avx512_vnni")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags: PyTorch's cpuinfo, else ``/proc/cpuinfo`` (empty elsewhere)."""
    try:
        caps = torch.cpu.get_capabilities()
        return frozenset(k for k, v in caps.items() if v is True)
    except (AttributeError, RuntimeError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=None)
def int8_dot_product_isa() -> str | None:
    """The int8 dot-product instructions that sum u8 x s8 products in int32 without int16
    saturation (``"amx_int8"``, ``"avx512_vnni"``), or None (7-bit activation grids needed)."""
    flags = cpu_flags()
    return next((isa for isa in FULL_RANGE_ISAS if isa in flags), None)


_DETECT = object()


def resolve_reduce_range(value, *, target: str = "cpu", cpu_engine: str = "auto",
                         isa=_DETECT) -> bool:
    """``QuantConfig.reduce_range`` as a bool. True/False as given. ``"auto"``: full 8-bit
    grids (False) on ``target="cuda"`` (GPU int8 sums in int32) and on a CPU with VNNI or AMX
    (``isa``: the detected instructions, default: detect) unless the engine is one whose
    grouped convolutions saturate (``cpu_engine="fbgemm"`` or ``"x86"``); 7-bit grids (True)
    elsewhere."""
    if isinstance(value, bool):
        return value
    if target == "cuda":
        return False
    if isa is _DETECT:
        isa = int8_dot_product_isa()
    return isa is None or cpu_engine in ("fbgemm", "x86")
