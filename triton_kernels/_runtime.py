"""Launch plumbing shared by the kernel families: interpreter switch, autotuning, input checks.

Why this exists. In triton 3.x ``@triton.jit`` decides *at decoration time* whether a function
becomes a compiled ``JITFunction`` or an ``InterpretedFunction`` (it reads
``triton.knobs.runtime.interpret``, i.e. the ``TRITON_INTERPRET`` environment variable, when
the module is imported). A package imported before a test sets ``TRITON_INTERPRET=1`` would
then try to compile for a GPU that is not there. Here the decision is taken *at launch time*:

- kernels are wrapped in :class:`Kernel`, which keeps the plain Python function and builds
  the compiled (autotuned) kernel or the interpreted one on first use in each mode;
- device functions (ours, made with :func:`device_fn`, and triton.language's own ``@jit``
  helpers such as ``tl.zeros``) are always ``JITFunction`` objects; while an interpreted
  kernel runs, calling one runs its interpreted twin (see ``_jit_functions_interpretable``).

So the switch is simply the environment variable at the time of the call::

    TRITON_INTERPRET=1 python -c "..."      # CPU tensors, kernels run in Triton's interpreter
    os.environ["TRITON_INTERPRET"] = "1"    # also fine after ``import fxopt.triton_kernels``

CPU tensors are accepted only while interpreting; CUDA tensors only while not.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
from typing import Callable, Sequence

import torch
import triton
from triton.runtime.jit import JITFunction

__all__ = ["interpreting", "Kernel", "KERNELS", "device_fn", "check_device", "as_float", "as_int",
           "as_pair", "float_reciprocal", "FLOAT_DTYPES", "CODE_DTYPES", "code_range",
           "check_codes", "check_grid", "check_out", "check_numel", "same_layout"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CODE_DTYPES = (torch.uint8, torch.int8)


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1`` now)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        try:
            return bool(knobs.runtime.interpret)
        except AttributeError:
            pass
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _quick_bench(fn, quantiles=None, **_):
    """Autotuning timer: medians over ~10 ms after a ~2 ms warm-up (FXOPT_AUTOTUNE_REP_MS)."""
    from triton.testing import do_bench

    rep = float(os.environ.get("FXOPT_AUTOTUNE_REP_MS", "10"))
    return do_bench(fn, warmup=max(1, int(rep / 5)), rep=int(rep), quantiles=quantiles)


KERNELS: list["Kernel"] = []  # every kernel declared, in declaration order


class Kernel:
    """A Triton kernel whose compiled-or-interpreted form is chosen at launch.

    ``configs()`` gives the autotune configurations (GPU), keyed on the argument names in
    ``key``; under the interpreter ``interpret_meta`` (block sizes) is passed instead.
    Launch like a jitted kernel: ``kernel[grid](*args, **constexprs)``.
    """

    def __init__(self, fn: Callable, configs: Callable[[], list], key: Sequence[str],
                 interpret_meta: dict, do_not_specialize: Sequence[str] = (),
                 compile_cases: dict[str, tuple[dict, dict]] | None = None):
        # accept the @triton.jit-decorated function: keep the plain Python function under it
        while not inspect.isfunction(fn) and hasattr(fn, "fn"):
            fn = fn.fn
        self.fn = fn
        self.configs = configs
        self.key = list(key)
        self.interpret_meta = dict(interpret_meta)
        self.do_not_specialize = list(do_not_specialize)
        self._compiled = None
        self._interpreted = None
        self.__name__ = fn.__name__
        # name -> (pointer dtypes by argument, constexprs): the specializations that must
        # compile for sm_90 (tests/triton_kernels/test_compile.py compiles every KERNELS entry's)
        self.compile_cases = dict(compile_cases or {})
        KERNELS.append(self)

    def compiled(self):
        if self._compiled is None:
            jit = JITFunction(self.fn, do_not_specialize=self.do_not_specialize or None)
            try:
                # Short timings per candidate (triton's default is 25 ms warm-up + 100 ms per
                # config and shape): tuning a ResNet-50 must stay a few seconds of optimize().
                tuner = triton.autotune(configs=self.configs(), key=self.key,
                                        do_bench=_quick_bench)
            except TypeError:  # a triton without the do_bench hook
                tuner = triton.autotune(configs=self.configs(), key=self.key)
            self._compiled = tuner(jit)
        return self._compiled

    def interpreted(self):
        if self._interpreted is None:
            from triton.runtime.interpreter import InterpretedFunction
            self._interpreted = InterpretedFunction(self.fn)
        return self._interpreted

    def __getitem__(self, grid):
        if interpreting():
            launcher = self.interpreted()[grid]
            meta = self.interpret_meta

            def run(*args, **kwargs):
                with _jit_functions_interpretable():
                    return launcher(*args, **kwargs, **meta)
            return run
        return self.compiled()[grid]


def _interpreted_call(self, *args, **kwargs):
    """``JITFunction.__call__`` while a kernel runs in the interpreter: run the function
    interpreted (a compiled JITFunction cannot be called from Python)."""
    interp = self.__dict__.get("_fxopt_interpreted")
    if interp is None:
        from triton.runtime.interpreter import InterpretedFunction
        interp = InterpretedFunction(self.fn)
        self.__dict__["_fxopt_interpreted"] = interp
    return interp(*args, **kwargs)


@contextlib.contextmanager
def _jit_functions_interpretable():
    """Device functions a kernel calls were made JITFunctions when their module was imported
    without TRITON_INTERPRET: ours (``device_fn``) and triton.language's own (``tl.zeros``,
    ``tl.cdiv``, ... are ``@jit`` functions too). For the duration of an interpreted launch,
    calling one runs its interpreted twin."""
    original = JITFunction.__call__
    JITFunction.__call__ = _interpreted_call
    try:
        yield
    finally:
        JITFunction.__call__ = original


def device_fn(fn: Callable) -> JITFunction:
    """Decorator for device functions called from :class:`Kernel` kernels: always a
    ``JITFunction`` (so compiled kernels can call it whatever the environment was at import);
    interpreted kernels call it through :func:`_jit_functions_interpretable`."""
    return JITFunction(fn)


def check_device(name: str, tensors: dict) -> torch.device:
    """All given tensors (None skipped) on one device that Triton can run on now."""
    devs = {k: t.device for k, t in tensors.items() if t is not None}
    first = next(iter(devs.values()))
    for k, d in devs.items():
        if d != first:
            raise ValueError(f"{name}: all tensors must be on one device; "
                             f"{next(iter(devs))} is on {first}, {k} is on {d}")
    if first.type == "cuda":
        if interpreting():
            raise ValueError(f"{name}: TRITON_INTERPRET=1 is set, so kernels run in the "
                             "interpreter on the CPU; pass CPU tensors, or unset TRITON_INTERPRET "
                             "for CUDA")
    elif first.type == "cpu":
        if not interpreting():
            raise ValueError(f"{name}: CPU tensors run only in Triton's interpreter; set "
                             "TRITON_INTERPRET=1, or move the tensors to a CUDA device")
    else:
        raise ValueError(f"{name}: unsupported device {first} (Triton needs CUDA, or the CPU "
                         "interpreter with TRITON_INTERPRET=1)")
    return first


def as_float(v, what: str) -> float:
    """A Python float from a number or a one-element tensor (a tensor costs a device sync;
    lowering should pass numbers)."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{what} must be a number or a one-element tensor, got shape "
                             f"{tuple(v.shape)}")
        return float(v.item())
    if isinstance(v, (int, float)):
        return float(v)
    raise TypeError(f"{what} must be a number or a one-element tensor, got {type(v).__name__}")


def as_int(v, what: str) -> int:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{what} must be an int or a one-element tensor, got shape "
                             f"{tuple(v.shape)}")
        v = v.item()
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{what} must be an integer, got {v!r}")
    return v


def as_pair(v, what: str) -> tuple[int, int]:
    """``(h, w)`` from an int (both) or a pair of ints: a kernel size, stride, padding or
    dilation as PyTorch takes it. ``what`` names it in the error (``"conv2d: stride"``)."""
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return tuple(v)
    raise TypeError(f"{what} must be an int or a pair of ints, got {v!r}")


def float_reciprocal(scale: float) -> float:
    """``1/scale`` rounded to float32 as ``torch.reciprocal`` does (PyTorch quantizes with
    ``round(x * (1/scale))``); exactly representable, so it crosses into the kernel unchanged."""
    return float(torch.reciprocal(torch.tensor(scale, dtype=torch.float32)))


def code_range(dtype: torch.dtype) -> tuple[int, int]:
    return (0, 255) if dtype == torch.uint8 else (-128, 127)


# -- argument checks shared by the int8 launchers -----------------------------------------------
def check_codes(name, t, what):
    """``t`` a tensor of uint8 or int8 codes."""
    if not isinstance(t, torch.Tensor) or t.dtype not in CODE_DTYPES:
        raise TypeError(f"{name}: {what} must be a uint8 or int8 tensor of codes, got "
                        f"{getattr(t, 'dtype', type(t).__name__)}")


def same_layout(shape, s1, s2) -> bool:
    """Same memory layout: equal strides on every dim of size > 1 (size-1 dims' strides do not
    matter and PyTorch leaves them ambiguous, e.g. channels-last [B, C, 1, 1])."""
    return all(n == 1 or x == y for n, x, y in zip(shape, s1, s2))


def check_grid(name, dtype, y_scale, y_zp, y_qmin, y_qmax, what="y"):
    """(scale, zero point, qmin, qmax) of a grid ``what`` for codes of ``dtype``, checked
    (qmin / qmax default to the dtype's range)."""
    s = as_float(y_scale, f"{name}: {what}_scale")
    if not s > 0 or not math.isfinite(s):
        raise ValueError(f"{name}: {what}_scale must be positive and finite, got {s}")
    zp = as_int(y_zp, f"{name}: {what}_zp")
    lo, hi = code_range(dtype)
    qmin = lo if y_qmin is None else as_int(y_qmin, f"{name}: {what}_qmin")
    qmax = hi if y_qmax is None else as_int(y_qmax, f"{name}: {what}_qmax")
    if not lo <= qmin <= qmax <= hi:
        raise ValueError(f"{name}: need {lo} <= {what}_qmin <= {what}_qmax <= {hi} for {dtype}, "
                         f"got {qmin}, {qmax}")
    return s, zp, qmin, qmax


def check_out(name, out, shape, dtype, strides):
    """A caller's ``out`` (None passes) of this shape, dtype and layout."""
    if out is None:
        return None
    if (not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape)
            or out.dtype != dtype or not same_layout(shape, out.stride(), strides)):
        raise ValueError(f"{name}: out must be a {dtype} tensor of shape {tuple(shape)} with "
                         f"strides {tuple(strides)}")
    return out


def check_numel(name, *numels):
    """Every tensor addressable with int32 offsets."""
    if max(numels) >= 2 ** 31:
        raise ValueError(f"{name}: tensors with 2**31 or more elements are not supported "
                         "(int32 offsets); split the batch")
