"""How far ONNX Runtime and OpenVINO run fxopt's int8 QDQ file from fxopt's own int8 graph.

torchvision resnet18 (seed 0, no weights, 10 classes, 32x32), ``quantize="int8"`` (bias
correction on) with the default activation grids (full 8-bit on a VNNI/AMX CPU) and with
``reduce_range=True`` (7-bit), calibrated on 3 batches of 4; the int8 IR
(``disable=["lower_int8_cpu"]``) exported with ``fxopt.export_onnx`` and run on 8 batches of 8
by ONNX Runtime (CPUExecutionProvider, 1 thread) and OpenVINO (CPU, f32 inference
precision). Per batch: the largest difference from the graph's output in output int8 steps
(``export_onnx(...).output_step``), and OpenVINO's relative error against the float model
over fxopt's (what ``INT8_ACCURACY_SLACK`` bounds). Run: ``python bench/qdq_engine_steps.py``.
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
import torchvision

import fxopt
from fxopt.export.onnx import export_onnx
from fxopt.ir.tolerances import rel_err


def main() -> None:
    import onnxruntime as ort
    import openvino as ov

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    g = torch.Generator().manual_seed(1)
    cal = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(3)]
    for name, cfg in (("default grids", fxopt.QuantConfig()),
                      ("reduce_range=True", fxopt.QuantConfig(reduce_range=True))):
        opt = fxopt.optimize(model, cal[0][:2], quantize=cfg, calibration_data=cal,
                             disable=["lower_int8_cpu"])
        with tempfile.TemporaryDirectory() as folder:
            path = str(Path(folder) / "resnet18_int8.onnx")
            step = export_onnx(opt, cal[0][:2], path, check=False).output_step
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            core = ov.Core()
            compiled = core.compile_model(core.read_model(path), "CPU",
                                          {"INFERENCE_PRECISION_HINT": "f32"})
            rows = []
            for seed in range(5, 13):
                x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
                with torch.no_grad():
                    ref, exact = opt(x.clone()), model(x.clone())
                got_ort = torch.from_numpy(session.run(None, {session.get_inputs()[0].name:
                                                              x.numpy()})[0])
                got_ov = torch.from_numpy(compiled(x.numpy())[compiled.outputs[0]])
                rows.append((float((got_ort - ref).abs().max()) / step,
                             float((got_ov - ref).abs().max()) / step,
                             float(rel_err(got_ov, exact) / rel_err(ref, exact))))
        print(f"{name}: ORT steps {[round(r[0], 2) for r in rows]}; OpenVINO steps "
              f"{[round(r[1], 2) for r in rows]}; OpenVINO rel. error / fxopt's "
              f"{[round(r[2], 3) for r in rows]}")


if __name__ == "__main__":
    main()
