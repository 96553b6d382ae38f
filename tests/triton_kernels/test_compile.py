"""Every kernel compiles for Hopper (sm_90) without a GPU: triton.compile down to PTX/cubin with
the bundled ptxas, for each specialization the kernel declares (``Kernel(compile_cases=...)``).
Catches compiled-mode errors the interpreter cannot (slow: ~20 s)."""
import inspect

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from fxopt import triton_kernels  # noqa: E402,F401  (declares every kernel)
from fxopt.triton_kernels._runtime import KERNELS  # noqa: E402

FLOAT_ARGS = {"act_a0", "act_a1", "y_inv_scale", "y_zp", "y_qmin", "y_qmax", "inv_scale", "zp",
              "qmin", "qmax", "scale", "a_scale", "b_scale", "count"}
# Every kernel declares the specializations it must compile for (``Kernel(compile_cases=)``,
# beside the kernel): a new kernel is compiled here without an edit to this file.
CASES = {name: (kernel, ptrs, consts) for kernel in KERNELS
         for name, (ptrs, consts) in kernel.compile_cases.items()}


def test_every_kernel_declares_a_compile_case():
    assert [k.__name__ for k in KERNELS if not k.compile_cases] == []
    assert len(CASES) == sum(len(k.compile_cases) for k in KERNELS)  # names are unique


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
