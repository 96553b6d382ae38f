"""The ``fxopt`` torch.library namespace: fused and quantized ops (filled by later passes).

Each op has a fake/meta implementation (shapes), a CPU implementation and, where a Triton
kernel exists, a CUDA one. Importing this module defines the namespace so saved graphs that
call ``torch.ops.fxopt.*`` load.
"""
from __future__ import annotations

import torch

__all__ = ["LIB"]

LIB = torch.library.Library("fxopt", "FRAGMENT")
