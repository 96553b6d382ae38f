"""vit_b_16's int8 accuracy at 224 x 224 under QuantConfig variants (issue 13: "vit at least
30 dB where the CNNs are").

The model, calibration and held-out images of ``bench/cpu_deploy.py`` (torchvision vit_b_16,
random seeded weights, the zero-initialized head redrawn; 16 calibration images of batch 1, 8
held-out ones): ``fxopt.optimize(model, x, target="cpu", check="end", quantize=QuantConfig(...))``
per variant, SQNR of the int8 logits against the float model's on the held-out images, and the
layers the int8 pass kept in float. Accuracy only (no timings); 2 threads.

    python bench/vit_int8_configs.py                    # every variant (~15 min here)
    python bench/vit_int8_configs.py default min30 --out -
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

import fxopt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header, write_result  # noqa: E402
from cpu_deploy import _model, _sqnr  # noqa: E402

BLOCKS = [f"encoder.layers.encoder_layer_{i}" for i in range(12)]
VARIANTS = {
    "default": ({}, "QuantConfig() (MSE observer, SmoothQuant 0.5, bias correction, float "
                    "residual adds, grids by the CPU, min_sqnr_db='auto': 30 dB within a quarter "
                    "of the MACs float)"),
    "all int8": ({"min_sqnr_db": None}, "the defaults, every layer int8 (no accuracy target)"),
    "float fc2": ({"keep_float": [b + ".mlp.3" for b in BLOCKS]}, "every MLP fc2 kept float"),
    "float fc1": ({"keep_float": [b + ".mlp.0" for b in BLOCKS]}, "every MLP fc1 kept float"),
    "float attention": ({"keep_float": [b + ".self_attention" for b in BLOCKS]},
                        "every attention's in_proj and out_proj kept float"),
    "minmax": ({"activation_observer": "minmax"}, "min/max activation ranges"),
    "percentile": ({"activation_observer": "percentile"}, "percentile activation ranges"),
    "kl": ({"activation_observer": "kl"}, "entropy (KL) activation ranges"),
    "symmetric": ({"activation_symmetric": True}, "zero point 0 everywhere"),
    "no smoothquant": ({"smooth_quant": None}, "SmoothQuant off"),
    "min30": ({"min_sqnr_db": 30}, "the sensitivity fallback: layers kept float until 30 dB"),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    model, _ = _model("vit_b_16")
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(1, 3, 224, 224, generator=gen) for _ in range(16)]
    held = torch.randn(8, 3, 224, 224, generator=gen)
    with torch.inference_mode():
        ref = torch.cat([model(c) for c in held.split(1)])
    rows = ["| variant | what | SQNR dB | int8 layers | kept float | build s |",
            "|---|---|---|---|---|---|"]
    for name in args.variants:
        options, what = VARIANTS[name]
        t0 = time.perf_counter()
        opt = fxopt.optimize(model, calib[0], target="cpu", check="end",
                             quantize=fxopt.QuantConfig(**options), calibration_data=calib)
        with torch.inference_mode():
            out = torch.cat([opt(c) for c in held.split(1)])
        rec = opt.report.record("quantize_int8")
        floats = [n.split(": ", 1)[1] for n in rec.notes if n.startswith("kept in float: ")]
        row = (f"| {name} | {what} | {_sqnr(ref, out):.2f} | {rec.stats.get('linear', 0)} | "
               f"{floats[0] if floats else '-'} | {time.perf_counter() - t0:.0f} |")
        rows.append(row)
        print(row, flush=True)
    text = header("vit_b_16 int8 SQNR at 224x224 by QuantConfig") + "\n".join(rows) + "\n"
    write_result(text, args.out, "vit-int8-configs")


if __name__ == "__main__":
    main()
