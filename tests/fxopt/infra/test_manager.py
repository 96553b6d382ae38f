"""The pass manager catches broken graphs and changed numbers, and blames the right pass."""
import logging
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.infra.registry import GROUPS, PASSES, PassContext, PassResult, register_pass
from fxopt.pipelines import expand_pipeline
from fxopt.ir.graph import copy_meta


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)) + x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = Block()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y = self.block(F.relu(self.stem(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


@pytest.fixture
def net():
    m = Net().eval()
    # non-default BN statistics, so that mistakes show
    m.block.bn.running_mean.uniform_(-0.5, 0.5)
    m.block.bn.running_var.uniform_(0.5, 2.0)
    return m, torch.randn(2, 3, 8, 8)


@pytest.fixture
def temp_passes():
    """Register test passes for one test and remove them afterwards."""
    names = []

    def make(name, fn, **kw):
        register_pass(name, **kw)(fn)
        names.append(name)
        return name

    yield make
    for n in names:
        PASSES.pop(n, None)
        GROUPS.pop(n, None)


def _first(gm, pred):
    return next(n for n in gm.graph.nodes if pred(n))


# -- passes that misbehave ---------------------------------------------------------------------
def corrupt_numbers(gm, ctx):
    """Silently scales the residual block's relu output by 1.01 (a subtle numeric bug)."""
    relu = _first(gm, lambda n: n.op == "call_function" and n.target is F.relu
                  and n.meta.get("fxopt_path") == "block")
    with gm.graph.inserting_after(relu):
        scaled = gm.graph.call_function(operator.mul, (relu, 1.01))
    copy_meta(scaled, relu)
    relu.replace_all_uses_with(scaled)
    scaled.args = (relu, 1.01)
    gm.recompile()
    return PassResult(gm, modified=True)


def dangling_attr(gm, ctx):
    """Adds a read of a weight that does not exist."""
    out = _first(gm, lambda n: n.op == "output")
    with gm.graph.inserting_before(out):
        gm.graph.get_attr("no_such_weight")
    gm.recompile()
    return PassResult(gm, modified=True)


def orphan_param(gm, ctx):
    """Registers a parameter nothing reads."""
    gm.register_parameter("forgotten", nn.Parameter(torch.zeros(1000)))
    return PassResult(gm, modified=True)


def no_recompile(gm, ctx):
    """Changes the graph but forgets gm.recompile()."""
    relu = _first(gm, lambda n: n.op == "call_function" and n.target is F.relu)
    relu.target = torch.sigmoid
    return PassResult(gm, modified=True)


def no_meta(gm, ctx):
    """Inserts a node without tensor_meta."""
    relu = _first(gm, lambda n: n.op == "call_function" and n.target is F.relu)
    with gm.graph.inserting_after(relu):
        new = gm.graph.call_function(torch.clone, (relu,))
    relu.replace_all_uses_with(new)
    new.args = (relu,)
    gm.recompile()
    return PassResult(gm, modified=True)


def lies_unmodified(gm, ctx):
    """Changes the graph and says it did not."""
    relu = _first(gm, lambda n: n.op == "call_function" and n.target is F.relu)
    relu.target = torch.sigmoid
    gm.recompile()
    return PassResult(gm, modified=False)


def crashes(gm, ctx):
    """Raises a bug."""
    raise KeyError("oops")


def test_numeric_bug_is_caught_and_blamed(net, temp_passes):
    m, x = net
    temp_passes("corrupt_numbers", corrupt_numbers)
    with pytest.raises(fxopt.NumericMismatchError) as e:
        fxopt.optimize(m, x, pipeline=["cleanup", "corrupt_numbers"])
    err = e.value
    assert err.pass_name == "corrupt_numbers"
    assert "cleanup/dce" in err.passes_before
    assert err.rel_err > fxopt.TOLERANCES[torch.float32]
    assert err.module_path == "block"
    assert err.node is not None and err.node.startswith("mul")
    assert "corrupt_numbers" in str(err) and "block" in str(err)
    assert "on_mismatch='rollback'" in err.hint


def test_rollback_drops_the_pass_and_goes_on(net, temp_passes):
    m, x = net
    temp_passes("corrupt_numbers", corrupt_numbers)
    with pytest.warns(UserWarning, match="rolled back"):
        opt = fxopt.optimize(m, x, pipeline=["corrupt_numbers", "cleanup"], on_mismatch="rollback")
    rec = opt.report.record("corrupt_numbers")
    assert rec.status == "rolled back" and not rec.modified
    assert opt.report.rolled_back == ["corrupt_numbers"]
    assert not any(n.target is operator.mul for n in opt.graph_module.graph.nodes)
    torch.testing.assert_close(opt(x), m(x), rtol=1e-5, atol=1e-6)
    assert opt.report.record("cleanup/dce") is not None  # later passes still ran


def test_warn_keeps_the_pass(net, temp_passes):
    m, x = net
    temp_passes("corrupt_numbers", corrupt_numbers)
    with pytest.warns(UserWarning, match="corrupt_numbers"):
        opt = fxopt.optimize(m, x, pipeline=["corrupt_numbers"], on_mismatch="warn")
    assert opt.report.record("corrupt_numbers").status == "mismatch kept"
    assert not torch.allclose(opt(x), m(x), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Attempted to insert a get_attr")
@pytest.mark.parametrize("fn, match", [
    (dangling_attr, "nonexistent attribute|does not exist"),
    (orphan_param, "no node uses"),
    (no_recompile, "recompile"),
    (no_meta, "tensor_meta"),
    (lies_unmodified, "modified=False"),
])
def test_structural_bugs_are_caught_and_blamed(net, temp_passes, fn, match):
    m, x = net
    name = temp_passes(fn.__name__, fn)
    with pytest.raises(fxopt.VerificationError, match=match) as e:
        fxopt.optimize(m, x, pipeline=["cleanup", name])
    assert e.value.pass_name == name
    assert name in str(e.value)


def test_structural_bug_rolls_back_too(net, temp_passes):
    m, x = net
    temp_passes("orphan_param", orphan_param)
    with pytest.warns(UserWarning):
        opt = fxopt.optimize(m, x, pipeline=["orphan_param"], on_mismatch="rollback")
    assert not hasattr(opt.graph_module, "forgotten")


def test_crashing_pass_is_named(net, temp_passes):
    m, x = net
    temp_passes("crashes", crashes)
    with pytest.raises(fxopt.PassError, match="crashes.*KeyError") as e:
        fxopt.optimize(m, x, pipeline=["crashes"])
    assert e.value.pass_name == "crashes"


def test_crashing_pass_rolls_back(net, temp_passes):
    m, x = net

    def half_then_crash(gm, ctx):
        """Rewrites part of the graph, then fails."""
        relu = _first(gm, lambda n: n.op == "call_function" and n.target is F.relu)
        relu.target = torch.sigmoid
        raise RuntimeError("midway")

    temp_passes("half_then_crash", half_then_crash)
    with pytest.warns(UserWarning, match="midway"):
        opt = fxopt.optimize(m, x, pipeline=["half_then_crash", "dce"], on_mismatch="rollback")
    assert opt.report.record("half_then_crash").status == "rolled back"
    torch.testing.assert_close(opt(x), m(x), rtol=1e-5, atol=1e-6)


def test_returned_reference_is_what_the_pass_is_checked_against(net, temp_passes):
    m, x = net

    def scale_output(gm, ctx):
        """Doubles the output and returns the reference that says so."""
        import copy

        ref = copy.deepcopy(gm)
        out = _first(gm, lambda n: n.op == "output")
        val = out.args[0]
        with gm.graph.inserting_before(out):
            dbl = gm.graph.call_function(operator.mul, (val, 2.0))
        copy_meta(dbl, val)
        out.args = (dbl,)
        gm.recompile()
        # the reference doubles too, but (bug) on the wrong side for a 1.5 factor
        rout = _first(ref, lambda n: n.op == "output")
        with ref.graph.inserting_before(rout):
            d = ref.graph.call_function(operator.mul, (rout.args[0], 2.0))
        rout.args = (d,)
        ref.recompile()
        return PassResult(gm, modified=True, reference=ref)

    temp_passes("scale_output", scale_output, reference="returned")
    opt = fxopt.optimize(m, x, pipeline=["scale_output"])
    torch.testing.assert_close(opt(x), 2 * m(x))
    assert opt.report.record("scale_output").rel_err == 0.0
    # the distance from eager is reported, not asserted, for passes with their own reference
    assert opt.report.final_rel_err == pytest.approx(1.0)


def test_ordering_constraints(temp_passes):
    temp_passes("late", lambda gm, ctx: PassResult(gm, False), after=("dce",))
    temp_passes("early", lambda gm, ctx: PassResult(gm, False), before=("dce",))
    assert expand_pipeline(["dce", "late"]) == ["dce", "late"]
    with pytest.raises(fxopt.PipelineError, match="after 'dce'"):
        expand_pipeline(["late", "dce"])
    with pytest.raises(fxopt.PipelineError, match="before 'dce'"):
        expand_pipeline(["dce", "early"])
    # groups count: dce is a member of cleanup
    with pytest.raises(fxopt.PipelineError):
        expand_pipeline(["late", "cleanup"])


def test_unknown_names_list_the_known_ones():
    with pytest.raises(fxopt.PipelineError, match="unknown pass") as e:
        expand_pipeline(["dce", "fold_everything"])
    assert "dce" in e.value.hint
    with pytest.raises(fxopt.PipelineError, match="unknown pipeline"):
        expand_pipeline("fastest")
    with pytest.raises(fxopt.PipelineError):
        expand_pipeline("default", disable=["nope"])


def test_disable_removes_a_group_member(temp_passes):
    temp_passes("noop_a", lambda gm, ctx: PassResult(gm, False))
    fxopt.register_group("two", ["noop_a", "dce"], "Test group.")
    try:
        steps = expand_pipeline(["two"], disable=["dce"])
        assert steps[0].members == ("noop_a",)
        assert expand_pipeline(["two", "dce"], disable=["two"]) == ["dce"]
    finally:
        GROUPS.pop("two")


def test_fixpoint_is_bounded(net, temp_passes):
    m, x = net

    def churn(gm, ctx):
        """Always rewrites something (inserts and removes a clone)."""
        relu = _first(gm, lambda n: n.op == "call_function" and n.target is F.relu)
        with gm.graph.inserting_after(relu):
            c = gm.graph.call_function(torch.clone, (relu,))
        copy_meta(c, relu)
        relu.replace_all_uses_with(c)
        c.args = (relu,)
        gm.recompile()
        return PassResult(gm, modified=True)

    temp_passes("churn", churn)
    fxopt.register_group("churn_group", ["churn", "dce"], "Never converges.", max_iterations=3)
    try:
        opt = fxopt.optimize(m, x, pipeline=["churn_group"])
    finally:
        GROUPS.pop("churn_group")
    rec = opt.report.record("churn_group/churn")
    assert rec.iterations == 3
    assert any("did not converge" in n for n in opt.report.notes)


def test_precondition_eval_is_checked_by_the_manager(net):
    m, x = net
    gm = fxopt.capture(m, x)
    gm.train()
    from fxopt.infra.registry import register_pass as reg

    reg("needs_eval", requires=("eval",))(lambda gm, ctx: PassResult(gm, False))
    try:
        pm = fxopt.PassManager(expand_pipeline(["needs_eval"]))
        with pytest.raises(fxopt.PreconditionError, match="eval"):
            pm.run(gm, PassContext(example_inputs=(x,)))
    finally:
        PASSES.pop("needs_eval")


def test_bad_modes(net):
    m, x = net
    with pytest.raises(fxopt.PipelineError, match="check"):
        fxopt.optimize(m, x, check="sometimes")
    with pytest.raises(fxopt.PipelineError, match="on_mismatch"):
        fxopt.optimize(m, x, on_mismatch="ignore")


def test_debug_instrument_logs(net, monkeypatch, caplog):
    m, x = net
    monkeypatch.setenv("FXOPT_DEBUG", "2")
    with caplog.at_level(logging.DEBUG, logger="fxopt"):
        fxopt.optimize(m, x, pipeline=["dce"])
    text = caplog.text
    assert "dce:" in text
    assert "graph before dce" in text


def test_instruments_see_every_pass(net):
    m, x = net
    seen = []

    class Spy(fxopt.Instrument):
        def after_pass(self, name, gm, record):
            seen.append((name, record.status))

    fxopt.optimize(m, x, pipeline=["cleanup"], instruments=[Spy()])
    assert seen and all(name.startswith("cleanup/") for name, _ in seen)


def test_report_contents(net):
    m, x = net
    opt = fxopt.optimize(m, x, pipeline=["cleanup"])
    rep = opt.report
    assert rep.before.params == sum(p.numel() for p in m.parameters()) + 4 + 4  # + BN stats
    assert rep.before.macs > 0 and rep.before.bytes > 0
    assert rep.final_rel_err is not None and rep.final_rel_err < 1e-5
    d = rep.to_dict()
    import json

    again = json.loads(json.dumps(d))
    assert again["passes"][0]["name"].startswith("cleanup/")
    text = str(rep)
    assert "cleanup/dce" in text and "total" in text
    assert fxopt.Report.from_dict(d).to_dict() == d
