"""fxopt: a compiler for trained PyTorch models, checked pass by pass against eager.

    >>> opt = fxopt.optimize(model.eval(), torch.randn(1, 3, 224, 224))
    >>> print(opt.report)
"""
from .api import OptimizedModule, load, optimize
from .capture import capture
from .channels import ChannelGraph, ChannelGroup, channel_groups
from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all
from .finetune import FinetuneResult, finetune
from .manager import Instrument, PassManager
from .prune_config import PruneConfig
from .quant_config import QuantConfig
from .registry import (GROUPS, PASSES, PIPELINES, PassContext, PassResult, expand_pipeline,
                       register_group, register_pass)
from .report import PassRecord, Report
from .tolerances import TOLERANCES

from . import ops  # noqa: E402,F401  (defines the torch.ops.fxopt namespace)
from . import passes  # noqa: E402,F401  (registers the built-in passes)
from .draw import draw  # noqa: E402  (matplotlib only when called: fxopt[draw])
from .onnx_export import OnnxExport, export_onnx  # noqa: E402

__all__ = [
    "optimize", "OptimizedModule", "load", "capture", "PassManager", "Instrument",
    "register_pass", "register_group", "PassResult", "PassContext", "PASSES", "GROUPS",
    "PIPELINES", "expand_pipeline", "Report", "PassRecord", "TOLERANCES", *_errors_all,
    "channel_groups", "ChannelGraph", "ChannelGroup", "PruneConfig", "finetune", "FinetuneResult",
]
__all__ += ["export_onnx", "OnnxExport", "draw"]
__version__ = "0.1.0"
__all__ += ["QuantConfig"]
from .qat import QATModel, prepare_qat  # noqa: E402  (quantization-aware fine-tuning)
from . import qat  # noqa: E402,F401  (fxopt.qat.convert)
__all__ += ["prepare_qat", "QATModel"]
