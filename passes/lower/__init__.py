"""Lowerings: the int8 IR onto PyTorch's CPU kernels, fused and int8 ops onto Triton kernels."""
from fxopt.passes.lower import cpu, triton  # noqa: F401  (register the passes)
