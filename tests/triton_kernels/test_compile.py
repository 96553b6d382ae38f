"""Every kernel compiles for Hopper (sm_90) without a GPU: triton.compile down to PTX/cubin with
the bundled ptxas. Catches compiled-mode errors the interpreter cannot (slow: ~20 s)."""
import inspect

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from fxopt.triton_kernels import conv as C  # noqa: E402
from fxopt.triton_kernels import depthwise as D  # noqa: E402
from fxopt.triton_kernels import elementwise as E  # noqa: E402
from fxopt.triton_kernels import gemm as G  # noqa: E402
from fxopt.triton_kernels import quant as Q  # noqa: E402
from fxopt.triton_kernels.epilogue import ACTIVATIONS  # noqa: E402

FLOAT_ARGS = {"act_a0", "act_a1", "y_inv_scale", "y_zp", "y_qmin", "y_qmax", "inv_scale", "zp",
              "qmin", "qmax", "scale", "a_scale", "b_scale", "count"}
# two of the longer activation branches, one per epilogue (codes from the kernels' table)
EP = dict(HAS_SCALE=True, HAS_BIAS=True, HAS_RES=True, ACT=ACTIVATIONS["gelu_tanh"].code,
          QUANT_OUT=True)
FLOAT_EP = dict(EP, HAS_SCALE=False, ACT=ACTIVATIONS["mish"].code, QUANT_OUT=False)
GEMM_T = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)
CASES = {
    "gemm_int8_u8out": (G._gemm_int8_kernel,
                        dict(a_ptr="*u8", w_ptr="*i8", out_ptr="*u8", res_ptr="*bf16"),
                        dict(IS_INT8=True, A_UNSIGNED=True, HAS_CORR=True, **EP, **GEMM_T)),
    "gemm_bf16": (G._gemm_half_kernel,
                  dict(a_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16", res_ptr="*bf16"),
                  dict(IS_INT8=False, A_UNSIGNED=False, HAS_CORR=False, **FLOAT_EP, **GEMM_T)),
    "gemm_fp32": (G._gemm_fp32_kernel,
                  dict(a_ptr="*fp32", w_ptr="*fp32", out_ptr="*fp32", res_ptr="*fp32"),
                  dict(IS_INT8=False, A_UNSIGNED=False, HAS_CORR=False, **FLOAT_EP,
                       **dict(GEMM_T, BLOCK_K=32))),
    "conv_int8": (C._conv_int8_kernel,
                  dict(x_ptr="*u8", w_ptr="*i8", out_ptr="*u8", res_ptr="*fp16"),
                  dict(IS_INT8=True, A_UNSIGNED=True, HAS_PAD_CODE=True, HAS_CORR=True, **EP,
                       **GEMM_T)),
    "conv_fp16": (C._conv_half_kernel,
                  dict(x_ptr="*fp16", w_ptr="*fp16", out_ptr="*fp16", res_ptr="*fp16"),
                  dict(IS_INT8=False, A_UNSIGNED=False, HAS_PAD_CODE=False, HAS_CORR=False,
                       **FLOAT_EP, **GEMM_T)),
    "depthwise_int8": (D._depthwise_kernel_l,
                       dict(x_ptr="*i8", w_ptr="*i8", out_ptr="*i8", res_ptr="*fp32"),
                       dict(KH=3, KW=3, IS_INT8=True, **EP, BLOCK_M=32, BLOCK_C=64)),
    "depthwise_fp16": (D._depthwise_kernel_l, dict(x_ptr="*fp16", w_ptr="*fp16", out_ptr="*fp16",
                                                   res_ptr="*fp16"),
                       dict(KH=3, KW=3, IS_INT8=False, **FLOAT_EP, BLOCK_M=32, BLOCK_C=64)),
    "quantize": (Q._quantize, dict(x_ptr="*bf16", q_ptr="*i8"), dict(BLOCK=1024)),
    "dequantize": (Q._dequantize, dict(q_ptr="*u8", x_ptr="*fp32"), dict(BLOCK=1024)),
    "add_bf16": (E._add_float, dict(a_ptr="*bf16", b_ptr="*bf16", out_ptr="*bf16"),
                 dict(B_FLAT=False, ACT=ACTIVATIONS["silu"].code, BLOCK=1024)),
    "add_int8": (E._add, dict(a_ptr="*u8", b_ptr="*u8", out_ptr="*u8", a_zp="i32", b_zp="i32"),
                 dict(ACT=1, BLOCK=1024)),
    "max_pool_int8": (E._max_pool, dict(x_ptr="*u8", out_ptr="*u8"),
                      dict(KH=3, KW=3, LOWEST=0, BLOCK_M=32, BLOCK_C=64)),
    "global_avg_pool_int8": (E._gap, dict(x_ptr="*u8", out_ptr="*u8", zp="i32"),
                             dict(BLOCK_HW=16, BLOCK_C=64)),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_compiles_for_sm90(case):
    kernel, ptrs, consts = CASES[case]
    consts = dict(consts)
    if "DOT_PRECISION" in inspect.signature(kernel.fn).parameters:
        consts.update(DOT_PRECISION="ieee", UPCAST_DOT=False)
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = ptrs[name]
        elif name.endswith("_ptr"):
            sig[name] = "*i32" if name == "corr_ptr" else "*fp32"
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    compiled = triton.compile(ASTSource(JITFunction(kernel.fn), sig, consts),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4, "num_stages": 3})
    assert compiled.asm["ptx"]
