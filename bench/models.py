"""Model benchmark on the CPU: eager vs ``torch.fx.experimental.optimization.fuse`` vs fxopt.

For each model and batch size, in one run: the eager model, torch.fx's conv-bn ``fuse`` (what
a user would pick instead), and fxopt's default pipeline (cleanup, fold_bn, fuse_act). The
variants are interleaved round by round (the machine may be shared: a slow spell hits all of
them alike) and the figure is the median per-call time over all rounds. Outputs are checked
against eager before timing.

    python bench/models.py                                   # resnet18, resnet50, mobilenet_v2
    python bench/models.py --models resnet18 --batches 1 --rounds 10 --out -

Writes a markdown table to ``bench/results/models-<date>.md`` (``--out -``: stdout only).

``--target cuda`` (``_models_cuda.py``): ResNet-50 at batch 1, 64, 256 on a CUDA GPU, eager
fp32 / eager fp16 channels-last / torch.compile fp16 / fxopt fp16 / fxopt int8, and the time to
optimize beside torch.compile's first compile; ``--out DIR`` writes DIR/models-cuda-<date>.md.
Without CUDA it says so and exits 0.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header, write_result  # noqa: E402
from _random_weights import randomize_batchnorm  # noqa: E402
from _timing import calls_per_round, median_times  # noqa: E402

__all__ = ["main"]

MODELS = ["resnet18", "resnet50", "mobilenet_v2"]


def _build(name: str):
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.get_model(name, weights=None).eval()
    return randomize_batchnorm(m, affine=False)  # trained-like statistics, not the defaults


def _variants(model, x):
    import fxopt
    from torch.fx.experimental.optimization import fuse

    return {
        "eager": model,
        "fx.fuse": fuse(model),
        "fxopt": fxopt.optimize(model, x),
    }


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--models", nargs="+", default=None,
                   help=f"default: {' '.join(MODELS)} (cpu), resnet50 (cuda)")
    p.add_argument("--batches", nargs="+", type=int, default=None,
                   help="default: 1 8 (cpu), 1 64 256 (cuda)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--calls", type=int, default=0, help="calls per round (0: about 0.1 s worth)")
    p.add_argument("--out", default=None, help="markdown file to write ('-': print only); "
                   "--target cuda: a directory or a .md file")
    cuda = p.add_argument_group("--target cuda")
    cuda.add_argument("--variants", nargs="+", default=None,
                      help="eager_fp32 eager_fp16 compile_fp16 fxopt_fp16 fxopt_int8 (default all)")
    cuda.add_argument("--budget-s", type=float, default=600.0,
                      help="skip what is left after this many seconds")
    cuda.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition time")
    cuda.add_argument("--calib-batches", type=int, default=4,
                      help="random calibration batches for fxopt int8")
    args = p.parse_args(argv)
    if args.target == "cuda":
        from _models_cuda import VARIANTS, run_cuda

        args.models = args.models or ["resnet50"]
        args.batches = args.batches or [1, 64, 256]
        args.variants = args.variants or VARIANTS
        return run_cuda(args, _build) or ""
    args.models = args.models or MODELS
    args.batches = args.batches or [1, 8]
    torch.set_num_threads(args.threads)
    from fxopt.ir.tolerances import compare_outputs

    rows = []
    for name in args.models:
        model = _build(name)
        for batch in args.batches:
            x = torch.randn(batch, 3, args.size, args.size)
            fns = _variants(model, x)
            with torch.no_grad():
                ref = model(x)
                for k, f in fns.items():
                    st = compare_outputs(f(x), ref)
                    assert st.ok, f"{name} b{batch} {k}: rel err {st.rel_err:.1e} vs eager"
            calls = args.calls if args.calls > 0 else calls_per_round(model, x, 0.1)
            med = median_times(fns, x, args.rounds, calls, warmup=max(3, calls))
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            rows.append((name, batch, med, load))
            print(f"{name:14s} b{batch:<2d} " + "  ".join(f"{k} {v * 1e3:8.2f} ms" for k, v in
                  med.items()) + f"  fxopt/fx.fuse {med['fx.fuse'] / med['fxopt']:.2f}x"
                  f"  (load {load:.1f})", flush=True)

    lines = [header("Model benchmark: eager vs torch.fx fuse vs fxopt (CPU)"), "",
             f"Input {args.size}x{args.size}, float32, `torch.no_grad()`, {args.threads} threads. "
             f"Median per-call time over {args.rounds} interleaved rounds. `load`: the machine's "
             f"1-minute load average when the row finished ({os.cpu_count()} cores; above that, "
             f"other processes took CPU from the run).", "",
             "| model | batch | eager ms | fx.fuse ms | fxopt ms | fx.fuse vs eager | "
             "fxopt vs eager | fxopt vs fx.fuse | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, batch, med, load in rows:
        e, f, o = med["eager"], med["fx.fuse"], med["fxopt"]
        lines.append(f"| {name} | {batch} | {e * 1e3:.2f} | {f * 1e3:.2f} | {o * 1e3:.2f} | "
                     f"{e / f:.2f}x | {e / o:.2f}x | {f / o:.2f}x | {load:.1f} |")
    text = "\n".join(lines) + "\n"
    write_result(text, args.out, "models")
    return text


if __name__ == "__main__":
    main()
