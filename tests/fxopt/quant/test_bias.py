"""Bias correction (fxopt.quant.bias): each int8 layer's bias absorbs the mean per-channel
error of its int8 form on the calibration data; the simulation and the int8 IR both use the
corrected bias, rounded onto the layer's int32 accumulator grid (as int8 kernels add it)."""
import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.infra.manager import PassManager
from fxopt.infra.registry import PassContext
from fxopt.ir.graph import get_attr_value
from fxopt.ops.int8 import Int8Layer
from fxopt.pipelines import expand_pipeline
from fxopt.quant.bias import bias_corrections
from fxopt.quant.calibrate import calibrate
from fxopt.quant.config import QuantConfig
from fxopt.quant.plan import find_layers
from fxopt.quant.qparams import on_accumulator_grid


class Wide(nn.Module):
    """Wide fan-in convolutions on all-positive inputs (post-ReLU), one large weight per output
    channel (a coarse weight grid): rounding the weights moves each output channel's mean by
    sum_k (w_q - w)_k * mean(x_k)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 64, 3, padding=1)
        self.c2 = nn.Conv2d(64, 64, 3, padding=1)
        self.c3 = nn.Conv2d(64, 16, 3, padding=1)
        with torch.no_grad():
            for c in (self.c2, self.c3):
                c.weight[:, 0, 0, 0] = 8 * c.weight.abs().amax(dim=(1, 2, 3))

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = torch.relu(self.c2(y))
        return self.c3(y)


def _batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 12, 12, generator=g) + 1.0 for _ in range(n)]


def _run(cfg, cal):
    torch.manual_seed(0)
    model = Wide().eval()
    gm = fxopt.capture(model, cal[0])
    ctx = PassContext(example_inputs=(cal[0],), configs=[cfg], calibration_data=cal)
    out, report = PassManager(expand_pipeline(["quantize_int8"]), check="each").run(gm, ctx)
    return model, out, report.record("quantize_int8")


def _channel_mean_error(model, q, batches):
    with torch.no_grad():
        d = torch.cat([q(x) - model(x) for x in batches])
    return d.mean(dim=(0, 2, 3)).abs().mean().item()


def test_bias_correction_reduces_the_mean_error_per_channel():
    cal = _batches(5, 1)
    held = _batches(4, 2)
    kw = dict(reduce_range=False, holdout_fraction=0)
    model, on, rec_on = _run(QuantConfig(**kw), cal)
    _, off, rec_off = _run(QuantConfig(bias_correction=False, **kw), cal)
    assert rec_on.status == rec_off.status == "ok"  # both within one step of their simulation
    assert rec_on.stats["bias_corrected"] == 3 and "bias_corrected" not in rec_off.stats
    e_on, e_off = _channel_mean_error(model, on, held), _channel_mean_error(model, off, held)
    assert e_on < 0.6 * e_off, (e_on, e_off)


def test_ir_and_simulation_carry_the_corrected_bias():
    cal = _batches(5, 1)
    # every layer int8 (min_sqnr_db=None): the bias of each is what is checked
    cfg = QuantConfig(reduce_range=False, holdout_fraction=0, min_sqnr_db=None)
    torch.manual_seed(0)
    model = Wide().eval()
    gm = fxopt.capture(model, cal[0])
    layers = find_layers(gm)
    grids, weights = calibrate(gm, layers, [(x,) for x in cal], cfg)
    corr = bias_corrections(gm, layers, grids, weights, [(x,) for x in cal])
    assert all(float(c.abs().max()) > 0 for c in corr.values())
    want = {l.path: l.bias + corr[l.node] for l in layers}
    _, out, rec = _run(cfg, cal)
    assert rec.status == "ok"   # the IR within one output step of the simulation (check="each")
    seen = 0
    for n in out.graph.nodes:
        v = Int8Layer.match(n)
        if v is None:
            continue
        path = n.meta.get("fxopt_path")
        bias = get_attr_value(out, v.bias.target)
        # on the accumulator's int32 grid (what int8 kernels add), within half a step of it
        xs, ws = get_attr_value(out, v.x_scale.target), get_attr_value(out, v.w_scale.target)
        torch.testing.assert_close(bias, on_accumulator_grid(want[path], xs, ws), rtol=0, atol=0)
        assert bool(((bias - want[path]).abs() <= 0.5 * xs * ws + 1e-9).all())
        seen += 1
    assert seen == 3


def test_bias_correction_can_be_switched_off():
    assert QuantConfig().bias_correction is True
    with pytest.raises(fxopt.errors.InputError, match="bias_correction"):
        QuantConfig(bias_correction="yes")
