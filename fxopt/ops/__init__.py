"""The ``fxopt`` torch.library namespace: every fxopt op, declared once in the op schema.

Importing this package defines all the ops (``torch.ops.fxopt.*``), so graphs that call them
run, print, save and load. The families: ``fused`` (float conv/linear with their epilogue),
``int8`` (the device-neutral int8 IR), ``int8_dynamic``, ``triton`` (what ``lower_to_triton``
writes) and ``cpu`` (the oneDNN int8 ops ``lower_int8_cpu`` writes).
"""
# importing defines the ops
from fxopt.ops import cpu, fused, int8, int8_dynamic, triton, triton_int8  # noqa: F401
