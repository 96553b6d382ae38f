"""Training through an optimized graph: the fused ops' gradients make a fused graph train
exactly as the same model before fusion (the weights after a few steps agree to fp32), so the
README's ``optimize(model, x, prune=...)`` then ``finetune(opt.graph_module, ...)`` works."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.errors import InputError, UnsupportedOpError
from fxopt.ops.schema import OPS
from fxopt.tools import digits
from fxopt.train.finetune import as_batches

TOL = dict(rtol=1e-4, atol=1e-5)


class ResBlockNet(nn.Module):
    """A resnet-like block on 3-channel images: the convolutions take oneDNN's path on the CPU
    (channels-last float32), where fusion used to cut the weights off from their gradients."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = self.conv2(F.relu(self.conv1(x)))
        return self.fc(F.adaptive_avg_pool2d(F.relu(y + x), 1).flatten(1))


def _sgd_steps(model, batches, steps=2):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for x, y in batches[:steps]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def _assert_same_weights(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], **TOL, msg=lambda m: f"{k}: {m}")


def test_resnet_block_trains_like_eager():
    torch.manual_seed(0)
    eager = ResBlockNet().eval()
    x = torch.randn(4, 3, 12, 12)
    opt = fxopt.optimize(eager, x)
    gm = opt.graph_module
    assert sum(OPS["conv2d_act"].view.matches(n) for n in gm.graph.nodes) == 3
    eager = copy.deepcopy(eager)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 12, 12, generator=g), torch.randint(0, 5, (4,), generator=g))
               for _ in range(2)]
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    _sgd_steps(gm, batches)
    _sgd_steps(eager, batches)
    _assert_same_weights(gm, eager)
    assert not torch.equal(gm.state_dict()["stem.weight"], before["stem.weight"])
    # the oneDNN path's packed weights follow the trained weights
    with torch.no_grad():
        torch.testing.assert_close(gm.eval()(x), eager.eval()(x), **TOL)


def _digits_tensors(n=192):
    d = digits.load_digits_split()
    return d.train_x[:n], d.train_y[:n]


def test_digits_cnn_trains_like_its_unfused_graph():
    """With BatchNorm folded in both, the fused graph and the unfused one have the same
    parameters; two steps of training keep them equal."""
    torch.manual_seed(0)
    model = digits.DigitsCNN().eval()
    x = digits.example_batch()
    fused = fxopt.optimize(model, x).graph_module
    unfused = fxopt.optimize(model, x, pipeline=["cleanup", "fold_bn"]).graph_module
    assert any(OPS["linear_act"].view.matches(n) for n in fused.graph.nodes)
    tx, ty = _digits_tensors(64)
    batches = [(tx[:32], ty[:32]), (tx[32:], ty[32:])]
    _sgd_steps(fused, batches)
    _sgd_steps(unfused, batches)
    _assert_same_weights(fused, unfused)
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), unfused.eval()(x), **TOL)


def _randomized_resnet(channels=1):
    torch.manual_seed(0)
    model = digits.DigitsResNet()
    if channels != 1:  # colour images: channels-last convolutions run on oneDNN
        model.stem[0] = nn.Conv2d(channels, 32, 3, padding=1, bias=False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("channels", [1, 3])
def test_pruned_and_fused_fine_tunes_to_the_pruned_eager_weights(channels):
    """The README's flow: prune with the default pipeline (folded, fused) and fine-tune the
    graph; the same pruning without fusion (``pipeline=["cleanup", "fold_bn"]``: the same
    parameters, standard ops) fine-tuned with the same seed and data reaches the same weights."""
    model = _randomized_resnet(channels)
    x = digits.example_batch().repeat(1, channels, 1, 1)
    fused = fxopt.optimize(model, x, prune=0.5).graph_module
    eager = fxopt.optimize(model, x, prune=0.5, pipeline=["cleanup", "fold_bn"]).graph_module
    assert any(OPS["conv2d_act"].view.matches(n) for n in fused.graph.nodes)
    assert not any(n.op == "call_function" and "fxopt" in str(n.target)
                   for n in eager.graph.nodes)
    before = copy.deepcopy(fused.state_dict())
    tx, ty = _digits_tensors()
    data = (tx.repeat(1, channels, 1, 1) + 0.1 * torch.randn(len(tx), channels, 8, 8), ty)
    for gm in (fused, eager):
        fxopt.finetune(gm, data, epochs=1, teacher=model, optimizer="sgd", lr=0.02,
                       progress=False, seed=0, batch_size=32)
    _assert_same_weights(fused, eager)
    moved = [k for k in before if not torch.equal(before[k], fused.state_dict()[k])]
    assert "stem.0.weight" in moved and "layer3.conv2.weight" in moved


# -- the data finetune takes ---------------------------------------------------------------
def test_finetune_takes_inputs_and_targets_tensors():
    """``finetune(model, (X, y))`` batches the tensors (it used to iterate over the pair and
    feed the targets to the model: "Input type (long int) and bias type (float)")."""
    x, y = _digits_tensors(128)
    a = digits.DigitsCNN()
    b = copy.deepcopy(a)
    fxopt.finetune(a, (x, y), (x[:32], y[:32]), epochs=1, progress=False, batch_size=32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32,
                                         shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    fxopt.finetune(b, loader, epochs=1, progress=False)
    _assert_same_weights(a, b)


@pytest.mark.parametrize("data", [
    torch.randn(16, 1, 8, 8),                                    # inputs alone
    (torch.randn(16, 1, 8, 8), torch.randint(0, 10, (15,))),     # lengths differ
    (torch.randn(16, 1, 8, 8), torch.randn(16)),                 # float targets
    {"x": torch.randn(4, 1, 8, 8)},
    42,
    "digits.npz",
], ids=["tensor", "lengths", "float-targets", "dict", "int", "str"])
def test_finetune_refuses_malformed_data_with_what_to_pass(data):
    model = digits.DigitsCNN()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(InputError) as err:
        fxopt.finetune(model, data, epochs=1, progress=False)
    assert "(inputs, targets)" in err.value.hint
    _assert_same_weights(model, _loaded(state))


def _loaded(state):
    m = digits.DigitsCNN()
    m.load_state_dict(state)
    return m


def test_as_batches_keeps_loaders_and_validates_batch_size():
    loader = [(torch.randn(2, 3), torch.tensor([0, 1]))]
    assert as_batches(loader) is loader and as_batches(None) is None
    with pytest.raises(InputError, match="batch_size"):
        as_batches((torch.randn(4, 3), torch.tensor([0, 1, 0, 1])), batch_size=0)


def test_finetune_refuses_an_int8_graph_pointing_at_qat():
    torch.manual_seed(0)
    model = digits.DigitsCNN().eval()
    x = digits.example_batch()
    int8 = fxopt.optimize(model, x, quantize="int8", calibration_data=[x]).graph_module
    with pytest.raises(UnsupportedOpError, match="int8") as err:
        fxopt.finetune(int8, _digits_tensors(32), epochs=1, progress=False)
    assert "prepare_qat" in err.value.hint


def test_finetune_lightning_takes_the_same_data_and_refuses_the_same(tmp_path):
    pytest.importorskip("lightning")
    from fxopt.train.lightning import finetune_lightning

    x, y = _digits_tensors(64)
    model = digits.DigitsCNN()
    before = copy.deepcopy(model.state_dict())
    result = finetune_lightning(model, (x, y), (x[:32], y[:32]), epochs=1, log_dir=tmp_path,
                                patience=None, batch_size=32, accelerator="cpu")
    assert result.history and not torch.equal(before["features.0.weight"],
                                              model.state_dict()["features.0.weight"])
    with pytest.raises(InputError) as err:
        finetune_lightning(model, x, epochs=1, log_dir=tmp_path, patience=None)
    assert "(inputs, targets)" in err.value.hint
    int8 = fxopt.optimize(model.eval(), x[:8], quantize="int8", calibration_data=[x[:8]])
    with pytest.raises(UnsupportedOpError) as err:
        finetune_lightning(int8.graph_module, (x, y), epochs=1, log_dir=tmp_path,
                           patience=None)
    assert "prepare_qat" in err.value.hint


# -- the README's figures ------------------------------------------------------------------
@pytest.mark.slow
def test_readme_prune_finetune_recovers_accuracy():
    """The README's prune -> fine-tune flow on the trained digits model (bench/
    prune_finetune_readme.py prints the figures): back within 2 points of the float model."""
    from torch.utils.data import DataLoader, TensorDataset

    from fxopt.tools.recipes import split_train

    model = digits.load_or_train_default(progress=False).model.eval()
    float_acc = digits.evaluate(model)
    data = digits.load_digits_split()
    (tx, ty), (vx, vy) = split_train(data.train_x, data.train_y, 0.1, 0)
    train = DataLoader(TensorDataset(tx, ty), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    opt = fxopt.optimize(model, digits.example_batch(),
                         prune=fxopt.PruneConfig(ratio=0.5, importance="l1", round_to=8))
    pruned_acc = digits.evaluate(opt.graph_module)
    fxopt.finetune(opt.graph_module, train, (vx, vy), epochs=8, teacher=model, kd_alpha=0.7,
                   kd_temperature=4.0, progress=False, num_threads=1)
    tuned_acc = digits.evaluate(opt.graph_module)
    assert pruned_acc < float_acc - 0.2  # pruning by half did cost accuracy
    assert tuned_acc > float_acc - 0.02, (float_acc, pruned_acc, tuned_acc)
    assert digits.evaluate(opt) == pytest.approx(tuned_acc)  # the module wraps the same graph
