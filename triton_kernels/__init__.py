"""Triton kernels for fxopt's fused and quantized ops (depends on torch and triton only).

One module per kernel family, each with its ``@triton.jit`` kernels, their launchers (checks,
output allocation, grid) and a plain PyTorch reference of the same math, and each kernel's
sm_90 compile cases beside it (``Kernel(compile_cases=...)``): ``gemm`` (linear layers, float and
int8), ``conv`` (implicit-GEMM convolution on channels-last activations), ``depthwise``,
``quant`` (quantize / dequantize), ``norm`` (residual add + LayerNorm), ``elementwise`` (int8
and float residual adds and gates), ``pool`` (int8 max and global average pooling) and
``epilogue`` (scale, bias, residual, activation, requantization, shared by all). fxopt's ops
call a launcher through its family module (``elementwise.mul``); the names below are
re-exported for users of the kernels alone.

The interpreter switch is ``TRITON_INTERPRET`` *at call time* (see ``_runtime``): with
``TRITON_INTERPRET=1`` the launchers take CPU tensors and run the kernels in Triton's
interpreter (tests, CI), without it they take CUDA tensors and run compiled, autotuned
kernels. Setting the variable before or after importing this package both work; on a GPU,
do not have it set when ``triton`` itself is first imported.

    import os; os.environ["TRITON_INTERPRET"] = "1"
    from fxopt.triton_kernels import gemm
    y = gemm.linear(torch.randn(17, 64), torch.randn(33, 64), act="relu")
"""
from fxopt.triton_kernels._runtime import interpreting
from fxopt.triton_kernels.conv import conv2d, conv2d_int8, prepare_conv_weight
from fxopt.triton_kernels.depthwise import (depthwise_conv2d, depthwise_conv2d_int8,
                                            prepare_depthwise_weight)
from fxopt.triton_kernels.elementwise import add, add_int8
from fxopt.triton_kernels.epilogue import ACTIVATIONS
from fxopt.triton_kernels.gemm import linear, linear_int8, weight_colsum
from fxopt.triton_kernels.norm import add_layer_norm
from fxopt.triton_kernels.pool import global_avg_pool2d_int8, max_pool2d_int8
from fxopt.triton_kernels.quant import dequantize, quantize

__all__ = ["interpreting", "ACTIVATIONS", "linear", "linear_int8", "weight_colsum", "conv2d",
           "conv2d_int8", "prepare_conv_weight", "depthwise_conv2d", "depthwise_conv2d_int8",
           "prepare_depthwise_weight", "quantize", "dequantize", "add", "add_int8",
           "max_pool2d_int8", "global_avg_pool2d_int8", "add_layer_norm"]
