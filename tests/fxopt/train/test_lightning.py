"""The Lightning integration: one short epoch on the digits data, on the CPU."""
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fxopt
from fxopt.tools import digits
from fxopt.train.lightning import finetune_lightning, lightning_available

pytestmark = pytest.mark.skipif(
    not lightning_available(),
    reason="lightning is not installed (pip install 'fxopt[lightning]')")
pytest.importorskip("tensorboard")


def _data():
    d = digits.load_digits_split()
    g = torch.Generator().manual_seed(0)
    train = DataLoader(TensorDataset(d.train_x[:256], d.train_y[:256]), batch_size=64,
                       shuffle=True, generator=g)
    val = DataLoader(TensorDataset(d.test_x[:128], d.test_y[:128]), batch_size=128)
    return train, val


def test_one_epoch_with_distillation(tmp_path):
    torch.manual_seed(0)
    teacher = digits.DigitsResNet(width=16).eval()
    x = digits.example_batch(4)
    student = fxopt.optimize(teacher, x, prune=0.5, pipeline=["cleanup"]).graph_module
    before = {k: v.clone() for k, v in student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    train, val = _data()
    result = finetune_lightning(student, train, val, teacher=teacher, epochs=1,
                                log_dir=tmp_path / "runs", kd_alpha=0.5, kd_temperature=4.0,
                                accelerator="cpu", devices=1, patience=2)
    assert result.model is student and not student.training
    assert result.history and math.isfinite(result.history[-1]["train_loss"])
    assert math.isfinite(result.history[-1]["val_loss"])
    assert result.best_val_loss is not None and math.isfinite(result.best_val_loss)
    after = student.state_dict()
    assert any(not torch.equal(before[k], after[k])
               for k in before if before[k].is_floating_point())
    # the teacher is frozen, and the caller's model keeps its flags (a frozen copy trains)
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.requires_grad for p in teacher.parameters())
    events = list((tmp_path / "runs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    with torch.no_grad():
        assert student(x).shape == (4, 10)


def test_without_teacher_or_validation(tmp_path):
    student = digits.DigitsResNet(width=8)
    train, _ = _data()
    result = finetune_lightning(student, train, epochs=1, log_dir=tmp_path, patience=None,
                                accelerator="cpu", devices=1, limit_train_batches=2)
    assert math.isfinite(result.history[-1]["train_loss"])
    assert result.best_checkpoint is None


def test_bad_arguments(tmp_path):
    student = digits.DigitsResNet(width=8)
    train, _ = _data()
    with pytest.raises(fxopt.InputError, match="patience"):
        finetune_lightning(student, train, epochs=1, log_dir=tmp_path)  # no val for patience
    with pytest.raises(fxopt.InputError):
        finetune_lightning(student, train, epochs=0, log_dir=tmp_path, patience=None)
    with pytest.raises(fxopt.InputError):
        finetune_lightning(student, train, epochs=1, kd_alpha=2.0, log_dir=tmp_path,
                           patience=None)


def test_student_trains_in_train_mode(tmp_path):
    """BatchNorm statistics of the student move (it trains in train mode); the teacher's not."""
    teacher = digits.DigitsResNet(width=8).eval()
    student = fxopt.optimize(teacher, digits.example_batch(4), pipeline=["cleanup"]).graph_module
    stats = [k for k in student.state_dict() if k.endswith("running_mean")]
    assert stats
    before = {k: student.state_dict()[k].clone() for k in stats}
    train, val = _data()
    finetune_lightning(student, train, val, teacher=teacher, epochs=1, log_dir=tmp_path,
                       accelerator="cpu", devices=1, limit_train_batches=2)
    assert any(not torch.equal(before[k], student.state_dict()[k]) for k in stats)
    assert not teacher.training
