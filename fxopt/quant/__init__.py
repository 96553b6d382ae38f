"""The quantization library: configs, grids, observers, the int8 plan and its simulation.

Used by the quantization passes (``fxopt.passes.quant``) and by quantization-aware training
(``fxopt.train.qat``); it rewrites no graph itself.
"""
