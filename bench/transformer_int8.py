"""Transformers in int8 on the CPU at 224 x 224: static against dynamic int8 (issue 13: "vit/deit/
swin at least 30 dB where the CNNs are").

The models, calibration and held-out images of ``bench/cpu_deploy.py`` (torchvision's, random
seeded weights, zero-initialized layers redrawn; 16 calibration images of batch 1, 8 held-out
ones). Variants, each ``fxopt.optimize(model, x, target="cpu", check="end", ...)``:

- ``eager``: the float model;
- ``fxopt_fp32``: the default pipeline, no quantization;
- ``int8_static``: ``quantize="int8"`` with the calibration images (the default QuantConfig:
  ``min_sqnr_db="auto"``, 30 dB with at most a quarter of the MACs float);
- ``int8_static_all``: the same with ``min_sqnr_db=None``: every Linear int8;
- ``int8_dynamic``: ``quantize="int8_dynamic"``: every Linear int8 with its input's grid picked
  per call (the attention's in_proj/out_proj included: the standard attention call is
  decomposed), no calibration;
- ``int8_dynamic_attn_float``: the same with the attention modules kept float
  (``keep_float`` = the paths of the modules whose class name holds "Attention");
- ``int8_dynamic_per_token``: ``QuantConfig(mode="dynamic", per_token=True)``: every Linear
  int8, one run-time grid per token.

Models: torchvision's by name; ``timm:<name>`` for timm's (``pretrained=False``, seeded), e.g.
``timm:deit_small_patch16_224``.

SQNR: the logits against the float model's on the held-out images. Latency: median ms per call
at batch 1, the variants interleaved round by round (``bench/_timing.py``). "float MACs": the
share of the conv/linear MACs the optimized graph runs in float.

    python bench/transformer_int8.py          # vit_b_16, swin_t, timm deit_small (~10 min here)
    python bench/transformer_int8.py --models swin_t --out -
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

import fxopt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header, write_result  # noqa: E402
from _timing import median_times  # noqa: E402
from cpu_deploy import _model, _sqnr  # noqa: E402

from fxopt.ir.metrics import node_macs  # noqa: E402


def _attention_paths(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules()
            if name and "Attention" in type(m).__name__]


def _variants(model, calib) -> dict:
    dyn_float = fxopt.QuantConfig(mode="dynamic", keep_float=_attention_paths(model))
    return {
        "fxopt_fp32": {},
        "int8_static": {"quantize": "int8", "calibration_data": calib},
        "int8_static_all": {"quantize": fxopt.QuantConfig(min_sqnr_db=None),
                            "calibration_data": calib},
        "int8_dynamic": {"quantize": "int8_dynamic"},
        "int8_dynamic_attn_float": {"quantize": dyn_float},
        "int8_dynamic_per_token": {"quantize": fxopt.QuantConfig(mode="dynamic",
                                                                 per_token=True)},
    }


def _build(name: str) -> torch.nn.Module:
    if name.startswith("timm:"):
        import timm

        torch.manual_seed(0)
        return timm.create_model(name[5:], pretrained=False).eval()
    return _model(name)[0]


def _float_mac_share(gm: torch.fx.GraphModule) -> float:
    """The share of the graph's conv/linear MACs that run in float."""
    mods = dict(gm.named_modules())
    total = floats = 0
    for n in gm.graph.nodes:
        if n.op == "call_module":
            name, is_int8 = type(mods[n.target]).__name__.lower(), False
        elif n.op == "call_function":
            name = str(n.target).lower()
            is_int8 = "int8" in name
        else:
            continue
        if "conv" not in name and "linear" not in name:
            continue
        macs = node_macs(n, gm)
        total += macs
        floats += 0 if is_int8 else macs
    return floats / max(total, 1)


def _row(name, variant, ms, sqnr, rec, build_s, float_share) -> str:
    stats = rec.stats if rec is not None else {}
    layers = stats.get("linear", "-")
    kept = f"{stats['kept_float']} layers" if stats.get("kept_float") else "-"
    share = f"{100 * float_share:.1f}%" if rec is not None else "-"
    return (f"| {name} | {variant} | {ms:.1f} | {sqnr:.2f} | {layers} | {kept} | {share} | "
            f"{build_s:.0f} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vit_b_16,swin_t,timm:deit_small_patch16_224")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--variants", default=None, help="comma-separated (default: all)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    rows = ["| model | variant | bs 1 ms | SQNR dB | int8 Linear layers | kept float | float MACs "
            "| build s |", "|---|---|---|---|---|---|---|---|"]
    for name in args.models.split(","):
        model = _build(name)
        gen = torch.Generator().manual_seed(1)
        calib = [torch.randn(1, 3, 224, 224, generator=gen) for _ in range(16)]
        held = torch.randn(8, 3, 224, 224, generator=gen)
        with torch.inference_mode():
            ref = torch.cat([model(c) for c in held.split(1)])
        fns, sq, recs, builds = {"eager": model}, {"eager": float("inf")}, {"eager": None}, \
            {"eager": 0.0}
        shares = {"eager": 1.0}
        for variant, options in _variants(model, calib).items():
            if args.variants and variant not in args.variants.split(","):
                continue
            t0 = time.perf_counter()
            opt = fxopt.optimize(model, calib[0], target="cpu", check="end", **options)
            builds[variant] = time.perf_counter() - t0
            with torch.inference_mode():
                sq[variant] = _sqnr(ref, torch.cat([opt(c) for c in held.split(1)]))
            recs[variant] = opt.report.record("quantize_int8") if "quantize" in options else None
            fns[variant] = opt
            shares[variant] = _float_mac_share(opt.graph_module)
            print(f"[{name}] built {variant} in {builds[variant]:.0f} s: {sq[variant]:.2f} dB",
                  flush=True)
        ms = median_times(fns, calib[0], rounds=args.rounds, calls=1)
        for variant in fns:
            row = _row(name, variant, ms[variant] * 1e3, sq[variant], recs[variant],
                       builds[variant], shares[variant])
            rows.append(row)
            print(row, flush=True)
    load1 = os.getloadavg()
    text = (header("Transformers in int8 on the CPU at 224x224: static and dynamic")
            + f"- threads: {args.threads}\n- load average (1, 5, 15 min) before: "
            + ", ".join(f"{v:.2f}" for v in load0) + "; after: "
            + ", ".join(f"{v:.2f}" for v in load1) + "\n\n" + "\n".join(rows) + "\n")
    write_result(text, args.out, "transformer-int8")


if __name__ == "__main__":
    main()
