"""capture(): metadata, module paths, typed errors, and the user's model left untouched."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.ir.graph import module_path


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)) + x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = Block()
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = self.block(F.relu(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent
            return x * 2
        return x


class HasBranchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Branchy()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.inner(self.conv(x))


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [id(p) for p in model.parameters()],
            [m.training for m in model.modules()])


def assert_unchanged(model, snap):
    state, ids, flags = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert torch.equal(now[k], state[k]), k
    assert [id(p) for p in model.parameters()] == ids
    assert [m.training for m in model.modules()] == flags


def test_every_tensor_node_has_meta_and_path():
    m = Net().eval()
    gm = fxopt.capture(m, torch.randn(2, 3, 8, 8))
    for n in gm.graph.nodes:
        if n.op in ("call_module", "call_function", "call_method", "placeholder"):
            assert "tensor_meta" in n.meta, n.name
            assert "fxopt_from" in n.meta
    paths = {module_path(n) for n in gm.graph.nodes}
    assert "block.conv" in paths and "block" in paths and "fc" in paths
    conv = next(n for n in gm.graph.nodes if n.target == "block.conv")
    assert tuple(conv.meta["tensor_meta"].shape) == (2, 4, 8, 8)
    assert torch.allclose(gm(torch.ones(2, 3, 8, 8)), m(torch.ones(2, 3, 8, 8)))


def test_capture_copies_the_model():
    m = Net().eval()
    snap = snapshot(m)
    gm = fxopt.capture(m, torch.randn(1, 3, 8, 8))
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(1.0)
    assert_unchanged(m, snap)


def test_training_mode_is_rejected_with_hint():
    m = Net().train()
    snap = snapshot(m)
    with pytest.raises(fxopt.PreconditionError, match="training mode") as e:
        fxopt.capture(m, torch.randn(1, 3, 8, 8))
    assert "model.eval()" in e.value.hint
    assert_unchanged(m, snap)


def test_submodule_in_training_mode_is_named():
    m = Net().eval()
    m.block.bn.train()
    with pytest.raises(fxopt.PreconditionError, match="block.bn"):
        fxopt.capture(m, torch.randn(1, 3, 8, 8))


def test_not_a_module():
    with pytest.raises(fxopt.ModelTypeError, match="nn.Module"):
        fxopt.capture(lambda x: x, torch.randn(1))
    with pytest.raises(TypeError):  # also a TypeError for callers that catch that
        fxopt.capture("resnet18", torch.randn(1))


@pytest.mark.parametrize("bad, match", [
    (None, "required"), ((), "empty"), ([1, 2], "no tensor"), ("abc", "tensor or a tuple"),
])
def test_bad_example_inputs(bad, match):
    with pytest.raises(fxopt.InputError, match=match):
        fxopt.capture(Net().eval(), bad)


def test_numpy_input_hint():
    import numpy as np

    with pytest.raises(fxopt.InputError) as e:
        fxopt.capture(Net().eval(), np.zeros((1, 3, 8, 8), dtype="float32"))
    assert "from_numpy" in e.value.hint


def test_wrong_shape_says_what_was_given():
    m = Net().eval()
    snap = snapshot(m)
    with pytest.raises(fxopt.InputError, match=r"\(1, 5, 8, 8\)"):
        fxopt.capture(m, torch.randn(1, 5, 8, 8))
    assert_unchanged(m, snap)


def test_control_flow_names_module_and_suggests_leaf():
    m = HasBranchy().eval()
    snap = snapshot(m)
    with pytest.raises(fxopt.CaptureError, match="inner") as e:  # automatic leaves off
        fxopt.capture(m, torch.randn(1, 3, 4, 4), auto_leaves=False)
    assert "leaf_modules=[Branchy]" in e.value.hint
    assert_unchanged(m, snap)
    # ...and the hint works.
    x = torch.randn(1, 3, 4, 4)
    gm = fxopt.capture(m, x, leaf_modules=[Branchy])
    assert torch.allclose(gm(x), m(x))
    gm = fxopt.capture(m, x, leaf_modules=["inner"])
    assert torch.allclose(gm(x), m(x))


def test_bad_leaf_modules_entry():
    with pytest.raises(fxopt.InputError, match="leaf_modules"):
        fxopt.capture(Net().eval(), torch.randn(1, 3, 8, 8), leaf_modules=[3])


def test_concrete_args():
    class Flag(nn.Module):
        def forward(self, x, double=False):
            return x * 2 if double else x

    m = Flag().eval()
    x = torch.randn(3)
    gm = fxopt.capture(m, x, concrete_args={"double": True})
    assert torch.equal(gm(x), x * 2)


def test_multihead_attention_is_a_leaf():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    m = Attn().eval()
    x = torch.randn(2, 5, 8)
    gm = fxopt.capture(m, x)
    assert any(n.op == "call_module" and n.target == "mha" for n in gm.graph.nodes)
    assert torch.allclose(gm(x), m(x), atol=1e-6)
    from fxopt.ir.metrics import count_macs
    # 4 projections of 8x8 on 10 tokens + scores and weighted sum
    assert count_macs(gm) == 4 * 10 * 64 + 2 * 2 * 5 * 5 * 8


def test_user_model_deepcopy_is_independent_of_saved_state():
    m = Net().eval()
    m2 = copy.deepcopy(m)
    fxopt.capture(m, torch.randn(1, 3, 8, 8))
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)


def test_captured_graph_passes_the_verifier():
    from fxopt.ir.verify import verify_structure

    class Sizes(nn.Module):
        def forward(self, x):
            return x.view(x.size(0), -1) * x.shape[1]

    gm = fxopt.capture(Sizes().eval(), torch.randn(2, 3, 4))
    assert verify_structure(gm) == []


def test_forward_that_writes_its_buffers_warns():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("steps", torch.zeros(()))

        def forward(self, x):
            self.steps.add_(1)
            return x * 2

    m = Counter().eval()
    with pytest.warns(UserWarning, match="steps"):
        fxopt.capture(m, torch.randn(3))
    assert m.steps.item() == 0  # the user's model was not run
