"""prune_channels: golden, negative, idempotence, numeric (masked reference) and config tests.

Each coupling kind has a tiny model in prune_zoo.py; the pass runs under the pass manager with
check="each", so the pruned graph is compared with the masked model after the pass.
"""

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.errors import InputError, NumericMismatchError, PreconditionError
from fxopt.infra.manager import PassManager
from fxopt.infra.registry import PASSES, PassContext
from fxopt.pipelines import expand_pipeline
from fxopt.prune.config import PruneConfig
from fxopt.ir.tolerances import rel_err
from fxopt.ir.verify import verify_structure
from fxopt.prune.channels import analyze_channels

import prune_zoo as zoo  # noqa: E402  (tests/support, on the path from tests/conftest.py)

prune_mod = __import__("fxopt.passes.prune.prune_channels", fromlist=["prune_channels"])


def run(model, x, prune=0.5, calibration_data=None, on_mismatch="raise"):
    gm = fxopt.capture(model, x)
    gm.eval()
    ctx = PassContext(example_inputs=(x,), configs=[PruneConfig.coerce(prune)],
                      calibration_data=calibration_data)
    pm = PassManager(expand_pipeline(["prune_channels"]), check="each", on_mismatch=on_mismatch)
    out, report = pm.run(gm, ctx)
    return gm, out, report.record("prune_channels")


def call_pass(model, x, prune=0.5, calibration_data=None):
    gm = fxopt.capture(model, x)
    gm.eval()
    ctx = PassContext(example_inputs=(x,), configs=[PruneConfig.coerce(prune)],
                      calibration_data=calibration_data)
    return gm, PASSES["prune_channels"].fn(gm, ctx)


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_pruned_equals_masked_model(name):
    model, x = zoo.make(name)
    with torch.no_grad():
        before = model(x)
    gm, out, rec = run(model, x)
    assert rec.status == "ok" and rec.modified
    assert rec.rel_err is not None and rec.rel_err <= rec.tolerance
    assert rec.params_after < rec.params_before  # physically smaller
    assert rec.stats["pruned"] >= 1 and rec.stats["channels_after"] < rec.stats["channels_before"]
    with torch.no_grad():
        after = out(x)
    assert after.shape == before.shape
    assert rel_err(after, before) > 1e-3  # the check compared something that changed
    assert verify_structure(out) == []  # no orphaned parameters, metadata everywhere


@pytest.mark.parametrize("name", ["residual", "split", "layer_norm", "flatten", "shuffle"])
def test_other_batch_size_matches_reference(name):
    model, x = zoo.make(name)
    gm, res = call_pass(model, x)
    x5 = torch.randn((5,) + tuple(x.shape[1:]))
    with torch.no_grad():
        assert rel_err(res.gm(x5), res.reference(x5)) < 1e-5


def test_golden_sequential():
    model, x = zoo.make("sequential")
    gm, out, rec = run(model, x)
    a0, a1, b0, fc = (out.get_submodule(p) for p in ("a.0", "a.1", "b.0", "fc"))
    assert (a0.out_channels, a1.num_features, b0.in_channels) == (4, 4, 4)
    assert tuple(a0.weight.shape) == (4, 3, 3, 3) and tuple(b0.weight.shape) == (8, 4, 3, 3)
    assert tuple(fc.weight.shape) == (10, 8) and fc.in_features == 8
    assert tuple(a1.running_mean.shape) == (4,)
    assert rec.nodes_before == rec.nodes_after
    assert rec.stats == {"groups": 3, "pruned": 2, "frozen": 1, "channels_before": 34,
                         "channels_after": 22, "macs_est_ratio": rec.stats["macs_est_ratio"]}
    assert any("a.0 4/8" in n for n in rec.notes) and any("frozen: fc" in n for n in rec.notes)


def test_golden_kept_filters_are_the_largest():
    model, x = zoo.make("sequential")
    with torch.no_grad():
        model.a[0].weight.mul_(0.01)
        model.a[0].weight[[1, 3, 5, 6]] *= 1000.0  # the four filters L1 must keep
    _, out, _ = run(model, x, prune=fxopt.PruneConfig(ratio=0.5, importance="l1"))
    kept = out.get_submodule("a.0").weight
    assert torch.equal(kept, model.a[0].weight[[1, 3, 5, 6]])


def test_golden_bn_scale_keeps_large_gammas():
    model, x = zoo.make("sequential")
    with torch.no_grad():
        model.a[1].weight.copy_(torch.tensor([.1, 2, .1, 2, .1, 2, .1, 2]))
    _, out, _ = run(model, x, prune=fxopt.PruneConfig(importance="bn_scale"))
    assert torch.equal(out.get_submodule("a.1").weight, torch.full((4,), 2.0))


def test_golden_split_becomes_sized_split():
    model, x = zoo.make("split")
    _, out, _ = run(model, x)
    splits = [n for n in out.graph.nodes if n.target is torch.split]
    assert len(splits) == 2
    assert [n for n in out.graph.nodes if n.target == "chunk"] == []
    sizes = sorted(tuple(n.args[1]) for n in splits)
    assert sum(sizes[0]) + sum(sizes[1]) == 4 + 3  # a.0 keeps 4 of 8, right.0 3 of 6


def test_golden_grouped_conv_loses_whole_groups():
    model, x = zoo.make("grouped")
    _, out, _ = run(model, x)
    g = out.get_submodule("gconv.0")
    assert (g.groups, g.in_channels, g.out_channels) == (2, 8, 8)
    dw = run(*zoo.make("depthwise"))[1].get_submodule("dw.0")
    assert dw.groups == dw.in_channels == dw.out_channels == 4


def test_golden_flatten_and_layer_norm():
    _, out, _ = run(*zoo.make("flatten"))
    assert out.get_submodule("fc1").in_features == 4 * 16
    _, out, _ = run(*zoo.make("layer_norm"))
    assert out.get_submodule("norm").normalized_shape == (4,)
    [ln] = [n for n in out.graph.nodes if n.target is torch.nn.functional.layer_norm]
    assert tuple(ln.args[1]) == (4,) and tuple(out.gamma.shape) == (4, 1, 1)
    gn = run(*zoo.make("group_norm"))[1].get_submodule("gn")
    assert (gn.num_groups, gn.num_channels) == (2, 4)


def test_negative_nothing_to_prune():
    model = zoo.LinearOnly().eval()
    gm, res = call_pass(model, zoo.X_FLAT)
    assert res.modified is False and res.gm is gm
    assert res.stats["frozen"] == 1 and res.stats["pruned"] == 0
    gm2, out, rec = run(model, zoo.X_FLAT)
    assert rec.modified is False and rec.status == "ok"


def test_idempotent():
    model, x = zoo.make("residual")
    gm, res = call_pass(model, x)
    ctx = PassContext(example_inputs=(x,), configs=[PruneConfig(ratio=0.5)])
    again = PASSES["prune_channels"].fn(res.gm, ctx)
    assert again.modified is False and again.gm is res.gm
    assert "already pruned" in again.notes[0]


def test_deterministic():
    a = call_pass(*zoo.make("concat"))[1].gm
    b = call_pass(*zoo.make("concat"))[1].gm
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb)


def test_ratio_zero_is_a_no_op():
    gm, res = call_pass(*zoo.make("mlp"), prune=0.0)
    assert res.modified is False


def test_reference_depends_on_what_was_removed():
    """A reference made for other removed channels differs: the check can fail."""
    from fxopt.passes.prune.rewrite import masked_reference

    model, x = zoo.make("sequential")
    gm, res = call_pass(model, x)
    analysis = analyze_channels(gm)
    g = [gr for gr in analysis.groups if gr.name == "a.0"][0]
    other = masked_reference(gm, analysis, set(int(r) for r in g.unit_roots[:4]))
    with torch.no_grad():
        assert rel_err(res.gm(x), other(x)) > 1e-3
        assert rel_err(res.gm(x), res.reference(x)) < 1e-5


def test_manager_catches_a_wrong_pruning(monkeypatch):
    from fxopt.passes.prune import rewrite as prune_rewrite

    real = prune_rewrite.masked_reference

    def wrong(gm, analysis, removed):
        return real(gm, analysis, set())  # the unmasked model: not what was pruned

    monkeypatch.setattr(prune_mod, "masked_reference", wrong)
    model, x = zoo.make("sequential")
    with pytest.raises(NumericMismatchError) as e:
        run(model, x)
    assert e.value.pass_name == "prune_channels"
    with pytest.warns(UserWarning, match="rolled back"):
        gm, out, rec = run(model, x, on_mismatch="rollback")
    assert rec.status == "rolled back" and out.get_submodule("a.0").out_channels == 8


def test_round_to_and_min_channels():
    model, x = zoo.make("mlp")
    _, out, rec = run(model, x, prune=fxopt.PruneConfig(ratio=0.3, round_to=8))
    fc1, fc2 = out.get_submodule("fc1"), out.get_submodule("fc2")
    assert (fc1.out_features, fc2.out_features) == (24, 8)
    _, out, _ = run(model, x, prune=fxopt.PruneConfig(ratio=0.95, min_channels=6))
    fc1, fc2 = out.get_submodule("fc1"), out.get_submodule("fc2")
    assert fc1.out_features == 6 and fc2.out_features == 6


def test_ignore_keeps_a_layer():
    model, x = zoo.make("mlp")
    _, out, rec = run(model, x, prune=fxopt.PruneConfig(ignore=["fc1"]))
    assert out.get_submodule("fc1").out_features == 32
    assert out.get_submodule("fc2").out_features == 8
    assert rec.stats["ignored"] == 1 and any("ignored" in n for n in rec.notes)


def test_global_scope_removes_the_ratio_overall():
    model, x = zoo.make("mlp")
    with torch.no_grad():
        model.fc2.weight.mul_(0.01)  # fc2's units are much less important than fc1's
    _, out, rec = run(model, x, prune=fxopt.PruneConfig(ratio=0.5, scope="global"))
    f1, f2 = out.get_submodule("fc1").out_features, out.get_submodule("fc2").out_features
    assert f1 + f2 <= (32 + 16) // 2 + 1
    assert rec.stats["channels_after"] == f1 + f2 + 4


def test_mac_target():
    model, x = zoo.make("residual")
    _, out, rec = run(model, x, prune=fxopt.PruneConfig(ratio=0.6, by="macs"))
    from fxopt.ir.metrics import count_macs

    gm = fxopt.capture(model, x)
    assert count_macs(out) <= 0.4 * count_macs(gm) * 1.001
    assert count_macs(out) >= 0.2 * count_macs(gm)  # and not far beyond the target


@pytest.mark.parametrize("importance", ["l1", "l2", "bn_scale", "random"])
def test_importances_run(importance):
    model, x = zoo.make("residual")
    _, out, rec = run(model, x, prune=fxopt.PruneConfig(importance=importance))
    assert rec.status == "ok" and rec.stats["pruned"] == 2


def test_taylor_needs_data_and_a_loss():
    model, x = zoo.make("mlp")
    y = torch.randint(0, 4, (len(x),))
    _, out, rec = run(model, x, prune=fxopt.PruneConfig(importance="taylor"),
                      calibration_data=[(x, y), (x, y)])
    assert rec.status == "ok" and rec.modified
    with pytest.raises(PreconditionError, match="calibration data"):
        run(model, x, prune=fxopt.PruneConfig(importance="taylor"))
    with pytest.raises(PreconditionError, match="loss"):
        run(model, x, prune=fxopt.PruneConfig(importance="taylor"), calibration_data=[x])
    cfg = fxopt.PruneConfig(importance="taylor", loss=lambda out: out.pow(2).mean(),
                            calibration_data=[x])
    _, out, rec = run(model, x, prune=cfg)
    assert rec.modified


def test_taylor_prefers_units_that_matter():
    """Units the loss does not depend on score zero and go first."""
    model, x = zoo.make("mlp")
    with torch.no_grad():
        model.fc3.weight[:, 8:] = 0.0  # fc2's outputs 8..15 do not reach the loss
    y = torch.randint(0, 4, (len(x),))
    _, out, _ = run(model, x, prune=fxopt.PruneConfig(importance="taylor"),
                    calibration_data=[(x, y)])
    # fc2 keeps its outputs 0..7, so fc3 keeps its input columns 0..7
    assert torch.equal(out.get_submodule("fc3").weight, model.fc3.weight[:, :8])


@pytest.mark.parametrize("value", [1.5, -0.1, "half", {"ratoi": 0.5}, [0.5]])
def test_bad_config(value):
    with pytest.raises(InputError):
        fxopt.PruneConfig.coerce(value)


def test_config_validation_messages():
    with pytest.raises(InputError, match="importance"):
        fxopt.PruneConfig(importance="magnitude")
    with pytest.raises(InputError, match="round_to"):
        fxopt.PruneConfig(round_to=0)
    assert fxopt.PruneConfig.coerce({"ratio": 0.25}).ratio == 0.25
    assert fxopt.PruneConfig(ignore="fc").ignore == ("fc",)


def test_optimize_prune_end_to_end(tmp_path):
    model, x = zoo.make("residual")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = fxopt.optimize(model, x, prune=0.5)
    assert "prune_channels" in opt.report.pipeline
    pl = opt.report.pipeline
    later = [pl.index(p) for p in ("fold_bn", "fuse_act") if p in pl]
    assert pl.index("prune_channels") < min(later, default=len(pl))
    rec = opt.report.record("prune_channels")
    assert rec.status == "ok" and opt.report.after.params < opt.report.before.params
    assert opt.report.after.macs < opt.report.before.macs
    for k, v in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, state[k])
    assert model.stem[0].out_channels == 8
    path = opt.save(tmp_path / "m.fxopt")
    with torch.no_grad():
        assert torch.equal(fxopt.load(path)(x), opt(x))
    opt2 = fxopt.optimize(model, x, prune={"ratio": 0.25, "importance": "l2"},
                          pipeline=["cleanup"])
    assert opt2.report.pipeline[:2] == ["cleanup", "prune_channels"]


def test_optimize_prune_as_a_named_pass():
    model, x = zoo.make("mlp")
    opt = fxopt.optimize(model, x, passes=["prune_channels"])  # default config
    assert opt.report.record("prune_channels").modified


def test_prune_report_prints():
    model, x = zoo.make("concat")
    opt = fxopt.optimize(model, x, prune=0.5, pipeline=["cleanup"])
    text = str(opt.report)
    assert "prune_channels" in text and "channels kept/had" in text
    groups = opt.graph_module.meta["fxopt_prune_groups"]
    assert {g["name"]: (g["channels"], g["kept"]) for g in groups}["b.0"] == (6, 3)


def test_unknown_op_model_prunes_the_rest():
    model = zoo.randomize(zoo.Unknown())
    _, out, rec = run(model, zoo.X)
    assert rec.status == "ok" and rec.stats["frozen"] == 2 and rec.stats["pruned"] == 1
    a0, b0 = out.get_submodule("a.0"), out.get_submodule("b.0")
    assert a0.out_channels == 4 and b0.out_channels == 8
    assert any("unsupported op" in n for n in rec.notes)


def test_inconsistent_rewrite_freezes_and_retries(monkeypatch):
    """A node the shape check rejects freezes its groups; the rest is pruned again."""
    from fxopt.passes.prune import rewrite as prune_rewrite

    real = prune_rewrite.check_shapes
    calls = []

    def picky(gm, analysis, removed, inputs):
        calls.append(1)
        if len(calls) == 1:
            return "b_1", "pretend it broke"  # the BatchNorm of group b.0
        return real(gm, analysis, removed, inputs)

    monkeypatch.setattr(prune_mod, "check_shapes", picky)
    model, x = zoo.make("sequential")
    _, out, rec = run(model, x)
    assert rec.status == "ok" and len(calls) == 2
    assert out.get_submodule("b.0").out_channels == 16  # frozen by the retry
    assert out.get_submodule("a.0").out_channels == 4
    assert any("could not be rewritten" in n for n in rec.notes)


def test_calibration_data_allowed_with_prune_only():
    model, x = zoo.make("mlp")
    y = torch.randint(0, 4, (len(x),))
    opt = fxopt.optimize(model, x, prune=fxopt.PruneConfig(importance="taylor"),
                         calibration_data=[(x, y)], pipeline=["cleanup"])
    assert opt.report.record("prune_channels").modified
    with pytest.raises(InputError):
        fxopt.optimize(model, x, calibration_data=[(x, y)])


def test_units_never_empty_a_tensor():
    """A split piece whose every channel would go keeps its best unit."""

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = zoo.cbr(3, 4)
            self.left = nn.Conv2d(1, 2, 1)
            self.right = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            p, q = torch.split(self.a(x), [1, 3], dim=1)
            return self.left(p) + self.right(q)

    m = zoo.randomize(Tiny())
    with torch.no_grad():
        m.a[0].weight[0] *= 1e-4  # the piece's only channel is the least important
    _, out, rec = run(m, zoo.X, prune=0.75)
    assert out.get_submodule("left").in_channels == 1
    assert rec.status == "ok"


def test_importance_scores_are_per_unit():
    from fxopt.prune.importance import unit_scores

    model, x = zoo.make("grouped")
    a = analyze_channels(fxopt.capture(model, x))
    scores = unit_scores(a.gm, a, fxopt.PruneConfig(importance="l2"))
    g = [gr for gr in a.groups if gr.name == "expand.0"][0]
    assert set(scores) == set(int(r) for r in g.unit_roots)
    assert all(np.isfinite(v) and v > 0 for v in scores.values())


# -- what users extend: their own channel rules and importance criteria -------------------------
def test_user_channel_rule_prunes_a_custom_op():
    """A rule for a leaf module with one weight per channel: that weight is sliced too."""
    from fxopt.prune.rule_table import CHANNEL_RULES, register_channel_rule

    @register_channel_rule(zoo.ChannelScale)
    def channel_scale_rule(walk, node):
        mod, x = walk.module_call(node)
        lay = walk.layout(x)
        if not lay.free and lay.pdim == 1:
            walk.param(f"{node.target}.weight", 0, lay.vec, "bn_weight", node.target)
        walk.set(node, lay)

    register_channel_rule(zoo.soft_gate)(lambda walk, node: walk.set(
        node, walk.layout(node.args[0])))
    try:
        model, x = zoo.randomize(zoo.CustomOps()), zoo.X
        gm = fxopt.capture(model, x, leaf_modules=[zoo.ChannelScale])
        ctx = PassContext(example_inputs=(x,), configs=[PruneConfig(ratio=0.5)])
        out, report = PassManager(expand_pipeline(["prune_channels"]), check="each").run(gm, ctx)
    finally:
        CHANNEL_RULES.remove(zoo.ChannelScale, zoo.soft_gate)
    rec = report.record("prune_channels")
    assert rec.status == "ok" and rec.rel_err <= rec.tolerance
    assert rec.stats["pruned"] == 2 and rec.stats["frozen"] == 1
    assert tuple(out.get_submodule("scale").weight.shape) == (4,)
    assert out.get_submodule("b.0").in_channels == 4


@pytest.fixture
def smallest_first():
    """A criterion that keeps the filters with the smallest L1 norm (the opposite of l1)."""
    from fxopt.prune.importance import IMPORTANCE, register_importance

    @register_importance("smallest_l1")
    def smallest_l1(ctx):
        total, count = ctx.magnitude(roles=("weight",), p=1)
        return -total / np.maximum(count, 1)

    yield smallest_l1
    del IMPORTANCE["smallest_l1"]


def test_user_importance_is_used(smallest_first):
    model, x = zoo.make("sequential")
    with torch.no_grad():
        model.a[0].weight.mul_(0.01)
        model.a[0].weight[[1, 3, 5, 6]] *= 1000.0  # the four filters l1 keeps
    _, out, rec = run(model, x, prune=fxopt.PruneConfig(ratio=0.5, importance="smallest_l1"))
    assert rec.status == "ok" and "smallest_l1" in rec.notes[0]
    kept = out.get_submodule("a.0").weight
    assert torch.equal(kept, model.a[0].weight[[0, 2, 4, 7]])


def test_importance_registry_validation(smallest_first):
    from fxopt.prune.importance import register_importance, unit_scores

    assert fxopt.PruneConfig(importance="smallest_l1").importance == "smallest_l1"
    with pytest.raises(ValueError, match="already registered"):
        register_importance("l1")(smallest_first)
    with pytest.raises(InputError, match="register_importance"):
        fxopt.PruneConfig(importance="nope")

    model, x = zoo.make("sequential")
    a = analyze_channels(fxopt.capture(model, x))
    register_importance("bad", override=True)(lambda ctx: np.zeros(3))
    try:
        with pytest.raises(InputError, match="one score per unit"):
            unit_scores(a.gm, a, fxopt.PruneConfig(importance="bad"))
    finally:
        from fxopt.prune.importance import IMPORTANCE
        del IMPORTANCE["bad"]


class LayerNormOfLayerNorm(nn.Module):
    """A residual stream through two LayerNorms in a row (timm Swin: PatchEmbed's norm, then the
    block's norm1), the stream pruned."""

    def __init__(self):
        super().__init__()
        self.lin, self.fc, self.out = nn.Linear(3, 16), nn.Linear(16, 16), nn.Linear(16, 5)
        self.ln, self.ln2 = nn.LayerNorm(16), nn.LayerNorm(16)

    def forward(self, x):
        y = self.ln(self.lin(x))
        return self.out(y + self.fc(self.ln2(y)))


def test_layer_norm_of_a_layer_norm_equals_masked_model():
    """Failed on main (NumericMismatchError, rel err 0.15; swin_tiny prune in the zoo sweep): the
    masked reference looked the second LayerNorm's input up by the name of the first one's
    replacement, which fx had renamed, and so left it unmasked."""
    model, x = zoo.randomize(LayerNormOfLayerNorm()), torch.randn(2, 4, 4, 3)
    gm, out, rec = run(model, x)
    assert rec.status == "ok" and rec.rel_err is not None and rec.rel_err <= rec.tolerance
    assert rec.stats["pruned"] >= 1 and out.get_submodule("ln2").normalized_shape[0] < 16
