"""fxopt.optimize / OptimizedModule / load: results, errors, and the user's model untouched."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.infra.registry import PASSES, PassResult, register_pass


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1)))


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [id(p) for p in model.parameters()], [m.training for m in model.modules()])


def assert_unchanged(model, snap):
    state, ids, flags = snap
    now = model.state_dict()
    assert list(now) == list(state)
    for k in state:
        assert torch.equal(now[k], state[k]), k
    assert [id(p) for p in model.parameters()] == ids
    assert [m.training for m in model.modules()] == flags


@pytest.fixture
def net():
    m = Net().eval()
    m.bn.running_mean.uniform_(-1, 1)
    m.bn.running_var.uniform_(0.5, 2)
    return m, torch.randn(2, 3, 8, 8)


def test_optimize_matches_eager_and_leaves_model_alone(net):
    m, x = net
    snap = snapshot(m)
    opt = fxopt.optimize(m, x)
    assert isinstance(opt, nn.Module) and isinstance(opt, fxopt.OptimizedModule)
    torch.testing.assert_close(opt(x), m(x), rtol=1e-5, atol=1e-6)
    x2 = torch.randn(5, 3, 8, 8)  # another batch size
    torch.testing.assert_close(opt(x2), m(x2), rtol=1e-5, atol=1e-6)
    assert_unchanged(m, snap)
    assert opt.report.passes and opt.report.total_time_s > 0
    assert "def forward" in opt.code


def test_user_model_untouched_after_a_failing_pass(net):
    m, x = net
    snap = snapshot(m)

    def zero_weights(gm, ctx):
        """Zeroes every parameter in place (and so changes the numbers)."""
        with torch.no_grad():
            for p in gm.parameters():
                p.zero_()
        return PassResult(gm, modified=True)

    register_pass("zero_weights")(zero_weights)
    try:
        with pytest.raises(fxopt.NumericMismatchError):
            fxopt.optimize(m, x, pipeline=["zero_weights"])
    finally:
        PASSES.pop("zero_weights")
    assert_unchanged(m, snap)


@pytest.mark.parametrize("kwargs, err, match", [
    ({"quantize": "int8"}, fxopt.PreconditionError, "calibration data"),
    ({"quantize": "int4", "calibration_data": [torch.randn(1, 3, 8, 8)]}, fxopt.InputError,
     "not supported"),
    ({"calibration_data": [torch.randn(1, 3, 8, 8)]}, fxopt.InputError, "quantize"),
    ({"target": "tpu"}, fxopt.PipelineError, "target"),
    ({"pipeline": "turbo"}, fxopt.PipelineError, "unknown pipeline"),
    ({"disable": ["nope"]}, fxopt.PipelineError, "unknown pass"),
    ({"passes": ["nope"]}, fxopt.PipelineError, "unknown pass"),
])
def test_bad_arguments_are_typed_errors(net, kwargs, err, match):
    m, x = net
    snap = snapshot(m)
    with pytest.raises(err, match=match):
        fxopt.optimize(m, x, **kwargs)
    assert_unchanged(m, snap)


def test_cuda_target_without_gpu(net):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    m, x = net
    with pytest.raises(fxopt.PipelineError, match="no CUDA device"):
        fxopt.optimize(m, x, target="cuda")


def test_training_mode_model(net):
    m, x = net
    m.train()
    snap = snapshot(m)
    with pytest.raises(fxopt.PreconditionError, match="eval"):
        fxopt.optimize(m, x)
    assert_unchanged(m, snap)


def test_save_and_load_bitwise(net, tmp_path):
    m, x = net
    opt = fxopt.optimize(m, x)
    path = opt.save(tmp_path / "sub" / "m.fxopt")
    back = fxopt.load(path)
    assert isinstance(back, fxopt.OptimizedModule)
    x2 = torch.randn(3, 3, 8, 8)
    assert torch.equal(back(x2), opt(x2))
    assert back.report.to_dict() == opt.report.to_dict()
    assert not list(tmp_path.glob("**/*.tmp"))


def test_load_errors(tmp_path):
    with pytest.raises(fxopt.InputError, match="no such file"):
        fxopt.load(tmp_path / "missing.fxopt")
    other = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(1)}, other)
    with pytest.raises(fxopt.InputError, match="not an fxopt module"):
        fxopt.load(other)


@pytest.mark.parametrize("check", ["each", "end", "none"])
def test_check_modes(net, check):
    m, x = net
    opt = fxopt.optimize(m, x, check=check)
    torch.testing.assert_close(opt(x), m(x), rtol=1e-5, atol=1e-6)
    if check == "each":
        assert all(r.status == "ok" for r in opt.report.passes)
    else:
        assert all(r.rel_err is None for r in opt.report.passes)


def test_disable_and_extra_passes(net):
    m, x = net
    opt = fxopt.optimize(m, x, pipeline=["cleanup"], passes=["dce"])
    names = [r.name for r in opt.report.passes]
    assert "cleanup/dce" in names and names[-1] == "dce"
    opt = fxopt.optimize(m, x, pipeline=["cleanup"], disable=["cleanup"], passes=["dce"])
    assert [r.name for r in opt.report.passes] == ["dce"]


def test_eval_dropout_leaves_no_trace_in_numbers(net):
    m, x = net
    opt = fxopt.optimize(m, x)
    assert torch.equal(opt(x), opt(x))  # deterministic: dropout is off


def test_tolerance_table():
    from fxopt.ir.tolerances import TF32_TOLERANCE, compare_outputs, tolerance_for

    assert tolerance_for(torch.float32) == 1e-5
    assert tolerance_for(torch.float16) == 1e-2 and tolerance_for(torch.int8) == 0.0
    assert tolerance_for(torch.float32, "cpu") == 1e-5
    old = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        assert tolerance_for(torch.float32, "cuda") == TF32_TOLERANCE
        torch.backends.cudnn.allow_tf32 = False
        if not torch.backends.cuda.matmul.allow_tf32:
            assert tolerance_for(torch.float32, "cuda") == 1e-5
    finally:
        torch.backends.cudnn.allow_tf32 = old
    a = torch.randn(100)
    assert compare_outputs(a, a.clone()).ok
    assert not compare_outputs(a * (1 + 1e-4), a).ok
    assert compare_outputs(a * (1 + 1e-6), a).ok
    assert not compare_outputs(torch.tensor([1, 2]), torch.tensor([1, 3])).ok  # ints: exact
    assert not compare_outputs((a,), (a, a)).ok  # structure


def test_strict_fp32_turns_tf32_off_and_restores():
    from fxopt.ir.tolerances import TF32_TOLERANCE, strict_fp32, tolerance_for

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        assert tolerance_for(torch.float32, "cuda") == TF32_TOLERANCE
        with strict_fp32():
            assert not torch.backends.cudnn.allow_tf32
            assert not torch.backends.cuda.matmul.allow_tf32
            assert tolerance_for(torch.float32, "cuda") == 1e-5
        assert torch.backends.cudnn.allow_tf32
        with strict_fp32(False):
            assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
