"""``OptimizedModule`` under ``torch.no_grad`` skips the autograd layer of the fxopt ops (their
gradient formulas): the same outputs, no graph recorded; with gradients enabled it still trains."""
import torch
import torch.nn as nn

import fxopt


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 4)).eval()


def test_no_grad_outputs_equal_the_graph_modules():
    m, x = _net(), torch.randn(2, 3, 8, 8)
    opt = fxopt.optimize(m, x)
    with torch.no_grad():
        fast, plain = opt(x), opt.graph_module(x)
    assert torch.equal(fast, plain) and not fast.requires_grad and fast.grad_fn is None
    with torch.inference_mode():
        assert torch.equal(opt(x), plain)


def test_with_gradients_the_module_still_trains():
    m, x = _net(), torch.randn(2, 3, 8, 8)
    opt = fxopt.optimize(m, x)
    out = opt(x)
    assert out.requires_grad
    out.sum().backward()
    grads = [p.grad for p in opt.parameters()]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
