"""The capture is a checked step (issue 12, item 1), and the smaller breaches around it.

Each case here returned a wrong model, changed the caller's tensors, or raised an untyped or
misleading error on main: hooks and ``__call__`` overrides (fx traces ``forward``), ``None``
example inputs used in control flow, in-place ops on a tensor another name aliases, an
in-place op on the input, dict/list outputs, the training flag of the result, NaN/Inf inputs,
``x.reshape(x.shape)``, and an ill-conditioned GroupNorm blamed on a pass for its own rounding.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.infra.registry import PASSES, PassResult, register_pass


def conv_net():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 4, 3)).eval()
    m[1].running_mean.uniform_(-1, 1)
    m[1].running_var.uniform_(0.5, 2)
    return m


X = torch.randn(2, 3, 8, 8)


def assert_same(opt, model, *inputs):
    with torch.no_grad():
        torch.testing.assert_close(opt(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)


# -- hooks and __call__ ---------------------------------------------------------------------------
def test_forward_hook_on_the_model_is_traced_in():
    m = conv_net()
    m.register_forward_hook(lambda mod, args, out: out * 2)
    opt = fxopt.optimize(m, X)
    assert_same(opt, m, X)
    assert any("hook" in n for n in opt.report.notes)
    assert len(m._forward_hooks) == 1  # the user's model keeps its hook


def test_forward_pre_hook_on_the_model_is_traced_in():
    m = conv_net()
    m.register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
    opt = fxopt.optimize(m, X)
    assert_same(opt, m, X)


def test_hooks_on_leaf_submodules_are_traced_in_once():
    m = conv_net()
    m[2].register_forward_hook(lambda mod, args, out: out * 2)  # ReLU: canonicalized away
    m[0].register_forward_pre_hook(lambda mod, args: (args[0] + 1,))  # Conv: fused
    m[3].register_forward_hook(lambda mod, args, kwargs, out: out - 1, with_kwargs=True)
    opt = fxopt.optimize(m, X)
    assert_same(opt, m, X)
    gm = fxopt.capture(m, X)  # not run twice at run time: the copy's hooks are gone
    assert_same(gm, m, X)


def test_observer_hooks_are_left_out_and_never_see_proxies():
    m = conv_net()
    seen = []
    m[0].register_forward_hook(lambda mod, args, out: seen.append(out))  # returns None
    opt = fxopt.optimize(m, X)
    assert_same(opt, m, X)
    assert seen and all(isinstance(t, torch.Tensor) for t in seen)
    assert any("observers" in n for n in opt.report.notes)


def test_torch_prune_reparametrization_hook():
    import torch.nn.utils.prune as prune

    m = conv_net()
    prune.l1_unstructured(m[0], "weight", amount=0.5)  # a forward pre-hook recomputes weight
    opt = fxopt.optimize(m, X)
    assert_same(opt, m, X)


def test_untraceable_hook_is_a_capture_error_naming_it():
    m = conv_net()

    def branchy(mod, args, out):
        return out * 2 if out.sum() > 0 else out

    m.register_forward_hook(branchy)
    with pytest.raises(fxopt.CaptureError, match="branchy") as e:
        fxopt.optimize(m, X)
    assert e.value.hint and "hook" in e.value.hint


def test_global_module_hooks_are_refused():
    handle = nn.modules.module.register_module_forward_hook(lambda mod, args, out: None)
    try:
        with pytest.raises(fxopt.CaptureError, match="global") as e:
            fxopt.optimize(conv_net(), X)
        assert e.value.hint
    finally:
        handle.remove()


class Doubling(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)

    def __call__(self, x):
        return super().__call__(x) * 2


def test_overridden_call_is_traced():
    m = Doubling().eval()
    opt = fxopt.optimize(m, X)
    assert_same(opt, m, X)


def test_overridden_call_of_a_leaf_is_caught_by_the_check():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Doubling()

        def forward(self, x):
            return self.inner(x)

    m = Outer().eval()
    with pytest.raises(fxopt.CaptureError, match="__call__") as e:  # applied twice: refused
        fxopt.optimize(m, X, leaf_modules=[Doubling])
    assert e.value.hint
    assert_same(fxopt.optimize(m, X), m, X)  # traced through (not a leaf): right


def test_random_ops_are_compared_under_one_seed_and_python_state_is_named():
    class Noisy(nn.Module):
        def forward(self, x):
            return x + torch.rand_like(x)

    state = torch.random.get_rng_state()
    fxopt.optimize(Noisy().eval(), X)  # the checks draw the same numbers each run
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's state untouched

    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return x * self.calls

    with pytest.raises(fxopt.CaptureError, match="not deterministic"):
        fxopt.optimize(Counter().eval(), X)


# -- constant example inputs ----------------------------------------------------------------------
class Optional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x, z=None, scale=1.0):
        y = self.conv(x)
        if z is None:
            return y * scale
        return y + z


def test_none_example_input_becomes_a_concrete_arg():
    m = Optional().eval()
    opt = fxopt.optimize(m, (X, None, 3.0))
    assert_same(opt, m, X, None, 3.0)
    assert any("specialized" in n for n in opt.report.notes)
    for other in ((X, torch.ones(2, 4, 6, 6), 3.0), (X,)):  # scale defaults to 1.0
        with pytest.raises(Exception, match="specialized"):  # fx's guard: never silently wrong
            opt(*other)
    opt = fxopt.optimize(m, (X, None))
    assert_same(opt, m, X)  # the defaults still work


# -- in-place ops on aliases ----------------------------------------------------------------------
class DropoutAlias(nn.Module):
    def __init__(self, alias):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.drop = nn.Dropout(0.5)
        self.ident = nn.Identity()
        self.alias = alias

    def forward(self, x):
        y = self.conv(x)
        if self.alias == "dropout":
            z = self.drop(y)
        elif self.alias == "identity":
            z = self.ident(y)
        elif self.alias == "contiguous":
            z = y.contiguous()
        elif self.alias == "functional":
            z = F.dropout(y, 0.5, training=False)
        else:
            z = y.to(torch.float32)
        z.relu_()
        return y + z * 3


@pytest.mark.parametrize("alias", ["dropout", "identity", "contiguous", "functional", "to"])
def test_inplace_op_on_an_alias_redirects_every_name(alias):
    m = DropoutAlias(alias).eval()
    gm = fxopt.capture(m, X)
    assert_same(gm, m, X)
    assert_same(fxopt.optimize(m, X), m, X)


def test_inplace_op_on_a_real_copy_is_not_redirected():
    class Copy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            z = y.to(torch.float64)  # a copy: writing into it leaves y alone
            z.relu_()
            return y + z.float()

    m = Copy().eval()
    assert_same(fxopt.capture(m, X), m, X)


# -- the caller's tensors -------------------------------------------------------------------------
class ScalesInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        x.mul_(2)
        return self.fc2(F.relu(self.fc(x)))


@pytest.mark.parametrize("check", ["each", "end", "none"])
def test_inplace_op_on_the_input_leaves_the_callers_tensor_alone(check):
    m = ScalesInput().eval()
    x = torch.randn(4, 6)
    keep = x.clone()
    opt = fxopt.optimize(m, x, check=check)
    assert torch.equal(x, keep)
    torch.testing.assert_close(opt(x.clone()), m(x.clone()))


def test_example_inputs_bitwise_unchanged_with_every_feature():
    x = X.clone()
    keep = x.clone()
    fxopt.optimize(conv_net(), x, prune=0.5)
    assert torch.equal(x, keep)


# -- outputs, mode, inputs ------------------------------------------------------------------------
class Structured(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.kind = kind

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.kind == "dict":
            return {"a": y, "b": [F.relu(y), (y * 2,)]}
        if self.kind == "list":
            return [y, F.relu(y)]
        return y, (F.relu(y), y.sum())


@pytest.mark.parametrize("kind", ["dict", "list", "tuple"])
def test_dict_list_and_nested_outputs(kind):
    m = Structured(kind).eval()
    opt = fxopt.optimize(m, X)
    out, ref = opt(X), m(X)
    assert type(out) is type(ref)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_optimized_module_is_in_eval_mode_and_can_be_optimized_again():
    m = conv_net()
    opt = fxopt.optimize(m, X)
    assert opt.training is False
    assert all(not mod.training for mod in opt.modules())
    again = fxopt.optimize(opt, X)
    assert_same(again, m, X)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_example_inputs_are_an_input_error(bad):
    x = X.clone()
    x[0, 0, 0, 0] = bad
    with pytest.raises(fxopt.InputError, match="NaN/Inf") as e:
        fxopt.optimize(conv_net(), x)
    assert e.value.hint


def test_non_finite_eager_output_is_an_input_error():
    class Overflows(nn.Module):
        def forward(self, x):
            return torch.exp(x * 1000)

    with pytest.raises(fxopt.InputError, match="output") as e:
        fxopt.optimize(Overflows().eval(), X)
    assert e.value.hint


def test_reshape_to_a_shape_object():
    class Reshape(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return F.relu(y.reshape(y.shape)) + y.view(y.size()) + y.reshape(y.shape[0], -1).sum()

    m = Reshape().eval()
    assert_same(fxopt.optimize(m, X), m, X)


# -- the final comparison and conditioning --------------------------------------------------------
def _nudge_weights(gm, ctx):
    """A pass with a real bug below the per-pass tolerance: conv weights scaled by 1 + 4e-6."""
    for mod in gm.modules():
        if isinstance(mod, nn.Conv2d):
            mod.weight.data.mul_(1 + 4e-6)
    return PassResult(gm, modified=True)


@pytest.fixture
def nudge_pass():
    for i in range(8):
        register_pass(f"_test_nudge_{i}", reference="exact")(_nudge_weights)
    yield [f"_test_nudge_{i}" for i in range(8)]
    for i in range(8):
        PASSES.pop(f"_test_nudge_{i}", None)


def test_errors_that_add_up_are_an_error_under_check_each(nudge_pass):
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Conv2d(4, 4, 3, padding=1) for _ in range(6)]).eval()
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(fxopt.NumericMismatchError, match="differs from the eager") as e:
        fxopt.optimize(m, x, pipeline=nudge_pass)
    assert e.value.hint and e.value.pass_name == "(pipeline)"
    with pytest.warns(UserWarning, match="differs from the eager"):
        fxopt.optimize(m, x, pipeline=nudge_pass, on_mismatch="warn")


class IllConditioned(nn.Module):
    """conv -> BN -> ReLU -> GroupNorm(C, C) over near-constant channels: the GroupNorm divides
    by a tiny standard deviation, so float32 rounding of its input (fold_bn's folded weights
    round differently) shows up 1e4 times larger at its output."""

    def __init__(self, c=16):
        super().__init__()
        self.conv = nn.Conv1d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm1d(c)
        self.gn = nn.GroupNorm(c, c)
        with torch.no_grad():
            self.conv.weight.mul_(0.01)
            self.conv.bias.fill_(10.0)
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.uniform_(0.5, 2)

    def forward(self, x):
        return self.gn(F.relu(self.bn(self.conv(x))))


def test_ill_conditioned_groupnorm_is_not_blamed_on_a_pass():
    torch.manual_seed(0)
    m = IllConditioned().eval()
    x = torch.randn(2, 3, 32)
    opt = fxopt.optimize(m, x)
    fold = next(r for r in opt.report.passes if r.name == "fold_bn")
    assert fold.modified and fold.rel_err > 1e-5  # above the float32 table: the model's noise
    assert any("rounding" in n for n in fold.notes)
    torch.testing.assert_close(opt(x), m(x), rtol=1e-3, atol=1e-3)


def _break_bn(gm, ctx):
    """A real bug: a BatchNorm's running variance off by 5%."""
    for mod in gm.modules():
        if isinstance(mod, nn.BatchNorm1d):
            mod.running_var.mul_(1.05)
    return PassResult(gm, modified=True)


def test_ill_conditioned_model_still_catches_a_real_bug():
    register_pass("_test_break_bn", reference="exact")(_break_bn)
    try:
        torch.manual_seed(0)
        m = IllConditioned().eval()
        with pytest.raises(fxopt.NumericMismatchError) as e:
            fxopt.optimize(m, torch.randn(2, 3, 32), pipeline=["_test_break_bn"])
        assert e.value.pass_name == "_test_break_bn"
    finally:
        PASSES.pop("_test_break_bn", None)
