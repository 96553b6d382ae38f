"""Int8 linear layers on few rows: oneDNN's kernel against PyTorch's fbgemm and x86 kernels.

The CPU lowering's ``cpu_engine="auto"`` ran every linear layer above ``SMALL_MACS`` on oneDNN's
``qlinear_pointwise``. On a CPU without VNNI oneDNN's int8 matrix-vector products are slow, so
``auto`` now runs a linear layer on at most ``LINEAR_FBGEMM_ROWS`` rows (batch times tokens) on
fbgemm there (``passes/lower/cpu.py``). This benchmark measures:

Part 1, layers: fxopt's bound int8 linear call (codes in, codes out, ``fxopt.ops.cpu``) on each
engine, for classifier shapes at 1 and 8 rows and transformer shapes at 64 and 197, random int8
weights; the variants interleaved round by round, medians.

Part 2, models: alexnet and vgg11 (classifiers 9216x4096 / 25088x4096, 4096x4096, 4096x1000) at
batch 1, 224x224, random weights, int8 with ``cpu_engine="auto"`` as it lowers now and as it
lowered before (``LINEAR_FBGEMM_ROWS = 0``), against torch.ao FX int8 (x86); each timed call
after a 20 ms pause and one untimed call, the variants in a new order each round; medians.

    python bench/int8_linear_rows.py              # bench/results/int8-linear-rows-<date>.md
    python bench/int8_linear_rows.py --parts 1 --out -
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header, write_result  # noqa: E402
from _int8_baselines import ao_fx_int8, quiet_quant_warnings  # noqa: E402
from _timing import turns  # noqa: E402

import fxopt  # noqa: E402
from fxopt.ops.cpu import _linear_call  # noqa: E402

__all__ = ["main"]

SHAPES = ((1, 1280, 1000), (1, 4096, 4096), (1, 25088, 4096), (8, 1280, 1000),
          (8, 4096, 4096), (16, 768, 768), (64, 512, 512), (197, 768, 768), (197, 768, 3072))
MODELS = ("alexnet", "vgg11")


def _interleaved(fns: dict, seconds: float) -> tuple[dict, int]:
    """Median ms per call of each variant, and the rounds (no pause between calls)."""
    times = turns(fns, seconds, pause=0.0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}, len(times[next(iter(fns))])


def layers(seconds: float) -> list[str]:
    rows = ["## Part 1: one int8 linear call", "",
            "| rows x in x out | onednn ms | fbgemm ms | x86 ms | fbgemm / onednn | rounds |",
            "|---|---|---|---|---|---|"]
    g = torch.Generator().manual_seed(0)
    for m, k, n in SHAPES:
        w_q = torch.randint(-60, 61, (n, k), dtype=torch.int8, generator=g)
        w_scale = torch.rand(n, generator=g) * 0.01 + 0.001
        bias = torch.randn(n, generator=g)
        q = torch.randint(0, 128, (m, k), dtype=torch.uint8, generator=g)
        calls = {e: _linear_call(q, w_q, w_scale, bias, 0.05, 3, 0.1, 5, act="relu", engine=e)
                 for e in ("onednn", "fbgemm", "x86")}
        ms, n_rounds = _interleaved({e: (lambda c=c: c(q)) for e, c in calls.items()}, seconds)
        rows.append(f"| {m} x {k} x {n} | {ms['onednn']:.3f} | {ms['fbgemm']:.3f} | "
                    f"{ms['x86']:.3f} | {ms['fbgemm'] / ms['onednn']:.2f} | {n_rounds} |")
    return rows + [""]


def _lowered(model, x, calib, rows: int):
    lower = __import__("fxopt.passes.lower.cpu", fromlist=["cpu"])
    before, lower.LINEAR_FBGEMM_ROWS = lower.LINEAR_FBGEMM_ROWS, rows
    try:
        opt = fxopt.optimize(model, x, target="cpu", quantize="int8", calibration_data=calib,
                             check="end")
    finally:
        lower.LINEAR_FBGEMM_ROWS = before
    return opt, opt.report.record("lower_int8_cpu").stats.get("engine", "")


def models(names, seconds: float) -> list[str]:
    from _random_weights import randomize_batchnorm
    lower = __import__("fxopt.passes.lower.cpu", fromlist=["cpu"])
    rows = ["## Part 2: whole models, batch 1", "",
            "| model | variant | ms | layers per engine | now faster in |", "|---|---|---|---|---|"]
    for name in names:
        torch.manual_seed(0)
        model = randomize_batchnorm(getattr(torchvision.models, name)().eval())
        x = torch.randn(1, 3, 224, 224)
        calib = [torch.randn(1, 3, 224, 224) for _ in range(8)]
        now, now_engines = _lowered(model, x, calib, lower.LINEAR_FBGEMM_ROWS)
        before, before_engines = _lowered(model, x, calib, 0)
        variants = {"fxopt auto (now)": now, "fxopt auto (before)": before,
                    "torch.ao": ao_fx_int8(model, x, calib)[0]}
        with torch.no_grad():
            for fn in variants.values():
                fn(x), fn(x)
            samples = turns({k: (lambda fn=fn: fn(x)) for k, fn in variants.items()}, seconds)
        mine = samples["fxopt auto (now)"]
        engines = {"fxopt auto (now)": now_engines, "fxopt auto (before)": before_engines}
        for key, t in samples.items():
            wins = "" if key == "fxopt auto (now)" else \
                f"{sum(a < b for a, b in zip(mine, t))} of {len(mine)}"
            rows.append(f"| {name} | {key} | {statistics.median(t) * 1e3:.2f} | "
                        f"{engines.get(key, '')} | {wins} |")
    return rows + ["", f"load average after: {os.getloadavg()[0]:.2f}", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--seconds", type=float, default=5.0, help="timing per layer shape")
    parser.add_argument("--model-seconds", type=float, default=40.0, help="timing per model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="markdown path; '-' prints only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_quant_warnings()
    from fxopt.ops.isa import int8_dot_product_isa
    lines = [header("Int8 linear layers on few rows: oneDNN against fbgemm and x86"),
             f"- threads: {args.threads}; load average before: {os.getloadavg()[0]:.2f}",
             f"- int8 dot product: {int8_dot_product_isa() or 'none (no VNNI, no AMX)'} "
             "(fxopt.ops.isa)", "", __doc__.split("\n\n")[1].replace("\n", " "), ""]
    if 1 in args.parts:
        lines += layers(args.seconds)
    if 2 in args.parts:
        lines += models(args.models, args.model_seconds)
    write_result("\n".join(lines), args.out, "int8-linear-rows")


if __name__ == "__main__":
    main()
