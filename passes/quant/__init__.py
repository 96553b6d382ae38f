"""Int8 quantization passes: ``quantize_int8`` (static, calibrated; dynamic for Linear)."""
from fxopt.passes.quant import quantize  # noqa: F401  (registers the pass)
