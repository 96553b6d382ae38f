"""Int8 accuracy: fxopt's post-training int8, change by change, against NNCF and ONNX Runtime.

Every quantizer gets the same 16 calibration images and is measured on the same held-out
images: SQNR (dB) of the int8 model's logits against the float model's
(``fxopt.quant.measure.sqnr_db``) and top-1 agreement with the float model.

Models: torchvision classifiers with seeded random weights and BatchNorm statistics and affine
parameters randomized as in ``tests/passes/quant/test_quantize_torchvision.py`` (the defaults
make many outputs degenerate; torchvision's ViT head, zero at init, drawn from N(0, 0.02)), plus
timm's vit_tiny / deit_tiny with ``--timm`` and any other torchvision name (``swin_t``). Images:
ImageNet-like, smooth random images (Gaussian noise at 1/8 resolution, bilinearly upsampled,
mapped to [0, 1] and normalized with ImageNet's mean and std), seeded; not real photographs.

Columns:

- ``fxopt 7-bit``: main before issue 13 (``reduce_range=True``, no bias correction, the
  residual add after a Linear in int8).
- ``+8-bit``: full 8-bit activation grids (``reduce_range=False``; what ``"auto"`` picks on a
  CPU with VNNI/AMX).
- ``+bias corr.``: and bias correction.
- ``+float res.``: and a Linear's residual add in float (``linear_residual_add="float"``).
- ``+SmoothQuant``: and SmoothQuant scale migration from LayerNorms into the Linear layers
  reading them (``smooth_quant=0.5``): the new defaults (``QuantConfig()`` on a VNNI CPU).
- ``NNCF``: ``nncf.quantize`` of the OpenVINO model (``openvino.convert_model`` of the
  float model), default preset (``model_type=TRANSFORMER`` for the ViTs, as NNCF's docs ask),
  ``subset_size=16``; run by OpenVINO on the CPU with ``INFERENCE_PRECISION_HINT=f32`` (so
  that the figure is the quantization error, not bf16's).
- ``ORT``: ``onnxruntime.quantization.quantize_static`` of the float model exported to ONNX
  (opset 17, TorchScript exporter), QDQ, uint8 activations, int8 per-channel weights, MinMax
  calibration (its default), run by ONNX Runtime's CPU provider.

fxopt rows run ``fxopt.optimize(..., target="cpu", check="none")`` with ``holdout_fraction=0``
(all 16 images calibrate, as for the other two); the lowering's checks are the tests' job.

    python bench/int8_accuracy.py          # writes bench/results/int8-accuracy-<date>.md
    python bench/int8_accuracy.py --models resnet18 --size 128 --out -
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header, write_result  # noqa: E402
from _random_weights import randomize_batchnorm  # noqa: E402

__all__ = ["main"]

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0",
          "regnet_x_400mf", "convnext_tiny", "vit_b_16"]
TIMM = ["vit_tiny_patch16_224", "deit_tiny_patch16_224"]
TRANSFORMERS = ("vit_b_16", "swin_t", "vit_tiny_patch16_224", "deit_tiny_patch16_224")
FXOPT_VARIANTS = {
    "fxopt 7-bit": dict(reduce_range=True, bias_correction=False, linear_residual_add="int8",
                        smooth_quant=None),
    "+8-bit": dict(reduce_range=False, bias_correction=False, linear_residual_add="int8",
                   smooth_quant=None),
    "+bias corr.": dict(reduce_range=False, bias_correction=True, linear_residual_add="int8",
                        smooth_quant=None),
    "+float res.": dict(reduce_range=False, bias_correction=True, linear_residual_add="float",
                        smooth_quant=None),
    "+SmoothQuant": dict(reduce_range=False),  # the defaults on a VNNI CPU
}


def build(name: str, size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if name in TIMM:
        import timm

        return timm.create_model(name, pretrained=False, img_size=size).eval()
    import torchvision

    kw = {"image_size": size} if name.startswith("vit_") else {}
    m = torchvision.models.get_model(name, weights=None, **kw).eval()
    if name.startswith("vit_"):  # torchvision zeroes the head: every output would be 0
        with torch.no_grad():
            m.heads.head.weight.normal_(0, 0.02)
    return randomize_batchnorm(m)


def images(n: int, size: int, seed: int) -> list[torch.Tensor]:
    """``n`` ImageNet-normalized smooth random images, one ``[1, 3, size, size]`` batch each."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    out = []
    for _ in range(n):
        low = torch.randn(1, 3, max(size // 8, 2), max(size // 8, 2), generator=g)
        img = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear",
                                              align_corners=False)
        img = torch.sigmoid(1.5 * img)  # [0, 1], most pixels mid-range
        out.append(((img - mean) / std).contiguous())
    return out


def _logits(run, held) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([torch.as_tensor(run(x)).reshape(1, -1).float() for x in held])


def _fig(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    from fxopt.quant.measure import sqnr_db

    return sqnr_db(ref, out), float((ref.argmax(1) == out.argmax(1)).float().mean())


def fxopt_int8(model, cal, held, cfg: dict):
    import fxopt
    from fxopt.quant.config import QuantConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = fxopt.optimize(model, cal[0], quantize=QuantConfig(holdout_fraction=0, **cfg),
                             calibration_data=cal, target="cpu", check="none")
    return _logits(opt, held)


def nncf_int8(model, cal, held, name: str):
    import nncf
    import openvino as ov

    try:
        ov_model = ov.convert_model(model, example_input=cal[0])
    except RuntimeError:  # OpenVINO's TorchScript trace refuses some models (vit_b_16): ONNX
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "f32.onnx")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (cal[0],), path, input_names=["x"],
                                  output_names=["y"], opset_version=17, dynamo=False)
            ov_model = ov.Core().read_model(path)
    kw = {"model_type": nncf.ModelType.TRANSFORMER} if name in TRANSFORMERS else {}
    q = nncf.quantize(ov_model, nncf.Dataset([x.numpy() for x in cal]), subset_size=len(cal),
                      **kw)
    compiled = ov.Core().compile_model(q, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return _logits(lambda x: compiled(x.numpy())[0], held)


def ort_int8(model, cal, held):
    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": x.numpy()} for x in cal])

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as d:
        f32, i8 = os.path.join(d, "f32.onnx"), os.path.join(d, "int8.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (cal[0],), f32, input_names=["x"], output_names=["y"],
                              opset_version=17, dynamo=False)
        quantize_static(f32, i8, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        so = ort.SessionOptions()
        so.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(i8, so, providers=["CPUExecutionProvider"])
        return _logits(lambda x: sess.run(None, {"x": x.numpy()})[0], held)


def run_model(name: str, size: int, n_cal: int, n_held: int, skip: set, notes: list) -> dict:
    model = build(name, size)
    cal, held = images(n_cal, size, 1), images(n_held, size, 2)
    ref = _logits(model, held)
    row = {}
    jobs = [(k, lambda c=c: fxopt_int8(model, cal, held, c)) for k, c in FXOPT_VARIANTS.items()]
    jobs += [("NNCF", lambda: nncf_int8(model, cal, held, name)),
             ("ORT", lambda: ort_int8(model, cal, held))]
    for col, job in jobs:
        if col in skip:
            continue
        t0 = time.perf_counter()
        try:
            with _quiet_stdout():
                out = job()
            row[col] = _fig(ref, out)
        except Exception as e:  # noqa: BLE001 - one failed cell must not lose the table
            notes.append(f"{name} / {col}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            traceback.print_exc(file=sys.stderr)
        print(f"{name:22s} {col:12s} {row.get(col, ('-', '-'))} "
              f"{time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    return row


class _quiet_stdout:
    """NNCF and ORT print progress bars and logs; keep them out of the table."""

    def __enter__(self):
        self.saved = sys.stdout
        sys.stdout = io.StringIO()

    def __exit__(self, *exc):
        sys.stdout = self.saved


def table(rows: dict, cols: list) -> str:
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in rows.items():
        cells = []
        for c in cols:
            if c in row:
                s, t = row[c]
                cells.append(f"{s:.1f} ({t:.2f})")
            else:
                cells.append("-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--timm", action="store_true", help="add timm vit_tiny and deit_tiny")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--calibration", type=int, default=16)
    p.add_argument("--held-out", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", nargs="*", default=[], help="columns to leave out, e.g. ORT")
    p.add_argument("--out", default=None, help="output file ('-': print only)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    models = list(a.models) + (TIMM if a.timm else [])
    notes: list[str] = []
    rows = {m: run_model(m, a.size, a.calibration, a.held_out, set(a.skip), notes)
            for m in models}
    cols = [c for c in [*FXOPT_VARIANTS, "NNCF", "ORT"] if c not in a.skip]
    from fxopt.quant.isa import int8_dot_product_isa

    import nncf
    import onnxruntime
    import openvino

    text = header("Int8 accuracy: fxopt vs NNCF vs ONNX Runtime (SQNR dB, top-1 agreement)")
    text += (f"- versions: openvino {openvino.__version__}, nncf {nncf.__version__}, "
             f"onnxruntime {onnxruntime.__version__}\n"
             f"- CPU int8 dot product: {int8_dot_product_isa()} (reduce_range='auto' -> "
             f"{'8' if int8_dot_product_isa() else '7'}-bit)\n"
             f"- {a.calibration} calibration images, {a.held_out} held-out images, "
             f"{a.size}x{a.size}, smooth random ImageNet-normalized images; random weights\n\n")
    text += "Each cell: SQNR of the int8 logits against float, in dB (top-1 agreement with " \
            "float on the held-out images). The fxopt columns add one change each, left to " \
            "right; the last is the new default.\n\n"
    text += table(rows, cols) + "\n"
    if notes:
        text += "\nNotes:\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    write_result(text, a.out, "int8-accuracy")
    return text


if __name__ == "__main__":
    main()
