"""Where fxopt's Triton ops run, and the layouts their kernels read.

Devices. On CUDA the ops call the launchers of ``fxopt.triton_kernels`` (compiled, autotuned).
On the CPU they run the plain PyTorch reference of the same math, so a lowered model saved on a
GPU machine still loads and runs anywhere, unless ``FXOPT_TRITON_ON_CPU=1``: then CPU tensors go
to the launchers too, which run the kernels in Triton's interpreter (``TRITON_INTERPRET=1`` is
set for the duration of the call when it is not set already). That is how the lowering is
tested without a GPU::

    FXOPT_TRITON_ON_CPU=1 TRITON_INTERPRET=1 python -m pytest tests/passes/lower/test_triton.py

An op asks ``kernels_for(x)`` whether its kernel runs (else it runs its reference) and launches
through ``run_on``; the layout helpers give the kernels dense, channels-last operands
(convolution and pooling outputs are NHWC; an add keeps its first input's layout, see
``add_format``). ``triton_op`` declares an op of the ``triton`` family in the op schema.
The float ops live in ``fxopt.ops.triton``, the int8 ones in ``fxopt.ops.triton_int8``.
"""
from __future__ import annotations

import contextlib
import os

import torch

from fxopt.ops.schema import define_op
from fxopt.ops.shapes import conv_out_shape

__all__ = ["triton_on_cpu", "ON_CPU_ENV", "kernels_for", "run_on", "nhwc", "conv_shape",
           "dense_residual", "nhwc_out", "depthwise_weight4", "grid", "add_format", "triton_op"]

ON_CPU_ENV = "FXOPT_TRITON_ON_CPU"


def triton_on_cpu() -> bool:
    """Whether CPU tensors go to the Triton launchers (interpreted): ``FXOPT_TRITON_ON_CPU=1``."""
    return os.environ.get(ON_CPU_ENV, "0").lower() in ("1", "true", "on", "yes")


@contextlib.contextmanager
def _interpreter():
    """``TRITON_INTERPRET=1`` for the duration of one CPU launch (the launchers read it then)."""
    old = os.environ.get("TRITON_INTERPRET")
    if old == "1":
        yield
        return
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def kernels_for(x: torch.Tensor):
    """The launchers module when ``x`` should run on Triton (CUDA, or CPU with the switch),
    else None (the reference runs)."""
    if x.is_cuda or triton_on_cpu():
        from fxopt import triton_kernels
        return triton_kernels
    return None


def run_on(x: torch.Tensor, fn):
    """``fn(tk)`` on the launchers module; under the interpreter for CPU tensors."""
    tk = kernels_for(x)
    if x.is_cuda:
        return fn(tk)
    with _interpreter():
        return fn(tk)


def nhwc(t):
    if t is None or t.dim() != 4 or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous(memory_format=torch.channels_last)


def conv_shape(x, kh, kw, cout, stride, padding, dilation):
    return conv_out_shape(x, (kh, kw), cout, stride, padding, dilation)


def dense_residual(res, shape, fmt=None):
    """A residual the kernels can read: the output's full shape (broadcasts expanded), dense."""
    if res is None:
        return None
    if tuple(res.shape) != tuple(shape):
        res = res.expand(shape)
    if fmt is torch.channels_last:
        return nhwc(res)
    return res if res.is_contiguous() else res.contiguous()


def nhwc_out(y):
    return y if y.is_contiguous(memory_format=torch.channels_last) else \
        y.contiguous(memory_format=torch.channels_last)


def depthwise_weight4(w2, kernel_size):
    """Prepared ``[KH*KW, C]`` back to the usual ``[C, 1, KH, KW]`` (reference path)."""
    kh, kw = kernel_size
    return w2.t().reshape(w2.shape[1], 1, kh, kw)


def grid(scale: float, zp: int, device):
    return (torch.tensor(scale, dtype=torch.float32, device=device),
            torch.tensor(zp, dtype=torch.int64, device=device))


def add_format(a):
    """The output layout of an add: ``a``'s if channels-last, else contiguous."""
    if a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def triton_op(signature: str, impl, fake, macs=None, *, quantized: bool = False,
              differentiable=None):
    """An op of the ``triton`` family in the op schema (``fxopt.ops.schema.define_op``)."""
    return define_op(signature, family="triton", reference=impl, fake=fake, macs=macs,
                     quantized=quantized, differentiable=differentiable)
