"""The one tolerance table, keyed by dtype, and the error measures every check uses.

The measure is the relative norm error ``||out - ref|| / ||ref||`` (DESIGN.md section 7), with
the largest absolute difference reported beside it. Integer and bool outputs must match exactly.

    >>> rel_err(torch.ones(4), torch.ones(4))
    0.0
    >>> tolerance_for(torch.float32)
    1e-05
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree

__all__ = ["strict_fp32", "TOLERANCES", "TF32_TOLERANCE", "tolerance_for", "rel_err", "ErrorStats",
           "compare_outputs", "plain_structure", "CONDITIONING_FACTOR"]

# Relative norm error allowed when a pass must equal its reference ("exact" passes, masked
# pruning reference). tf32 is not a dtype; kernels that use it say so and use TF32_TOLERANCE.
TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}
TF32_TOLERANCE = 5e-4
# An ill-conditioned model (a GroupNorm over near-constant channels, say) amplifies rounding:
# two float32 evaluations of it that differ only in summation order can differ by far more
# than 1e-5. Its own rounding error is measured as the spread between a float64 and a float32
# eager run; a check that fails the table tolerance then allows CONDITIONING_FACTOR times that
# spread, which still catches any real bug above the model's noise.
CONDITIONING_FACTOR = 10.0


@contextlib.contextmanager
def strict_fp32(enabled: bool = True):
    """TF32 off for cuDNN convolutions and cuBLAS matmuls while the block runs (restored after).

    ``optimize(target="cuda")`` runs its checks in it: two float32 computations then differ by
    summation order only (the 1e-5 tolerance), not by TF32 rounding, which is not a property of
    any pass. At run time the optimized module follows torch's TF32 flags like eager does.
    """
    if not enabled:
        yield
        return
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def tolerance_for(dtype: torch.dtype, device: torch.device | str | None = None) -> float:
    """Allowed relative norm error for outputs of ``dtype`` (0.0: must be exact).

    On CUDA, float32 convolutions and matmuls run in TF32 when PyTorch allows it (cuDNN's
    convolutions do by default): then two equal float32 computations differ by TF32 rounding,
    and the TF32 tolerance applies.
    """
    if dtype == torch.float32 and device is not None and torch.device(device).type == "cuda" \
            and (torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32):
        return TF32_TOLERANCE
    return TOLERANCES.get(dtype, 0.0)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; when ``ref`` is all zeros, ``||out||``."""
    o = out.detach().to(torch.float64)
    r = ref.detach().to(torch.float64)
    denom = torch.linalg.vector_norm(r).item()
    num = torch.linalg.vector_norm(o - r).item()
    if denom == 0.0:
        return num
    return num / denom


@dataclass
class ErrorStats:
    """Worst errors over all tensor leaves of an output; ``ok`` when within ``tolerance``."""

    max_abs: float = 0.0
    rel_err: float = 0.0
    tolerance: float = 0.0
    dtype: str = ""
    ok: bool = True
    reason: str = ""


def plain_structure(value):
    """``value`` with fx's immutable containers (what ``fx.Interpreter`` returns for a graph
    whose output is a list or a dict) turned into the plain ``list``/``dict`` the generated
    code returns, recursively; other values unchanged."""
    if isinstance(value, dict):
        return {k: plain_structure(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_structure(v) for v in value]
    if type(value) is tuple:
        return tuple(plain_structure(v) for v in value)
    return value


def compare_outputs(out, ref, floors: list[float] | None = None) -> ErrorStats:
    """Compare two (nested) outputs leaf by leaf with the tolerance of each leaf's dtype.

    ``floors``: per leaf of ``ref`` (flattened), a relative tolerance the leaf is allowed at
    least (the conditioning allowance, ``CONDITIONING_FACTOR`` times the model's own float32
    rounding spread); None: the table alone.
    """
    out_leaves, out_spec = pytree.tree_flatten(plain_structure(out))
    ref_leaves, ref_spec = pytree.tree_flatten(plain_structure(ref))
    if floors is not None and len(floors) != len(ref_leaves):
        floors = None
    stats = ErrorStats()
    if out_spec != ref_spec:
        stats.ok = False
        stats.rel_err = float("inf")
        stats.max_abs = float("inf")
        stats.reason = f"output structure differs: {out_spec} vs {ref_spec}"
        return stats
    for i, (o, r) in enumerate(zip(out_leaves, ref_leaves)):
        if isinstance(r, torch.Tensor):
            if not isinstance(o, torch.Tensor) or o.shape != r.shape:
                stats.ok = False
                stats.rel_err = stats.max_abs = float("inf")
                got = tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__
                stats.reason = f"output shape {got} vs reference {tuple(r.shape)}"
                return stats
            tol = tolerance_for(r.dtype, r.device)
            if floors is not None and tol > 0:
                tol = max(tol, floors[i])
            if r.numel() == 0:
                continue
            diff = (o.detach().to(torch.float64) - r.detach().to(torch.float64)).abs()
            max_abs = float(diff.max().item())
            err = rel_err(o, r)
            if err != err:  # NaN
                err = float("inf")
            if err >= stats.rel_err:
                stats.dtype = str(r.dtype).replace("torch.", "")
                stats.tolerance = tol
            stats.max_abs = max(stats.max_abs, max_abs)
            stats.rel_err = max(stats.rel_err, err)
            if err > tol:
                stats.ok = False
        elif o != r:
            stats.ok = False
            stats.reason = f"non-tensor output {o!r} vs reference {r!r}"
    return stats
