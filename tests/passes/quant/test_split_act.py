"""passes/quant/split_act.py: on target="onnxruntime" a layer's activation that ONNX Runtime
cannot fuse runs after the layer, so every conv and linear of the QDQ file becomes an ONNX
Runtime int8 kernel (QLinearConv / QGemm / MatMulInteger family), checked in a real session."""
import collections
import operator

import pytest
import torch
import torch.nn.functional as F

import fxopt
from fxopt.ir.tolerances import compare_outputs
from fxopt.ops.fused import CONV2D_ACT, LINEAR_ACT
from fxopt.passes.quant.split_act import ORT_FUSED_ACTIVATIONS, split_unfused_activations
from fxopt.quant.roles import OWN_GRID_ACTIVATION
from tests.support.small_nets import MobileBlock

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _fused_graph():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    opt = fxopt.optimize(MobileBlock().eval(), x, target="cpu")
    return opt.graph_module, x


def test_split_keeps_the_numbers_and_only_unfused_activations():
    gm, x = _fused_graph()
    with torch.no_grad():
        before = gm(x.clone())
    fused = [n for n in gm.graph.nodes if n.op == "call_function"
             and n.target in (CONV2D_ACT.overload, LINEAR_ACT.overload)]
    acts = [CONV2D_ACT.view.match(n).act if n.target is CONV2D_ACT.overload
            else LINEAR_ACT.view.match(n).act for n in fused]
    assert {"hardswish", "silu", "gelu"} <= set(acts)
    n = split_unfused_activations(gm)
    assert n == sum(a not in ORT_FUSED_ACTIVATIONS for a in acts) == 3
    after_acts = [CONV2D_ACT.view.match(f).act if f.target is CONV2D_ACT.overload
                  else LINEAR_ACT.view.match(f).act for f in fused]
    assert set(after_acts) <= ORT_FUSED_ACTIVATIONS
    targets = {u.target for f in fused for u in f.users}
    # gated activations as value * gate (ONNX Runtime's quantizer sees them so); GELU as is
    assert {torch.sigmoid, F.hardsigmoid, operator.mul, F.gelu} <= targets
    assert F.hardswish not in targets and F.silu not in targets
    marked = [u for f in fused for u in f.users if u.meta.get(OWN_GRID_ACTIVATION)]
    assert sorted(u.target.__name__ for u in marked) == ["gelu", "hardsigmoid", "sigmoid"]
    with torch.no_grad():
        after = gm(x.clone())
    assert compare_outputs(after, before).ok
    assert split_unfused_activations(gm) == 0  # nothing left to split


def test_onnxruntime_target_runs_every_layer_in_int8_kernels(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    cal = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(4)]
    model = MobileBlock().eval()
    opt = fxopt.optimize(model, cal[0], quantize="int8", calibration_data=cal,
                         target="onnxruntime")
    rec = opt.report.record("quantize_int8")
    assert rec.stats["activations_after_layer"] == 3, rec.stats
    assert rec.stats.get("conv2d", 0) + rec.stats.get("linear", 0) == 4, rec.stats
    # the gates and GELU on grids of their own, the gated products int8
    assert rec.stats["activation"] == 3 and rec.stats["mul"] == 2, rec.stats
    path = tmp_path / "m.onnx"
    fxopt.export_onnx(opt, cal[0], path)  # checked against the module: within one step
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "ort.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    assert ops["QLinearConv"] == 2 and "Conv" not in ops, ops  # no float conv left
    assert "Gemm" not in ops and "MatMul" not in ops, ops
    # the gated products and the sigmoid gate in ORT's int8 kernels (Hardsigmoid and GELU run
    # in float between a DequantizeLinear and a QuantizeLinear, as in quantize_static's file)
    assert ops["QLinearMul"] == 2 and ops["QLinearSigmoid"] == 1, ops
    # the CPU plan keeps the activations fused (oneDNN post-ops): nothing split there
    cpu = fxopt.optimize(model, cal[0], quantize="int8", calibration_data=cal, target="cpu")
    assert "activations_after_layer" not in cpu.report.record("quantize_int8").stats


@pytest.mark.parametrize("act,args,fn", [("sigmoid", [], torch.sigmoid),
                                         ("hardsigmoid", [], F.hardsigmoid),
                                         ("leaky_relu", [0.2], lambda v: F.leaky_relu(v, 0.2))])
def test_activation_int8_is_the_activation_of_the_values_rounded_once(act, args, fn):
    from fxopt.ops.int8 import ACTIVATION_INT8
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 256, (2, 5, 3, 3), generator=g, dtype=torch.uint8)
    s, z, ys, yz = torch.tensor(0.07), torch.tensor(120), torch.tensor(0.004), torch.tensor(3)
    got = torch.ops.fxopt.activation_int8(q, s, z, 0, 255, ys, yz, act=act, act_args=args)
    values = (q.to(torch.int64) - 120).float() * s  # float32, as PyTorch's quantized ops
    want = torch.clamp(torch.round(fn(values) * (1 / ys)) + 3, 0, 255)
    assert got.dtype == torch.uint8 and got.shape == q.shape
    assert torch.equal(got.double(), want.double())
    exact = torch.clamp(torch.round(fn((q.double() - 120) * 0.07) / 0.004) + 3, 0, 255)
    assert (got.double() - exact).abs().max() <= 1  # against float64: ties only
    fake = ACTIVATION_INT8.fake(q, s, z, 0, 255, ys, yz, act=act, act_args=args)
    assert fake.shape == q.shape and fake.dtype == torch.uint8
