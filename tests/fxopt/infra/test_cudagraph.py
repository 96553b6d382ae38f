"""CUDA graphs (``fxopt.infra.cudagraph``, ``OptimizedModule.with_cuda_graphs``).

On the CPU: the runner's signature cache and its fallbacks, driven by ``ReplayByRerunning``, a
test double of the capture backend (not of any kernel: the model's real ops run), which
"captures" by running the function into static outputs and "replays" by running it again on
the static inputs and copying into those outputs, what a CUDA graph does to its buffers. On a
GPU (``gpu`` tests, skipped without CUDA): the real ``torch.cuda.CUDAGraph`` on ResNet-18 in
fp16 and int8 at batch 1, bitwise against the plain module, a re-capture on a new batch size,
and the fallback on a real capture failure.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.errors import InputError, PipelineError
from fxopt.infra.cudagraph import CudaGraphRunner, signature


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = F.relu(self.c1(x))
        y = F.relu(self.c2(y) + y)
        return self.fc(y.mean((2, 3)))


class CaptureRefused(RuntimeError):
    pass


class ReplayByRerunning:
    """Test double for the capture backend (``fxopt.infra.cudagraph.TorchGraphs``), CPU only:
    for the cache and fallback logic. ``refuse``: capture raises (as a syncing op does)."""

    def __init__(self, refuse: bool = False):
        self.refuse = refuse
        self.warmups = 0

    def warmup(self, fn, static, n=2):
        for _ in range(n):
            fn(*static)
        self.warmups += 1

    def capture(self, fn, static):
        if self.refuse:
            raise CaptureRefused("operation not permitted when stream is capturing")
        out = fn(*static)
        return (fn, static, out), out

    def replay(self, graph):
        fn, static, out = graph
        new = fn(*static)
        for o, n in zip(out if isinstance(out, (tuple, list)) else [out],
                        new if isinstance(new, (tuple, list)) else [new]):
            o.copy_(n)

    def recover(self):
        pass


def _runner(fn, **kw):
    backend = kw.pop("backend", None) or ReplayByRerunning()
    return CudaGraphRunner(fn, backend=backend, device_type="cpu", **kw), backend


@pytest.fixture
def net():
    return Net().eval()


@torch.no_grad()
def test_replay_equals_the_plain_call_and_returns_clones(net):
    run, _ = _runner(net)
    x1, x2 = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    y1 = run(x1)
    assert torch.equal(y1, net(x1))
    y2 = run(x2)
    assert torch.equal(y2, net(x2))
    assert torch.equal(y1, net(x1)), "a kept result changed on the next call"
    y2.zero_()
    assert torch.equal(run(x2), net(x2)), "writing into a result reached the static output"
    assert (run.captures, run.replays, run.plain_calls) == (1, 3, 0)


@torch.no_grad()
def test_a_new_signature_captures_again_up_to_the_limit(net):
    run, backend = _runner(net, max_graphs=2)
    notes = run.notes
    for b in (1, 2, 1, 2):
        x = torch.randn(b, 3, 8, 8)
        assert torch.equal(run(x), net(x))
    assert run.captures == 2 and backend.warmups == 2
    x_cl = torch.randn(1, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    with pytest.warns(RuntimeWarning, match="more than 2 input signatures"):
        assert torch.equal(run(x_cl), net(x_cl))  # another stride: a third signature
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        x3 = torch.randn(3, 3, 8, 8)
        assert torch.equal(run(x3), net(x3))
    assert run.captures == 2 and run.plain_calls == 2 and len(notes) == 1


@torch.no_grad()
def test_a_capture_failure_falls_back_to_the_plain_call_for_good(net):
    notes: list[str] = []
    run, _ = _runner(net, backend=ReplayByRerunning(refuse=True), notes=notes)
    x = torch.randn(1, 3, 8, 8)
    with pytest.warns(RuntimeWarning, match="capture failed.*CaptureRefused"):
        assert torch.equal(run(x), net(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(run(x), net(x))
    assert run.disabled and "CaptureRefused" in notes[0] and len(notes) == 1
    assert (run.captures, run.replays, run.plain_calls) == (0, 0, 2)


@torch.no_grad()
def test_an_output_that_is_not_tensors_turns_the_graphs_off():
    run, _ = _runner(lambda x: (x * 2, "label"))
    with pytest.warns(RuntimeWarning, match="not tensors"):
        out = run(torch.ones(2))
    assert torch.equal(out[0], torch.full((2,), 2.0)) and out[1] == "label"
    assert run.disabled and run.captures == 0


@torch.no_grad()
def test_calls_a_graph_cannot_serve_run_the_plain_function(net):
    run, backend = _runner(lambda x, scale=1.0: net(x) * scale)
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(run(x, scale=2.0), net(x) * 2.0)  # keyword arguments
    assert signature((x, 3)) is None and signature((x,)) is None  # a non-tensor; not CUDA
    assert signature((x,), device_type="cpu") is not None
    assert run.plain_calls == 1 and backend.warmups == 0 and run.notes == []


def test_a_warmup_error_is_the_models_own_and_propagates():
    def broken(x):
        raise ValueError("shape mismatch in the model")
    run, _ = _runner(broken)
    with pytest.raises(ValueError, match="shape mismatch"):
        run(torch.ones(2))


def test_optimized_module_uses_the_graphs_only_without_gradients(net, tmp_path):
    x = torch.randn(1, 3, 8, 8)
    opt = fxopt.optimize(net, x, target="cpu")
    plain = opt.with_cuda_graphs(False)
    assert plain.graph_module is opt.graph_module and plain.cuda_graphs is None
    # The CPU double in place of the real backend (with_cuda_graphs needs CUDA).
    opt.cuda_graphs, _ = _runner(opt._forward_no_grad, notes=opt.report.notes)
    y = opt(x)
    assert y.requires_grad and opt.cuda_graphs.captures == 0  # gradients on: the plain module
    with torch.no_grad():
        assert torch.equal(opt(x), y.detach()) and opt.cuda_graphs.replays == 1
    with torch.inference_mode():
        assert torch.equal(opt(x), y.detach()) and opt.cuda_graphs.captures == 2
    back = fxopt.load(opt.save(tmp_path / "m.fxopt"))  # the file holds the graph, not the runner
    with torch.no_grad():
        assert back.cuda_graphs is None and torch.equal(back(x), y.detach())


def test_with_cuda_graphs_needs_a_cuda_module(net):
    opt = fxopt.optimize(net, torch.randn(1, 3, 8, 8), target="cpu")
    with pytest.raises(PipelineError, match="target='cuda'") as info:
        opt.with_cuda_graphs()
    assert info.value.hint
    with pytest.raises(InputError):
        opt.with_cuda_graphs("yes")
    with pytest.raises(InputError):
        opt.with_cuda_graphs(max_graphs=0)
    assert opt.cuda_graphs is None


# -- on a GPU --------------------------------------------------------------------------------
def _resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10).eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 1.5)
    return m.cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fp16", "int8"])
def test_graphs_equal_the_plain_module_bitwise_on_gpu(mode):
    m = _resnet18()
    x = torch.randn(1, 3, 64, 64, device="cuda")
    if mode == "fp16":
        opt = fxopt.optimize(m, x, target="cuda", precision="fp16")
        x = x.half()
    else:
        g = torch.Generator(device="cuda").manual_seed(1)
        cal = [torch.randn(4, 3, 64, 64, device="cuda", generator=g) for _ in range(2)]
        opt = fxopt.optimize(m, x, target="cuda", quantize="int8", calibration_data=cal)
    fast = opt.with_cuda_graphs()
    with torch.no_grad():
        for b in (1, 1, 2, 1):  # batch 2: a second capture; batch 1 again: replayed
            xb = torch.randn(b, *x.shape[1:], device="cuda", dtype=x.dtype)
            assert torch.equal(fast(xb), opt(xb)), f"batch {b}"
    assert fast.cuda_graphs.captures == 2 and fast.cuda_graphs.replays == 4
    assert fast.cuda_graphs.disabled is None and opt.cuda_graphs is None


@pytest.mark.gpu
def test_a_real_capture_failure_falls_back_on_gpu():
    net = Net().cuda().eval()

    def syncs(x):  # .item() synchronizes: not allowed while a stream is captured
        return net(x) * (x.abs().sum().item() > 0)

    run = CudaGraphRunner(syncs)
    x = torch.randn(1, 3, 8, 8, device="cuda")
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="capture failed"):
            y = run(x)
        assert torch.equal(y, syncs(x)) and run.disabled
        assert torch.equal(run(x), syncs(x))
    torch.cuda.synchronize()  # the device is usable after the failed capture
