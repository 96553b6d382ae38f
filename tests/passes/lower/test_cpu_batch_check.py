"""The lowering's check at a second batch size (``register_pass(..., batch_check=True)``).

A kernel can be right at one batch size and wrong at another: PyTorch's oneDNN 1x1 stride-2
int8 conv was exact at batch 1 and tens of codes off at batch 2 on two threads
(``fxopt/ops/onednn.py``), while ``optimize`` checked the lowering at the example inputs' batch
only. Here a kernel made wrong from the second sample on stands for such a bug, on any CPU."""
import copy

import pytest
import torch
import torch.nn as nn

import fxopt
import fxopt.ops.cpu as cpu_ops
from fxopt.errors import NumericMismatchError, PipelineError
from fxopt.infra.manager import PassManager
from fxopt.infra.registry import PASSES, PassContext, PassResult, register_pass
from cpu_lowering import Net, calibration  # tests/support


@pytest.fixture
def wrong_from_the_second_sample(monkeypatch):
    """Every int8 conv call fxopt makes on PyTorch's kernels puts the codes of samples 2, 3, ...
    40 codes up (the first sample exact)."""
    real = cpu_ops._conv_call

    def conv_call(q, *args, **kwargs):
        call = real(q, *args, **kwargs)
        if call is None:
            return None

        def wrong(x):
            y = call(x)
            if isinstance(y, torch.Tensor) and y.dtype == torch.uint8 and y.shape[0] > 1:
                y = y.clone()
                y[1:] = (y[1:].to(torch.int32) + 40).clamp(0, 255).to(torch.uint8)
            return y
        return wrong

    monkeypatch.setattr(cpu_ops, "_conv_call", conv_call)


def _optimize(model, x, **kw):
    return fxopt.optimize(model, x, target="cpu", quantize="int8",
                          calibration_data=calibration(), **kw)


def test_a_kernel_wrong_only_from_the_second_sample_is_not_used(wrong_from_the_second_sample):
    torch.manual_seed(0)
    model = Net().eval()
    before = copy.deepcopy(model.state_dict())
    opt = _optimize(model, torch.randn(1, 3, 8, 8))  # the example: one sample, where it is right
    rec = opt.report.record("lower_int8_cpu")
    # both convs (each wrong), not the linear and add after them (other codes in, not wrong)
    assert rec.status == "ok" and rec.stats["kept_on_reference"] == 2, (rec.stats, rec.notes)
    for conv in ("c1", "c2"):
        assert any(f"conv2d_int8 ({conv}): PyTorch's kernel was " in n and
                   "codes at batch 2 from the int8 IR: fxopt's reference runs it" in n
                   for n in rec.notes), rec.notes
    assert rec.stats["linear"] == 1 and rec.stats["add"] == 1, rec.stats
    assert not any("no PyTorch int8 kernel" in n for n in rec.notes), rec.notes
    # the convs run the reference: the module gives at batch 3 what it gives a sample at a time
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        whole = opt(x)
        alone = torch.cat([opt(x[i:i + 1]) for i in range(3)])
    assert torch.equal(whole, alone)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _wrong_from_the_second_sample(y):
    return torch.cat([y[:1], y[1:] + 1.0])


@pytest.fixture
def wrong_at_two():
    """A pass (registered for this test only) whose graph's output is one up from the second
    sample on, its reference the graph before it."""
    name = "test_batch_check_wrong_at_two"

    def wrong(gm, ctx):
        reference = copy.deepcopy(gm)
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            node = gm.graph.call_function(_wrong_from_the_second_sample, (out.args[0],))
        out.args = (node,)
        gm.recompile()
        return PassResult(gm, modified=True, reference=reference, shapes_changed=True)

    register_pass(name, reference="returned", batch_check=True)(wrong)
    yield name
    PASSES.pop(name)


@pytest.mark.parametrize("batch", [1, 2])
def test_the_manager_checks_a_batch_check_pass_at_one_sample_more(batch, wrong_at_two):
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    x = torch.randn(batch, 4)
    gm = fxopt.capture(model, x)
    manager = PassManager([wrong_at_two], check="each")
    if batch > 1:  # wrong at the example batch already: the usual check
        with pytest.raises(NumericMismatchError) as info:
            manager.run(gm, PassContext(example_inputs=(x,)))
        assert "at batch" not in info.value.message, info.value.message
        return
    with pytest.raises(NumericMismatchError) as info:
        manager.run(gm, PassContext(example_inputs=(x,)))
    assert "at batch 2 (the example inputs and their first sample again; at batch 1 they " \
           "agreed)" in info.value.message, info.value.message


def test_the_right_kernels_pass_at_both_batches():
    torch.manual_seed(0)
    model = Net().eval()
    opt = _optimize(model, torch.randn(1, 3, 8, 8))
    rec = opt.report.record("lower_int8_cpu")
    assert rec.status == "ok" and rec.stats["checked_batches"] == "1, 2" and not rec.notes, \
        (rec.stats, rec.notes)


class _FixedBatch(nn.Module):
    """Its graph runs only at batch 1: the flatten's leading 1 is the example's."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).reshape(1, -1))


def test_a_graph_fixed_at_the_example_batch_is_noted_not_failed():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    opt = fxopt.optimize(_FixedBatch().eval(), torch.randn(1, 3, 8, 8), target="cpu",
                         quantize="int8",
                         calibration_data=[torch.randn(1, 3, 8, 8, generator=g)
                                           for _ in range(3)])
    rec = opt.report.record("lower_int8_cpu")
    assert rec.status == "ok" and rec.modified and "checked_batches" not in rec.stats
    assert any(n.startswith("not checked at batch 2: the reference does not run there")
               for n in rec.notes), rec.notes


def test_batch_check_needs_a_returned_reference():
    with pytest.raises(PipelineError, match="batch_check needs reference='returned'"):
        register_pass("test_batch_check_exact", batch_check=True)(lambda gm, ctx: None)
    assert "test_batch_check_exact" not in PASSES
    assert PASSES["lower_int8_cpu"].batch_check and PASSES["lower_to_triton"].batch_check
