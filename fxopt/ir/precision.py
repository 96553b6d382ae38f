"""``optimize(..., precision=)``: the float dtype the optimized model computes in.

The conversion happens once, at the boundary, on ``optimize``'s own copy of the model: its
floating-point parameters and buffers, the example inputs and the calibration batches go to the
dtype, and the pipeline (capture, every pass, every check) then works on that model. So each
pass is checked against a reference in the same dtype with that dtype's tolerance (fp16/bf16
1e-2, DESIGN.md section 7), and the distance the conversion itself introduces is reported, not
asserted (a note in the report).

    opt = fxopt.optimize(model.cuda(), x.cuda(), target="cuda", precision="fp16")
    opt(x.cuda().half())

``precision`` is a GPU option: reduced-precision convolutions on the CPU are slow in PyTorch and
have no Triton kernels there (except interpreted, for tests: ``FXOPT_TRITON_ON_CPU=1``).
"""
from __future__ import annotations

from typing import Any

import torch

from fxopt.errors import NotAvailableError, PipelineError
from fxopt.ir.tolerances import rel_err

__all__ = ["PRECISIONS", "resolve_precision", "to_precision"]

PRECISIONS: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16,
                                      "fp32": torch.float32}


def resolve_precision(precision: str | None, target: str, quantize: Any = None, *,
                      reduced_on_cpu: bool = False) -> torch.dtype | None:
    """The dtype for ``precision`` (None: keep the model's own), or a typed error saying why not.

    ``reduced_on_cpu``: fp16/bf16 are allowed on the CPU (the Triton kernels run there under
    the interpreter, ``FXOPT_TRITON_ON_CPU=1``: tests)."""
    if precision is None:
        return None
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise PipelineError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}",
                            hint="pass precision='fp16', 'bf16' or 'fp32' (or leave it unset)")
    dtype = PRECISIONS[precision]
    if dtype != torch.float32 and target != "cuda":
        if not reduced_on_cpu:
            raise PipelineError(
                f"precision='{precision}' is for target='cuda'; the target here is '{target}'",
                hint="move the model and inputs to a CUDA device and pass target='cuda', or "
                     "leave precision unset on the CPU")
    if dtype != torch.float32 and quantize is not None:
        raise NotAvailableError(
            f"precision='{precision}' together with quantize= is not supported yet (the int8 "
            f"layers dequantize to float32)",
            hint="use quantize='int8' with precision='fp32' (or unset), or precision alone")
    return dtype


def _convert(value, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_convert(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _convert(v, dtype) for k, v in value.items()}
    return value


class _ConvertedBatches:
    """Calibration batches converted one at a time as they are read (re-iterable)."""

    def __init__(self, data, dtype):
        self.data, self.dtype = data, dtype

    def __iter__(self):
        for batch in self.data:
            yield _convert(batch, self.dtype)

    def __len__(self):
        return len(self.data)


def to_precision(model: torch.nn.Module, inputs: tuple, calibration_data: Any,
                 dtype: torch.dtype | None) -> tuple[torch.nn.Module, tuple, Any, list[str]]:
    """``model`` (converted in place: it is optimize's own copy), the inputs and calibration
    batches in ``dtype``, and the report notes (the conversion's distance from the original)."""
    if dtype is None:
        return model, inputs, calibration_data, []
    floats = {p.dtype for p in list(model.parameters()) + list(model.buffers())
              if p.is_floating_point()}
    if floats == {dtype} and all(not isinstance(x, torch.Tensor) or not x.is_floating_point()
                                 or x.dtype == dtype for x in inputs):
        return model, inputs, calibration_data, []
    with torch.no_grad():
        before = model(*inputs)
    model.to(dtype)
    inputs = tuple(_convert(x, dtype) for x in inputs)
    if calibration_data is not None:
        calibration_data = _ConvertedBatches(calibration_data, dtype)
    with torch.no_grad():
        after = model(*inputs)
    name = str(dtype).replace("torch.", "")
    note = f"precision {name}: model, inputs and calibration batches converted"
    if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor):
        note += (f"; the converted model differs from the original by rel err "
                 f"{rel_err(after, before):.1e}")
    return model, inputs, calibration_data, [note]
