"""fxopt: a compiler for trained PyTorch models, checked pass by pass against eager.

    >>> opt = fxopt.optimize(model.eval(), torch.randn(1, 3, 224, 224))
    >>> print(opt.report)

The public names are re-exported here; ``ARCHITECTURE.md`` maps the packages behind them.
"""
from fxopt import ops  # noqa: F401  (defines the torch.ops.fxopt namespace)
from fxopt import passes  # noqa: F401  (registers the built-in passes)
from fxopt.api import OptimizedModule, load, optimize
from fxopt.errors import *  # noqa: F401,F403
from fxopt.errors import __all__ as _errors_all
from fxopt.export.onnx import OnnxExport, export_onnx
from fxopt.infra.manager import Instrument, PassManager
from fxopt.infra.registry import (GROUPS, PASSES, PassContext, PassResult, register_group,
                                  register_pass)
from fxopt.infra.report import PassRecord, Report
from fxopt.ir.capture import capture
from fxopt.ir.tolerances import TOLERANCES
from fxopt.ops.unversioned import weights_written
from fxopt.pipelines import PIPELINES, build_pipeline, expand_pipeline
from fxopt.prune.channels import ChannelGraph, ChannelGroup, channel_groups
from fxopt.prune.config import PruneConfig
from fxopt.prune.importance import register_importance
from fxopt.prune.rule_table import register_channel_rule
from fxopt.quant.config import QuantConfig
from fxopt.tools.draw import draw  # matplotlib only when called: fxopt[draw]
from fxopt.train import qat  # noqa: F401  (fxopt.qat.convert)
from fxopt.train.finetune import FinetuneResult, finetune
from fxopt.train.qat import QATModel, prepare_qat

__version__ = "0.1.0"
__all__ = [
    "optimize", "OptimizedModule", "load", "capture", "PassManager", "Instrument",
    "register_pass", "register_group", "PassResult", "PassContext", "PASSES", "GROUPS",
    "PIPELINES", "expand_pipeline", "build_pipeline", "Report", "PassRecord", "TOLERANCES",
    *_errors_all,
    "channel_groups", "ChannelGraph", "ChannelGroup", "PruneConfig", "QuantConfig", "finetune",
    "FinetuneResult", "export_onnx", "OnnxExport", "draw", "prepare_qat", "QATModel",
    "register_channel_rule", "register_importance", "weights_written",
]
