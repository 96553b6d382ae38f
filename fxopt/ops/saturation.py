"""Int8 sums that stay exact where the CPU's kernels add u8 x s8 product pairs in int16.

On an x86 CPU without VNNI or AMX (``fxopt.ops.isa``) PyTorch's, oneDNN's and fbgemm's int8
kernels saturate a pair sum past 32767. A layer is exact there when its weight codes stay within
[-64, 64] (``255 * 64 * 2`` fits) or its input codes at most 127 (``127 * 128 * 2`` fits).
This module says which layers and calls are exact and gives the exact form of the others, for
``fxopt.ops.cpu`` (conv and linear layers) and ``fxopt.ops.int8_dynamic``:

    >>> saturating_weights(w_q)       # False on a VNNI/AMX CPU, or weights within [-64, 64]
    >>> exact_only(call, w_q)         # call, refusing (None) codes past 127 where it saturates
    >>> lo, hi = weight_halves(w_q)   # lo + hi == w_q, each within [-64, 64]

Each answer about a weight is read once and cached with the packed weights
(``fxopt.ops.onednn.packed_int8``: redone when the weight is written in place or replaced).
"""
from __future__ import annotations

import torch

from fxopt.ops.isa import SATURATION_FREE_CODE, SATURATION_FREE_WEIGHT, int8_pairs_saturate
from fxopt.ops.onednn import packed_int8

__all__ = ["saturating_weights", "codes_fit", "exact_sums", "exact_only", "weight_halves"]

_SATURATES = int8_pairs_saturate()


def saturating_weights(w_q: torch.Tensor) -> bool:
    """Whether this CPU's x86 int8 kernels may saturate on ``w_q``: its codes leave
    [-SATURATION_FREE_WEIGHT, SATURATION_FREE_WEIGHT] on a CPU that adds u8 x s8 product pairs
    in int16; then the sums are exact only for input codes at most ``SATURATION_FREE_CODE``."""
    if not _SATURATES or w_q.dtype != torch.int8 or w_q.numel() == 0:
        return False
    return packed_int8("wide", w_q, (), lambda: bool(
        (w_q.amin() < -SATURATION_FREE_WEIGHT) | (w_q.amax() > SATURATION_FREE_WEIGHT)))


def codes_fit(q: torch.Tensor) -> bool:
    """Whether every uint8 code of ``q`` is at most ``SATURATION_FREE_CODE`` (one read)."""
    return q.numel() == 0 or int(q.max()) <= SATURATION_FREE_CODE


def exact_sums(q: torch.Tensor, w_q: torch.Tensor) -> bool:
    """Whether the int8 kernels sum codes ``q`` times weight ``w_q`` exactly here."""
    return not saturating_weights(w_q) or codes_fit(q)


def exact_only(call, w_q: torch.Tensor):
    """``call`` (a function of the codes, or None), refusing (None) the codes it would sum
    inexactly; ``call`` itself where it never does."""
    if call is None or not saturating_weights(w_q):
        return call
    return lambda q: call(q) if codes_fit(q) else None


def weight_halves(w_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w_q`` as two int8 weights within [-64, 64] that add up to it: each sums exactly with
    any input code, so a layer runs as two kernel calls whose outputs are added."""
    def split():
        lo = torch.div(w_q, 2, rounding_mode="floor")
        return lo, (w_q.to(torch.int16) - lo).to(torch.int8)
    return packed_int8("halves", w_q, (), split)
