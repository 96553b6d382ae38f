"""What this CPU's int8 dot-product instructions can sum exactly (run-time detection).

x86 int8 kernels multiply uint8 activations by int8 weights. Without VNNI (AVX2, AVX-512
without VNNI, SSE4) they use ``vpmaddubsw``, which adds two products in int16 and saturates:
``255 * 127 * 2 > 32767``. The sums are exact when either side loses a bit: codes at most 127
(7-bit activation grids, ``127 * 128 * 2`` fits) or weights within [-64, 64] (7-bit weight
grids, ``255 * 64 * 2`` fits). With AVX-512 VNNI (``vpdpbusd``) or AMX (``tdpbusd``) the
products are summed in int32 and every code is exact. Measured on an AMD EPYC with AVX2 only
(2026-12-07): oneDNN's int8 convolution 42 codes off the reference with full-range inputs and
weights, exact with either side on 7 bits; OpenVINO's the same.

Detection is from PyTorch's cpuinfo (``torch.cpu.get_capabilities()``), else the ``flags``
line of ``/proc/cpuinfo``. AVX-VNNI (the 256-bit form, ``avx_vnni``: Alder Lake and later
without AVX-512) does not count: fbgemm's AVX2 kernels do not use it, and PyTorch's own check
(``at::cpu::is_cpu_support_vnni``) asks for ``avx512_vnni`` too.

    >>> int8_dot_product_isa()          # "amx_int8", "avx512_vnni" or None
    >>> int8_pairs_saturate()           # True on an x86 CPU without them
"""
from __future__ import annotations

import functools
import platform

import torch

__all__ = ["FULL_RANGE_ISAS", "cpu_flags", "int8_dot_product_isa", "int8_pairs_saturate",
           "SATURATION_FREE_WEIGHT", "SATURATION_FREE_CODE"]

# strongest first: what ``int8_dot_product_isa`` reports
FULL_RANGE_ISAS = ("amx_int8", "avx512_vnni")
# without them: the largest |weight code| exact with any uint8 input, and the largest uint8
# code exact with any int8 weight
SATURATION_FREE_WEIGHT = 64
SATURATION_FREE_CODE = 127
_X86 = ("x86_64", "amd64", "i386", "i686", "x86")


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
    saturation (``"amx_int8"``, ``"avx512_vnni"``), or None (7-bit grids needed)."""
    flags = cpu_flags()
    return next((isa for isa in FULL_RANGE_ISAS if isa in flags), None)


@functools.lru_cache(maxsize=None)
def int8_pairs_saturate() -> bool:
    """Whether PyTorch's x86 int8 kernels here add u8 x s8 product pairs in int16 (an x86 CPU
    without VNNI or AMX): then a layer is exact only with weights within
    ``SATURATION_FREE_WEIGHT`` or input codes at most ``SATURATION_FREE_CODE``."""
    return platform.machine().lower() in _X86 and int8_dot_product_isa() is None
