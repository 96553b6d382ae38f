"""Does the residual add + LayerNorm fusion pay on the CPU? (It is off there by default.)

On the CPU ``fxopt.add_layer_norm`` is ``x + r`` then ``F.layer_norm``: the same two PyTorch
kernels eager runs, behind one more op call. This measures, interleaved round by round, medians,
one thread unless ``--threads``:

- the op at transformer sizes (ViT-S/B rows at batch 1, BERT-large's 4096 x 1024), float32 and
  bfloat16: eager ``s = x + r; F.layer_norm(s)`` against ``torch.ops.fxopt.add_layer_norm``;
- a ViT-Ti-sized torchvision ``VisionTransformer`` (12 layers, 192 wide, 224 x 224, batch 1)
  optimized for the CPU with and without ``passes=["fuse_add_layer_norm"]``.

    python bench/add_layer_norm_cpu.py --out -        # prints; default writes bench/results/
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import fxopt  # noqa: F401  (declares torch.ops.fxopt.*)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header, write_result  # noqa: E402
from _timing import calls_per_round, median_times  # noqa: E402

SHAPES = [("ViT-S row block, bs1", 197, 384), ("ViT-B, bs1", 197, 768),
          ("BERT-large 4096 tok", 4096, 1024)]


def op_rows(rounds: int) -> list[str]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for name, m, n in SHAPES:
            x, r = torch.randn(m, n, dtype=dtype), torch.randn(m, n, dtype=dtype)
            w, b = torch.rand(n, dtype=dtype) + 0.5, torch.randn(n, dtype=dtype)

            def eager(x):
                s = x + r
                return s, F.layer_norm(s, (n,), w, b, 1e-6)

            def fused(x):
                return torch.ops.fxopt.add_layer_norm(x, r, [n], w, b, 1e-6)

            calls = calls_per_round(eager, x, 0.05)
            t = median_times({"eager": eager, "fused": fused}, x, rounds, calls)
            rows.append(f"| {name} | {m}x{n} | {str(dtype)[6:]} | {t['eager'] * 1e6:.1f} | "
                        f"{t['fused'] * 1e6:.1f} | {t['eager'] / t['fused']:.2f}x |")
            print(rows[-1], flush=True)
    return rows


def model_row(rounds: int) -> str:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(image_size=224, patch_size=16, num_layers=12, num_heads=3,
                          hidden_dim=192, mlp_dim=768).eval()
    x = torch.randn(1, 3, 224, 224)
    plain = fxopt.optimize(m, x, target="cpu", check="end")
    fused = fxopt.optimize(m, x, target="cpu", check="end", passes=["fuse_add_layer_norm"])
    n = fused.report.record("fuse_add_layer_norm").stats.get("add_layer_norm", 0)
    calls = calls_per_round(plain, x, 0.3)
    t = median_times({"plain": plain, "fused": fused}, x, rounds, calls)
    return (f"| ViT-Ti (torchvision, 12 x 192), bs1 | {n} fused | {t['plain'] * 1e3:.2f} ms | "
            f"{t['fused'] * 1e3:.2f} ms | {t['plain'] / t['fused']:.2f}x |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="a .md file; '-': print only")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = op_rows(args.rounds)
    model = model_row(args.rounds)
    print(model, flush=True)
    text = header("Residual add + LayerNorm on the CPU: fused op against eager") + "\n"
    text += ("## the op (us per call, medians; eager: `x + r` then `F.layer_norm`)\n\n"
             "| shape | rows x width | dtype | eager | fxopt.add_layer_norm | eager / fused |\n"
             "| --- | --- | --- | ---: | ---: | ---: |\n" + "\n".join(rows) + "\n\n")
    text += ("## a model (optimize(target='cpu') with and without the pass)\n\n"
             "| model | LayerNorms fused | without | with | without / with |\n"
             "| --- | --- | ---: | ---: | ---: |\n" + model + "\n")
    write_result(text, args.out, "add_layer_norm_cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
