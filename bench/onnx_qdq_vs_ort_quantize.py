"""ONNX Runtime on fxopt's QDQ export against ORT's own ``quantize_static`` of the same model.

For each model (torchvision, random weights with BatchNorm statistics randomized and all-zero
weights redrawn (ViT's head), as ``bench/cpu_deploy.py`` does, 224x224, batch 1): the float
model is optimized by
``fxopt.optimize(model, x, quantize="int8", calibration_data=batches, target=T)`` (``--target``,
default ``"onnxruntime"``: the int8 plan for ONNX Runtime, whose QLinear kernels fuse no
activation but ReLU/Clip, so a conv's output gets a grid of its own before a Hardswish or SiLU;
``"cpu"``: the plan for fxopt's own oneDNN kernels) and written by ``fxopt.export_onnx`` (QDQ,
dynamic batch); the same float model is exported by
``torch.onnx.export``, pre-processed (``quant_pre_process``) and quantized by
``onnxruntime.quantization.quantize_static`` (QDQ, per-channel int8 weights, uint8 activations,
MinMax) on the same calibration batches. Both files run in ONNX Runtime, 1 intra-op thread,
interleaved round by round, each timed call right after an untimed one of the same file
(medians), with SQNR of each against the float model on a batch
neither calibrated on.

    python bench/onnx_qdq_vs_ort_quantize.py   # bench/results/onnx-qdq-vs-ort-quantize-<date>.md
    python bench/onnx_qdq_vs_ort_quantize.py --models resnet18 --rounds 10 --out -
    python bench/onnx_qdq_vs_ort_quantize.py --target cpu   # the file of fxopt's CPU plan
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header, write_result  # noqa: E402
from _random_weights import randomize_batchnorm, redraw_zero_weights  # noqa: E402

import fxopt  # noqa: E402
from fxopt.export.onnx import export_onnx  # noqa: E402

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0",
          "regnet_x_400mf", "convnext_tiny", "vit_b_16"]


def _sqnr(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return 10 * math.log10((ref ** 2).sum() / max(((out - ref) ** 2).sum(), 1e-30))


def _session(path, ort):
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _ort_graph(path, ort) -> dict:
    """Op counts of the graph ONNX Runtime runs after its optimizations (QDQ fusion): what
    decides the speed, independent of the machine's load."""
    import onnx

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(path.with_name(path.stem + ".ort-optimized.onnx"))
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return dict(sorted(Counter(n.op_type for n in onnx.load(so.optimized_model_filepath)
                               .graph.node).items()))


def _ort_quantize(model, x, batches, folder, ort):
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    float_path, pre, out = folder / "float.onnx", folder / "pre.onnx", folder / "ort_int8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, x, str(float_path), input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}},
                          opset_version=17, dynamo=False)
    try:
        quant_pre_process(str(float_path), str(pre))
    except Exception:  # noqa: BLE001 - ORT's shape inference fails on ViT: quantize as it is
        pre = float_path

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": b.numpy()} for b in batches])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    return out


def run(models, rounds, size, target="onnxruntime"):
    import onnxruntime as ort

    torch.set_num_threads(1)
    rows = []
    for name in models:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval()
        randomize_batchnorm(model, affine=False)  # trained-like statistics
        redraw_zero_weights(model)  # ViT's zero head: constant outputs, no SQNR
        g = torch.Generator().manual_seed(1)
        batches = [torch.randn(2, 3, size, size, generator=g) for _ in range(4)]
        held = torch.randn(4, 3, size, size, generator=g)
        x1 = held[:1]
        with tempfile.TemporaryDirectory() as d:
            folder = Path(d)
            opt = fxopt.optimize(model, batches[0], quantize="int8", calibration_data=batches,
                                 target=target)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export_onnx(opt, batches[0], folder / "fxopt_int8.onnx")
            ort_path = _ort_quantize(model, batches[0], batches, folder, ort)
            files = {"fxopt QDQ": folder / "fxopt_int8.onnx", "ORT quantize_static": ort_path}
            graphs = {k: _ort_graph(f, ort) for k, f in files.items()}
            sessions = {k: _session(f, ort) for k, f in files.items()}
            with torch.no_grad():
                ref = model(held).numpy()
            sqnr = {k: _sqnr(s.run(None, {s.get_inputs()[0].name: held.numpy()})[0], ref)
                    for k, s in sessions.items()}
            feeds = {k: {s.get_inputs()[0].name: x1.numpy()} for k, s in sessions.items()}
            times = {k: [] for k in sessions}
            for i in range(rounds + 3):
                for k, s in sessions.items():
                    s.run(None, feeds[k])  # back to back: the timed call is not a first call
                    t = time.perf_counter()
                    s.run(None, feeds[k])
                    if i >= 3:
                        times[k].append((time.perf_counter() - t) * 1e3)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append((name, med, sqnr, graphs))
            print(name, med, sqnr, flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--target", default="onnxruntime", choices=["onnxruntime", "cpu"],
                   help="the fxopt target whose int8 plan is exported (default onnxruntime)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--out", default=None, help="output file ('-': print only)")
    a = p.parse_args(argv)
    import onnxruntime as ort

    load = os.getloadavg()
    rows = run(a.models, a.rounds, a.size, a.target)
    load_after = os.getloadavg()
    flags = subprocess.run(["grep", "-m1", "-o", "-w", "-e", "avx512_vnni", "-e", "avx512_bf16",
                            "/proc/cpuinfo"], capture_output=True, text=True).stdout.split()
    text = header("ONNX Runtime: fxopt's QDQ export vs ORT's quantize_static (1 thread, bs 1)")
    text += (f"- onnxruntime: {ort.__version__}; fxopt QDQ from `fxopt.export_onnx` (opset 17) "
             f"of `fxopt.optimize(..., target='{a.target}')`\n"
             f"- command: `python bench/onnx_qdq_vs_ort_quantize.py {' '.join(sys.argv[1:])}`\n"
             f"- CPU flags seen: "
             f"{', '.join(sorted(set(flags))) or 'neither avx512_vnni nor avx512_bf16'}\n"
             f"- load average before / after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} / "
             f"{load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}\n"
             f"- input {a.size}x{a.size}, random weights, 4 calibration batches of 2 (random), "
             f"SQNR on 4 held-out random images against the float model; "
             f"{a.rounds} interleaved rounds, medians\n\n")
    text += ("| model | fxopt QDQ (ms) | ORT quantize_static (ms) | fxopt / ORT | "
             "SQNR fxopt / ORT (dB) |\n|---|---|---|---|---|\n")
    for name, med, sqnr, _ in rows:
        f, o = med["fxopt QDQ"], med["ORT quantize_static"]
        text += (f"| {name} | {f:.2f} | {o:.2f} | {f / o:.2f} | "
                 f"{sqnr['fxopt QDQ']:.1f} / {sqnr['ORT quantize_static']:.1f} |\n")
    text += ("\nThe graphs ONNX Runtime runs after its QDQ fusion "
             "(`SessionOptions.optimized_model_filepath`, op counts):\n\n")
    for name, _, _, graphs in rows:
        same = graphs["fxopt QDQ"] == graphs["ORT quantize_static"]
        text += f"- {name}: {'the same for both files' if same else 'they differ'}: "
        text += "; ".join(f"{k} {v}" for k, v in graphs.items()) if not same else \
            str(graphs["fxopt QDQ"])
        text += "\n"
    write_result(text, a.out, "onnx-qdq-vs-ort-quantize")


if __name__ == "__main__":
    main()
