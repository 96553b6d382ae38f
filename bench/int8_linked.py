"""Linked int8 layers: a bound quantized kernel handing its quint8 output to the next layer.

fxopt's CPU int8 module passes plain uint8 codes between its ops; a layer on PyTorch's quantized
engines (``cpu_engine="x86"`` / ``"fbgemm"``, and ``"auto"``'s small layers) makes a quint8 view
of its input codes and a uint8 view of its output for every call. In the direct twin
(``fxopt.infra.direct``) a bound layer whose every user takes a quint8 tensor (the next bound
layer, the int8 add, a concat, a pool, an int8 batch norm) passes the quantized output itself
(``BoundCall.q_out``; a oneDNN layer, whose kernel returns codes, views them once where every
user would: ``BoundCall.view_out``), and an int8 add, mul, concat, pool or batch norm whose
every user does passes its quint8 result. This benchmark measures, per model and
``cpu_engine``, the same optimized module with its twin linked (as fxopt runs it) and
unlinked (every ``q_out``, ``view_out`` and ``quantized_out`` turned off; the ops then view
the codes as before the links), against torch.ao FX int8 (x86):
batch 1, 224x224, random weights (BatchNorm statistics randomized), the variants interleaved
round by round in a new order each round, each timed call after a 20 ms pause and one untimed
call; medians, and in how many rounds the linked module beat each other variant.

    python bench/int8_linked.py                      # bench/results/int8-linked-<date>.md
    python bench/int8_linked.py --models regnet_x_400mf --engines x86 --seconds 20 --out -
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
from _random_weights import randomize_batchnorm  # noqa: E402
from _timing import turns  # noqa: E402

import fxopt  # noqa: E402
from fxopt import QuantConfig  # noqa: E402
from fxopt.infra.direct import BoundCall  # noqa: E402

MODELS = ("regnet_x_400mf", "resnet18", "mobilenet_v2")


def _unlinked(opt, x):
    """A copy of ``opt`` whose twin passes codes between every pair of layers."""
    import copy
    twin_of = copy.deepcopy(opt)
    with torch.no_grad():
        twin_of(x), twin_of(x)
    twin = twin_of.direct._direct
    for node in twin.graph.nodes:
        if isinstance(node.target, BoundCall):
            node.target.q_out = node.target.view_out = False
        elif node.kwargs.get("quantized_out"):
            node.kwargs = {**node.kwargs, "quantized_out": False}
    twin.recompile()
    return twin_of


def _linked_count(opt) -> tuple[int, int]:
    """(linked, of): the bound layers passing a quint8 output and the adds, muls, concats,
    pools and batch norms passing a quint8 result, of all of them."""
    linked = total = 0
    for node in opt.direct._direct.graph.nodes:
        if isinstance(node.target, BoundCall):
            total += 1
            linked += node.target.q_out and (
                getattr(node.target.call, "quantized", None) is not None or node.target.view_out)
        elif getattr(node.target, "quantized_output", False):
            total += 1
            linked += bool(node.kwargs.get("quantized_out"))
    return linked, total


def run_model(name: str, engines: list[str], seconds: float) -> list[str]:
    torch.manual_seed(0)
    model = randomize_batchnorm(getattr(torchvision.models, name)().eval())
    x = torch.randn(1, 3, 224, 224)
    calib = [torch.randn(1, 3, 224, 224) for _ in range(16)]
    variants = {"torch.ao": ao_fx_int8(model, x, calib)[0]}
    linked, choices = {}, []
    for engine in engines:
        opt = fxopt.optimize(model, x, target="cpu", quantize=QuantConfig(cpu_engine=engine),
                             calibration_data=calib, check="end")
        with torch.no_grad():
            opt(x), opt(x)
        linked[engine] = _linked_count(opt)
        choices.append(f"{engine}: " + (opt.report.record("lower_int8_cpu").stats.get(
            "engine_choice") or opt.report.record("lower_int8_cpu").stats.get("engine", "")))
        variants[f"{engine} linked"] = opt
        variants[f"{engine} unlinked"] = _unlinked(opt, x)
    with torch.no_grad():
        for fn in variants.values():
            fn(x), fn(x), fn(x)
        times = turns({k: (lambda fn=fn: fn(x)) for k, fn in variants.items()}, seconds)
    rows = [f"## {name}", "",
            f"rounds: {len(times['torch.ao'])}; load average after: {os.getloadavg()[0]:.2f}", "",
            "lowering: " + "; ".join(choices), "",
            "| variant | ms | linked ops | linked faster in |", "|---|---|---|---|"]
    for key, t in times.items():
        engine = key.split()[0]
        count = f"{linked[engine][0]} of {linked[engine][1]}" if key.endswith(" linked") else ""
        wins = ""
        if key.endswith(" linked"):
            mine = times[key]
            wins = "; ".join(
                f"{sum(a < b for a, b in zip(mine, times[other]))} of {len(mine)} rounds "
                f"against {other}" for other in (f"{engine} unlinked", "torch.ao"))
        rows.append(f"| {key} | {statistics.median(t) * 1e3:.2f} | {count} | {wins} |")
    return rows + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--engines", nargs="+", default=["x86", "auto"])
    parser.add_argument("--seconds", type=float, default=40.0, help="timing per model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="markdown path; '-' prints only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_quant_warnings()
    from fxopt.ops.isa import cpu_flags, int8_dot_product_isa
    simd = "avx512" if "avx512f" in cpu_flags() else "avx2" if "avx2" in cpu_flags() else "other"
    lines = [header("Linked int8 layers: quint8 outputs passed between bound layers"),
             f"- threads: {args.threads}; load average before: {os.getloadavg()[0]:.2f}",
             f"- SIMD: {simd}; int8 dot product: "
             f"{int8_dot_product_isa() or 'none (no VNNI, no AMX)'} (fxopt.ops.isa)", "",
             __doc__.split("\n\n")[1].replace("\n", " "), ""]
    for name in args.models:
        lines += run_model(name, args.engines, args.seconds)
    write_result("\n".join(lines), args.out, "int8-linked")


if __name__ == "__main__":
    main()
