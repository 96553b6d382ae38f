"""An int8 module lowered by ``lower_int8_cpu`` is plain tensors and fxopt ops with fakes, so
``torch.export`` and ``torch.compile`` take it: outputs equal to the module's, bit for bit
(Inductor calls each fxopt op as an extern kernel and reorders no int8 arithmetic).

A small CNN with every between-op the lowering writes (a residual add fused into its conv,
one kept apart, cat, max and global pooling, a squeeze-excitation gate in int8), and
resnet18 (slow)."""
from __future__ import annotations

import pytest
import torch

import fxopt
from fxopt.ops.schema import schema_of
from fxopt.quant.config import QuantConfig
from small_nets import SmallCNN  # tests/support (tests/conftest.py)

lower = __import__("fxopt.passes.lower.cpu", fromlist=["cpu"])
pytestmark = pytest.mark.skipif(not lower.quantized_engine_available(),
                                reason="PyTorch's int8 CPU kernels are not available")


def _cal(n=4, shape=(2, 3, 16, 16), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


# the gate's conv + sigmoid in int8 too (no kernel: it stays the IR op, which exports as well)
CONFIGS = {"default": "int8", "int8_gate": QuantConfig(float_without_kernel=False)}


@pytest.fixture(scope="module", params=list(CONFIGS))
def small(request):
    torch.manual_seed(0)
    cal = _cal()
    opt = fxopt.optimize(SmallCNN().eval(), cal[0], quantize=CONFIGS[request.param],
                         calibration_data=cal)
    return request.param, opt, cal


def _plain(gm) -> bool:
    return not any(isinstance(v, torch.ScriptObject) for v in gm.__dict__.values()) and \
        not any(t.is_quantized for t in gm.state_dict().values())


def test_small_cnn_is_lowered_onto_plain_codes(small):
    name, opt, _ = small
    rec = opt.report.record("lower_int8_cpu")
    assert rec.status == "ok" and _plain(opt.graph_module)
    families = {schema_of(n.target).family for n in opt.graph_module.graph.nodes
                if schema_of(n.target) is not None}
    assert "cpu" in families
    assert rec.stats["add"] == 1 and rec.stats["cat"] == 1 and rec.stats["pool"] >= 2
    assert rec.stats["mul"] == 1  # the SE gate: its conv + sigmoid is int8 in both configs


def test_small_cnn_torch_export_equal(small):
    _, opt, cal = small
    x = cal[1]
    with torch.no_grad():
        want = opt(x)
        for module in (opt, opt.graph_module):
            ep = torch.export.export(module, (x,), strict=False)
            ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
            assert any(o.startswith("fxopt.onednn_conv2d_int8") for o in ops)
            assert not any(o.startswith("quantized.") for o in ops)
            for xb in (x, cal[2]):
                assert torch.equal(ep.module()(xb), opt(xb))
        assert torch.equal(ep.module()(x), want)


@pytest.mark.slow  # Inductor compiles for about 20 s here
def test_small_cnn_torch_compile_equal(small):
    _, opt, cal = small
    torch._dynamo.reset()
    compiled = torch.compile(opt)  # backend inductor, default mode
    with torch.no_grad():
        for x in cal[1:3]:
            assert torch.equal(compiled(x), opt(x))


@pytest.mark.slow
def test_resnet18_int8_exports_and_compiles():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18().eval()
    cal = _cal(n=2, shape=(1, 3, 224, 224))
    opt = fxopt.optimize(model, cal[0], quantize="int8", calibration_data=cal)
    rec = opt.report.record("lower_int8_cpu")
    assert rec.status == "ok" and rec.stats["fallback"] == 0 and _plain(opt.graph_module)
    x = cal[1]
    with torch.no_grad():
        want = opt(x)
        ep = torch.export.export(opt, (x,), strict=False)
        assert torch.equal(ep.module()(x), want)
        torch._dynamo.reset()
        assert torch.equal(torch.compile(opt)(x), want)
