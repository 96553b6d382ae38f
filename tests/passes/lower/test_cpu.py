"""lower_int8_cpu: the int8 IR onto PyTorch's int8 CPU kernels on plain uint8 codes.

Golden (fxopt's CPU ops in, no int8 IR op, no quantized tensor, no packed ScriptObject),
equal to the int8 graph before it within one output step on fresh inputs, fallbacks named in
the report, the residual add fused into the conv (and not where the grids forbid it),
symmetric grids left alone, save/load, deepcopy, target="cuda" untouched; the table itself
(``RULES``): every row fires, a rejected case stays and is named, an op without a row is left
alone. Which kernel engine each layer runs: test_cpu_engines.py; the shared network and
pass run: tests/support/cpu_lowering.py.
"""
import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.infra.registry import PassContext
from fxopt.infra.rewrite import apply_rules
from fxopt.ops import onednn
from fxopt.ops.fused import LINEAR_ACT
from fxopt.ops.cpu import (CPU_ADAPTIVE_AVG_POOL2D_INT8, CPU_ADD_INT8, CPU_DEQUANTIZE,
                           CPU_QUANTIZE, ONEDNN_CONV2D_INT8, ONEDNN_LINEAR_INT8)
from fxopt.ops.int8 import INT8_IR_OPS, QUANTIZE
from fxopt.quant.config import QuantConfig
from cpu_lowering import Net, plain, run  # tests/support (tests/conftest.py)
from cpu_lowering import calibration as _cal
from cpu_lowering import close as _close
from cpu_lowering import convs as _convs
from small_nets import MobileBlock

lower = __import__("fxopt.passes.lower.cpu", fromlist=["cpu"])
pytestmark = pytest.mark.skipif(not lower.quantized_engine_available(),
                                reason="PyTorch's quantized CPU engine is not available")
CONV, LINEAR = ONEDNN_CONV2D_INT8.overload, ONEDNN_LINEAR_INT8.overload


def _step(rec):
    return rec.tolerance


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def test_golden():
    ir, low, rec = run(Net())
    assert rec.status == "ok" and rec.modified
    t = targets(low)
    convs = _convs(low)
    assert [c.act for c in convs] == ["relu", "none"]  # the add (+ relu) after the second
    assert convs[0].residual is None and convs[1].residual is None  # the add apart (default)
    assert t.count(LINEAR) == 1 and t.count(CPU_ADD_INT8.overload) == 1
    # the entry and the exit, and the global pool onto its own grid
    assert t.count(CPU_QUANTIZE.overload) == 1 and t.count(CPU_DEQUANTIZE.overload) == 1
    assert t.count(CPU_ADAPTIVE_AVG_POOL2D_INT8.overload) == 1
    assert not set(t) & set(INT8_IR_OPS) and plain(low)
    assert rec.stats["conv2d"] == 2 and "conv2d_add" not in rec.stats
    assert rec.stats["linear"] == 1 and rec.stats["add"] == 1
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
    assert torch.ops.fxopt.conv2d_act.default in targets(low)  # c1 (+act) in float
    assert CONV in targets(low) and plain(low)  # the rest is int8 on PyTorch's kernels


@pytest.mark.parametrize("act", [nn.Sigmoid, nn.Mish])
def test_no_kernel_falls_back_and_says_so(act):
    ir, low, rec = run(Net(res_act=act), quantize=QuantConfig(float_without_kernel=False))
    assert rec.status == "ok" and rec.stats["fallback"] == 1
    assert "res_act" in rec.notes[0] and "no PyTorch int8 kernel" in rec.notes[0]
    assert torch.ops.fxopt.add_int8.default in targets(low)  # the reference add, on the codes
    assert CONV in targets(low) and plain(low)  # the rest is lowered
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
    assert rec.stats["conv2d"] == 2, rec.stats
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
    assert q.stats["mul"] == 1 and rec.stats["linear"] == 3
    assert rec.status == "ok" and rec.stats["fallback"] == 0


class Block(nn.Module):
    """conv-relu, conv, + identity, relu: a ResNet basic block. ``shift`` moves the second
    conv's output down: at 2 most of it is negative, and the relu'd sum spans a small part of
    the conv's range (its grid several of the sum's steps)."""

    def __init__(self, shift=0.0):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        with torch.no_grad():
            self.c2.bias.sub_(shift)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        return torch.relu(self.c2(y) + y)


@pytest.fixture
def fuse_residual(monkeypatch):
    monkeypatch.setattr(lower, "FUSE_RESIDUAL_ADD", True)


def test_residual_add_fused_into_the_conv_within_one_code(fuse_residual):
    """Turned on (``FUSE_RESIDUAL_ADD``, off by default), on inputs within the calibrated
    range: oneDNN's sum post-op within one code of the IR."""
    ir, low, rec = run(Block())
    fused = [c for c in _convs(low) if c.residual is not None]
    assert len(fused) == 1 and fused[0].act == "relu" and fused[0].engine == "onednn"
    assert rec.stats["conv2d_add"] == 1 and rec.status == "ok" and not rec.notes
    assert CPU_ADD_INT8.overload not in targets(low)
    for x in _cal(n=3, seed=11):
        with torch.no_grad():
            assert _close(low(x), ir(x), _step(rec))


@pytest.mark.filterwarnings("ignore::fxopt.Int8AccuracyWarning")  # the shifted conv: 13 dB
def test_residual_add_stays_apart_where_the_conv_grid_is_coarse(fuse_residual):
    """A conv's output grid over ``RESIDUAL_SCALE_RATIO`` add steps: skipping its rounding
    could move the sum by more than one code, so the add runs on its own."""
    ir, low, rec = run(Block(shift=2.0))
    convs = _convs(low)
    add = next(n for n in low.graph.nodes if n.target is CPU_ADD_INT8.overload)
    ratio = convs[1].y_scale / float(getattr(low, add.args[6].target))
    assert ratio > lower.RESIDUAL_SCALE_RATIO, ratio
    assert all(c.residual is None for c in convs) and "conv2d_add" not in rec.stats
    for x in _cal(n=2, seed=12):
        with torch.no_grad():
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
    assert CONV in targets(opt.graph_module) and plain(opt.graph_module)
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
    assert rec.stats["conv2d"] == 2 and rec.stats["linear"] == 2
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
    state, gm = lower.CpuLowering(), copy.deepcopy(gm)
    return apply_rules(gm, rules, context=state), gm


def test_the_table_on_a_network_of_every_kind_of_op():
    """The rows this network reaches each fire as many times as it has such ops. (A row for a
    new op is tested in that op's own test module: this network need not grow with the
    table.)"""
    ir, low, rec = run(EveryOp(), quantize=QuantConfig(float_without_kernel=False))
    result, table = _table(ir)
    assert result.counts == {"quantize": 1, "conv2d_int8": 7, "linear_int8": 2,
                             "add_int8": 2, "mul_int8": 1,
                             "cat_int8": 1, "max_pool2d_int8": 1,
                             "adaptive_avg_pool2d_int8": 2, "dequantize": 1}
    assert set(result.counts) <= set(ROWS)
    # the stats are the rows' tallies; what no row took stays the IR op, and is named
    assert result.tallies == {k: v for k, v in rec.stats.items()
                              if k not in ("fallback", "engine", "tie_flips", "checked_batches")}
    left = [n.name for n in table.graph.nodes if n.target in INT8_IR_OPS]
    assert rec.stats["fallback"] == len(left) == 1  # c2's sigmoid: the kernel's float output
    assert any("add_int8_default_2" in n and "no PyTorch int8 kernel" in n for n in rec.notes)
    assert len(result.rewrites) == result.count
    assert result.rejected == ["add_int8 (add_int8_default_2): no int8 add_int8 kernel with "
                               "activation silu"]
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
    assert result.rejected == ["quantize (q): grid [-128, 127] (the kernels take uint8 only)"]


def test_a_rejected_op_stays_the_ir_op_on_the_codes():
    """No kernel for an add then SiLU: the row says why, the op stays ``add_int8`` (its
    reference on plain codes, as every lowered op's inputs are) and the report names it."""
    ir, low, rec = run(ResidualSiLU(), quantize=QuantConfig(float_without_kernel=False))
    result, table = _table(ir, [ROWS["add_int8"]])
    assert result.count == 0
    assert result.rejected == ["add_int8 (add_int8_default): no int8 add_int8 kernel with "
                               "activation silu"]
    assert torch.ops.fxopt.add_int8.default in targets(low) and plain(low)
    assert rec.stats["fallback"] == 1 and "add_int8_default" in rec.notes[0]


def test_op_without_a_row_is_left_alone():
    gm = _tiny_graph(lambda g, x, w: LINEAR_ACT.emit(g, x=x, weight=w, bias=None, act="relu"),
                     w=torch.randn(4, 3))
    code = gm.code
    result = apply_rules(gm, lower.RULES, context=lower.CpuLowering())
    assert result.count == 0 and result.notes == [] and gm.code == code


def test_residual_add_is_not_fused_by_default_where_inputs_leave_the_calibrated_range():
    """The IR clamps the conv's output on its own grid before the add; a fused sum would not:
    on an input beyond the calibration data the default lowering stays within the check."""
    torch.manual_seed(0)
    m = Block().eval()
    cal = _cal(n=3, seed=13)
    opt = fxopt.optimize(m, cal[0] * 4, quantize="int8", calibration_data=cal)
    rec = opt.report.record("lower_int8_cpu")
    assert rec.status == "ok" and "conv2d_add" not in rec.stats
