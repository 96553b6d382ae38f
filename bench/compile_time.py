"""Time to optimize: ``fxopt.optimize`` (checks on) next to ``torch.compile``'s first call.

Both run on the same model and input in the same process; torch.compile's caches are disabled
so that its figure is a real first compile. Writes a markdown table to bench/results/.

    python bench/compile_time.py                        # all twelve models, 1x3x224x224
    python bench/compile_time.py --models resnet18,resnet50 --no-compile
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header  # noqa: E402

import fxopt  # noqa: E402

MODELS = ["alexnet", "resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "densenet121",
          "vgg11_bn", "squeezenet1_0", "shufflenet_v2_x1_0", "regnet_x_400mf", "convnext_tiny",
          "vit_b_16"]


def time_fxopt(model, x, repeats: int) -> tuple[float, "fxopt.OptimizedModule"]:
    times = []
    opt = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        opt = fxopt.optimize(model, x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), opt


def time_compile(model, x) -> float:
    torch._dynamo.reset()
    compiled = torch.compile(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        compiled(x)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    import torchvision

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3, help="fxopt.optimize runs per model (median)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval()
        x = torch.randn(1, 3, args.size, args.size)
        with torch.no_grad():
            model(x)  # warm the eager kernels both sides use
        fxopt.optimize(model, x)  # warm-up run, not timed
        t_fx, opt = time_fxopt(model, x, args.repeats)
        t_tc = float("nan") if args.no_compile else time_compile(model, x)
        ratio = t_fx / t_tc if t_tc == t_tc else float("nan")
        rows.append((name, t_fx, t_tc, ratio, len(opt.report.passes), opt.report.final_rel_err))
        print(f"{name:20s} fxopt {t_fx:7.2f} s   torch.compile {t_tc:7.2f} s   ratio {ratio:.3f}",
              flush=True)
    lines = [header("Time to optimize: fxopt.optimize vs torch.compile first call"),
             f"Input 1x3x{args.size}x{args.size}, random weights, eval mode, CPU. fxopt: "
             f"`fxopt.optimize(model, x)` with its default pipeline and `check=\"each\"`, median "
             f"of {args.repeats} after one warm-up run. torch.compile: first call, inductor caches disabled.",
             "", f"fxopt default pipeline: {fxopt.PIPELINES['default']}", "",
             "| model | fxopt.optimize (s) | torch.compile first call (s) | fxopt / compile | "
             "passes run | final rel err vs eager |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, a, b, r, n, e in rows:
        lines.append(f"| {name} | {a:.2f} | {b:.1f} | {r:.3f} | {n} | {e:.1e} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    path = out / f"compile_time_{stamp}.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
