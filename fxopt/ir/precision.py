"""``optimize(..., precision=)``: the float dtype the optimized model computes in.

The conversion happens once, at the boundary, on ``optimize``'s own copy of the model: its
floating-point parameters and buffers, the example inputs and the calibration batches go to the
dtype, and the pipeline (capture, every pass, every check) then works on that model. So each
pass is checked against a reference in the same dtype with that dtype's tolerance (fp16/bf16
1e-2, DESIGN.md section 7), and the distance the conversion itself introduces is reported, not
asserted (a note in the report).

    opt = fxopt.optimize(model.cuda(), x.cuda(), target="cuda", precision="fp16")
    opt(x.cuda().half())

On the CPU, ``precision="bf16"`` runs where the CPU computes in bfloat16 natively (AVX-512
BF16 or AMX, detected at run time: ``cpu_native_bf16``): the convolutions take oneDNN's fused
bf16 kernels on channels-last activations (``fxopt.ops.onednn``), linear layers oneDNN's bf16
matmul. The module keeps the user's interface: ``cast_at_boundary`` puts casts into its graph,
float32 inputs to bfloat16 at the entry and the outputs back to the inputs' dtype at the exit::

    opt = fxopt.optimize(model, x, precision="bf16")     # target="cpu"
    opt(x).dtype                                          # torch.float32

Refused on the CPU, with a hint (decided, 2026-12-06, measured on a 2-core EPYC with AVX-512
BF16 and no AVX-512 FP16):

- bf16 on a CPU without native bf16: oneDNN would emulate it, slower than float32 (and less
  accurate than it), so asking for it there is a mistake worth an error, not a warning;
- fp16: no CPU here has fast fp16 convolutions in PyTorch (resnet18 eager channels-last, one
  thread: fp32 49 ms, bf16 24 ms, fp16 204 ms);
- a reduced precision together with ``quantize=``: the int8 layers dequantize to float32 and the
  quantizer calibrates and simulates in float32; mixing in bf16 would need both checked on a
  bf16 float rest, which is not built (int8 alone measured faster than OpenVINO's bf16 on
  resnet18 in issue 13: 6.0 against 9.2 ms).

The Triton kernels also run on the CPU under the interpreter (``FXOPT_TRITON_ON_CPU=1``, tests):
there any precision is allowed and the module takes inputs in that dtype, as on CUDA.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from fxopt.errors import NotAvailableError, PipelineError
from fxopt.ir.check import clone_inputs, seeded
from fxopt.ir.tolerances import plain_structure, rel_err

__all__ = ["PRECISIONS", "resolve_precision", "to_precision", "cpu_native_bf16",
           "cast_at_boundary", "finish_cpu_precision"]

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
    if dtype != torch.float32 and quantize is not None:
        raise NotAvailableError(
            f"precision='{precision}' together with quantize= is not supported yet (the int8 "
            f"layers dequantize to float32)",
            hint="use quantize='int8' with precision='fp32' (or unset), or precision alone")
    if dtype == torch.float32 or target == "cuda" or reduced_on_cpu:
        return dtype
    if dtype == torch.float16:
        raise PipelineError(
            f"precision='fp16' is for target='cuda'; the target here is '{target}' (fp16 "
            f"convolutions on the CPU run several times slower than float32)",
            hint="on the CPU use precision='bf16' (where the CPU has native bf16) or leave "
                 "precision unset; fp16 needs target='cuda' with the model on a CUDA device")
    if not cpu_native_bf16():
        raise NotAvailableError(
            "precision='bf16' on the CPU needs native bfloat16 instructions (AVX-512 BF16 or "
            "AMX); this CPU lacks them, and emulated bf16 is slower than float32",
            hint="leave precision unset (float32) on this CPU, or use quantize='int8' for "
                 "speed")
    return dtype


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX tiles) and oneDNN can
    use it: the condition for ``precision="bf16"`` on the CPU. (oneDNN also runs bf16 on plain
    AVX-512 by emulation, slower than float32: not counted.)"""
    try:
        if not torch.backends.mkldnn.is_available() or \
                not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


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


def cast_at_boundary(gm: fx.GraphModule, dtype: torch.dtype, inputs: tuple) -> int:
    """Casts into ``gm`` (which computes in ``dtype``) so that it takes and returns the user's
    dtype: every floating-point tensor input ``x`` of another dtype is read through
    ``x.to(dtype)`` (a no-op for an input already in ``dtype``), and every floating-point
    output in ``dtype`` is returned as ``out.to(x's dtype)``, the dtype of the first floating
    input. Returns how many casts were added."""
    floats = [x.dtype for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point()]
    if not floats or all(d == dtype for d in floats):
        return 0
    back = floats[0]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    added = 0
    for node, x in zip(placeholders, inputs):
        if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype):
            continue
        users = list(node.users)
        with gm.graph.inserting_after(placeholders[-1]):
            cast = gm.graph.call_method("to", (node, dtype))
        for user in users:
            user.replace_input_with(node, cast)
        added += 1
    output = next(n for n in gm.graph.nodes if n.op == "output")

    def cast_back(value):
        nonlocal added
        meta = value.meta.get("tensor_meta")
        if getattr(meta, "dtype", None) != dtype:
            return value
        with gm.graph.inserting_before(output):
            new = gm.graph.call_method("to", (value, back))
        added += 1
        return new

    output.args = fx.node.map_arg(output.args, cast_back)
    gm.graph.lint()
    gm.recompile()
    return added


def finish_cpu_precision(gm: fx.GraphModule, dtype: torch.dtype, user_inputs: tuple,
                         model: torch.nn.Module) -> list[str]:
    """The last step of ``precision=`` on the CPU: the casts at the boundary
    (``cast_at_boundary``), then the module run on the user's own inputs against the user's
    model (both in the user's dtype): that distance is the precision's, reported, not asserted
    (every pass was checked in ``dtype`` against the graph before it). Returns the notes."""
    added = cast_at_boundary(gm, dtype, user_inputs)
    if not added:
        return []
    name = str(dtype).replace("torch.", "")
    note = f"precision {name} on the CPU: {added} casts at the module's boundary"
    with torch.no_grad(), seeded(user_inputs):
        out = plain_structure(gm(*clone_inputs(user_inputs)))
    with torch.no_grad(), seeded(user_inputs):
        ref = model(*clone_inputs(user_inputs))
    if isinstance(out, torch.Tensor) and isinstance(ref, torch.Tensor):
        note += (f"; its {str(out.dtype).replace('torch.', '')} output differs from the "
                 f"original model's by rel err {rel_err(out, ref):.1e}")
    return [note]
