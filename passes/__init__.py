"""Built-in passes. Importing this package registers them and the named pipelines.

Pipelines are literal lists (DESIGN.md section 5); ``cleanup`` is a fixpoint group.
"""
from fxopt.registry import PIPELINES

from . import cleanup  # noqa: F401  (registers dce, cse, constant_fold, remove_noops, group cleanup)
from . import fold_bn  # noqa: F401  (registers fold_bn)
from . import fuse_act  # noqa: F401  (registers fuse_act)
from . import prune  # noqa: F401  (registers prune_channels)
from . import quantize  # noqa: F401  (registers quantize_int8)
from . import lower_cpu  # noqa: F401  (registers lower_int8_cpu)
from . import lower_triton  # noqa: F401  (registers lower_to_triton)

__all__ = ["PIPELINES"]

PIPELINES["cleanup"] = ["cleanup"]
# The fullest pipeline available; later issues add fold_bn, fuse_act, prune, quantize, lower.
PIPELINES["default"] = ["cleanup", "fold_bn", "fuse_act", "cleanup"]
