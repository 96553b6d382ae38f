"""Canonical forms: one pattern per computation, whatever the user wrote."""
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.ir.activations import CAPTURE_FORMS
from fxopt.ir.canonical import activation_of


def calls(gm):
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]


SPELLINGS = [
    ("relu", lambda: nn.ReLU(), {}), ("relu", lambda: nn.ReLU(inplace=True), {}),
    ("relu", lambda: F.relu, {}), ("relu", lambda: torch.relu, {}),
    ("relu", lambda: (lambda x: x.relu()), {}),
    ("relu6", lambda: nn.ReLU6(), {}), ("relu6", lambda: F.relu6, {}),
    ("leaky_relu", lambda: nn.LeakyReLU(0.2), {"negative_slope": 0.2}),
    ("leaky_relu", lambda: (lambda x: F.leaky_relu(x, 0.2)), {"negative_slope": 0.2}),
    ("hardtanh", lambda: nn.Hardtanh(-2.0, 3.0), {"min_val": -2.0, "max_val": 3.0}),
    ("gelu", lambda: nn.GELU(approximate="tanh"), {"approximate": "tanh"}),
    ("gelu", lambda: F.gelu, {"approximate": "none"}),
    ("silu", lambda: nn.SiLU(), {}), ("hardswish", lambda: nn.Hardswish(), {}),
    ("hardsigmoid", lambda: nn.Hardsigmoid(), {}), ("sigmoid", lambda: nn.Sigmoid(), {}),
    ("sigmoid", lambda: (lambda x: x.sigmoid()), {}), ("tanh", lambda: nn.Tanh(), {}),
    ("tanh", lambda: F.tanh, {}), ("elu", lambda: nn.ELU(0.5), {"alpha": 0.5}),
]


class Apply(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        if isinstance(act, nn.Module):
            self.act = act
        else:
            self.fn = act

    def forward(self, x):
        y = self.lin(x)
        return self.act(y) if hasattr(self, "act") else self.fn(y)


@pytest.mark.parametrize("name, make, params", SPELLINGS)
def test_activation_spellings_become_one_form(name, make, params):
    m = Apply(make()).eval()
    x = torch.randn(3, 4)
    gm = fxopt.capture(m, x)
    acts = [activation_of(n) for n in calls(gm) if activation_of(n)]
    assert len(acts) == 1
    got_name, got_params = acts[0]
    assert got_name == name
    expected = dict(CAPTURE_FORMS[name].defaults)
    expected.update(params)
    assert got_params == expected
    assert not any(n.op == "call_module" and n.target == "act" for n in gm.graph.nodes)
    assert not hasattr(gm, "act")  # the activation module is gone
    assert torch.allclose(gm(x), m(x))


def test_add_spellings_and_inplace_semantics():
    class M(nn.Module):
        def forward(self, x):
            a = torch.add(x, 1)
            b = a.add(x)
            b += a
            c = b.mul(2)
            F.relu(c, inplace=True)  # later readers of c see the relu
            return c + a

    m = M().eval()
    x = torch.randn(5)
    gm = fxopt.capture(m, x)
    targets = [n.target for n in calls(gm)]
    assert torch.add not in targets and "add" not in targets and "mul" not in targets
    assert targets.count(operator.add) == 4
    assert torch.allclose(gm(x), m(x))


def test_inplace_on_view_with_live_base_is_left_alone():
    class M(nn.Module):
        def forward(self, x):
            y = x * 1.0
            v = y.view(-1)
            v.relu_()  # writes into y too
            return y

    m = M().eval()
    x = torch.randn(2, 3)
    gm = fxopt.capture(m, x)
    assert "relu_" in [n.target for n in calls(gm)]
    assert torch.equal(gm(x), m(x))


def test_clamp_spellings():
    class M(nn.Module):
        def forward(self, x):
            return torch.clamp(x, -1, 1) + x.clamp_min(0.5) + x.clamp_max(0.2) + x.clip(0, 3)

    m = M().eval()
    x = torch.randn(10)
    gm = fxopt.capture(m, x)
    clamps = [n for n in calls(gm) if n.target is torch.clamp]
    assert len(clamps) == 4
    assert all(set(n.kwargs) == {"min", "max"} for n in clamps)
    assert torch.equal(gm(x), m(x))


def test_flatten_spellings():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fl = nn.Flatten()

        def forward(self, x):
            return (self.fl(x), x.flatten(1), x.view(x.size(0), -1), x.reshape(x.shape[0], -1),
                    torch.flatten(x, 1), x.view(-1, 3, 16))

    m = M().eval()
    x = torch.randn(2, 3, 4, 4)
    gm = fxopt.capture(m, x)
    flats = [n for n in calls(gm) if n.target is torch.flatten]
    assert len(flats) == 5
    assert all(n.kwargs == {"start_dim": 1, "end_dim": 3} for n in flats)
    reshapes = [n for n in calls(gm) if n.target is torch.reshape]
    assert len(reshapes) == 1  # the genuine reshape
    for a, b in zip(gm(x), m(x)):
        assert torch.equal(a, b)
    # still right at another batch size
    x8 = torch.randn(8, 3, 4, 4)
    for a, b in zip(gm(x8), m(x8)):
        assert torch.equal(a, b)


def test_view_with_constant_batch_is_not_a_flatten():
    class M(nn.Module):
        def forward(self, x):
            return x.view(2, -1)

    x = torch.randn(2, 3, 4)
    gm = fxopt.capture(M().eval(), x)
    assert not any(n.target is torch.flatten for n in calls(gm))
    assert torch.equal(gm(x), x.view(2, -1))


class InplaceThroughAlias(nn.Module):
    """``z`` is ``y`` itself (eval Dropout, contiguous of a contiguous tensor): ``z.relu_()``
    changes ``y`` too."""

    def __init__(self, how):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.2)
        self.how = how

    def forward(self, x):
        y = self.lin(x)
        z = self.drop(y) if self.how == "dropout" else y.contiguous()
        z.relu_()
        return y * 2 + z


@pytest.mark.parametrize("how", ["dropout", "contiguous"])
def test_inplace_op_on_a_same_tensor_alias_redirects_the_alias(how):
    m = InplaceThroughAlias(how).eval()
    x = torch.randn(3, 4)
    gm = fxopt.capture(m, x, check=False)  # canonicalization alone must get it right
    assert not any(isinstance(n.target, str) and n.target == "relu_" for n in calls(gm))
    mul = next(n for n in calls(gm) if n.target is operator.mul)
    assert activation_of(mul.args[0]) is not None  # y's later use reads the relu
    torch.testing.assert_close(gm(x), m(x))


def test_reshape_to_a_size_object_is_left_alone():
    class R(nn.Module):
        def forward(self, x):
            return x.reshape(x.shape) + x.view(x.size(0), -1).sum() + x.view(x.numel())[0]

    m = R().eval()
    x = torch.randn(3, 4)
    gm = fxopt.capture(m, x)
    torch.testing.assert_close(gm(x), m(x))
