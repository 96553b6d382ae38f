"""Which int8 grids lose a bit on this CPU (``QuantConfig.reduce_range``): none, the
activations', or the weights'.

Without VNNI or AMX, x86 int8 kernels add u8 x s8 product pairs in int16 and saturate
(``fxopt.ops.isa``); either side on 7 bits makes every sum exact. ``reduce_range="auto"``:

- ``False`` (8-bit everywhere) on ``target="cuda"`` (GPU int8 sums in int32) and on a CPU with
  AVX-512 VNNI or AMX: on the digits ResNet 39.3 dB SQNR against 35.0 dB with 7-bit activation
  grids (issue 13);
- ``"weights"`` (7-bit weight grids, ``[-63, 63]``, 8-bit activations) on other CPUs: exact
  for any input code, also the codes beyond the calibrated range that a 7-bit activation grid
  still lets through (up to 255), and what OpenVINO's kernels need there for signed zero-point-0
  activations (NNCF's overflow fix does the same). On an AVX2-only AMD EPYC (2026-12-07,
  ``bench/results/int8-grids-avx2-2026-12-07.md``): 4.7 to 6.2 dB above 7-bit activation grids
  on target="cpu" (resnet18 39.5 against 34.7 dB, mobilenet_v3_large 35.9 against 29.9); on
  OpenVINO mobilenet_v3_large 35.1 dB where 8-bit weights with full-range signed activations
  came out 28.3 dB (saturated sums: the engine's check refused it) and 7-bit asymmetric
  activation grids 30.1 dB;
- ``True`` (7-bit activation grids, torch.ao's x86 default) on a CPU with VNNI where the user
  forces ``cpu_engine="fbgemm"`` or ``"x86"``: fbgemm's grouped and depthwise convolutions
  saturate with full-range inputs even with VNNI (up to 52 codes off, measured on an AVX-512
  VNNI CPU); ``lower_int8_cpu`` packs grouped convolutions with oneDNN for that reason. Without
  VNNI those engines get the 7-bit weights too: fbgemm's, x86's and oneDNN's plain, grouped and
  depthwise convolutions were exact with them on the AVX2 EPYC, 3 to 12 codes off with 8-bit
  weights.

Whatever the grids, fxopt's CPU ops never hand back a saturated sum: on such a CPU a layer
whose weights exceed [-64, 64] runs its one kernel call only for inputs whose codes are at most
127, else two exact calls on the weight's halves (``fxopt.ops.cpu``).

    >>> int8_dot_product_isa()          # "amx_int8", "avx512_vnni" or None
    >>> resolve_reduce_range("auto")    # False on a VNNI/AMX CPU, "weights" elsewhere
"""
from __future__ import annotations

from fxopt.ops.isa import FULL_RANGE_ISAS, cpu_flags, int8_dot_product_isa

__all__ = ["int8_dot_product_isa", "cpu_flags", "resolve_reduce_range", "FULL_RANGE_ISAS",
           "REDUCE_RANGE_VALUES"]

# what QuantConfig.reduce_range takes: True / "activations" are the same (7-bit activations)
REDUCE_RANGE_VALUES = (True, False, "auto", "activations", "weights")


_DETECT = object()


def resolve_reduce_range(value, *, target: str = "cpu", cpu_engine: str = "auto",
                         isa=_DETECT) -> bool | str:
    """``QuantConfig.reduce_range`` resolved: True (7-bit activation grids; ``"activations"``
    too), False (none) or ``"weights"`` (7-bit weight grids), as given; ``"auto"`` by the
    module docstring (``isa``: the detected instructions, default: detect)."""
    if value == "activations":
        return True
    if isinstance(value, bool) or value == "weights":
        return value
    if target == "cuda":
        return False
    if isa is _DETECT:
        isa = int8_dot_product_isa()
    if isa is None:
        return "weights"
    return cpu_engine in ("fbgemm", "x86")
