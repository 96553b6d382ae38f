"""What a user would pick instead of fxopt's int8 on the CPU, for ``bench/int8_cpu.py``.

``ao_fx_int8``: torch.ao's FX graph mode post-training quantization, x86 backend
(``prepare_fx`` with ``get_default_qconfig_mapping("x86")``, calibration, ``convert_fx``).
torch.ao.quantization is deprecated in recent torch and warns about it on every conversion; the
warnings are recorded (the benchmark lists them once in its notes) instead of printed.
``channels_last``: the eager float model in channels_last memory format, the input converted on
each call as a user's would be.
"""
from __future__ import annotations

import copy
import time
import warnings

import torch
import torch.nn as nn

__all__ = ["QUANT_WARNINGS", "quiet_quant_warnings", "ao_fx_int8", "channels_last"]

# Messages (regexes, matched at the start) of the deprecation warnings torch.ao and the
# quantized tensor functions give in torch 2.1x.
QUANT_WARNINGS = (
    r"torch\.ao\.quantization is deprecated",
    r"Please use quant_min and quant_max",
    r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
    r".*quantized tensor.* deprecated",
)


def quiet_quant_warnings() -> None:
    """Ignore the quantization deprecation warnings for the rest of the process."""
    for msg in QUANT_WARNINGS:
        warnings.filterwarnings("ignore", message=msg)


def ao_fx_int8(model: nn.Module, example: torch.Tensor,
               batches) -> tuple[nn.Module, float, list[str]]:
    """torch.ao FX int8 of a copy of ``model`` calibrated on ``batches`` (tensors).

    Returns the converted module, the seconds prepare + calibration + convert took, and the
    first line of each distinct warning torch gave meanwhile (not printed).
    """
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"),
                              (example,))
        with torch.no_grad():
            for b in batches:
                prepared(b)
        q = convert_fx(prepared)
        seconds = time.perf_counter() - t0
    msgs = []
    for w in seen:
        first = " ".join(str(w.message).strip().splitlines()[0].split())
        line = f"{w.category.__name__}: {first[:200]}"
        if line not in msgs:
            msgs.append(line)
    return q.eval(), seconds, msgs


def channels_last(model: nn.Module):
    """A copy of ``model`` in channels_last, as a function of a contiguous NCHW input."""
    m = copy.deepcopy(model).to(memory_format=torch.channels_last).eval()

    def run(x):
        return m(x.contiguous(memory_format=torch.channels_last))

    return run
