"""Quantization-aware fine-tuning (fxopt.qat) on the digits data, on the CPU."""
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fxopt
from fxopt.quant.calibrate import calibrate
from fxopt.quant.config import QuantConfig
from fxopt.quant.plan import find_layers, make_plan
from fxopt.quant.simulate import SimulatedInt8
from fxopt.tools import digits
from fxopt.tools.recipes import split_train
from fxopt.train.qat import QATModel, convert, prepare_qat


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """8x8 images gain nothing from intra-op threads; on a busy 2-core machine their spin-waits
    made these tests 10-20x slower (see fxopt.digits._one_thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return digits.train_digits_model(epochs=2, progress=False).model


@pytest.fixture(scope="module")
def loaders():
    d = digits.load_digits_split()
    (tx, ty), (vx, vy) = split_train(d.train_x, d.train_y, 0.1, 0)  # as recipes.py does
    train = DataLoader(TensorDataset(tx, ty), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    val = DataLoader(TensorDataset(vx, vy), batch_size=256)
    return train, val


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_mode_equals_simulated_int8(model):
    x = digits.example_batch()
    calib = digits.calibration_batches()
    before = _state(model)
    qat = fxopt.prepare_qat(model, x, calib)
    assert _same(before, model.state_dict())
    assert isinstance(qat, QATModel) and qat.training
    assert len(qat.plan.layers) == 9 and qat.kept_float == []
    # an independent plan on the same graph: same calibration, same weights
    gm = qat.graph_module
    layers = find_layers(gm)
    grids, weights = calibrate(gm, layers, [(b,) for b in calib], QuantConfig())
    ref = SimulatedInt8(gm, make_plan(gm, layers, grids, weights))
    qat.eval()
    with torch.no_grad():
        assert torch.equal(qat(x), ref(x))
        # training mode computes the same fake-quant model with autograd (float32 sums)
        qat.train()
        train_out = qat(x)
    step = max(float(q.scale) for q in grids.values())
    assert (train_out - ref(x)).abs().max() <= 2 * step


def test_gradients_reach_weights_through_fake_quant(model):
    x = digits.example_batch()
    qat = prepare_qat(model, x, digits.calibration_batches(4),
                      QuantConfig(first_layer="float"))  # stem stays float: the fused op path
    assert qat.kept_float == ["stem.0"]
    out = qat(x)
    torch.nn.functional.cross_entropy(out, digits.load_digits_split().test_y[:8]).backward()
    params = dict(qat.named_parameters())
    for name in ("stem.0.weight", "layer1.conv1.weight", "layer1.conv1.bias",
                 "layer3.conv2.weight", "fc.weight", "fc.bias"):
        g = params["graph_module." + name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name


def test_finetune_lightning_and_convert(model, loaders, tmp_path):
    pytest.importorskip("tensorboard")
    from fxopt.train.lightning import finetune_lightning, lightning_available
    if not lightning_available():
        pytest.skip("lightning is not installed")
    before = _state(model)
    train, val = loaders
    x = digits.example_batch()
    calib = digits.calibration_batches()
    qat = prepare_qat(model, x, calib)
    w0 = qat.graph_module.layer2.conv1.weight.detach().clone()
    result = finetune_lightning(qat, train, val, teacher=model, epochs=1, lr=1e-4,
                                kd_alpha=0.7, log_dir=tmp_path / "runs", accelerator="cpu",
                                devices=1, patience=None)
    assert result.model is qat and not qat.training
    assert math.isfinite(result.history[-1]["train_loss"])
    assert math.isfinite(result.best_val_loss)
    assert not torch.equal(w0, qat.graph_module.layer2.conv1.weight)
    events = list((tmp_path / "runs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0

    qat_acc = digits.evaluate(qat)
    int8 = qat.convert()  # fxopt.qat.convert(qat)
    assert isinstance(int8, fxopt.OptimizedModule)
    stats = int8.report.record("quantize_int8").stats
    assert stats["conv2d"] + stats["linear"] == len(qat.plan.layers)
    assert "lower_int8_cpu" in [p.name.split("/")[-1] for p in int8.report.passes]
    assert abs(digits.evaluate(int8) - qat_acc) <= 0.01
    assert _same(before, model.state_dict())  # the teacher is the user's model, untouched


def test_plain_finetune(model, loaders):
    before = _state(model)
    train, val = loaders
    qat = prepare_qat(model, digits.example_batch(), digits.calibration_batches(4))
    w0 = qat.graph_module.fc.weight.detach().clone()
    res = fxopt.finetune(qat, train, val, epochs=1, teacher=model, lr=1e-4, progress=False,
                         num_threads=1)
    assert res.model is qat and not qat.training
    assert math.isfinite(res.history[-1]["train_loss"]) and res.best_epoch == 1
    assert not torch.equal(w0, qat.graph_module.fc.weight)
    assert _same(before, model.state_dict())
    int8 = convert(qat, calibration_data=digits.calibration_batches(2))
    assert int8.report.record("quantize_int8").stats["calibration_batches"] == 2
    assert abs(digits.evaluate(int8) - digits.evaluate(qat)) <= 0.01


def test_bad_arguments(model):
    x = digits.example_batch()
    with pytest.raises(fxopt.InputError, match="static"):
        prepare_qat(model, x, digits.calibration_batches(2), "int8_dynamic")
    with pytest.raises(fxopt.InputError, match="calibration_data"):
        prepare_qat(model, x, None)
    with pytest.raises(fxopt.InputError):
        convert(model)
