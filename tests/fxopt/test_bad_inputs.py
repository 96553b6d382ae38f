"""A table of bad inputs to every public entry point: each one is a typed error with a hint.

For every row the test asserts the error type (a subclass of ``fxopt.FxoptError``; those that
``fxopt.errors`` also derives from ``ValueError`` / ``TypeError`` stay so), that ``err.hint``
is a non-empty string, and that the user's objects are bitwise untouched: parameters and
buffers (values, dtype, device, identity), the training flag of every submodule,
``requires_grad`` of every parameter, the hook dictionaries, and the example input tensors
(``tests/support/untouched.py``).

The command line's bad arguments are in ``tests/fxopt/tools/test_cli_bad_arguments.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from untouched import assert_same, snapshot

import fxopt
from fxopt.errors import (FxoptError, InputError, ModelTypeError, PipelineError,
                          PreconditionError, UnsupportedOpError)
from fxopt.export.onnx import export_onnx
from fxopt.prune.channels import channel_groups
from fxopt.prune.config import PruneConfig
from fxopt.quant.config import QuantConfig
from fxopt.train.finetune import finetune
from fxopt.train.lightning import finetune_lightning, lightning_available


# -- the subjects -------------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        return self.fc(y.mean((2, 3)))


class Deconv(nn.Module):
    """A file torch writes but ONNX Runtime refuses: ConvTranspose2d with dilation 2 and
    output_padding 1 at stride 1 (torch allows output_padding below the dilation; ORT wants it
    below the stride: InvalidArgument when the session runs)."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 2, 3, stride=1, dilation=2, output_padding=1)

    def forward(self, x):
        return self.up(x)


class TwoIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, a, b):
        return self.fc(a + b)


def two_in() -> nn.Module:
    torch.manual_seed(0)
    return TwoIn().eval()


def two_inputs() -> tuple:
    return torch.randn(2, 4), torch.randn(2, 4)


def tiny() -> nn.Module:
    torch.manual_seed(0)
    m = Tiny()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


def example() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


_OPT_CACHE: dict = {}


def optimized() -> fxopt.OptimizedModule:
    """One optimized module for the save rows (optimized once per session)."""
    if "opt" not in _OPT_CACHE:
        _OPT_CACHE["opt"] = fxopt.optimize(tiny(), example())
    return _OPT_CACHE["opt"]


# -- the table ----------------------------------------------------------------------------------
@dataclass
class Case:
    """``model`` / ``inputs``: what the call gets (built fresh for each row); ``call(model,
    inputs, tmp)`` makes the bad call."""

    call: Callable
    error: type
    model: Callable = tiny
    inputs: Callable = example
    xfail: str | None = None
    marks: list = field(default_factory=list)


def _opt(**kw):
    return lambda m, x, tmp: fxopt.optimize(m, x, **kw)


def _train_mode():
    return tiny().train()


def _sub_train():
    m = tiny()
    m.bn.train()
    return m


def _hooked_train():
    m = tiny().train()
    m.conv.register_forward_hook(lambda mod, i, o: None)
    m.register_forward_pre_hook(lambda mod, i: None)
    return m


def _frozen():
    m = tiny()
    m.conv.weight.requires_grad_(False)
    return m


def _data(n=2, shape=(4, 3, 8, 8), classes=5):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(*shape, generator=g), torch.randint(0, classes, (shape[0],),
                                                             generator=g)) for _ in range(n)]


def _ft(**kw):
    def call(m, x, tmp):
        args = {"epochs": 1, "progress": False, **kw}
        data = args.pop("train_data", _data())
        return finetune(m, data, **args)
    return call


def _ftl(**kw):
    def call(m, x, tmp):
        args = {"epochs": 1, "patience": None, "log_dir": str(tmp / "logs"), **kw}
        data = args.pop("train", _data())
        return finetune_lightning(m, data, **args)
    return call


def _save(path_of):
    return lambda m, x, tmp: m.save(path_of(tmp))


def _graphs(*args, **kw):
    return lambda m, x, tmp: m.with_cuda_graphs(*args, **kw)


def _load(path_of):
    return lambda m, x, tmp: fxopt.load(path_of(tmp))


def _file(name: str, content: bytes | None):
    def make(tmp):
        p = tmp / name
        if content is not None:
            p.write_bytes(content)
        return p
    return make


def _truncated(tmp):
    p = tmp / "whole.fxopt"
    optimized().save(p)
    data = p.read_bytes()
    q = tmp / "truncated.fxopt"
    q.write_bytes(data[: len(data) // 2])
    return q


def _gm_bad_code():
    """A GraphModule whose graph calls a function that fails on any input."""
    gm = fx.symbolic_trace(tiny())
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is F.relu:
            n.args = (n.args[0], "not a flag")
    gm.recompile()
    return gm.eval()



CASES: dict[str, Case] = {
    # --- optimize: the model -------------------------------------------------------------------
    "optimize/model-None": Case(_opt(), ModelTypeError, model=lambda: None),
    "optimize/model-function": Case(_opt(), ModelTypeError, model=lambda: (lambda x: x)),
    "optimize/model-class": Case(_opt(), ModelTypeError, model=lambda: Tiny),
    "optimize/model-state-dict": Case(_opt(), ModelTypeError, model=lambda: tiny().state_dict()),
    "optimize/model-training": Case(_opt(), PreconditionError, model=_train_mode),
    "optimize/submodule-training": Case(_opt(), PreconditionError, model=_sub_train),
    "optimize/training-with-hooks": Case(_opt(), PreconditionError, model=_hooked_train),
    "optimize/graphmodule-bad-code": Case(_opt(), InputError, model=_gm_bad_code),
    # --- optimize: the example inputs ----------------------------------------------------------
    "optimize/inputs-None": Case(_opt(), InputError, inputs=lambda: None),
    "optimize/inputs-empty-tuple": Case(_opt(), InputError, inputs=lambda: ()),
    "optimize/inputs-empty-list": Case(_opt(), InputError, inputs=lambda: []),
    "optimize/inputs-dict": Case(_opt(), InputError, inputs=lambda: {"x": example()}),
    "optimize/inputs-ndarray": Case(_opt(), InputError, inputs=lambda: example().numpy()),
    "optimize/inputs-string": Case(_opt(), InputError, inputs=lambda: "x"),
    "optimize/inputs-no-tensor": Case(_opt(), InputError, inputs=lambda: (1, 2)),
    "optimize/inputs-wrong-channels": Case(_opt(), InputError,
                                           inputs=lambda: torch.randn(2, 5, 8, 8)),
    "optimize/inputs-wrong-rank": Case(_opt(), InputError, inputs=lambda: torch.randn(2, 3)),
    "optimize/inputs-int64": Case(_opt(), InputError,
                                  inputs=lambda: torch.ones(2, 3, 8, 8, dtype=torch.long)),
    "optimize/inputs-float64": Case(_opt(), InputError,
                                    inputs=lambda: torch.randn(2, 3, 8, 8, dtype=torch.float64)),
    "optimize/inputs-meta-device": Case(_opt(), InputError,
                                        inputs=lambda: torch.empty(2, 3, 8, 8, device="meta")),
    "optimize/inputs-two-for-one": Case(_opt(), InputError,
                                        inputs=lambda: (example(), example())),
    # --- optimize: pipeline, passes, disable ---------------------------------------------------
    "optimize/pipeline-int": Case(_opt(pipeline=42), PipelineError),
    "optimize/pipeline-unknown": Case(_opt(pipeline="fastest"), PipelineError),
    "optimize/pipeline-unknown-pass": Case(_opt(pipeline=["cleanup", "fold_bns"]), PipelineError),
    "optimize/pipeline-None-entry": Case(_opt(pipeline=["cleanup", None]), PipelineError),
    "optimize/pipeline-dict": Case(_opt(pipeline={"cleanup": True}), PipelineError),
    "optimize/pipeline-empty-string": Case(_opt(pipeline=""), PipelineError),
    "optimize/passes-unknown": Case(_opt(passes=["fold_bns"]), PipelineError),
    "optimize/passes-unknown-string": Case(_opt(passes="fold_bns"), PipelineError),
    "optimize/passes-int": Case(_opt(passes=7), PipelineError),
    "optimize/passes-function": Case(_opt(passes=[lambda gm: gm]), PipelineError),
    "optimize/disable-unknown": Case(_opt(disable=["fold_bns"]), PipelineError),
    "optimize/disable-int": Case(_opt(disable=5), PipelineError),
    "optimize/disable-unknown-string": Case(_opt(disable="fuse"), PipelineError),
    # --- optimize: target, precision, check, on_mismatch ---------------------------------------
    "optimize/target-unknown": Case(_opt(target="tpu"), PipelineError),
    "optimize/target-None": Case(_opt(target=None), PipelineError),
    "optimize/target-device": Case(_opt(target=torch.device("cpu")), PipelineError),
    "optimize/target-cuda-without-cuda": Case(
        _opt(target="cuda"), PipelineError,
        marks=[pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")]),
    "optimize/precision-fp8": Case(_opt(precision="fp8"), PipelineError),
    "optimize/precision-int": Case(_opt(precision=16), PipelineError),
    "optimize/precision-dtype": Case(_opt(precision=torch.float16), PipelineError),
    "optimize/precision-fp16-on-cpu": Case(_opt(precision="fp16", target="cpu"), PipelineError),
    "optimize/check-typo": Case(_opt(check="every"), PipelineError),
    "optimize/check-bool": Case(_opt(check=True), PipelineError),
    "optimize/on-mismatch-typo": Case(_opt(on_mismatch="ignore"), PipelineError),
    # --- optimize: prune -----------------------------------------------------------------------
    "optimize/prune-negative": Case(_opt(prune=-0.1), InputError),
    "optimize/prune-one": Case(_opt(prune=1.0), InputError),
    "optimize/prune-two": Case(_opt(prune=2), InputError),
    "optimize/prune-string": Case(_opt(prune="half"), InputError),
    "optimize/prune-nan": Case(_opt(prune=math.nan), InputError),
    "optimize/prune-list": Case(_opt(prune=[0.5]), InputError),
    "optimize/prune-unknown-field": Case(_opt(prune={"ratio": 0.5, "ratios": 2}), InputError),
    "optimize/prune-unknown-importance": Case(_opt(prune={"importance": "l3"}), InputError),
    # --- optimize: quantize and calibration ----------------------------------------------------
    "optimize/quantize-int": Case(_opt(quantize=8), InputError),
    "optimize/quantize-int4": Case(_opt(quantize="int4"), InputError),
    "optimize/quantize-bool": Case(_opt(quantize=True), InputError),
    "optimize/quantize-bad-mode": Case(_opt(quantize={"mode": "weights"}), InputError),
    "optimize/quantize-unknown-field": Case(_opt(quantize={"observer": "mse"}), InputError),
    "optimize/calibration-None-batch": Case(
        _opt(quantize="int8", calibration_data=[None]), InputError),
    "optimize/calibration-empty": Case(_opt(quantize="int8", calibration_data=[]), InputError),
    "optimize/calibration-int": Case(_opt(quantize="int8", calibration_data=5), InputError),
    "optimize/calibration-one-tensor": Case(
        lambda m, x, tmp: fxopt.optimize(m, x, quantize="int8", calibration_data=x), InputError),
    "optimize/calibration-wrong-shape": Case(
        _opt(quantize="int8", calibration_data=[torch.randn(2, 3, 5)]), InputError),
    "optimize/calibration-strings": Case(
        _opt(quantize="int8", calibration_data=[("a", "b")]), InputError),
    "optimize/calibration-one-of-two-inputs": Case(
        _opt(quantize="int8", calibration_data=[torch.randn(2, 4)]), InputError, model=two_in,
        inputs=two_inputs),
    "optimize/calibration-empty-batch": Case(
        _opt(quantize="int8", calibration_data=[torch.randn(0, 3, 8, 8)]), InputError),
    "optimize/calibration-generator-of-None": Case(
        _opt(quantize="int8", calibration_data=(None for _ in range(2))), InputError),
    "optimize/calibration-without-quantize": Case(
        _opt(calibration_data=[torch.randn(2, 3, 8, 8)]), InputError),
    # --- optimize: capture options, instruments ------------------------------------------------
    "optimize/concrete-args-unknown": Case(_opt(concrete_args={"flag": True}), InputError),
    "optimize/concrete-args-list": Case(_opt(concrete_args=[True]), InputError),
    "optimize/leaf-modules-int": Case(_opt(leaf_modules=[3]), InputError),
    "optimize/leaf-modules-not-iterable": Case(_opt(leaf_modules=5), InputError),
    "optimize/leaf-modules-instance": Case(_opt(leaf_modules=[nn.Conv2d(1, 1, 1)]), InputError),
    "optimize/instruments-object": Case(_opt(instruments=[object()]), PipelineError),
    "optimize/instruments-not-iterable": Case(_opt(instruments=5), PipelineError),
    # --- export_onnx ---------------------------------------------------------------------------
    "export_onnx/module-None": Case(lambda m, x, tmp: export_onnx(None, x, tmp / "a.onnx"),
                                    InputError),
    "export_onnx/module-function": Case(
        lambda m, x, tmp: export_onnx(lambda t: t, x, tmp / "a.onnx"), InputError),
    "export_onnx/path-None": Case(lambda m, x, tmp: export_onnx(m, x, None), InputError),
    "export_onnx/path-directory": Case(lambda m, x, tmp: export_onnx(m, x, tmp), InputError),
    "export_onnx/opset-string": Case(lambda m, x, tmp: export_onnx(m, x, tmp / "a.onnx",
                                                                   opset="17"), InputError),
    "export_onnx/opset-too-low": Case(lambda m, x, tmp: export_onnx(m, x, tmp / "a.onnx",
                                                                    opset=3), InputError),
    "export_onnx/opset-too-high": Case(lambda m, x, tmp: export_onnx(m, x, tmp / "a.onnx",
                                                                     opset=99), InputError),
    "export_onnx/inputs-None": Case(lambda m, x, tmp: export_onnx(m, None, tmp / "a.onnx"),
                                    InputError),
    "export_onnx/inputs-wrong-shape": Case(
        lambda m, x, tmp: export_onnx(m, torch.randn(1, 7, 8, 8), tmp / "a.onnx"), InputError),
    "export_onnx/inputs-wrong-shape-training": Case(
        lambda m, x, tmp: export_onnx(m, torch.randn(1, 7, 8, 8), tmp / "a.onnx"), InputError,
        model=_train_mode),
    "export_onnx/input-names-string": Case(
        lambda m, x, tmp: export_onnx(m, x, tmp / "a.onnx", input_names="x"), InputError),
    "export_onnx/dynamic-batch-string": Case(
        lambda m, x, tmp: export_onnx(m, x, tmp / "a.onnx", dynamic_batch="yes"), InputError),
    "export_onnx/ort-refuses-file": Case(
        lambda m, x, tmp: export_onnx(m, x, tmp / "a.onnx"), UnsupportedOpError,
        model=lambda: Deconv().eval(), inputs=lambda: torch.randn(1, 3, 5, 5)),
    # --- channel_groups ------------------------------------------------------------------------
    "channel_groups/model-None": Case(lambda m, x, tmp: channel_groups(None, x), ModelTypeError),
    "channel_groups/inputs-missing": Case(lambda m, x, tmp: channel_groups(m), InputError),
    "channel_groups/inputs-wrong-shape": Case(
        lambda m, x, tmp: channel_groups(m, torch.randn(1, 2, 8, 8)), InputError),
    "channel_groups/training": Case(lambda m, x, tmp: channel_groups(m, x), PreconditionError,
                                    model=_train_mode),
    "channel_groups/leaf-modules-int": Case(
        lambda m, x, tmp: channel_groups(m, x, leaf_modules=[1]), InputError),
    "channel_groups/leaf-modules-not-iterable": Case(
        lambda m, x, tmp: channel_groups(m, x, leaf_modules=1.5), InputError),
    "channel_groups/concrete-args-unknown": Case(
        lambda m, x, tmp: channel_groups(m, x, concrete_args={"y": 1}), InputError),
    # --- finetune ------------------------------------------------------------------------------
    "finetune/model-None": Case(_ft(), ModelTypeError, model=lambda: None),
    "finetune/epochs-zero": Case(_ft(epochs=0), InputError),
    "finetune/epochs-float": Case(_ft(epochs=1.5), InputError),
    "finetune/epochs-string": Case(_ft(epochs="3"), InputError),
    "finetune/lr-negative": Case(_ft(lr=-1e-3), InputError),
    "finetune/lr-string": Case(_ft(lr="fast"), InputError),
    "finetune/lr-nan": Case(_ft(lr=math.nan), InputError),
    "finetune/kd-alpha": Case(_ft(kd_alpha=2.0), InputError),
    "finetune/temperature": Case(_ft(kd_temperature=0), InputError),
    "finetune/weight-decay": Case(_ft(weight_decay=-1), InputError),
    "finetune/patience-without-val": Case(_ft(patience=2), InputError),
    "finetune/schedule": Case(_ft(schedule="linear"), InputError),
    "finetune/optimizer": Case(_ft(optimizer="lbfgs"), InputError),
    "finetune/frozen-teacher-type": Case(_ft(teacher="resnet"), ModelTypeError),
    "finetune/no-trainable-params": Case(_ft(), InputError,
                                         model=lambda: tiny().requires_grad_(False)),
    "finetune/data-int": Case(_ft(train_data=5), InputError),
    "finetune/data-strings": Case(_ft(train_data=[("a", "b")]), InputError),
    "finetune/data-wrong-shape": Case(_ft(train_data=_data(shape=(4, 2, 8, 8))), InputError),
    "finetune/val-empty": Case(_ft(val_data=[]), InputError),
    "finetune/no-targets-no-teacher": Case(_ft(train_data=[torch.randn(4, 3, 8, 8)]),
                                           InputError),
    "finetune_lightning/epochs-zero": Case(_ftl(epochs=0), InputError),
    "finetune_lightning/student-None": Case(_ftl(), ModelTypeError, model=lambda: None),
    "finetune_lightning/patience-without-val": Case(_ftl(patience=3), InputError),
    # --- configs -------------------------------------------------------------------------------
    "QuantConfig/first-layer": Case(lambda m, x, t: QuantConfig(first_layer="middle"),
                                    InputError),
    "QuantConfig/keep-float-int": Case(lambda m, x, t: QuantConfig(keep_float=[3]), InputError),
    "QuantConfig/mode": Case(lambda m, x, t: QuantConfig(mode="weights"), InputError),
    "QuantConfig/cpu-engine": Case(lambda m, x, t: QuantConfig(cpu_engine="qnnpack2"),
                                   InputError),
    "QuantConfig/observer": Case(lambda m, x, t: QuantConfig(activation_observer="max"),
                                 InputError),
    "QuantConfig/max-float-layers": Case(lambda m, x, t: QuantConfig(max_float_layers=-1),
                                         InputError),
    "QuantConfig/max-float-layers-str": Case(lambda m, x, t: QuantConfig(max_float_layers="all"),
                                             InputError),
    "QuantConfig/min-sqnr-str": Case(lambda m, x, t: QuantConfig(min_sqnr_db="30"), InputError),
    "QuantConfig/sensitivity-batches": Case(lambda m, x, t: QuantConfig(sensitivity_batches=0),
                                            InputError),
    "QuantConfig/min-batches-str": Case(lambda m, x, t: QuantConfig(min_batches="two"),
                                        InputError),
    "QuantConfig/observer-options": Case(lambda m, x, t: QuantConfig(observer_options=5),
                                         InputError),
    "QuantConfig/observer-option-unknown": Case(
        lambda m, x, t: QuantConfig(observer_options={"percentile": 99.9}), InputError),
    "optimize/quantize-observer-option-unknown": Case(
        _opt(quantize={"activation_observer": "percentile", "observer_options": {"window": 8}},
             calibration_data=[torch.randn(2, 3, 8, 8)]), InputError),
    "QuantConfig/symmetric-str": Case(lambda m, x, t: QuantConfig(activation_symmetric="yes"),
                                      InputError),
    "PruneConfig/ratio-nan": Case(lambda m, x, t: PruneConfig(ratio=math.nan), InputError),
    "PruneConfig/ratio-inf": Case(lambda m, x, t: PruneConfig(ratio=math.inf), InputError),
    "PruneConfig/by": Case(lambda m, x, t: PruneConfig(by="flops"), InputError),
    "PruneConfig/scope": Case(lambda m, x, t: PruneConfig(scope="local"), InputError),
    "PruneConfig/round-to": Case(lambda m, x, t: PruneConfig(round_to=0), InputError),
    "PruneConfig/min-channels": Case(lambda m, x, t: PruneConfig(min_channels=2.5), InputError),
    "PruneConfig/max-group-ratio": Case(lambda m, x, t: PruneConfig(max_group_ratio=0),
                                        InputError),
    "PruneConfig/max-group-ratio-str": Case(lambda m, x, t: PruneConfig(max_group_ratio="all"),
                                            InputError),
    "PruneConfig/loss": Case(lambda m, x, t: PruneConfig(loss="ce"), InputError),
    "PruneConfig/ignore-int": Case(lambda m, x, t: PruneConfig(ignore=[3]), InputError),
    "PruneConfig/seed": Case(lambda m, x, t: PruneConfig(seed="x"), InputError),
    # --- save / load ---------------------------------------------------------------------------
    "save/directory": Case(_save(lambda tmp: tmp), InputError, model=optimized),
    "save/None": Case(_save(lambda tmp: None), InputError, model=optimized),
    "load/missing": Case(_load(lambda tmp: tmp / "nope.fxopt"), InputError),
    "load/directory": Case(_load(lambda tmp: tmp), InputError),
    "load/None": Case(_load(lambda tmp: None), InputError),
    "load/empty": Case(_load(_file("empty.fxopt", b"")), InputError),
    "load/text": Case(_load(_file("text.fxopt", b"hello, world\n")), InputError),
    "load/truncated": Case(_load(_truncated), InputError),
    # --- OptimizedModule.with_cuda_graphs (the module is checked before any capture) -----------
    "with_cuda_graphs/cpu-module": Case(_graphs(), PipelineError, model=optimized),
    "with_cuda_graphs/enabled-string": Case(_graphs("yes"), InputError, model=optimized),
    "with_cuda_graphs/enabled-None": Case(_graphs(None), InputError, model=optimized),
    "with_cuda_graphs/enabled-int": Case(_graphs(1), InputError, model=optimized),
    "with_cuda_graphs/max-graphs-zero": Case(_graphs(max_graphs=0), InputError, model=optimized),
    "with_cuda_graphs/max-graphs-float": Case(_graphs(max_graphs=2.0), InputError,
                                              model=optimized),
}


def _params():
    out = []
    for name, case in CASES.items():
        marks = list(case.marks)
        if case.xfail:
            marks.append(pytest.mark.xfail(strict=True, reason=case.xfail))
        if name.startswith("finetune_lightning/") and not lightning_available():
            marks.append(pytest.mark.skip(reason="lightning is not installed"))
        out.append(pytest.param(name, id=name, marks=marks))
    return out


def test_the_table_is_large_and_diverse():
    assert len(CASES) >= 50
    entry_points = {name.split("/")[0] for name in CASES}
    assert {"optimize", "export_onnx", "channel_groups", "finetune", "QuantConfig",
            "PruneConfig", "save", "load"} <= entry_points
    typed = [n for n, c in CASES.items() if not c.xfail]
    assert len(typed) >= 50


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", _params())
def test_bad_input(name, tmp_path):
    case = CASES[name]
    model, inputs = case.model(), case.inputs()
    before_model, before_inputs = snapshot(model), snapshot(inputs)
    with pytest.raises(FxoptError) as info:
        case.call(model, inputs, tmp_path)
    err = info.value
    assert isinstance(err, case.error), f"{type(err).__name__}: {err}"
    assert isinstance(err.hint, str) and err.hint.strip(), f"no hint: {err}"
    assert err.message.strip()
    assert_same(before_model, model, "model ")
    assert_same(before_inputs, inputs, "inputs ")


# -- the error classes stay the builtin kinds errors.py says ---------------------------------
def test_typed_errors_keep_their_builtin_bases():
    assert issubclass(InputError, ValueError) and issubclass(PipelineError, ValueError)
    assert issubclass(ModelTypeError, TypeError)
    with pytest.raises(ValueError):
        fxopt.optimize(tiny(), example(), pipeline=42)
    with pytest.raises(TypeError):
        fxopt.optimize(None, example())


def test_wrapped_third_party_errors_keep_the_original_as_cause(tmp_path):
    with pytest.raises(UnsupportedOpError) as info:
        export_onnx(Deconv().eval(), torch.randn(1, 3, 5, 5), tmp_path / "d.onnx")
    assert info.value.__cause__ is not None
    assert "onnxruntime" in type(info.value.__cause__).__module__.lower() or \
        "ONNX Runtime" in str(info.value)
    assert not (tmp_path / "d.onnx").exists()  # nothing half-checked left behind
    # the file itself is still there for inspection with check=False
    out = export_onnx(Deconv().eval(), torch.randn(1, 3, 5, 5), tmp_path / "d.onnx", check=False)
    assert out.path.exists() and out.check is None


def test_gm_bad_code_is_an_input_error_with_cause():
    with pytest.raises(InputError) as info:
        fxopt.optimize(_gm_bad_code(), example())
    assert info.value.__cause__ is not None


# -- a single name where a list is expected is one name, not its letters ---------------------
def test_a_single_pass_name_is_one_pass():
    x = example()
    opt = fxopt.optimize(tiny(), x, pipeline=["cleanup"], passes="fold_bn")
    assert [r.name for r in opt.report.passes][-1] == "fold_bn"
    opt = fxopt.optimize(tiny(), x, disable="fuse_act")
    assert "fuse_act" not in [r.name for r in opt.report.passes]
    with pytest.raises(PipelineError, match="'fold_bns'") as info:
        fxopt.optimize(tiny(), x, passes="fold_bns")  # the whole name, not its letters
    assert "did you mean 'fold_bn'" in info.value.hint


def test_a_single_leaf_module_class_is_one_leaf():
    x = example()
    gm = fxopt.optimize(tiny(), x, pipeline=["cleanup"], leaf_modules=nn.BatchNorm2d).graph_module
    assert any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.BatchNorm2d)
               for n in gm.graph.nodes)
    graph = channel_groups(tiny(), x, leaf_modules=nn.Linear)
    assert graph.groups


def test_concrete_args_that_exist_still_work():
    class Flag(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, double: bool = False):
            y = self.fc(x)
            return y * 2 if double else y

    m, x = Flag().eval(), torch.randn(2, 4)
    opt = fxopt.optimize(m, x, concrete_args={"double": False})
    torch.testing.assert_close(opt(x), m(x))


def test_numpy_inputs_hint_says_how_to_convert():
    with pytest.raises(InputError) as info:
        fxopt.optimize(tiny(), np.zeros((2, 3, 8, 8), dtype=np.float32))
    assert "from_numpy" in info.value.hint
