"""Which int8 grids lose a bit (``QuantConfig.reduce_range``): accuracy and latency of fxopt's
``target="cpu"`` int8 on this CPU with 7-bit activation grids (``"activations"``, torch.ao's
x86 default), 7-bit weight grids (``"weights"``, the default on a CPU without VNNI/AMX) and
neither (``False``: on such a CPU the layers whose weights leave [-64, 64] run their kernel
only on inputs whose codes are at most 127, their exact reference on the rest).

Per torchvision model (random weights, BatchNorm statistics randomised, as
``bench/cpu_deploy.py`` builds them), calibrated on the same 16 random images: SQNR (dB)
against the float model on 8 held-out images, and latency at batch 1 (the variants interleaved
round by round in one process, medians: ``bench/_timing.py``), with the load average.

    python bench/int8_grids.py --rounds 20 --threads 2
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header, write_result  # noqa: E402
from _int8_baselines import quiet_quant_warnings  # noqa: E402
from _timing import calls_per_round, median_times  # noqa: E402
from cpu_deploy import _model  # noqa: E402

__all__ = ["main", "MODELS", "GRIDS"]

MODELS = ["resnet18", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0",
          "regnet_x_400mf"]
GRIDS = {"activations 7-bit": "activations", "weights 7-bit": "weights", "8-bit": False}


def _data(calib: int, held: int):
    g = torch.Generator().manual_seed(1)
    cal = [torch.randn(1, 3, 224, 224, generator=g) for _ in range(calib)]
    return cal, torch.randn(held, 3, 224, 224, generator=g)


def bench_model(name: str, rounds: int, calib: int) -> dict:
    import fxopt
    from fxopt.quant.measure import sqnr_db

    model, _ = _model(name)
    cal, held = _data(calib, 8)
    with torch.inference_mode():
        ref = torch.cat([model(h[None]) for h in held])
    mods, row = {}, {}
    for label, rr in GRIDS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = fxopt.optimize(model, cal[0], target="cpu", calibration_data=cal,
                                 quantize={"reduce_range": rr}, check="end")
        with torch.inference_mode():
            out = torch.cat([opt(h[None]) for h in held])
        mods[label] = opt
        row[label] = {"sqnr": sqnr_db(ref, out)}
    if rounds:
        x = cal[0]
        calls = min(calls_per_round(f, x, 0.05) for f in mods.values())
        with torch.inference_mode():
            times = median_times(mods, x, rounds, calls)
        for label, t in times.items():
            row[label]["ms"] = t * 1e3
    return row


def markdown(results: dict, load: tuple, args) -> str:
    from fxopt.ops.isa import int8_dot_product_isa, int8_pairs_saturate

    text = header("int8 grids on this CPU: 7-bit activations, 7-bit weights or 8-bit "
                  "(fxopt target='cpu')")
    text += (f"- int8 dot products: {int8_dot_product_isa() or 'none (no AVX-512 VNNI, no AMX)'}; "
             f"u8 x s8 pairs summed in int16: {int8_pairs_saturate()}\n"
             f"- threads: {args.threads}; load average before: {load[0]}, after: {load[1]}\n\n")
    cols = list(GRIDS)
    text += "| model | " + " | ".join(f"{c} SQNR dB" for c in cols) + " | " + \
        " | ".join(f"{c} ms" for c in cols) + " |\n"
    text += "|---" * (1 + 2 * len(cols)) + "|\n"
    for name, row in results.items():
        text += f"| {name} | " + " | ".join(f"{row[c]['sqnr']:.2f}" for c in cols) + " | " + \
            " | ".join(f"{row[c]['ms']:.2f}" if "ms" in row[c] else "-" for c in cols) + " |\n"
    return text


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--rounds", type=int, default=20, help="timed rounds (0: SQNR only)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib", type=int, default=16)
    p.add_argument("--out", default=None, help="markdown file; '-': print only")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_quant_warnings()
    before = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    results = {}
    for name in args.models:
        results[name] = bench_model(name, args.rounds, args.calib)
        print(name, results[name], flush=True)
    after = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    text = markdown(results, (before, after), args)
    write_result(text, args.out, "int8-grids")
    return text


if __name__ == "__main__":
    main()
