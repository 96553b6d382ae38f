"""The activation table: every row's reference, arity, capture spellings and CPU columns."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.ir.activations import (ACTIVATIONS, CAPTURE_FORMS, apply_activation,
                                  check_activation, fused_activation)
from fxopt.ir.canonical import activation_of

ARGS = {"leaky_relu": [0.1], "hardtanh": [-0.5, 0.7], "clamp": [-math.inf, 0.3], "elu": [0.8]}
PLAIN = {
    "none": lambda y, a: y, "relu": lambda y, a: F.relu(y), "relu6": lambda y, a: F.relu6(y),
    "leaky_relu": lambda y, a: F.leaky_relu(y, a[0]),
    "hardtanh": lambda y, a: F.hardtanh(y, a[0], a[1]), "clamp": lambda y, a: y.clamp(max=a[1]),
    "elu": lambda y, a: F.elu(y, a[0]), "gelu": lambda y, a: F.gelu(y),
    "gelu_tanh": lambda y, a: F.gelu(y, approximate="tanh"), "silu": lambda y, a: F.silu(y),
    "mish": lambda y, a: F.mish(y), "hardswish": lambda y, a: F.hardswish(y),
    "hardsigmoid": lambda y, a: F.hardsigmoid(y), "sigmoid": lambda y, a: torch.sigmoid(y),
    "tanh": lambda y, a: torch.tanh(y),
}


def test_the_table_names_every_activation_once():
    assert set(ACTIVATIONS) == set(PLAIN)


@pytest.mark.parametrize("act", sorted(PLAIN))
def test_reference_in_and_out_of_place(act):
    y = torch.randn(64) * 4
    args = ARGS.get(act, [])
    check_activation(act, args)
    expected = PLAIN[act](y, args)
    torch.testing.assert_close(apply_activation(y, act, args), expected)
    fresh = y.clone()
    torch.testing.assert_close(apply_activation(fresh, act, args, inplace=True), expected)


def test_wrong_names_and_arities_are_refused():
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        apply_activation(torch.zeros(1), "swish")
    with pytest.raises(ValueError, match="takes 1 act_args"):
        check_activation("leaky_relu", [])


@pytest.mark.parametrize("name", sorted(CAPTURE_FORMS))
def test_every_spelling_captures_to_the_canonical_call(name):
    row = CAPTURE_FORMS[name]
    for module_type in row.modules:
        m = nn.Sequential(module_type()).eval()
        gm = fxopt.capture(m, torch.randn(2, 3))
        acts = [activation_of(n) for n in gm.graph.nodes if activation_of(n) is not None]
        assert [a[0] for a in acts] == [name]
        assert fused_activation(*acts[0]) == (name, [float(row.defaults[p]) for p in row.params])


def test_fused_forms_and_refusals():
    assert fused_activation("gelu", {"approximate": "tanh"}) == ("gelu_tanh", [])
    assert fused_activation("hardtanh", {"min_val": -2.0, "max_val": 2.0}) == \
        ("hardtanh", [-2.0, 2.0])
    assert isinstance(fused_activation("hardtanh", {"min_val": 2.0, "max_val": -2.0}), str)
    assert isinstance(fused_activation("leaky_relu", {"negative_slope": None}), str)
    assert isinstance(fused_activation("softmax", {}), str)


def test_cpu_columns():
    # what PyTorch's int8 CPU kernels run: relu fused, clamps after the kernel
    assert {k for k, r in ACTIVATIONS.items() if r.quantized_cpu == "fused"} >= {"none", "relu"}
    assert {k for k, r in ACTIVATIONS.items() if r.quantized_cpu == "clamp"} == \
        {"relu6", "hardtanh", "clamp"}
    assert ACTIVATIONS["relu6"].bounds([]) == (0.0, 6.0)
    assert ACTIVATIONS["clamp"].bounds([-1.0, 2.0]) == (-1.0, 2.0)
    assert ACTIVATIONS["silu"].bounds([]) is None
