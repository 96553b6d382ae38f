"""``fxopt.infra.direct``: the lowered graph's fxopt ops called past the dispatcher, only where
that gives the graph's own result (proven on the first call), and never under tracing."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.infra.direct import BoundCall, DirectRunner, direct_graph
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


# -- bound calls: an int8 layer's kernel call with its arguments worked out once ----------------
@pytest.fixture(scope="module")
def int8_opt():
    torch.manual_seed(0)
    cal = _cal()
    return fxopt.optimize(Net().eval(), cal[0], quantize="int8", calibration_data=cal)


def _bound_calls(opt) -> list[BoundCall]:
    return [n.target for n in opt.direct._direct.graph.nodes if isinstance(n.target, BoundCall)]


def test_int8_layers_run_bound_calls_equal_to_the_graph(int8_opt):
    opt = copy.deepcopy(int8_opt)
    with torch.no_grad():
        opt(_cal(1, seed=11)[0])  # the trial call binds each layer
        bound = _bound_calls(opt)
        assert len(bound) == 4 and all(b.call is not None and not b.off for b in bound)
        for seed in (12, 13):
            x = _cal(1, seed=seed)[0]
            assert torch.equal(opt(x), opt.graph_module(x))
        x3 = torch.randn(3, 3, 16, 16)  # another batch: each layer binds again
        assert torch.equal(opt(x3), opt.graph_module(x3))
        assert all(b.shape[0] == 3 for b in bound)


def test_a_bound_call_sees_int8_weights_written_in_place(int8_opt):
    opt = copy.deepcopy(int8_opt)
    x = _cal(1, seed=14)[0]
    with torch.no_grad():
        opt(x)
        before = opt(x)  # through the bound calls
        codes = [t for t in opt.graph_module.buffers() if t.dtype == torch.int8]
        assert codes
        for t in codes:
            t.neg_()  # the packed copies of these are stale now
        after = opt(x)
        assert torch.equal(after, opt.graph_module(x))
        assert not torch.equal(after, before)


def _counting_impl(calls):
    def impl(q, w_q, w_scale, bias, *rest, **kwargs):
        calls.append("impl")
        return q + 1
    return impl


def test_a_bound_call_runs_while_its_arguments_hold_and_rebinds_otherwise():
    calls: list[str] = []

    def bind(q, w_q, w_scale, bias, *rest, **kwargs):
        calls.append("bind")
        return lambda codes: codes + 1

    bc = BoundCall(_counting_impl(calls), bind)
    q, w, s = torch.zeros(4, dtype=torch.uint8), torch.ones(2), torch.ones(2)
    assert torch.equal(bc(q, w, s, None, 0.5, act="relu"), q + 1)
    assert calls == ["impl", "bind"] and bc.call is not None
    bc(q, w, s, None, 0.5, act="relu")
    assert calls == ["impl", "bind"]  # bound: neither runs
    w.mul_(2)  # written in place: its version moved
    bc(q, w, s, None, 0.5, act="relu")
    assert calls[2:] == ["impl", "bind"]
    bc(q, w.clone(), s, None, 0.5, act="relu")  # another weight tensor
    assert calls[4:] == ["impl", "bind"]
    bc(torch.zeros(5, dtype=torch.uint8), w, s, None, 0.5, act="relu")  # another shape
    assert calls[6:] == ["impl", "bind"]
    assert torch.equal(bc(q.float(), w, s, None, 0.5, act="relu"), q.float() + 1)
    assert calls[8:] == ["impl"]  # not uint8 codes: no binding


def test_a_bound_call_that_disagrees_with_the_kernel_is_never_used():
    calls: list[str] = []
    bc = BoundCall(_counting_impl(calls), lambda *a, **k: (lambda codes: codes + 2))
    q = torch.zeros(4, dtype=torch.uint8)
    for _ in range(3):
        assert torch.equal(bc(q, None, None, None), q + 1)
    assert bc.off and bc.call is None and calls == ["impl"] * 3


def test_a_layer_with_a_tensor_argument_past_its_weights_is_not_bound():
    from fxopt.ops.cpu import ONEDNN_CONV2D_INT8
    g = torch.fx.Graph()
    q, r = g.placeholder("q"), g.placeholder("residual")
    w = g.placeholder("w")
    args = (q, w, w, None, [1, 1], [0, 0], [1, 1], 1, 0.1, 0, 0.1, 0)
    g.output((g.call_function(ONEDNN_CONV2D_INT8.overload, args),
              g.call_function(ONEDNN_CONV2D_INT8.overload, args + (r,))))
    direct, swapped = direct_graph(torch.fx.GraphModule(nn.Module(), g))
    plain, with_residual = [n.target for n in direct.graph.nodes if n.op == "call_function"]
    assert swapped == 2 and isinstance(plain, BoundCall)
    assert with_residual is ONEDNN_CONV2D_INT8.cpu_impl


@pytest.mark.parametrize("engine", ["fbgemm", "onednn"])
def test_in_place_writes_to_scales_and_biases_repack_the_layers(engine):
    """A layer's packed weight is made again once its weight scales or bias are written in
    place, through the graph and through the bound calls (was: PyTorch's packed params kept
    the old bias and scales, keyed on the int8 weight alone: a silently wrong output)."""
    from fxopt.quant.config import QuantConfig
    torch.manual_seed(0)
    cal = _cal()
    opt = fxopt.optimize(Net().eval(), cal[0], quantize=QuantConfig(cpu_engine=engine),
                         calibration_data=cal)
    gm = opt.graph_module
    x = _cal(1, seed=15)[0]
    with torch.no_grad():
        opt(x), opt(x), gm(x)  # packed, and bound
        written = 0
        for t in gm.buffers():
            if t.dtype == torch.float32 and t.dim() == 1 and t.numel() > 1:  # scales, biases
                t.add_(0.5)
                written += 1
        assert written >= 6
        fresh = copy.deepcopy(gm)  # new tensors: packed anew
        assert torch.equal(gm(x), fresh(x))
        assert torch.equal(opt(x), fresh(x))


def test_a_used_module_pickles_without_its_twin(int8_opt, tmp_path):
    """torch.save of the whole module after calls (the twin built, its layers bound to kernel
    closures): the twin is a cache and stays behind; the loaded module builds its own and
    gives the same outputs (was: a pickling error)."""
    import io
    opt = copy.deepcopy(int8_opt)
    x = _cal(1, seed=16)[0]
    with torch.no_grad():
        expected = opt(x)
        opt(x)
    assert opt.direct._direct is not None
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.direct._direct is None and loaded.direct.notes is loaded.report.notes
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
        assert torch.equal(loaded(x), expected)
    assert loaded.direct._proven


# -- linked layers: a bound quantized kernel passes its quint8 output to the next ----------------
def _nodes_by_target(opt):
    return {n.name: n.target for n in opt.direct._direct.graph.nodes
            if n.op == "call_function"}


@pytest.mark.parametrize("engine", ["fbgemm", "x86"])
def test_linked_layers_pass_quantized_outputs_and_equal_the_graph(engine):
    """On PyTorch's quantized engines a bound layer whose every user takes a quint8 tensor (the
    next bound layer, the int8 add) hands over its quantized output, and the next uses it
    without views of the codes: the outputs stay the graph's, call after call, and after a
    weight written in place (that layer runs its kernel wrapper: codes, not quint8)."""
    from fxopt.quant.config import QuantConfig
    if engine not in torch.backends.quantized.supported_engines:
        pytest.skip(f"no {engine} engine in this PyTorch")
    torch.manual_seed(0)
    cal = _cal()
    opt = fxopt.optimize(Net().eval(), cal[0], quantize=QuantConfig(cpu_engine=engine),
                         calibration_data=cal)
    with torch.no_grad():
        for seed in (21, 22, 23):
            x = _cal(1, seed=seed)[0]
            assert torch.equal(opt(x), opt.graph_module(x))
        bound = _bound_calls(opt)
        # stem -> c1 and the add, c1 -> c2, c2 -> the add: linked; fc -> dequantize: not
        assert [b.q_out for b in bound] == [True, True, True, False]
        assert [b.linked for b in bound][1:3] == [True, True]
        c1 = next(t for n, t in opt.graph_module.named_buffers() if "c1" in n and
                  t.dtype == torch.int8)
        c1.neg_()
        x = _cal(1, seed=24)[0]
        assert torch.equal(opt(x), opt.graph_module(x))
        assert torch.equal(opt(x), opt.graph_module(x))


def test_a_quantized_input_off_the_layers_grid_runs_on_its_codes():
    """A quint8 input whose grid is not the bound kernel's x grid is never used as it is: the
    call runs on its codes (what the graph would pass), and the node stays unlinked."""
    seen: list = []

    class Kernel:
        x_grid = (0.5, 3)

        def __call__(self, codes):
            seen.append(("codes", codes.dtype))
            return codes + 1

        def quantized(self, q):
            seen.append(("quantized", q.dtype))
            return q

    bc = BoundCall(lambda q, *a, **k: q + 1, lambda *a, **k: Kernel())
    codes = torch.arange(8, dtype=torch.uint8)
    bc(codes, None, None, None)  # binds
    off_grid = torch._make_per_tensor_quantized_tensor(codes, 0.25, 3)
    assert torch.equal(bc(off_grid, None, None, None), codes + 1)
    assert bc.linked is False and seen[-1] == ("codes", torch.uint8)
    on_grid = torch._make_per_tensor_quantized_tensor(codes, 0.5, 3)
    out = bc(on_grid, None, None, None)
    assert bc.linked is True and seen[-1] == ("quantized", torch.quint8)
    assert out.dtype == torch.uint8  # its users do not all take quint8: codes out...
    bc.q_out = True
    assert bc(on_grid, None, None, None).dtype == torch.quint8  # ...linked: quint8 out
    assert seen[-1] == ("quantized", torch.quint8)


class AddThenConv(nn.Module):
    """A residual add whose sum feeds a convolution: the add is linked to it."""

    def __init__(self):
        super().__init__()
        self.stem, self.c1 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.c2, self.fc = nn.Conv2d(16, 16, 1), nn.Linear(16, 10)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = torch.relu(self.c1(y)) + y
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.c2(y), 1), 1))


def test_a_linked_add_passes_its_quint8_sum_and_an_off_grid_one_runs_on_codes():
    """The add's sum goes to the next layer as a quint8 tensor; its output scale written in
    place puts that tensor off the layer's grid (a literal): the layer then runs on the codes,
    as the graph does, and the outputs stay the graph's."""
    from fxopt.quant.config import QuantConfig
    torch.manual_seed(0)
    cal = _cal()
    opt = fxopt.optimize(AddThenConv().eval(), cal[0], quantize=QuantConfig(cpu_engine="x86"),
                         calibration_data=cal)
    x = _cal(1, seed=31)[0]
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(opt(x), opt.graph_module(x))
        nodes = list(opt.direct._direct.graph.nodes)
        add = next(n for n in nodes if getattr(n.target, "quantized_output", False))
        assert add.kwargs.get("quantized_out") is True
        c2 = next(u.target for u in add.users if isinstance(u.target, BoundCall))
        assert c2.linked is True
        getattr(opt.graph_module, add.args[6].target).mul_(1.5)  # the add's y scale
        expected = opt.graph_module(x)
        assert torch.equal(opt(x), expected) and c2.linked is False


class SqueezeExcite(nn.Module):
    """A conv whose output is gated (int8 mul) and then convolved: conv -> mul -> conv."""

    def __init__(self):
        super().__init__()
        self.stem, self.fc1 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 1)
        self.fc2, self.out = nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 1)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        gate = F.hardsigmoid(self.fc2(torch.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return F.adaptive_avg_pool2d(torch.relu(self.out(y * gate)), 1).flatten(1)


@pytest.mark.parametrize("engine", ["x86", "auto"])
def test_linked_gates_and_inputs_beyond_the_calibrated_range_equal_the_graph(engine):
    """Linked mul (a squeeze-excitation gate) and layers, on inputs far beyond the calibration
    data (codes clamp at 0 and 255): the twin's outputs are the graph's, call after call."""
    from fxopt.quant.config import QuantConfig
    torch.manual_seed(0)
    cal = _cal()
    opt = fxopt.optimize(SqueezeExcite().eval(), cal[0], quantize=QuantConfig(cpu_engine=engine),
                         calibration_data=cal)
    with torch.no_grad():
        opt(cal[0])
        for seed, gain in ((41, 1.0), (42, 8.0), (43, 0.01), (44, -5.0)):
            x = _cal(1, seed=seed)[0] * gain
            assert torch.equal(opt(x), opt.graph_module(x))
        if engine == "x86":
            mul = [n for n in opt.direct._direct.graph.nodes
                   if n.kwargs.get("quantized_out") is True]
            assert mul, "the gate's product is linked to the conv after it"
    assert opt.direct._proven and opt.direct.enabled
