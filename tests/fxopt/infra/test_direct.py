"""``fxopt.infra.direct``: the lowered graph's fxopt ops called past the dispatcher, only where
that gives the graph's own result (proven on the first call), and never under tracing."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.infra.direct import DirectRunner, direct_graph
from fxopt.ops.schema import schema_of


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.c1, self.c2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = torch.relu(self.c2(torch.relu(self.c1(y))) + y)
        y = F.max_pool2d(y, 2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def _cal(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 16, 16, generator=g) for _ in range(n)]


@pytest.fixture(scope="module", params=["float", "int8"])
def opt(request):
    torch.manual_seed(0)
    cal = _cal()
    if request.param == "int8":
        return fxopt.optimize(Net().eval(), cal[0], quantize="int8", calibration_data=cal)
    return fxopt.optimize(Net().eval(), cal[0])


def _fxopt_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and schema_of(n.target)]


def test_the_twin_calls_every_fxopt_op_directly(opt):
    direct, swapped = direct_graph(opt.graph_module)
    assert swapped == len(_fxopt_nodes(opt.graph_module)) > 0
    assert _fxopt_nodes(direct) == []
    x = _cal(1, seed=7)[0]
    with torch.no_grad():
        assert torch.equal(direct(x), opt.graph_module(x))


def test_no_grad_calls_run_the_twin_once_proven_and_equal_the_graph(opt):
    x = _cal(1, seed=3)[0]
    runner = DirectRunner([])
    with torch.no_grad():
        first = runner(opt.graph_module, (x,), {})
        assert runner._proven and runner.enabled
        again = runner(opt.graph_module, (x,), {})
        assert torch.equal(first, again)
        assert torch.equal(again, opt.graph_module(x))
        assert torch.equal(opt(x), opt.graph_module(x))


def test_a_twin_that_disagrees_is_turned_off_with_a_note(opt):
    x = _cal(1, seed=4)[0]
    notes: list[str] = []
    runner = DirectRunner(notes)
    runner._twin(opt.graph_module)

    def wrong(*args):
        return opt.graph_module(*args) + 1  # a kernel that does not compute the op

    runner._direct.forward = wrong
    with torch.no_grad():
        out = runner(opt.graph_module, (x,), {})
        assert torch.equal(out, opt.graph_module(x))  # the graph's result, not the twin's
        assert not runner.enabled and "direct calls off" in notes[0]
        assert torch.equal(runner(opt.graph_module, (x,), {}), opt.graph_module(x))


def test_a_twin_that_raises_is_turned_off(opt):
    x = _cal(1, seed=5)[0]
    runner = DirectRunner([])
    runner._twin(opt.graph_module)

    def broken(*args):
        raise TypeError("unexpected keyword argument 'act_args'")

    runner._direct.forward = broken
    with torch.no_grad():
        assert torch.equal(runner(opt.graph_module, (x,), {}), opt.graph_module(x))
    assert not runner.enabled and "TypeError" in runner.notes[0]


def test_a_reassigned_attribute_rebuilds_the_twin():
    torch.manual_seed(0)
    cal = _cal()
    opt = fxopt.optimize(Net().eval(), cal[0])
    x = _cal(1, seed=6)[0]
    with torch.no_grad():
        before = opt(x)
        gm = opt.graph_module
        # replace a module and a weight tensor by new objects (not in place)
        name = next(n for n, _ in gm.named_children())
        setattr(gm, name, copy.deepcopy(getattr(gm, name)))
        for p in getattr(gm, name).parameters():
            p.mul_(0.5)
        after = opt(x)
        assert torch.equal(after, gm(x))
        assert not torch.equal(after, before)


def test_in_place_weight_updates_are_seen(opt):
    clone = copy.deepcopy(opt)
    x = _cal(1, seed=8)[0]
    with torch.no_grad():
        clone(x)  # proven
        sd = {k: v * 0.5 if v.is_floating_point() else v
              for k, v in clone.graph_module.state_dict().items()}
        clone.graph_module.load_state_dict(sd)
        assert torch.equal(clone(x), clone.graph_module(x))
        assert torch.equal(opt(x), opt.graph_module(x))  # the original is untouched


def test_tracing_sees_the_dispatcher_graph(opt):
    x = _cal(1, seed=9)[0]
    ep = torch.export.export(opt, (x,), strict=False)
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert any(str(t).startswith("fxopt.") for t in targets)
    with torch.no_grad():
        assert torch.equal(ep.module()(x), opt(x))


class WritesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)

    def forward(self, x):
        return x.mul_(torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1))))))


def test_the_trial_run_does_not_write_the_callers_input_twice():
    """The first call runs the twin as a trial: on copies, so a graph that writes its input
    (x.mul_) writes the caller's tensor once, as the model would (was: twice, a wrong output)."""
    torch.manual_seed(0)
    m = WritesItsInput().eval()
    opt = fxopt.optimize(m, torch.randn(2, 8, 6, 6))
    for _ in range(2):  # the trial call, then a proven one
        x = torch.randn(2, 8, 6, 6)
        x_model = x.clone()
        with torch.no_grad():
            expected = m(x_model)
            out = opt(x)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(x, x_model)  # written once, as by the model
    assert opt.direct._proven
