"""Int8 coverage of every torchvision classification model, and fxopt int8 against torch.ao FX.

Two tables (issue 13 item 1), in one markdown file:

1. *Coverage* (``--coverage``): every model of ``torchvision.models.list_models(module=
   torchvision.models)`` (random weights, BatchNorm statistics randomised as the tests do) through
   ``fxopt.optimize(..., quantize="int8", target="cpu")`` on a small input (64x64; ViTs built
   for it with ``image_size=``; MaxViT at 224, the smallest its windows take), calibrated on
   ``--calib`` batches. Per model: the conv/linear modules, how many became int8
   (``quantize_int8``'s ``conv2d`` + ``linear`` counters), the report's ``no_cpu_kernel`` and the
   reason per float layer (``kind+activation`` for a layer kept for want of a kernel; layers
   fxopt does not find, such as the projections inside a leaf ``nn.MultiheadAttention``, are
   the difference), and how many int8 ops the CPU lowering ran as its slow reference.
   Each model's row is appended to a JSON-lines file as it finishes (``--jsonl``), so an
   interrupted run keeps what it measured and ``--resume`` goes on from there.
2. *Speed* (``--speed``): fxopt int8 against torch.ao FX int8 (``prepare_fx`` /
   ``convert_fx`` with ``get_default_qconfig_mapping("x86")``) on ``SPEED_MODELS`` at batch 1,
   one thread, the two variants interleaved round by round in one process (medians;
   ``bench/_timing.py``), at 224x224.

    python bench/int8_coverage.py                         # both tables, every model
    python bench/int8_coverage.py --speed --rounds 15     # the speed table only
    python bench/int8_coverage.py --coverage --models resnet18 efficientnet_b0 --out -
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header, write_result  # noqa: E402
from _int8_baselines import ao_fx_int8, quiet_quant_warnings  # noqa: E402
from _random_weights import randomize_batchnorm  # noqa: E402
from _timing import calls_per_round, median_times  # noqa: E402

__all__ = ["main", "SPEED_MODELS"]

SPEED_MODELS = ["shufflenet_v2_x1_0", "densenet121", "mobilenet_v3_large", "efficientnet_b0",
                "convnext_tiny", "vit_b_16"]


def _size(name: str) -> int:
    if name.startswith("maxvit"):
        return 224
    if name == "inception_v3":
        return 96  # its stem needs at least 75
    if name == "vit_h_14":
        return 56  # a multiple of its 14-pixel patches
    return 64


def model_of(name: str, size: int | None = None) -> nn.Module:
    """torchvision's ``name`` with random weights and randomised BatchNorm statistics."""
    import torchvision

    torch.manual_seed(0)
    kw = {}
    if name.startswith("vit_"):
        kw["image_size"] = size or _size(name)
    if name in ("googlenet", "inception_v3"):
        kw["aux_logits"] = False
        kw["init_weights"] = False
    m = torchvision.models.get_model(name, weights=None, **kw).eval()
    return randomize_batchnorm(m)


def _layer_count(m: nn.Module) -> tuple[int, int]:
    """Conv2d and Linear modules (an ``nn.MultiheadAttention``'s input projection, a weight of
    its own, counts as one Linear; its ``out_proj`` is a Linear module), and how many of them
    read only constants: Swin V2's continuous position bias MLP (``cpb_mlp``) runs on a
    constant table, so fxopt's constant folding computes it once at compile time."""
    n = sum(isinstance(x, (nn.Conv2d, nn.Linear)) for x in m.modules()) + \
        sum(isinstance(x, nn.MultiheadAttention) for x in m.modules())
    const = sum(isinstance(x, nn.Linear) and ".cpb_mlp." in f".{p}." for p, x in m.named_modules())
    return n, const


_NO_KERNEL = re.compile(r"\(((?:conv2d|linear)\+[a-z0-9_]+(?:\+add)?)\)")


def coverage_row(name: str, calib: int) -> dict:
    import fxopt

    size = _size(name)
    m = model_of(name, size)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, size, size, generator=g)
    cal = [torch.randn(2, 3, size, size, generator=g) for _ in range(calib)]
    layers, const = _layer_count(m)
    row = {"model": name, "input": size, "layers": layers, "constant": const,
           "params_m": round(sum(p.numel() for p in m.parameters()) / 1e6, 1)}
    t0 = time.perf_counter()
    try:
        opt = fxopt.optimize(m, x, quantize="int8", calibration_data=cal, target="cpu",
                             check="none")
    except Exception as e:  # noqa: BLE001 - a row says why and the sweep goes on
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return row
    row["seconds"] = round(time.perf_counter() - t0, 1)
    q = opt.report.record("quantize_int8")
    low = opt.report.record("lower_int8_cpu")
    st = q.stats if q is not None else {}
    row["int8"] = st.get("conv2d", 0) + st.get("linear", 0)
    row["no_cpu_kernel"] = st.get("no_cpu_kernel", 0)
    row["kept_float"] = st.get("kept_float", 0)
    reasons = Counter()
    for note in (q.notes if q is not None else []):
        if note.startswith("no PyTorch int8 CPU kernel"):
            reasons.update(_NO_KERNEL.findall(note))
    row["reasons"] = dict(reasons)
    row["not_found"] = row["layers"] - row["int8"] - row["kept_float"] - const
    row["sqnr_db"] = st.get("sqnr_db")
    row["lowering_reference"] = (low.stats.get("fallback", 0) if low is not None else None)
    return row


def _fmt_reasons(r: dict) -> str:
    parts = [f"{k} x{v}" for k, v in sorted(r.get("reasons", {}).items(), key=lambda t: -t[1])]
    if r.get("not_found", 0) > 0:
        parts.append(f"not found as a layer x{r['not_found']}")
    if r.get("constant", 0) > 0:
        parts.append(f"constant-folded x{r['constant']}")
    return ", ".join(parts) or "-"


def coverage_table(rows: list[dict]) -> str:
    lines = ["| model | input | conv/linear | int8 | no_cpu_kernel | float layers: why | "
             "lowering ref. ops | SQNR dB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['input']} | {r['layers']} | - | - | "
                         f"error: {r['error']} | - | - |")
            continue
        sq = "-" if r.get("sqnr_db") is None else f"{r['sqnr_db']:.1f}"
        lines.append(f"| {r['model']} | {r['input']} | {r['layers']} | {r['int8']} | "
                     f"{r['no_cpu_kernel']} | {_fmt_reasons(r)} | {r['lowering_reference']} | "
                     f"{sq} |")
    done = [r for r in rows if "error" not in r]
    tot = sum(r["no_cpu_kernel"] for r in done)
    with_nk = sum(r["no_cpu_kernel"] > 0 for r in done)
    lines.append("")
    lines.append(f"{len(done)} models run ({len(rows) - len(done)} failed); "
                 f"{with_nk} keep layers float for want of a kernel ({tot} layers in all); "
                 f"{sum(r['layers'] for r in done)} conv/linear, "
                 f"{sum(r['int8'] for r in done)} int8.")
    return "\n".join(lines)


def speed_rows(models: list[str], calib: int, rounds: int) -> tuple[list[dict], list[str]]:
    import fxopt

    quiet_quant_warnings()
    rows, notes = [], []
    for name in models:
        m = model_of(name, 224)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, 3, 224, 224, generator=g)
        cal = [torch.randn(1, 3, 224, 224, generator=g) for _ in range(calib)]
        fns = {}
        try:
            opt = fxopt.optimize(m, x, quantize="int8", calibration_data=cal, target="cpu",
                                 check="none")
            fns["fxopt"] = opt
            q = opt.report.record("quantize_int8")
            nk = q.stats.get("no_cpu_kernel", 0) if q is not None else "-"
        except Exception as e:  # noqa: BLE001
            notes.append(f"{name}: fxopt int8 failed: {type(e).__name__}: {str(e)[:200]}")
            nk = "-"
        try:
            fns["ao"] = ao_fx_int8(m, x, cal)[0]
        except Exception as e:  # noqa: BLE001
            notes.append(f"{name}: torch.ao FX int8 failed: {type(e).__name__}: {str(e)[:200]}")
        if not fns:
            continue
        calls = max(1, min(calls_per_round(f, x, 0.3) for f in fns.values()))
        med = median_times(fns, x, rounds, calls)
        r = {"model": name, "no_cpu_kernel": nk, **{k: v * 1e3 for k, v in med.items()}}
        rows.append(r)
        print(r, flush=True)
        del fns, m
        gc.collect()
    return rows, notes


def speed_table(rows: list[dict]) -> str:
    lines = ["| model | fxopt int8 ms | torch.ao FX int8 ms | fxopt / torch.ao | "
             "no_cpu_kernel |", "|---|---|---|---|---|"]
    for r in rows:
        f, a = r.get("fxopt"), r.get("ao")
        ratio = f"{f / a:.2f}x" if f and a else "-"
        lines.append(f"| {r['model']} | {f'{f:.2f}' if f else '-'} | "
                     f"{f'{a:.2f}' if a else '-'} | {ratio} | {r['no_cpu_kernel']} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    import torchvision

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--coverage", action="store_true", help="the coverage table only")
    p.add_argument("--speed", action="store_true", help="the speed table only")
    p.add_argument("--models", nargs="*", help="coverage models (default: every one)")
    p.add_argument("--speed-models", nargs="*", default=SPEED_MODELS)
    p.add_argument("--max-params-m", type=float, default=None,
                   help="skip coverage models with more parameters (millions)")
    p.add_argument("--calib", type=int, default=3, help="calibration batches")
    p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jsonl", default=None, help="coverage rows as they finish")
    p.add_argument("--resume", action="store_true", help="skip models already in --jsonl")
    p.add_argument("--render", action="store_true",
                   help="the coverage table of the rows in --jsonl, running nothing")
    p.add_argument("--out", default=None, help="markdown path ('-': print only)")
    args = p.parse_args(argv)
    both = not (args.coverage or args.speed)
    torch.set_num_threads(args.threads)
    quiet_quant_warnings()
    parts = [header("fxopt int8 coverage and speed against torch.ao FX (issue 13 item 1)"),
             f"- load average: {os.getloadavg()}", f"- torchvision: {torchvision.__version__}",
             ""]
    if args.coverage or both:
        names = args.models or torchvision.models.list_models(module=torchvision.models)
        path = Path(args.jsonl) if args.jsonl else None
        done = {}
        if args.render:
            done = {json.loads(line)["model"]: json.loads(line)
                    for line in path.read_text().splitlines()}
            names = [n for n in names if n in done]
        if path is not None and args.resume and path.exists():
            for line in path.read_text().splitlines():
                r = json.loads(line)
                done[r["model"]] = r
        rows = []
        for name in names:
            if name in done:
                rows.append(done[name])
                continue
            if args.max_params_m is not None:
                n = sum(p.numel() for p in model_of(name).parameters()) / 1e6
                if n > args.max_params_m:
                    rows.append({"model": name, "input": _size(name), "layers": "-",
                                 "error": f"skipped: {n:.0f}M parameters > --max-params-m"})
                    continue
            r = coverage_row(name, args.calib)
            print(json.dumps(r), flush=True)
            rows.append(r)
            if path is not None:
                with path.open("a") as f:
                    f.write(json.dumps(r) + "\n")
            gc.collect()
        parts += ["## Coverage", "", f"fxopt.optimize(quantize='int8', target='cpu', "
                  f"check='none'), {args.calib} calibration batches of 2, "
                  f"{args.threads} thread(s).", "", coverage_table(rows), ""]
    if args.speed or both:
        rows, notes = speed_rows(args.speed_models, args.calib, args.rounds)
        parts += ["## Speed: fxopt int8 against torch.ao FX int8", "",
                  f"bs 1, 224x224, {args.threads} thread(s), {args.rounds} interleaved rounds, "
                  f"medians; load average after: {os.getloadavg()}", "", speed_table(rows), ""]
        parts += [f"- {n}" for n in notes]
    text = "\n".join(parts) + "\n"
    write_result(text, args.out, "int8-coverage")
    return text


if __name__ == "__main__":
    main()
