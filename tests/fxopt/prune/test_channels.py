"""Channel dependency analysis (fxopt.channels): one tiny graph per coupling kind.

What the groups must be, which units move together, what freezes and why. The pruning itself
is tested in tests/passes/test_prune.py on the same models.
"""

import networkx as nx
import numpy as np
import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.prune.channels import analyze_channels, channel_groups
from fxopt.prune.rule_table import CHANNEL_RULES, ChannelRuleTable, register_channel_rule
from fxopt.prune.rules_layers import conv_module
from fxopt.prune.rules_shapes import segment_of

import prune_zoo as zoo  # noqa: E402  (tests/support, on the path from tests/conftest.py)


def groups_of(name_or_model, x=None):
    if isinstance(name_or_model, str):
        m, x = zoo.make(name_or_model)
    else:
        m = zoo.randomize(name_or_model)
    return channel_groups(m, x if x is not None else zoo.X)


def by_name(graph):
    return {g.name: g for g in graph.groups}


@pytest.mark.parametrize("name", [n for n, (_, _, kind) in zoo.ZOO.items() if kind])
def test_coupling_kind_is_reported(name):
    kind = zoo.ZOO[name][2]
    graph = groups_of(name)
    assert any(kind in g.couplings for g in graph.groups), [g.couplings for g in graph.groups]
    # a well-formed model: only the classifier is frozen
    assert [g.reasons for g in graph.frozen] == [["reaches the model output"]]


def test_sequential_groups_and_members():
    g = by_name(groups_of("sequential"))
    assert set(g) == {"a.0", "b.0", "fc"}
    assert (g["a.0"].channels, g["a.0"].units) == (8, 8)
    # conv a produces the channels; BN a.1 and conv b read them
    assert {"a.0", "a.1", "b.0"} <= set(g["a.0"].members)
    assert g["fc"].frozen and not g["a.0"].frozen and g["a.0"].prunable


def test_residual_add_unites_all_operands():
    graph = groups_of("residual")
    g = by_name(graph)
    # the stem and the residual branch's last conv write the same channels
    assert sorted(g["stem.0"].layers) == ["b2.0", "stem.0"]
    assert "residual" in g["stem.0"].couplings
    assert g["stem.0"].units == 8
    assert graph.group_of("b2.0") is g["stem.0"]
    assert "residual" not in g["b1.0"].couplings


def test_concat_keeps_operands_independent():
    a = analyze_channels(fxopt.capture(*zoo.make("concat")))
    g = {gr.name: gr for gr in a.groups}
    assert g["a.0"].units == 4 and g["b.0"].units == 6
    # the BatchNorm after the cat and the head's input see both groups at their offsets
    bn = a.params["bn.weight"][0]
    head = a.params["head.weight"][1]
    assert len(bn) == 10 and np.array_equal(bn, head)
    roots = a.slot_root
    assert set(roots[bn[:4]]) == set(g["a.0"].unit_roots)
    assert set(roots[bn[4:]]) == set(g["b.0"].unit_roots)


def test_depthwise_couples_input_and_output():
    a = analyze_channels(fxopt.capture(*zoo.make("depthwise")))
    [g] = [gr for gr in a.groups if gr.name == "expand.0"]
    assert sorted(g.layers) == ["dw.0", "expand.0"] and g.units == 8
    # channel i of the depthwise output is channel i of its input: one unit each
    dw_out = a.layouts["dw_0"].vec
    exp_out = a.layouts["expand_0"].vec
    assert np.array_equal(a.slot_root[dw_out], a.slot_root[exp_out])


def test_grouped_conv_moves_whole_groups():
    a = analyze_channels(fxopt.capture(*zoo.make("grouped")))
    [g] = [gr for gr in a.groups if gr.name == "expand.0"]
    assert (g.channels, g.units) == (16, 4) and list(g.unit_widths) == [4, 4, 4, 4]
    roots = a.slot_root[a.layouts["expand_0"].vec]
    assert [len(set(roots[i:i + 4])) for i in range(0, 16, 4)] == [1, 1, 1, 1]


def test_flatten_maps_one_channel_to_hw_features():
    a = analyze_channels(fxopt.capture(*zoo.make("flatten")))
    fc_in = a.params["fc1.weight"][1]
    assert len(fc_in) == 8 * 4 * 4
    roots = a.slot_root[fc_in]
    conv = a.slot_root[a.layouts["a_0"].vec]
    assert np.array_equal(roots, np.repeat(conv, 16))  # channel c -> features c*16 .. c*16+15


def test_split_pieces_and_chunk():
    a = analyze_channels(fxopt.capture(*zoo.make("split")))
    kinds = [rw.kind for rw in a.rewrites]
    assert kinds.count("split") == 2  # chunk and split both become torch.split with kept sizes
    g = {gr.name: gr for gr in a.groups}
    assert g["a.0"].units == 8 and g["right.0"].units == 6


def test_channel_shuffle_couples_columns():
    a = analyze_channels(fxopt.capture(*zoo.make("shuffle")))
    g = {gr.name: gr for gr in a.groups}
    # the two convs feed one shuffle: channel i of each goes with channel i of the other
    assert sorted(g["a.0"].layers) == ["a.0", "b.0"] and g["a.0"].units == 8
    assert "shuffle" in g["a.0"].couplings
    ra = a.slot_root[a.layouts["a_0"].vec]
    rb = a.slot_root[a.layouts["b_0"].vec]
    assert np.array_equal(ra, rb)


def test_squeeze_excite_multiplication():
    g = by_name(groups_of("channel_mul"))
    assert sorted(g["a.0"].layers) == ["a.0", "fc2"]
    assert "channel-mul" in g["a.0"].couplings
    assert g["fc1"].units == 4 and not g["fc1"].frozen


def test_layer_norm_over_channels_and_layer_scale():
    a = analyze_channels(fxopt.capture(*zoo.make("layer_norm")))
    g = {gr.name: gr for gr in a.groups}
    assert sorted(g["stem"].layers) == ["down", "dw", "stem"]
    assert {"norm", "constant", "depthwise", "residual"} <= set(g["stem"].couplings)
    assert set(a.norm_nodes) == {"norm", "layer_norm"}  # module and functional forms
    assert "gamma" in a.params and "norm2_w" in a.params  # layer scale and F.layer_norm weight


def test_group_norm_keeps_whole_groups():
    g = by_name(groups_of("group_norm"))
    assert (g["a"].channels, g["a"].units) == (8, 4)
    assert "norm" in g["a"].couplings


def test_slice_and_functional_and_shared():
    g = by_name(groups_of("slice"))
    assert "slice" in g["a.0"].couplings and g["a.0"].units == 8
    g = by_name(groups_of("functional"))
    assert g["conv2d"].units == 4 and "grouped" in g["conv2d"].couplings
    g = by_name(groups_of("shared"))
    # both calls of the shared conv write and read the same channels
    assert sorted(g["a.0"].layers) == ["a.0", "shared", "shared"]


@pytest.mark.parametrize("factory, frozen, reason", [
    (zoo.Unknown, "b.0", "unsupported op"),
    (zoo.MaxOverChannels, "b.0", "reduction over channels"),
    (zoo.InputResidual, "a.0", "cannot shrink"),
])
def test_what_it_cannot_reason_about_freezes(factory, frozen, reason):
    graph = groups_of(factory())
    g = by_name(graph)
    assert g[frozen].frozen and reason in " ".join(g[frozen].reasons)
    # the rest is still prunable: a frozen group never spreads to independent ones
    assert [gr.name for gr in graph.prunable] == [n for n in g if not g[n].frozen]
    assert len(graph.prunable) >= 1


def test_output_always_frozen_and_table():
    graph = groups_of("mlp", zoo.X_FLAT)
    g = by_name(graph)
    assert g["fc3"].frozen and not g["fc1"].frozen and not g["fc2"].frozen
    assert isinstance(graph.graph, nx.Graph) and graph.graph.number_of_nodes() >= 3
    text = str(graph)
    assert "fc1" in text and "reaches the model output" in text
    assert g["fc1"].as_dict()["channels"] == 32


def test_channel_groups_takes_a_captured_graph_without_copying():
    m, x = zoo.make("residual")
    gm = fxopt.capture(m, x)
    graph = channel_groups(gm)
    assert graph.analysis.gm is gm


def test_unknown_leaf_module_freezes():
    class Leaf(nn.Module):
        def forward(self, x):
            return x.flip(1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = zoo.cbr(3, 8)
            self.leaf = Leaf()
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.head(self.leaf(self.a(x)))

    m = zoo.randomize(Net())
    graph = channel_groups(m, zoo.X, leaf_modules=[Leaf])
    assert by_name(graph)["a.0"].frozen
    assert "unsupported op Leaf" in by_name(graph)["a.0"].reasons[0]


@pytest.mark.parametrize("a, b, dim, seg", [
    ((2, 8, 4, 4), (2, 128), 1, ((1, 4), (1, 2))),
    ((2, 8, 4, 4), (2, 2, 4, 4, 4), 1, ((1, 2), (1, 3))),
    ((2, 4, 2, 4, 4), (2, 8, 4, 4), 1, ((1, 3), (1, 2))),
    ((1, 8, 1, 1), (1, 8), 1, ((1, 2), (1, 2))),
    ((2, 8, 4, 4), (2, 8, 1, 4, 4), 1, ((1, 2), (1, 2))),
    ((2, 6), (3, 4), 1, ((0, 2), (0, 2))),
])
def test_reshape_segments(a, b, dim, seg):
    assert segment_of(a, b, dim) == seg


def test_analysis_never_raises_on_odd_graphs():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = zoo.cbr(3, 8)
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.a(x)
            z = y[:, 0:1] * y  # integer-free slice broadcast against all channels
            w = torch.stack([y, y], dim=0).sum(0)  # stack: unknown
            return self.head(z + w + y.roll(1, dims=1))

    graph = groups_of(Odd())
    assert by_name(graph)["a.0"].frozen


def test_channels_tied_to_a_model_input_freeze():
    """A conv added to a concat that holds the model input: its last channels meet the input."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = zoo.cbr(3, 5)
            self.b = zoo.cbr(3, 8)
            self.c = zoo.cbr(3, 4)
            self.head = nn.Conv2d(12, 4, 1)

        def forward(self, x):
            return self.head(torch.cat([torch.cat([self.a(x), x], 1) + self.b(x), self.c(x)], 1))

    graph = groups_of(Net())
    g = graph.group_of("a.0")
    assert g is graph.group_of("b.0") and g.name == "b.0"  # b covers all the units
    assert g.frozen and "cannot be removed" in " ".join(g.reasons)
    assert not graph.group_of("c.0").frozen  # the concat's other operand is independent


# -- the rule table: an op with no rule freezes; a user's rule unfreezes ------------------------
def custom_groups(rules=CHANNEL_RULES):
    m = zoo.randomize(zoo.CustomOps())
    gm = fxopt.capture(m, zoo.X, leaf_modules=[zoo.ChannelScale])
    return analyze_channels(gm, rules)


@pytest.fixture
def user_rules():
    """Register rules for the zoo's custom ops; take them out again after the test."""
    @register_channel_rule(zoo.soft_gate)
    def soft_gate_rule(walk, node):  # elementwise: the channels pass through
        walk.set(node, walk.layout(node.args[0]))

    @register_channel_rule(zoo.ChannelScale)
    def channel_scale_rule(walk, node):  # one weight per channel: it shrinks with them
        mod, x = walk.module_call(node)
        lay = walk.layout(x)
        if not lay.free and lay.pdim == 1:
            walk.param(f"{node.target}.weight", 0, lay.vec, "bn_weight", node.target)
        walk.set(node, lay)

    yield soft_gate_rule, channel_scale_rule
    CHANNEL_RULES.remove(zoo.soft_gate, zoo.ChannelScale)


def test_op_with_no_rule_freezes():
    a = custom_groups()
    g = {gr.name: gr for gr in a.groups}
    assert g["a.0"].frozen and g["a.0"].reasons == [
        "unsupported op ChannelScale at 'scale' (scale)"]
    assert g["b.0"].frozen and g["b.0"].reasons == ["unsupported op prune_zoo.soft_gate at "
                                                    "'soft_gate'"]
    assert a.walk.unknown_ops == {"ChannelScale": 1, "prune_zoo.soft_gate": 1}
    # a table with the conv row alone: every other op is unknown, every group freezes
    convs_only = ChannelRuleTable()
    convs_only.register([nn.modules.conv._ConvNd], conv_module)
    bare = custom_groups(convs_only)
    assert len(bare.groups) == 3 and all(gr.frozen for gr in bare.groups)
    assert {"BatchNorm2d", "F.relu", "ChannelScale"} <= set(bare.walk.unknown_ops)


def test_user_rule_unfreezes_custom_ops(user_rules):
    soft_gate_rule, channel_scale_rule = user_rules
    assert CHANNEL_RULES.lookup(next(n for n in custom_groups().gm.graph.nodes
                                     if n.target is zoo.soft_gate)).fn is soft_gate_rule
    a = custom_groups()
    g = {gr.name: gr for gr in a.groups}
    assert g["a.0"].prunable and g["b.0"].prunable and not a.walk.unknown_ops
    assert "scale" in g["a.0"].members  # the scale's weight shrinks with a.0's channels
    assert np.array_equal(a.params["scale.weight"][0], a.layouts["a_0"].vec)
    assert [gr.name for gr in a.groups if gr.frozen] == ["head"]


def test_rule_table_rows_and_errors(user_rules):
    assert zoo.soft_gate in CHANNEL_RULES and "view" in CHANNEL_RULES
    assert torch.cat in CHANNEL_RULES and nn.Conv2d not in CHANNEL_RULES  # by _ConvNd
    with pytest.raises(ValueError, match="already has the channel rule"):
        register_channel_rule(zoo.soft_gate)(lambda walk, node: None)
    with pytest.raises(TypeError, match="keyed by"):
        register_channel_rule(42)(lambda walk, node: None)
    table = ChannelRuleTable()

    def freeze_all(walk, node):
        walk.freeze_inputs(node.args, "mine")

    register_channel_rule(torch.relu, table=table)(freeze_all)
    register_channel_rule(torch.relu, table=table, override=True)(user_rules[0])
    assert len(table) == 1 and [r.fn for r in table] == [user_rules[0]]
    conv = nn.Conv2d(3, 4, 1)
    node = fxopt.capture(nn.Sequential(conv).eval(), zoo.X).graph.find_nodes(op="call_module")[0]
    assert CHANNEL_RULES.lookup(node, conv).name == "conv_module"  # a subclass of _ConvNd
