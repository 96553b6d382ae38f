"""fxopt.export.watch: every way a weight can change is seen, and watching changes nothing."""
import copy
import io

import pytest
import torch
import torch.nn as nn

from fxopt.export.watch import WeightWatch


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 5),
                      nn.Linear(5, 5))
    return m.eval()


def _watched():
    m = copy.deepcopy(_model())
    return m, WeightWatch(m)


def test_watching_keeps_values_names_sharing_and_flags():
    ref = _model()
    ref.tied = nn.Linear(5, 5)
    ref.tied.weight = ref[4].weight  # one tensor in two places stays one
    m = copy.deepcopy(ref)
    watch = WeightWatch(m)
    assert watch.unchanged()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(m(x), ref(x))
    assert list(m.state_dict()) == list(ref.state_dict())
    for (name, a), b in zip(m.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b) and a.dtype == b.dtype, name
    assert m.tied.weight is m[4].weight
    for a, b in zip(m.parameters(), ref.parameters()):
        assert isinstance(a, nn.Parameter) and a.requires_grad == b.requires_grad and a.is_leaf
    assert all(p.data_ptr() % 64 == 0 for p in m.parameters())


def _inplace_param(m):
    with torch.no_grad():
        m[0].weight.mul_(2)


def _inplace_buffer(m):
    m[1].running_mean.add_(1)


def _load_state_dict(m):
    m.load_state_dict(_model().state_dict())


def _assign_load(m):
    m.load_state_dict(_model().state_dict(), assign=True)


def _new_param(m):
    m[0].weight = nn.Parameter(torch.randn(4, 3, 3, 3))


def _new_buffer(m):
    m[1].running_var = torch.ones(4)


def _convert(m):
    m.double()


def _bn_training_step(m):
    m[1].train()
    m[1](torch.randn(2, 4, 6, 6))


def _optimizer_step(m):
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()


def _swap_module(m):
    m[0] = nn.Conv2d(3, 4, 3)


def _delete_param(m):
    del m[3].bias


def _register_buffer(m):
    m[0].register_buffer("extra", torch.zeros(1))


@pytest.mark.parametrize("change", [
    _inplace_param, _inplace_buffer, _load_state_dict, _assign_load, _new_param, _new_buffer,
    _convert, _bn_training_step, _optimizer_step, _swap_module, _delete_param, _register_buffer])
def test_every_change_is_seen(change):
    m, watch = _watched()
    change(m)
    assert not watch.unchanged()


def test_running_forward_in_eval_changes_nothing():
    m, watch = _watched()
    with torch.no_grad():
        m(torch.randn(2, 3, 8, 8))
    m(torch.randn(2, 3, 8, 8)).sum().backward()  # gradients are not weights
    assert watch.unchanged()


def test_copies_and_pickles_are_plain_modules():
    m, watch = _watched()
    twin = copy.deepcopy(m)
    assert type(twin[0]._parameters) is dict
    with torch.no_grad():
        twin[0].weight.mul_(2)
    assert watch.unchanged()  # the copy's weights are its own
    buffer = io.BytesIO()
    torch.save(m.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)
    assert all(torch.equal(loaded[k], v) for k, v in m.state_dict().items())
