"""What the fold_bn test modules share: trained-like BatchNorm statistics, a fold checked
against eager, and the BatchNorms left in a graph."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.infra.registry import PassContext
from fxopt.ir.graph import count_bytes, count_params
from fxopt.ir.tolerances import compare_outputs
from fxopt.ir.verify import verify_structure
from fxopt.passes.fusion.fold_bn import fold_bn

__all__ = ["randomize_bn", "run_fold", "bn_left"]


def randomize_bn(model, *, affine_params=True):
    """Trained-like BN statistics: the defaults (mean 0, var 1, gamma 1, beta 0) hide mistakes."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.running_mean is not None:
                m.running_mean.uniform_(-1.0, 1.0)
                m.running_var.uniform_(0.3, 2.0)
            if m.affine and affine_params:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.5, 0.5)
    return model


def run_fold(model, *inputs):
    model = model.eval()
    gm = fxopt.capture(model, inputs)
    before = count_params(gm), count_bytes(gm)
    res = fold_bn(gm, PassContext(example_inputs=inputs))
    assert verify_structure(gm) == []
    with torch.no_grad():
        out, ref = gm(*inputs), model(*inputs)
    stats = compare_outputs(out, ref)
    assert stats.ok, f"rel err {stats.rel_err:.2e}"
    return gm, res, before


def bn_left(gm):
    mods = [n for n in gm.graph.nodes if n.op == "call_module"
            and isinstance(gm.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)]
    fns = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.batch_norm]
    return len(mods) + len(fns)
