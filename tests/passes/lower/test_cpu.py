"""lower_int8_cpu: the int8 IR onto PyTorch's quantized x86 kernels.

Golden (quantized.* ops in, fxopt int8 ops out), equal to the int8 graph before it within
one output step on fresh inputs, fallbacks named in the report, relu6, symmetric grids left
alone, save/load, deepcopy, target="cuda" untouched; the table itself (``RULES``): every row
fires, a rejected case stays and is named, an op without a row is left alone.
"""
import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.infra.manager import PassManager
from fxopt.infra.registry import PassContext
from fxopt.infra.rewrite import apply_rules
from fxopt.pipelines import expand_pipeline
from fxopt.ops import onednn
from fxopt.ops.fused import LINEAR_ACT
from fxopt.ops.int8 import INT8_IR_OPS, QUANTIZE
from fxopt.quant.config import QuantConfig
from small_nets import MobileBlock  # tests/support (tests/conftest.py)

lower = __import__("fxopt.passes.lower.cpu", fromlist=["cpu"])
pytestmark = pytest.mark.skipif(not lower.quantized_engine_available(),
                                reason="PyTorch's quantized CPU engine is not available")
QOPS = torch.ops.quantized


class Net(nn.Module):
    def __init__(self, act=nn.ReLU, res_act=nn.ReLU):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = act()
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.res_act = res_act()
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = self.act(self.c1(x))
        y = self.res_act(self.c2(y) + y)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def _cal(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(n)]


def run(model, quantize="int8", steps=("fold_bn", "fuse_act", "quantize_int8"), target="cpu"):
    """The int8 graph (before lowering), and a copy lowered with the manager's checks."""
    x = torch.randn(2, 3, 8, 8)
    gm = fxopt.capture(model.eval(), x)
    ctx = PassContext(example_inputs=(x,), configs=[QuantConfig.coerce(quantize)],
                      calibration_data=_cal(), target=target)
    ir, _ = PassManager(expand_pipeline(list(steps)), check="each").run(gm, ctx)
    low, report = PassManager(expand_pipeline(["lower_int8_cpu"]), check="each").run(
        copy.deepcopy(ir), ctx)
    return ir, low, report.record("lower_int8_cpu")


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def _close(a, b, step):
    with torch.no_grad():
        return (a - b).abs().max().item() <= step * (1 + 1e-4)


def _step(rec):
    return rec.tolerance


def test_golden():
    ir, low, rec = run(Net())
    assert rec.status == "ok" and rec.modified
    t = targets(low)
    for op in (QOPS.conv2d_relu, QOPS.conv2d, QOPS.add_relu,
               QOPS.linear):
        assert t.count(op) == 1, op
    # the entry and the exit, and the global pool onto its own grid: quantize_per_tensor(
    # F.adaptive_avg_pool2d(q.dequantize()), s_p, zp_p)
    assert t.count(torch.quantize_per_tensor) == 2 and t.count("dequantize") == 2
    assert t.count(F.adaptive_avg_pool2d) == 1
    assert not set(t) & set(INT8_IR_OPS)
    assert rec.stats["conv2d"] == 2 and rec.stats["add"] == 1 and rec.stats["linear"] == 1
    assert rec.stats["fallback"] == 0 and rec.notes == []


def test_equal_to_int8_graph_on_fresh_inputs():
    ir, low, rec = run(Net())
    for x in _cal(n=3, seed=5):
        with torch.no_grad():
            assert _close(low(x), ir(x), _step(rec))


@pytest.mark.parametrize("act", [nn.Sigmoid, nn.Mish])
def test_no_kernel_stays_float_on_cpu_and_says_so(act):
    """Default on target='cpu': a layer with no CPU int8 kernel (a residual layer whose
    activation after the add is not relu: PyTorch's quantized add fuses relu only) stays float
    (named)."""
    x = torch.randn(2, 3, 8, 8)
    opt = fxopt.optimize(Net(res_act=act).eval(), x, quantize="int8", calibration_data=_cal())
    q, rec = opt.report.record("quantize_int8"), opt.report.record("lower_int8_cpu")
    assert q.stats["no_cpu_kernel"] == 1 and q.stats["kept_float"] == 1
    assert any("no PyTorch int8 CPU kernel" in n and "c2" in n for n in q.notes), q.notes
    assert rec.status == "ok" and rec.stats["fallback"] == 0
    low = opt.graph_module
    assert torch.ops.fxopt.conv2d_int8.default not in targets(low)
    assert torch.ops.fxopt.conv2d_act.default in targets(low)  # c2 (+add+act) in float
    assert QOPS.conv2d_relu in targets(low)  # the rest is int8 on PyTorch's kernels


@pytest.mark.parametrize("act", [nn.Sigmoid, nn.Mish])
def test_no_kernel_falls_back_and_says_so(act):
    ir, low, rec = run(Net(res_act=act), quantize=QuantConfig(float_without_kernel=False))
    assert rec.status == "ok" and rec.stats["fallback"] == 1
    assert "res_act" in rec.notes[0] and "no PyTorch int8 kernel" in rec.notes[0]
    assert torch.ops.fxopt.add_int8.default in targets(low)  # the reference add, on the codes
    assert QOPS.conv2d_relu in targets(low)  # the rest is lowered
    for x in _cal(n=2, seed=6):
        assert _close(low(x), ir(x), _step(rec))


FLOAT_EPILOGUE = [nn.Sigmoid, nn.Hardsigmoid, nn.Mish, nn.Tanh, nn.GELU, nn.ELU,
                  lambda: nn.LeakyReLU(0.1)]


@pytest.mark.skipif(not onednn.onednn_int8_available(), reason="no oneDNN int8 kernels")
@pytest.mark.parametrize("act", FLOAT_EPILOGUE)
def test_conv_with_any_activation_runs_int8(act):
    """A convolution whose activation oneDNN fuses no post-op for (sigmoid and hardsigmoid
    gates, mish, tanh, GELU, ELU, leaky ReLU) is int8 all the same: oneDNN's int8 kernel writes
    float32, the activation runs on it, then the requantize; within one output step of the
    int8 graph, and nothing kept float or run as the reference."""
    torch.manual_seed(0)
    m, x = Net(act).eval(), torch.randn(2, 3, 8, 8)
    opt = fxopt.optimize(m, x, quantize="int8", calibration_data=_cal())
    q, rec = opt.report.record("quantize_int8"), opt.report.record("lower_int8_cpu")
    assert "no_cpu_kernel" not in q.stats and q.stats["kept_float"] == 0, q.notes
    assert q.stats["conv2d"] == 2 and rec.status == "ok" and rec.stats["fallback"] == 0
    assert rec.stats["onednn_conv2d"] == 1, rec.stats
    low = opt.graph_module
    assert torch.ops.fxopt.onednn_conv2d_int8.default in targets(low)
    assert torch.ops.fxopt.conv2d_act.default not in targets(low)
    ir = fxopt.optimize(m, x, quantize="int8", calibration_data=_cal(),
                        disable=["lower_int8_cpu"])
    for xb in _cal(n=2, seed=6):
        with torch.no_grad():
            assert _close(opt(xb), ir(xb), rec.tolerance)


class LinearGate(nn.Module):
    """A linear layer ending in a gate (sigmoid / hardsigmoid), as an SE block's second FC."""

    def __init__(self, act):
        super().__init__()
        self.fc0, self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 32), nn.Linear(32, 16)
        self.act = act()

    def forward(self, x):
        h = torch.relu(self.fc0(x))
        return h * self.act(self.fc2(torch.relu(self.fc1(h))))


@pytest.mark.skipif(not onednn.onednn_int8_available(), reason="no oneDNN int8 kernels")
@pytest.mark.parametrize("act", [nn.Sigmoid, nn.Hardsigmoid])
def test_linear_gate_runs_int8(act):
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    cal = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    opt = fxopt.optimize(LinearGate(act).eval(), x, quantize="int8", calibration_data=cal)
    q, rec = opt.report.record("quantize_int8"), opt.report.record("lower_int8_cpu")
    assert "no_cpu_kernel" not in q.stats and q.stats["linear"] == 3, q.notes
    assert q.stats["mul"] == 1 and rec.stats["onednn_linear"] == 1
    assert rec.status == "ok" and rec.stats["fallback"] == 0


def test_relu6_is_conv_then_clamp():
    ir, low, rec = run(Net(nn.ReLU6))
    assert rec.stats["fallback"] == 0
    conv = next(n for n in low.graph.nodes if n.target is QOPS.conv2d
                and any(u.target is torch.clamp for u in n.users))
    clamp = next(iter(conv.users))
    assert clamp.args[1:] == (0.0, 6.0)
    for x in _cal(n=2, seed=7):
        assert _close(low(x), ir(x), _step(rec))


def test_symmetric_activations_not_lowered():
    ir, low, rec = run(Net(), quantize=QuantConfig(activation_symmetric=True))
    assert rec.modified is False and "symmetric" in rec.notes[0]
    assert low.code == ir.code


def test_target_cuda_leaves_it_alone():
    ir, _, _ = run(Net())
    x = torch.randn(2, 3, 8, 8)
    code = ir.code
    res = lower.lower_int8_cpu(ir, PassContext((x,), target="cuda"))
    assert res.modified is False and ir.code == code and "cuda" in res.notes[0]


def test_idempotent_and_negative():
    _, low, _ = run(Net())
    x = torch.randn(2, 3, 8, 8)
    code = low.code
    assert lower.lower_int8_cpu(low, PassContext((x,))).modified is False and low.code == code
    gm = fxopt.capture(Net().eval(), x)  # float graph: nothing to lower
    code = gm.code
    assert lower.lower_int8_cpu(gm, PassContext((x,))).modified is False and gm.code == code


def test_save_load_and_deepcopy(tmp_path):
    torch.manual_seed(0)
    m, x = Net().eval(), torch.randn(2, 3, 8, 8)
    opt = fxopt.optimize(m, x, quantize="int8", calibration_data=_cal(), target="cpu")
    assert opt.report.record("lower_int8_cpu").status == "ok"
    assert QOPS.conv2d_relu in targets(opt.gm if hasattr(opt, "gm") else opt.graph_module)
    again = fxopt.load(opt.save(tmp_path / "m.fxopt"))
    dup = copy.deepcopy(opt)
    for xb in _cal(n=2, seed=8):
        with torch.no_grad():
            want = opt(xb)
            assert torch.equal(again(xb), want) and torch.equal(dup(xb), want)


@pytest.mark.skipif(not onednn.onednn_int8_available(), reason="no oneDNN int8 kernels")
def test_hardswish_silu_gelu_run_int8_on_onednn(tmp_path):
    """Every layer int8 on the CPU (none kept float for want of a kernel): the three
    epilogues on oneDNN's int8 kernels, within one output step of the int8 graph, and the
    module saves, loads and copies with the same outputs."""
    torch.manual_seed(0)
    m, x = MobileBlock().eval(), torch.randn(2, 3, 16, 16)
    cal = [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    opt = fxopt.optimize(m, x, quantize="int8", calibration_data=cal)
    q, rec = opt.report.record("quantize_int8"), opt.report.record("lower_int8_cpu")
    assert "no_cpu_kernel" not in q.stats and q.stats["kept_float"] == 0
    assert q.stats["conv2d"] == 2 and q.stats["linear"] == 2
    assert rec.status == "ok" and rec.stats["fallback"] == 0
    assert rec.stats["onednn_conv2d"] == 2 and rec.stats["onednn_linear"] == 1
    assert q.stats["sqnr_db"] > 25
    ir = fxopt.optimize(m, x, quantize="int8", calibration_data=cal,
                        disable=["lower_int8_cpu"])
    again = fxopt.load(opt.save(tmp_path / "mobile.fxopt"))
    dup = copy.deepcopy(opt)
    for xb in cal:
        with torch.no_grad():
            want = opt(xb)
            assert _close(want, ir(xb), rec.tolerance)
            assert torch.equal(again(xb), want) and torch.equal(dup(xb), want)


class ResidualSiLU(nn.Module):
    """A residual add followed by SiLU (add_int8 with no x86 kernel) and a functional max pool."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = F.silu(self.c2(y) + y)
        return self.fc(F.max_pool2d(y, 2).flatten(1))


def test_add_fallback_reads_codes_and_functional_max_pool():
    ir, low, rec = run(ResidualSiLU(), quantize=QuantConfig(float_without_kernel=False))
    assert rec.status == "ok" and rec.stats["fallback"] == 1
    assert torch.ops.fxopt.add_int8.default in targets(low)  # the reference, on the codes
    assert torch.ops.fxopt.max_pool2d_int8.default in targets(ir)
    for x in _cal(n=2, seed=8):
        assert _close(low(x), ir(x), _step(rec))


# -- the table ------------------------------------------------------------------------------------
ROWS = {rule.name: rule for rule in lower.RULES}


class EveryOp(nn.Module):
    """An op for every row: conv-relu, conv-sigmoid (oneDNN's int8 kernel, the sigmoid on its
    float output), two conv-hardswish in a row
    and linear-gelu (oneDNN's int8 kernels: codes stay plain between the two), adds (plain,
    with relu, and a residual one with silu: no kernel), a product with a pooled gate
    (broadcast), cat, max pool, a depthwise conv-relu6 (conv then clamp), global average pool,
    linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.c4 = nn.Conv2d(8, 8, 3, padding=1)
        self.c5 = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.c6, self.c7 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 10)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        a = torch.sigmoid(self.c2(y)) + F.hardswish(self.c7(F.hardswish(self.c6(y))))
        b = torch.relu(self.c3(y) + y)
        c = F.silu(self.c4(b) + b) * F.adaptive_avg_pool2d(a, 1)
        y = F.relu6(self.c5(F.max_pool2d(torch.cat([a, c], 1), 2)))
        return self.fc2(F.gelu(self.fc1(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))))


def _table(gm, rules=lower.RULES):
    """The table run on a copy of ``gm`` as the pass runs it: (RewriteResult, shared state)."""
    state = lower.CpuLowering()
    return apply_rules(copy.deepcopy(gm), rules, context=state, skip=state.skip), state


def test_the_table_on_a_network_of_every_kind_of_op():
    """The rows this network reaches each fire as many times as it has such ops. (A row for a
    new op is tested in that op's own test module: this network need not grow with the
    table.)"""
    ir, low, rec = run(EveryOp(), quantize=QuantConfig(float_without_kernel=False))
    result, state = _table(ir)
    assert result.counts == {"quantize": 1, "conv2d_int8": 4,
                             "conv2d_int8_onednn": 3, "codes_of_wrapped_codes": 1,
                             "linear_int8_onednn": 1, "add_int8": 2,
                             "add_int8_reference": 1, "mul_int8": 1, "cat_int8": 1,
                             "max_pool2d_int8": 1, "adaptive_avg_pool2d_int8": 2,
                             "linear_int8": 1, "dequantize": 1}
    assert set(result.counts) <= set(ROWS)
    # the stats are the rows' tallies; the reference rows' ops are named, and not lowered again
    assert result.tallies == {k: v for k, v in rec.stats.items()
                              if k not in ("fallback", "engine", "tie_flips")}
    assert rec.stats["fallback"] == len(state.fallback) == 1 and "c2" not in state.fallback
    assert len(result.rewrites) == result.count and result.notes == []
    assert rec.status == "ok"
    for x in _cal(n=2, seed=9):
        assert _close(low(x), ir(x), _step(rec))


def _tiny_graph(emit, **buffers) -> fx.GraphModule:
    """``emit(graph, x, *get_attrs)``: one op on an input ``x`` and constant buffers."""
    root = nn.Module()
    for name, value in buffers.items():
        root.register_buffer(name, value)
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(emit(g, x, *(g.get_attr(name) for name in buffers)))
    return fx.GraphModule(root, g)


def test_rejected_case_stays_and_is_named():
    gm = _tiny_graph(lambda g, x, s, z: QUANTIZE.emit(g, x=x, scale=s, zp=z, qmin=-128,
                                                      qmax=127, name="q"),
                     s=torch.tensor(0.1), z=torch.tensor(0))
    code = gm.code
    result = apply_rules(gm, lower.RULES, context=lower.CpuLowering())
    assert result.count == 0 and gm.code == code
    assert result.rejected == ["quantize (q): grid [-128, 127] (the kernels take quint8 only)"]


def test_kernel_row_rejects_and_the_reference_row_takes_it():
    ir, _, _ = run(ResidualSiLU(), quantize=QuantConfig(float_without_kernel=False))
    kernel_only, _ = _table(ir, [ROWS["add_int8"]])
    assert kernel_only.count == 0
    assert kernel_only.rejected == ["add_int8 (add_int8_default): no quantized add with "
                                    "activation silu"]
    both, state = _table(ir, [ROWS["add_int8"], ROWS["add_int8_reference"]])
    assert both.counts == {"add_int8_reference": 1} and both.rejected == []
    assert state.fallback == ["add_int8_default"]


def test_op_without_a_row_is_left_alone():
    gm = _tiny_graph(lambda g, x, w: LINEAR_ACT.emit(g, x=x, weight=w, bias=None, act="relu"),
                     w=torch.randn(4, 3))
    code = gm.code
    result = apply_rules(gm, lower.RULES, context=lower.CpuLowering())
    assert result.count == 0 and result.notes == [] and gm.code == code


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
    """The auto engine: fbgemm for a tiny dense layer, PyTorch's own choice for a depthwise one
    (fbgemm's made shufflenet_v2's int8 1.6x slower than x86's)."""
    _, low, rec = run(Depthwise())
    engines = {n.target: n.meta.get("fxopt_engine") for n in low.graph.nodes
               if n.op == "get_attr" and "packed" in n.target}
    dense = next(e for t, e in engines.items() if t.startswith("dense"))
    dw = next(e for t, e in engines.items() if t.startswith("dw"))
    assert dense == "fbgemm" and dw == torch.backends.quantized.engine != "fbgemm", engines
    assert rec.status == "ok"
