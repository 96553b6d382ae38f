"""Which kernel engine each int8 layer of ``lower_int8_cpu`` runs: oneDNN's
``qconv2d_pointwise`` or a PyTorch quantized engine's packed kernel (``cpu_engine``: a named
engine, ``"auto"``'s per-layer rule, ``"fastest"``'s two lowerings timed), and the packed
weights those kernels keep."""
import pytest
import torch
import torch.nn as nn

from cpu_lowering import Net, calibration, close, convs, plain, run  # tests/support
from fxopt.ops import onednn
from fxopt.quant.config import QuantConfig

lower = __import__("fxopt.passes.lower.cpu", fromlist=["cpu"])
pytestmark = pytest.mark.skipif(not lower.quantized_engine_available(),
                                reason="PyTorch's quantized CPU engine is not available")


@pytest.mark.parametrize("engine", ["onednn", "fbgemm"])
def test_relu6_on_either_engine(engine):
    """relu6: oneDNN's hardtanh post-op, or fbgemm's conv then a clamp of its codes."""
    ir, low, rec = run(Net(nn.ReLU6), quantize=QuantConfig(cpu_engine=engine))
    assert rec.stats["fallback"] == 0 and plain(low)
    conv = convs(low)[0]
    assert conv.act == "relu6" and conv.engine == engine
    for x in calibration(n=2, seed=7):
        assert close(low(x), ir(x), rec.tolerance)


@pytest.mark.parametrize("faster", ["auto", "x86"])
def test_fastest_keeps_the_faster_lowering_and_says_so(monkeypatch, faster):
    """cpu_engine='fastest' lowers the graph with "auto"'s choices and with "x86", times both
    (stubbed here: no timing in tests) and keeps the faster; either is within one output step
    of the int8 IR, and the report says what was kept, against what."""
    if "x86" not in torch.backends.quantized.supported_engines:
        pytest.skip("no x86 quantized engine in this PyTorch")
    timed = []

    def timings(graphs, inputs):
        timed.append(sorted(graphs))
        return {name: 1.0 if name == faster else 2.0 for name in graphs}

    monkeypatch.setattr(lower, "_timings", timings)
    monkeypatch.setattr(lower, "int8_pairs_saturate", lambda: True)  # where it is measured
    ir, low, rec = run(Net(), quantize=QuantConfig(cpu_engine="fastest"))
    assert timed == [["auto", "x86"]]
    engines = {c.engine for c in convs(low)}
    assert engines == ({"x86"} if faster == "x86" else {"fbgemm"})  # auto: small layers
    assert rec.stats["engine_choice"].startswith(f"{faster} kept (1.00 ms against")
    for x in calibration(n=2, seed=8):
        assert close(low(x), ir(x), rec.tolerance)


def test_fastest_measures_nothing_with_vnni_and_other_engines_never(monkeypatch):
    """With VNNI (8-bit activation grids, which fbgemm's grouped kernels may saturate) the x86
    lowering is not a candidate: "auto" is kept, unmeasured; a named engine is never timed."""
    monkeypatch.setattr(lower, "_timings", lambda *a: pytest.fail("timed"))
    monkeypatch.setattr(lower, "int8_pairs_saturate", lambda: False)
    ir, low, rec = run(Net(), quantize=QuantConfig(cpu_engine="fastest"))
    assert rec.stats["engine_choice"].startswith("auto kept")
    assert {c.engine for c in convs(low)} == {"fbgemm"}
    for engine in ("auto", "onednn", "x86"):
        _, _, rec = run(Net(), quantize=QuantConfig(cpu_engine=engine))
        assert "engine_choice" not in rec.stats


class Depthwise(nn.Module):
    """A tiny dense conv and a tiny depthwise conv (shufflenet's non-ReLU 3x3)."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, x):
        return self.dw(torch.relu(self.dense(x)))


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines,
                    reason="no fbgemm engine here")
def test_small_dense_layers_pack_under_fbgemm_grouped_ones_do_not():
    """The auto engine: fbgemm for a tiny dense layer, oneDNN for a depthwise one (fbgemm's
    made shufflenet_v2's int8 1.6x slower than x86's, and its grouped kernels saturate on full
    8-bit grids)."""
    _, low, rec = run(Depthwise(), quantize=QuantConfig(min_sqnr_db=None))  # both int8
    engines = {n.args[1].target: n.kwargs.get("engine", "onednn") for n in low.graph.nodes
               if n.target == torch.ops.fxopt.onednn_conv2d_int8.default}
    dense = next(e for t, e in engines.items() if t.startswith("dense"))
    dw = next(e for t, e in engines.items() if t.startswith("dw"))
    assert dense == "fbgemm" and dw == "onednn", engines
    assert rec.status == "ok"


def test_forget_dead_weights_drops_only_the_packs_of_dead_weights():
    """The packed weights of a lowering that was measured and not kept go once its int8
    weights do; live ones stay packed."""
    live, dead = torch.ones(4, 4, dtype=torch.int8), torch.ones(4, 4, dtype=torch.int8)
    onednn.packed_int8("test_live", live, (), lambda: "packed live")
    onednn.packed_int8("test_dead", dead, (), lambda: "packed dead")
    del dead
    assert onednn.forget_dead_weights() >= 1
    kinds = {k[1] for k in onednn._INT8_PACKED}
    assert "test_live" in kinds and "test_dead" not in kinds
    assert onednn.packed_int8("test_live", live, (), lambda: "packed again") == "packed live"


class Heads(nn.Module):
    """A classifier on 2 rows and a token projection on 128, both over SMALL_MACS."""

    def __init__(self):
        super().__init__()
        self.fc, self.tokens = nn.Linear(192, 12000), nn.Linear(3, 8000)

    def forward(self, x):
        return self.fc(x.flatten(1)), self.tokens(x.flatten(2).transpose(1, 2))


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines,
                    reason="no fbgemm engine here")
@pytest.mark.parametrize("vnni", [False, True])
def test_auto_runs_a_big_linear_on_few_rows_on_fbgemm_without_vnni(monkeypatch, vnni):
    """Without VNNI oneDNN's int8 matrix-vector products are slow (4096x4096 at one row: 2.04
    against fbgemm's 0.33 ms, bench/results/int8-linear-rows-2026-12-07.md): "auto" puts a
    linear on at most LINEAR_FBGEMM_ROWS rows on fbgemm whatever its size; on more rows, and
    on a CPU with VNNI (not measured), oneDNN as before."""
    monkeypatch.setattr(lower, "int8_pairs_saturate", lambda: not vnni)
    _, low, rec = run(Heads())
    engines = {n.args[1].target.split("_")[0]: n.kwargs.get("engine", "onednn")
               for n in low.graph.nodes if n.target == torch.ops.fxopt.onednn_linear_int8.default}
    assert engines == {"fc": "onednn" if vnni else "fbgemm", "tokens": "onednn"}, engines
    assert rec.status == "ok"
