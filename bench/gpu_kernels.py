"""Triton kernel microbenchmarks against what a user would run instead (CUDA only).

- int8 GEMM (``linear_int8``: int8 codes x int8 [N, K] weight, fused dequant + bias, bf16 out)
  against ``torch._int_mm`` (int32 out, no epilogue) and bf16 ``torch.mm`` (cuBLAS), at 4096^3,
  8192^3 and the GEMM shapes of ResNet-50's convolutions at batch 64;
- conv kernels at ResNet-50 layer shapes, batch 64, channels-last: ``conv2d`` fp16 with fused
  bias + relu, and ``conv2d_int8`` (uint8 in, requantized uint8 out), against cuDNN's fp16 conv
  followed by the separate bias add and relu;
- the transformer block's residual add + LayerNorm (``add_layer_norm``: one program per row,
  writes the sum and the normalized row) against PyTorch eager ``s = x + r`` then
  ``F.layer_norm(s)``, at ViT-B (197 x 768, batch 1 and 64), BERT-large (4096 x 1024) and a
  wide row (ViT-H's 1280, LLM's 8192), bf16 and fp32. GB/s counts the bytes the fused kernel must
  move (read x, r; write s, y).

Times are ``triton.testing.do_bench`` medians (after the autotuner's first call); the tables
give TOP/s (or TFLOP/s) and the ratios. Usage, on a CUDA machine::

    python bench/gpu_kernels.py --out DIR      # writes DIR/gpu-kernels-<date>.md ('-': print only)

Without CUDA it says so and exits 0 (nothing to measure). About 2 minutes on an H200.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header, write_result  # noqa: E402

# (name, M, N, K): ResNet-50 convolutions as GEMMs, batch 64 (M = 64 * OH * OW, K = C_in*KH*KW)
RESNET_GEMMS = [
    ("layer1 1x1 64->256 @56", 64 * 56 * 56, 256, 64),
    ("layer1 3x3 64 @56", 64 * 56 * 56, 64, 576),
    ("layer2 3x3 128 @28", 64 * 28 * 28, 128, 1152),
    ("layer3 3x3 256 @14", 64 * 14 * 14, 256, 2304),
    ("layer3 1x1 1024->256 @14", 64 * 14 * 14, 256, 1024),
    ("layer4 3x3 512 @7", 64 * 7 * 7, 512, 4608),
    ("layer4 1x1 512->2048 @7", 64 * 7 * 7, 2048, 512),
]
# (name, C_in, H, C_out, k, stride, padding)
RESNET_CONVS = [
    ("layer1 1x1 64->256 @56", 64, 56, 256, 1, 1, 0),
    ("layer1 3x3 64 @56", 64, 56, 64, 3, 1, 1),
    ("layer2 3x3 128 @28", 128, 28, 128, 3, 1, 1),
    ("layer3 3x3 256 @14", 256, 14, 256, 3, 1, 1),
    ("layer3 1x1 1024->256 @14", 1024, 14, 256, 1, 1, 0),
    ("layer4 3x3 512 @7", 512, 7, 512, 3, 1, 1),
]


def _bench(fn):
    import triton
    fn()  # compile / autotune outside the timing
    try:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    except TypeError:  # older signature
        return triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5])[0]


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def bench_gemm(rows, deadline, quick):
    import torch
    from fxopt.triton_kernels import linear_int8
    shapes = [("square 4096^3", 4096, 4096, 4096), ("square 8192^3", 8192, 8192, 8192)] + RESNET_GEMMS
    if quick:
        shapes = shapes[:1] + shapes[2:4]
    for name, M, N, K in shapes:
        if time.monotonic() > deadline:
            rows.append(f"| {name} | {M}x{N}x{K} | skipped (time budget) | | | | | |")
            continue
        a = torch.randint(-128, 128, (M, K), dtype=torch.int8, device="cuda")
        w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
        w_scale = torch.rand(N, device="cuda") * 0.01
        bias = torch.randn(N, device="cuda")
        colsum = None
        ours = lambda: linear_int8(a, w, w_scale, bias, a_scale=0.02, a_zp=0, out_dtype=torch.bfloat16,
                                   w_colsum=colsum)
        wt = w.t()
        try:
            torch._int_mm(a, wt)
            int_mm = lambda: torch._int_mm(a, wt)
        except RuntimeError:
            wk = w.t().contiguous()
            int_mm = lambda: torch._int_mm(a, wk)
        ab, wb = a.bfloat16(), w.bfloat16()
        wbt = wb.t()
        mm = lambda: torch.mm(ab, wbt)
        # correctness: our kernel against _int_mm's exact int32 with the same epilogue
        ref = (int_mm().float() * (0.02 * w_scale) + bias)
        err = _rel(ours(), ref)
        t_ours, t_int, t_mm = _bench(ours), _bench(int_mm), _bench(mm)
        ops = 2.0 * M * N * K
        rows.append(f"| {name} | {M}x{N}x{K} | {ops / t_ours / 1e9:.0f} | {ops / t_int / 1e9:.0f} | "
                    f"{ops / t_mm / 1e9:.0f} | {t_int / t_ours:.2f}x | {t_mm / t_ours:.2f}x | {err:.1e} |")
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()


def bench_conv(rows, deadline, quick, batch):
    import torch
    import torch.nn.functional as F
    from fxopt.triton_kernels import conv2d, conv2d_int8, prepare_conv_weight, weight_colsum
    cl = torch.channels_last
    convs = RESNET_CONVS[:3] if quick else RESNET_CONVS
    for name, ci, h, co, k, s, p in convs:
        if time.monotonic() > deadline:
            rows.append(f"| {name} | skipped (time budget) | | | | | |")
            continue
        x = torch.randn(batch, ci, h, h, device="cuda", dtype=torch.float16).contiguous(memory_format=cl)
        w = (torch.randn(co, ci, k, k, device="cuda") / (ci * k * k) ** 0.5).half()
        wcl = prepare_conv_weight(w)
        b = torch.randn(co, device="cuda", dtype=torch.float16)
        b4 = b.view(1, -1, 1, 1)

        def cudnn():
            y = F.conv2d(x, wcl, None, s, p)
            y.add_(b4)
            return y.relu_()

        ours = lambda: conv2d(x, wcl, b, s, p, act="relu")
        err = _rel(ours(), cudnn())
        xq = torch.randint(0, 256, x.shape, dtype=torch.uint8, device="cuda").contiguous(memory_format=cl)
        wq = prepare_conv_weight(torch.randint(-127, 128, w.shape, dtype=torch.int8, device="cuda"))
        ws = torch.rand(co, device="cuda") * 0.001
        cs = weight_colsum(wq)
        ours8 = lambda: conv2d_int8(xq, wq, ws, b.float(), s, p, a_scale=0.02, a_zp=128, act="relu",
                                    out_dtype=torch.uint8, y_scale=0.05, y_zp=0, w_colsum=cs)
        t_dnn, t_ours, t_8 = _bench(cudnn), _bench(ours), _bench(ours8)
        oh = (h + 2 * p - k) // s + 1
        flops = 2.0 * batch * oh * oh * co * ci * k * k
        rows.append(f"| {name} | {flops / t_dnn / 1e9:.0f} | {flops / t_ours / 1e9:.0f} | "
                    f"{flops / t_8 / 1e9:.0f} | {t_dnn / t_ours:.2f}x | {t_dnn / t_8:.2f}x | {err:.1e} |")
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()


# (name, rows, width): the residual add + LayerNorm of a transformer block
ADD_LAYER_NORMS = [
    ("ViT-B/16 bs1", 197, 768),
    ("ViT-B/16 bs64", 64 * 197, 768),
    ("BERT-large 4096 tok", 4096, 1024),
    ("ViT-H/14 bs8", 8 * 257, 1280),
    ("LLM 8192 wide, 2048 tok", 2048, 8192),
]


def bench_add_layer_norm(rows, deadline, quick):
    import torch
    import torch.nn.functional as F
    from fxopt.triton_kernels import add_layer_norm
    shapes = ADD_LAYER_NORMS[:3] if quick else ADD_LAYER_NORMS
    for dtype in (torch.bfloat16, torch.float32):
        for name, m, n in shapes:
            tag = str(dtype).replace("torch.", "")
            if time.monotonic() > deadline:
                rows.append(f"| {name} | {m}x{n} | {tag} | skipped (time budget) | | | | |")
                continue
            x = torch.randn(m, n, device="cuda", dtype=dtype)
            r = torch.randn(m, n, device="cuda", dtype=dtype)
            w = (torch.rand(n, device="cuda") + 0.5).to(dtype)
            b = torch.randn(n, device="cuda", dtype=dtype)

            def eager():
                s = x + r
                return s, F.layer_norm(s, (n,), w, b, 1e-6)

            ours = lambda: add_layer_norm(x, r, w, b, eps=1e-6)
            (s1, y1), (s0, y0) = ours(), eager()
            err = max(_rel(s1, s0), _rel(y1, y0))
            t_eager, t_ours = _bench(eager), _bench(ours)
            gb = 4.0 * m * n * x.element_size() / 1e9
            rows.append(f"| {name} | {m}x{n} | {tag} | {t_eager * 1e3:.1f} | {t_ours * 1e3:.1f} | "
                        f"{gb / (t_ours / 1e3):.0f} | {t_eager / t_ours:.2f}x | {err:.1e} |")
            print(rows[-1], flush=True)
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None,
                    help="directory (writes gpu-kernels-<date>.md there) or .md file; '-': print only")
    ap.add_argument("--quick", action="store_true", help="a few shapes only")
    ap.add_argument("--budget-s", type=float, default=140.0, help="skip remaining shapes after this")
    ap.add_argument("--batch", type=int, default=64, help="batch of the conv shapes")
    args = ap.parse_args(argv)

    import torch
    if not torch.cuda.is_available():
        print("bench/gpu_kernels.py: no CUDA device here; the Triton kernel benchmarks need a GPU "
              "(nothing measured). Run bench/gpu_check.sh on a CUDA machine.")
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench/gpu_kernels.py: TRITON_INTERPRET is set; unset it to benchmark compiled kernels.")
        return 2
    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    gemm_rows, conv_rows, ln_rows = [], [], []
    # the add + LayerNorm rows first: a few seconds in all (memory-bound, small)
    bench_add_layer_norm(ln_rows, t0 + 0.2 * args.budget_s, args.quick)
    bench_gemm(gemm_rows, t0 + 0.55 * args.budget_s, args.quick)
    bench_conv(conv_rows, deadline, args.quick, args.batch)

    text = header("Triton kernels against cuBLAS / cuDNN") + "\n"
    text += ("## int8 GEMM (`linear_int8`: int8 x int8 [N,K], dequant + bias fused, bf16 out)\n\n"
             "TOP/s; `_int_mm` returns raw int32 (no epilogue), bf16 mm is cuBLAS via `torch.mm`. "
             "err: relative to `_int_mm` + the same epilogue.\n\n"
             "| shape | M x N x K | ours | _int_mm | bf16 mm | vs _int_mm | vs bf16 | err |\n"
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n" + "\n".join(gemm_rows) + "\n\n")
    text += (f"## conv, ResNet-50 layers, batch {args.batch}, channels-last\n\n"
             "TFLOP/s. cuDNN: fp16 `F.conv2d` then `add_(bias)` and `relu_()`; fp16: our `conv2d` with "
             "bias + relu fused; int8: our `conv2d_int8`, uint8 in, requantized uint8 out. "
             "err: fp16 ours vs cuDNN.\n\n"
             "| layer | cuDNN+ops | fp16 fused | int8 fused | fp16 speedup | int8 speedup | err |\n"
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n" + "\n".join(conv_rows) + "\n")
    text += ("\n## residual add + LayerNorm (`add_layer_norm`: one program per row, both "
             "outputs)\n\n"
             "Times in us (medians); eager: `s = x + r` then `F.layer_norm(s)` (two kernels, "
             "5 passes over the rows); ours: one kernel, 4 passes (read x, r; write s, y). "
             "GB/s: those 4 passes over our time. err: the larger of the two outputs' relative "
             "errors against eager.\n\n"
             "| shape | rows x width | dtype | eager | ours | ours GB/s | speedup | err |\n"
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |\n" + "\n".join(ln_rows) + "\n")
    text += f"\ntotal {time.monotonic() - t0:.0f} s\n"
    out = args.out
    if out not in (None, "-") and not out.endswith(".md"):
        out = str(Path(out) / f"kernels-{datetime.date.today().isoformat()}.md")
    write_result(text, out, "gpu-kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
