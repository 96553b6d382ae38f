"""Fine-tuning (fxopt.finetune) and the prune + fine-tune recipe (fxopt.recipes)."""
import io
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import fxopt
from fxopt.errors import InputError
from fxopt.train.finetune import distillation_loss, evaluate_loss


def blobs(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 12, generator=g) * 3
    y = torch.randint(0, 4, (n,), generator=g)
    x = centers[y] + torch.randn(n, 12, generator=g)
    return x, y


def loaders(seed=0):
    x, y = blobs(seed=seed)
    train = DataLoader(TensorDataset(x[:192], y[:192]), batch_size=32, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    val = DataLoader(TensorDataset(x[192:], y[192:]), batch_size=64)
    return train, val


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4)).eval()


def test_finetune_learns_and_returns_eval_model():
    model = mlp()
    train, val = loaders()
    loss0, _ = evaluate_loss(model, val)
    res = fxopt.finetune(model, train, val, epochs=4, lr=1e-2, progress=False)
    assert res.model is model and not model.training
    assert len(res.history) == 4 and res.best_epoch >= 1
    h = res.history[-1]
    assert {"epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds"} <= set(h)
    assert res.best_val_loss < loss0 and h["val_accuracy"] > 0.9
    assert res.history[-1]["lr"] < res.history[0]["lr"]  # cosine schedule


def test_distillation_loss():
    s = torch.randn(8, 4, requires_grad=True)
    t = torch.randn(8, 4)
    y = torch.randint(0, 4, (8,))
    ce = F.cross_entropy(s, y)
    assert torch.allclose(distillation_loss(s, None, y, alpha=0.7, temperature=4.0), ce)
    assert torch.allclose(distillation_loss(s, t, y, alpha=0.0, temperature=4.0), ce)
    kd = F.kl_div(F.log_softmax(s / 2, -1), F.softmax(t / 2, -1), reduction="batchmean") * 4
    assert torch.allclose(distillation_loss(s, t, y, alpha=1.0, temperature=2.0), kd, atol=1e-6)
    mix = distillation_loss(s, t, y, alpha=0.25, temperature=2.0)
    assert torch.allclose(mix, 0.25 * kd + 0.75 * ce, atol=1e-6)
    mix.backward()
    assert s.grad is not None
    assert torch.allclose(distillation_loss(s, s.detach(), None, alpha=1.0, temperature=3.0),
                          torch.tensor(0.0), atol=1e-6)


def test_teacher_pulls_the_student():
    teacher = mlp(seed=5)  # another solution than the students would find alone
    train, val = loaders()
    fxopt.finetune(teacher, train, val, epochs=3, lr=1e-2, progress=False, seed=5)
    x, _ = blobs(seed=3)

    def gap(student):
        with torch.no_grad():
            return float(F.kl_div(F.log_softmax(student(x), -1), F.softmax(teacher(x), -1),
                                  reduction="batchmean"))

    kd, ce = mlp(), mlp()
    before = gap(kd)
    teacher.train()  # the caller's mode and flags survive (a frozen copy does the teaching)
    fxopt.finetune(kd, train, val, epochs=3, teacher=teacher, kd_alpha=1.0, lr=1e-2,
                   progress=False)
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    teacher.eval()
    fxopt.finetune(ce, train, val, epochs=3, lr=1e-2, progress=False)
    assert gap(kd) < before and gap(kd) < gap(ce)


def test_early_stopping_restores_the_best_epoch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))  # no BN statistics
    train, val = loaders()
    res = fxopt.finetune(model, train, val, epochs=6, lr=1e-12, patience=2, schedule="constant",
                         progress=False)
    assert res.stopped_early and len(res.history) == 3 and res.best_epoch == 1
    best = res.history[0]["val_loss"]
    assert evaluate_loss(model, val)[0] == pytest.approx(best, rel=1e-6)


def test_optimizers_and_progress_output():
    train, val = loaders()
    for opt in ("adamw", "sgd", lambda params: torch.optim.RMSprop(params, lr=1e-3)):
        res = fxopt.finetune(mlp(), train, val, epochs=1, optimizer=opt, progress=False)
        assert len(res.history) == 1
    from rich.console import Console

    buf = io.StringIO()
    fxopt.finetune(mlp(), train, val, epochs=2, progress=True,
                   console=Console(file=buf, width=100))
    text = buf.getvalue()
    assert "epoch 1/2" in text and "val acc" in text


def test_tensorboard_logs(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    pytest.importorskip("tensorboard")
    train, val = loaders()
    fxopt.finetune(mlp(), train, val, epochs=1, progress=False, log_dir=tmp_path / "tb")
    assert list(Path(tmp_path / "tb").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("kwargs", [
    {"epochs": 0}, {"kd_alpha": 1.5}, {"kd_temperature": 0}, {"lr": 0}, {"optimizer": "lbfgs"},
    {"patience": 0}, {"schedule": "step"},
])
def test_bad_arguments(kwargs):
    train, val = loaders()
    with pytest.raises(InputError):
        fxopt.finetune(mlp(), train, val, progress=False, **kwargs)


def test_patience_needs_validation_data():
    train, _ = loaders()
    with pytest.raises(InputError, match="val_data"):
        fxopt.finetune(mlp(), train, epochs=2, patience=1, progress=False)


def test_finetune_a_pruned_graph_then_optimize():
    model = mlp()
    train, val = loaders()
    fxopt.finetune(model, train, val, epochs=2, lr=1e-2, progress=False)
    x = next(iter(val))[0]
    pruned = fxopt.optimize(model, x, prune=0.5, pipeline=["cleanup"]).graph_module
    assert pruned.get_submodule("0").out_features == 16
    res = fxopt.finetune(pruned, train, val, epochs=2, teacher=model, kd_alpha=0.5, lr=1e-2,
                         progress=False)
    assert res.history[-1]["val_accuracy"] > 0.9
    final = fxopt.optimize(pruned, x)
    with torch.no_grad():
        assert torch.allclose(final(x), pruned(x), atol=1e-5)


def test_prune_and_finetune_digits_recipe():
    from fxopt.tools.digits import DigitsResNet
    from fxopt.tools.recipes import prune_and_finetune_digits

    torch.manual_seed(0)
    result = prune_and_finetune_digits(0.5, model=DigitsResNet().eval(), epochs=1,
                                       latency_repeats=2, progress=False)
    stages = [r.stage for r in result.rows]
    assert stages == ["original", "pruned", "pruned + fine-tuned",
                      "pruned + fine-tuned, optimized"]
    orig, pruned, tuned, final = result.rows
    assert pruned.params < 0.4 * orig.params and pruned.macs < 0.4 * orig.macs
    assert all(0.0 <= r.accuracy <= 1.0 for r in result.rows)
    assert tuned.accuracy == final.accuracy or abs(tuned.accuracy - final.accuracy) < 0.01
    assert isinstance(result.final, fxopt.OptimizedModule)
    text = str(result)
    assert "pruned + fine-tuned" in text and "latency" in text
