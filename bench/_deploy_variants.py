"""The variants of bench/cpu_deploy.py: how each deployment choice (eager, ``torch.compile``,
torch.ao int8, OpenVINO, OpenVINO+NNCF int8, ONNX Runtime float and int8, fxopt's own paths) is
built from one model into a runner.

A builder takes a ``Context`` (the model, its calibration images and the pieces several variants
share, made once) and returns a ``Built``: ``runner(batch)`` gives a function of an NCHW float
tensor, with the size of the file the engine deploys from and a note. ``BUILDERS`` maps each name
in ``VARIANTS`` to its builder; a builder raises ``NotApplicable`` where fxopt refuses the option.
Timing, SQNR and the report are the harness's (bench/cpu_deploy.py).
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _int8_baselines import ao_fx_int8  # noqa: E402

__all__ = ["BUILDERS", "Built", "Context", "ENGINE_TARGETS", "FXOPT_FLOAT", "FXOPT_INT8",
           "FXOPT_INT8_CPU", "NotApplicable", "TRANSFORMERS", "VARIANTS", "first_line"]

TRANSFORMERS = {"vit_b_16", "vit_b_32", "vit_l_16", "swin_t", "swin_s", "swin_b"}
ENGINE_TARGETS = {"ov": "openvino", "ort": "onnxruntime", "best": "best"}
FXOPT_FLOAT = ["fxopt_fp32", "fxopt_bf16"] + [f"fxopt_{e}_{p}" for e in ENGINE_TARGETS
                                              for p in ("fp32", "bf16")]
# int8_bf16: quantize="int8" with precision="bf16" (on OpenVINO: the layers left in float in bf16)
# fxopt's own CPU int8 module: the default lowering, and cpu_engine="fastest"'s measured choice
FXOPT_INT8_CPU = ["fxopt_int8", "fxopt_int8_fastest"]
FXOPT_INT8 = FXOPT_INT8_CPU + [f"fxopt_{e}_{p}" for e in ENGINE_TARGETS
                               for p in ("int8", "int8_bf16")]
VARIANTS = ["eager", "compile", "ao_int8", "ov", "ov_nncf_int8", "ort_fp32", "ort_fp32_torch",
            "ort_int8", "ort_int8_s8", "ort_int8_fxopt", "fxopt_fp32", "fxopt_bf16",
            *FXOPT_INT8_CPU] + [f"fxopt_{e}_{p}" for e in ENGINE_TARGETS
                             for p in ("fp32", "bf16", "int8", "int8_bf16")]



class NotApplicable(Exception):
    """A variant this build cannot make (fxopt refused the option): an ``n/a`` cell."""


@dataclass
class Built:
    """One variant, ready to run: ``runner(batch)`` gives a function of an NCHW float tensor
    returning a float tensor (engines that compile per shape compile there)."""

    runner: Callable[[int], Callable]
    size: int | None = None
    note: str = ""
    build_s: float | None = None  # None: the time the builder took



def first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {' '.join(line.split())[:160]}"


def _file_size(*paths) -> int:
    return sum(Path(p).stat().st_size for p in paths)


class Context:
    """One model's shared pieces, made once and reused by the variants that need them."""

    def __init__(self, name: str, model, x, calib, tmp: Path, threads: int, check: str):
        self.name, self.model, self.x, self.calib = name, model, x, calib
        self.tmp, self.threads, self.check = tmp, threads, check
        self._cache: dict = {}
        self.seconds: dict[str, float] = {}  # what making each shared piece took

    def once(self, key: str, make: Callable):
        if key not in self._cache:
            t0 = time.perf_counter()
            try:
                self._cache[key] = (True, make())
            except Exception as e:  # noqa: BLE001 - remembered: every user of it fails alike
                self._cache[key] = (False, e)
            self.seconds[key] = time.perf_counter() - t0
        ok, value = self._cache[key]
        if not ok:
            raise value
        return value


# ---- helpers per engine -------------------------------------------------------------------------

def _torch_runner(module) -> Callable[[int], Callable]:
    return lambda batch: module


def _state_dict_size(module, path: Path) -> int:
    torch.save(module.state_dict(), path)
    return _file_size(path)


def _ov_runner(ctx: Context, ov_model) -> Callable[[int], Callable]:
    import openvino as ov

    def runner(batch: int):
        m = ov_model.clone()
        m.reshape([batch, *ctx.x.shape[1:]])
        compiled = ov.Core().compile_model(m, "CPU", {"INFERENCE_NUM_THREADS": ctx.threads})
        request = compiled.create_infer_request()

        def run(x):
            request.infer([x.numpy()])
            return torch.from_numpy(request.get_output_tensor(0).data.copy())

        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        run.precision = getattr(hint, "type_name", None) or str(hint)
        return run

    return runner


def _ov_model(ctx: Context):
    """``(ov_model, note)``: ``ov.convert_model(model, example_input=x)``; where its TorchScript
    tracing fails (torchvision's ViT: the trace check), OpenVINO's other documented input,
    ``ov.convert_model(torch.export.export(model, (x,)))``, and the note says so."""
    import openvino as ov

    def make():
        with _quiet():
            try:
                return ov.convert_model(copy.deepcopy(ctx.model), example_input=ctx.x), ""
            except Exception as e:  # noqa: BLE001 - the torch.export front end instead
                first = first_line(e)
            ep = torch.export.export(copy.deepcopy(ctx.model), (ctx.x,))
            return ov.convert_model(ep), f"converted from torch.export ({first[:80]})"

    return ctx.once("ov_model", make)


def _ov_size(ctx: Context, ov_model, stem: str) -> int:
    import openvino as ov

    xml = ctx.tmp / f"{stem}.xml"
    ov.save_model(ov_model.clone(), str(xml))  # its default: float weights stored as fp16
    return _file_size(xml, xml.with_suffix(".bin"))


def _ort_runner(ctx: Context, path: Path) -> Callable[[int], Callable]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = ctx.threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def run(x):
        return torch.from_numpy(sess.run(None, {name: x.numpy()})[0])

    return lambda batch: run


def _optimize(ctx: Context, **kw):
    """``fxopt.optimize`` of the model; an option fxopt refuses is NotApplicable. When the
    checked build fails a numeric check it is built again with ``check="none"`` (noted)."""
    import fxopt
    from fxopt.errors import FxoptError, NumericMismatchError

    if kw.get("quantize"):
        kw["calibration_data"] = ctx.calib
    try:
        return fxopt.optimize(ctx.model, ctx.x, check=ctx.check, **kw), ""
    except NumericMismatchError as e:
        if ctx.check == "none":
            raise
        note = f"check={ctx.check!r} failed ({first_line(e)}); built with check='none'"
        return fxopt.optimize(ctx.model, ctx.x, check="none", **kw), note
    except (FxoptError, ValueError, NotImplementedError) as e:
        raise NotApplicable(first_line(e)) from e


def _fxopt_runner(opt, x) -> Callable[[int], Callable]:
    """An fxopt module as a function of a float32 input, float32 out. A module that takes float32
    is given it; one that refuses it (a reduced-precision module without boundary casts) gets the
    input in its parameters' dtype, as a user's code would convert it."""
    dtype = torch.float32
    try:
        with torch.inference_mode():
            opt(x)
    except Exception:  # noqa: BLE001 - the probe: float32 refused
        dtype = next((p.dtype for p in opt.parameters() if p.is_floating_point()), dtype)

    def run(inp):
        return opt(inp if dtype == torch.float32 else inp.to(dtype)).float()

    return lambda batch: run


def _fxopt_size(ctx: Context, opt, stem: str) -> int | None:
    path = ctx.tmp / f"{stem}.fxopt"
    try:
        opt.save(path)
    except Exception:  # noqa: BLE001 - an engine-backed module may not save (size n/a)
        return None
    return _file_size(path)


# ---- the variants -------------------------------------------------------------------------------

def _eager(ctx):
    return Built(_torch_runner(ctx.model), _state_dict_size(ctx.model, ctx.tmp / "eager.pt"))


def _compile(ctx):
    compiled: dict[int, Callable] = {}

    def runner(batch: int):
        if batch not in compiled:  # compiled here, not in the timed warm-up
            compiled[batch] = torch.compile(ctx.model, dynamic=False)
            with torch.inference_mode():
                compiled[batch](ctx.x.expand(batch, *ctx.x.shape[1:]).contiguous())
        return compiled[batch]

    runner(ctx.x.shape[0])  # the build time includes the first compile
    return Built(runner, _state_dict_size(ctx.model, ctx.tmp / "eager.pt"),
                 "torch.compile(model, dynamic=False), default mode; build s: the first "
                 "batch size's compile")


def _ao_int8(ctx):
    q, _, _ = ao_fx_int8(ctx.model, ctx.x, ctx.calib)
    return Built(_torch_runner(q), _state_dict_size(q, ctx.tmp / "ao.pt"))


def _ov(ctx):
    m, note = _ov_model(ctx)
    return Built(_ov_runner(ctx, m), _ov_size(ctx, m, "ov"), note)


def _ov_nncf_int8(ctx):
    import nncf

    dataset = nncf.Dataset(ctx.calib, lambda t: t.numpy())
    kw = {"model_type": nncf.ModelType.TRANSFORMER} if ctx.name in TRANSFORMERS else {}
    with _quiet():
        m, note = _ov_model(ctx)
        q = nncf.quantize(m.clone(), dataset, subset_size=len(ctx.calib), **kw)
    return Built(_ov_runner(ctx, q), _ov_size(ctx, q, "ov_nncf"), "; ".join(filter(None, [
        "nncf.quantize(ov_model)" + (", model_type=TRANSFORMER" if kw else ""), note])))


def _fxopt_float(ctx):
    return ctx.once("fxopt_fp32", lambda: _optimize(ctx, target="cpu"))


def _fxopt_int8_module(ctx):
    return ctx.once("fxopt_int8", lambda: _optimize(ctx, target="cpu", quantize="int8"))


def _float_onnx(ctx) -> Path:
    def make():
        import fxopt

        path = ctx.tmp / "fxopt_fp32.onnx"
        fxopt.export_onnx(_fxopt_float(ctx)[0], ctx.x, path)
        return path

    return ctx.once("float_onnx", make)


def _ort_fp32(ctx):
    path = _float_onnx(ctx)
    return Built(_ort_runner(ctx, path), _file_size(path), "fxopt.export_onnx(fxopt fp32)")


def _ort_fp32_torch(ctx):
    path = ctx.tmp / "torch_fp32.onnx"
    with _quiet():
        torch.onnx.export(copy.deepcopy(ctx.model), (ctx.x,), str(path), dynamo=False,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17)
    return Built(_ort_runner(ctx, path), _file_size(path), "torch.onnx.export(eager)")


def _ort_int8_variant(activations: str):
    """ORT's ``quantize_static`` of fxopt's float file: QDQ, per-channel int8 weights,
    activations ``"u8"`` (U8S8, what ORT's docs advise on x86) or ``"s8"`` (S8S8, the default
    of ``quantize_static`` in recent ORT)."""
    def build(ctx):
        from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                              quant_pre_process, quantize_static)
        import onnxruntime as ort

        act = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}[activations]
        recipe = f"quantize_static(QDQ, per_channel, {activations.upper()}S8)"
        src = _float_onnx(ctx)
        pre = ctx.tmp / "ort_pre.onnx"

        def preprocess():
            with _quiet():
                quant_pre_process(str(src), str(pre))
            return pre

        try:
            pre, note = ctx.once("ort_pre", preprocess), f"{recipe} after quant_pre_process"
        except Exception as e:  # noqa: BLE001 - quantize the file as it is
            pre, note = src, f"{recipe}; quant_pre_process failed: {first_line(e)}"
        sess = ort.InferenceSession(str(pre), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(ctx.calib)

            def get_next(self):
                b = next(self.it, None)
                return None if b is None else {name: b.numpy()}

        out = ctx.tmp / f"ort_int8_{activations}.onnx"
        with _quiet():
            quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=act, weight_type=QuantType.QInt8)
        return Built(_ort_runner(ctx, out), _file_size(out), note)

    return build


def _ort_int8_fxopt(ctx):
    import fxopt

    from fxopt.errors import NumericMismatchError

    opt, note = _fxopt_int8_module(ctx)
    path = ctx.tmp / "fxopt_int8.onnx"
    notes = [note, "fxopt.export_onnx(fxopt int8)"]
    try:
        fxopt.export_onnx(opt, ctx.x, path)
    except NumericMismatchError as e:  # timed anyway: the file's speed is what is measured
        fxopt.export_onnx(opt, ctx.x, path, check=False)
        notes.append(f"its check failed ({first_line(e)}); written with check=False")
    return Built(_ort_runner(ctx, path), _file_size(path), "; ".join(filter(None, notes)))


def _fxopt_variant(target: str, precision: str):
    def build(ctx):
        seconds = None
        if target == "cpu" and precision == "fp32":
            opt, note = _fxopt_float(ctx)
            seconds = ctx.seconds["fxopt_fp32"]
        elif target == "cpu" and precision == "int8":
            opt, note = _fxopt_int8_module(ctx)
            seconds = ctx.seconds["fxopt_int8"]
        elif target == "cpu" and precision == "int8_fastest":
            from fxopt import QuantConfig
            opt, note = _optimize(ctx, target="cpu", quantize=QuantConfig(cpu_engine="fastest"))
            choice = opt.report.record("lower_int8_cpu").stats.get("engine_choice")
            note = "; ".join(filter(None, [note, f"cpu_engine='fastest': {choice}"]))
        elif precision == "int8":
            opt, note = _optimize(ctx, target=target, quantize="int8")
        elif precision == "int8_bf16":
            opt, note = _optimize(ctx, target=target, quantize="int8", precision="bf16")
        else:
            opt, note = _optimize(ctx, target=target, precision=precision)
        stem = f"fxopt_{target}_{precision}"
        return Built(_fxopt_runner(opt, ctx.x), _fxopt_size(ctx, opt, stem), note, seconds)

    return build


BUILDERS: dict[str, Callable[[Context], Built]] = {
    "eager": _eager, "compile": _compile, "ao_int8": _ao_int8, "ov": _ov,
    "ov_nncf_int8": _ov_nncf_int8, "ort_fp32": _ort_fp32, "ort_fp32_torch": _ort_fp32_torch,
    "ort_int8": _ort_int8_variant("u8"), "ort_int8_s8": _ort_int8_variant("s8"),
    "ort_int8_fxopt": _ort_int8_fxopt,
    "fxopt_fp32": _fxopt_variant("cpu", "fp32"), "fxopt_bf16": _fxopt_variant("cpu", "bf16"),
    "fxopt_int8": _fxopt_variant("cpu", "int8"),
    "fxopt_int8_fastest": _fxopt_variant("cpu", "int8_fastest"),
    **{f"fxopt_{e}_{p}": _fxopt_variant(t, p) for e, t in ENGINE_TARGETS.items()
       for p in ("fp32", "bf16", "int8", "int8_bf16")},
}


@contextlib.contextmanager
def _quiet():
    """Silence the libraries' own progress bars and warnings while a variant builds."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            yield


# ---- measuring ----------------------------------------------------------------------------------
