"""Fixtures for the Triton kernel tests.

``device``: every kernel test runs on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``,
set for that test only) and, marked ``gpu``, on CUDA with compiled kernels (the variable unset).
The launchers read the variable at call time, so both kinds run in one process.

``tk``: the checks (DESIGN.md section 7): relative norm error against a float64 reference with
the tolerance table's thresholds, codes within one quantization step, outputs poisoned first.
"""
from types import SimpleNamespace

import pytest
import torch

from fxopt.ir.tolerances import TOLERANCES, rel_err


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request, monkeypatch):
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return torch.device(request.param)


def poisoned(shape, dtype, device, channels_last=False):
    """An output buffer full of a value no kernel writes (NaN; 77 for codes)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    t = torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)
    return t.fill_(float("nan") if dtype.is_floating_point else 77)


def assert_float_close(out, ref, dtype=None):
    """Relative norm error below the table's threshold for ``dtype`` (default out's dtype);
    every element written (no NaN left from the poison)."""
    dtype = out.dtype if dtype is None else dtype
    assert not torch.isnan(out).any(), "output has unwritten (poisoned) elements"
    err = rel_err(out, ref)
    assert err < TOLERANCES[dtype], f"relative error {err:.3g} >= {TOLERANCES[dtype]} ({dtype})"


def assert_codes_close(out, ref):
    """Requantized codes: within one quantization step of the reference, everywhere."""
    assert out.dtype == ref.dtype, (out.dtype, ref.dtype)
    diff = (out.to(torch.int32) - ref.to(torch.int32)).abs()
    assert diff.max().item() <= 1, f"codes differ by up to {diff.max().item()} steps"
    # nearly all codes should agree exactly; off-by-one only at rounding ties
    assert (diff == 0).float().mean().item() > 0.9


def grid_for(y: torch.Tensor, dtype: torch.dtype):
    """(scale, zero_point) that spread ``y``'s range over ``dtype``'s codes."""
    lo, hi = float(y.min()), float(y.max())
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qlo, qhi = (0, 255) if dtype == torch.uint8 else (-128, 127)
    scale = max((hi - lo) / (qhi - qlo), 1e-4)
    zp = int(round(qlo - lo / scale))
    return scale, max(qlo, min(qhi, zp))


def codes(shape, dtype, device, channels_last=False):
    """Random activation codes over the whole range (never all zeros)."""
    lo, hi = (0, 256) if dtype == torch.uint8 else (-128, 128)
    t = torch.randint(lo, hi, shape, dtype=dtype, device=device)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def weight_codes(shape, device):
    return torch.randint(-127, 128, shape, dtype=torch.int8, device=device)


@pytest.fixture
def tk():
    return SimpleNamespace(poisoned=poisoned, assert_float_close=assert_float_close,
                           assert_codes_close=assert_codes_close, grid_for=grid_for, codes=codes,
                           weight_codes=weight_codes)
