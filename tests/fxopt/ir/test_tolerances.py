"""compare_outputs: nested structures (fx's immutable containers too) and conditioning floors."""
import torch
import torch.fx as fx

from fxopt.ir.check import conditioning_floors
from fxopt.ir.tolerances import CONDITIONING_FACTOR, compare_outputs, plain_structure


def test_interpreter_containers_compare_equal_to_plain_ones():
    t = torch.randn(3)
    ran = fx.immutable_collections.immutable_dict(
        {"a": fx.immutable_collections.immutable_list([t, (t,)])})
    plain = plain_structure(ran)
    assert type(plain) is dict and type(plain["a"]) is list and type(plain["a"][1]) is tuple
    assert compare_outputs({"a": [t, (t,)]}, ran).ok
    assert not compare_outputs({"a": [t, t]}, ran).ok  # a real structure difference


def test_floors_raise_the_tolerance_per_leaf():
    ref = torch.ones(100)
    out = ref + 1e-4
    assert not compare_outputs(out, ref).ok
    assert compare_outputs((out, ref), (ref, ref), floors=[1e-3, 0.0]).ok
    assert not compare_outputs((ref, out), (ref, ref), floors=[1e-3, 0.0]).ok
    assert not compare_outputs(out, ref, floors=[1e-5]).ok  # a floor below the error: no help


def test_conditioning_floor_is_the_float32_spread_times_the_factor():
    lin = torch.nn.Linear(8, 8).eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        out = lin(x)
        exact = lin.double()(x.double())
    lin.float()
    floors = conditioning_floors(lin, (x,), out)
    spread = ((out.double() - exact).norm() / exact.norm()).item()
    assert floors is not None and len(floors) == 1
    assert abs(floors[0] - CONDITIONING_FACTOR * spread) <= 1e-12
    assert lin.weight.dtype == torch.float32  # the model is copied, not converted
