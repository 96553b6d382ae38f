"""What ``merge_convs`` buys: RepVGG-style branches (3x3 + 1x1 + identity) as one convolution.

timm's RepVGG models (random weights, eval) at 224 x 224, batch 1, CPU, interleaved round by
round, medians, one thread unless ``--threads``: eager, ``fxopt.optimize`` without the pass
(``disable=["merge_convs"]``: fold_bn has already folded every branch's BatchNorm, the identity's
into the 3x3 centre tap) and with it (the default pipeline). Also the convolutions left, the
parameters and each variant's relative error against eager.

    python bench/merge_convs.py --out -        # prints; default writes bench/results/
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

import fxopt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header, write_result  # noqa: E402
from _timing import median_times  # noqa: E402

MODELS = ["repvgg_a0", "repvgg_a1", "repvgg_b0"]


def _convs(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in module.modules())


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def rows(names: list[str], size: int, rounds: int) -> list[str]:
    import timm

    out = ["| model | variant | convs | params (M) | ms b1 | x eager | rel err vs eager |",
           "|---|---|---|---|---|---|---|"]
    for name in names:
        model = timm.create_model(name).eval()
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        variants = {"eager": model,
                    "fxopt, no merge_convs": fxopt.optimize(model, x, disable=["merge_convs"]),
                    "fxopt default": fxopt.optimize(model, x)}
        with torch.no_grad():
            ref = model(x)
            errs = {k: float((m(x) - ref).norm() / ref.norm()) for k, m in variants.items()}
        times = median_times(variants, x, rounds=rounds, calls=1)
        for k, m in variants.items():
            convs = _convs(m if k == "eager" else m.graph_module)
            out.append(f"| {name} | {k} | {convs} | {_params(m) / 1e6:.2f} | "
                       f"{times[k] * 1e3:.1f} | {times['eager'] / times[k]:.2f}x | "
                       f"{errs[k]:.1e} |")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    table = rows(args.models.split(","), args.size, args.rounds)
    text = header("merge_convs: RepVGG branches as one convolution (CPU)") + "\n".join([
        f"- load average (1, 5, 15 min) before: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}; "
        f"after: {os.getloadavg()[0]:.2f}",
        f"- input 1x3x{args.size}x{args.size}, random timm weights, {args.rounds} interleaved "
        f"rounds, medians", "", *table, ""])
    write_result(text, args.out, "merge-convs")


if __name__ == "__main__":
    main()
