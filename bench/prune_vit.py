"""Attention-head and MLP pruning of a ViT-B/16 (CPU): fxopt against Torch-Pruning at ratio 0.5.

Two ViT-B/16 builds (random weights, no downloads, 224x224): torchvision's ``vit_b_16``
(``nn.MultiheadAttention`` leaves, which fxopt opens into in_proj, SDPA and out_proj so that
whole heads go) and timm's ``vit_base_patch16_224`` (one qkv Linear, reshape, unbind, SDPA).
Torch-Pruning runs as its ViT examples set it up: ``MetaPruner`` with L1 group magnitude
importance, ``num_heads`` for every attention, the classifier ignored, the class token and
position embedding as unwrapped parameters; its model's head counts/widths are then updated the
way its examples do. fxopt runs ``prune=0.5`` (L1, the same ratio in every channel group:
heads or head dims, MLP hidden units, the residual stream) as the pruned GraphModule alone and
after the default pipeline.

Reported per variant: parameters, MACs (fxopt's counter on the captured graph, attention
matmuls included), latency at batch 1 with 1 thread (variants interleaved round by round,
median per call) and the output's relative difference from the dense model (both pruners
remove half the channels of a random-weight model, so this is large for both: it only shows
the model runs).

    python bench/prune_vit.py                 # writes bench/results/prune-vit-<date>.md
    python bench/prune_vit.py --rounds 3 --models tv --out -

Needs ``torch-pruning`` and ``timm`` (the ``bench`` extra).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _counts import macs, params  # noqa: E402
from _env import header, write_result  # noqa: E402
from _timing import median_times  # noqa: E402

__all__ = ["main"]


def _randomize(model: nn.Module) -> nn.Module:
    """Non-trivial LayerNorm affines and a non-zero classifier (torchvision zero-inits it)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
        head = model.heads.head if hasattr(model, "heads") else model.head
        head.weight.normal_(0, 0.02, generator=g)
    return model.eval()


def build(which: str) -> nn.Module:
    torch.manual_seed(0)
    if which == "tv":
        import torchvision

        return _randomize(torchvision.models.vit_b_16(weights=None))
    import timm

    return _randomize(timm.create_model("vit_base_patch16_224", pretrained=False))


def tp_prune(model: nn.Module, which: str, x, ratio: float) -> nn.Module:
    """Torch-Pruning as in its ViT examples (see the module doc)."""
    import torch_pruning as tp

    m = copy.deepcopy(model)
    if which == "tv":
        num_heads = {a: a.num_heads for a in m.modules() if isinstance(a, nn.MultiheadAttention)}
        unwrapped = [(m.class_token, 2), (m.encoder.pos_embedding, 2)]
        ignored = [m.heads.head]
    else:
        num_heads = {a.qkv: a.num_heads for a in m.modules() if hasattr(a, "qkv")}
        unwrapped = [(m.cls_token, 2), (m.pos_embed, 2)]
        ignored = [m.head]
    pruner = tp.pruner.MetaPruner(m, x, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                  pruning_ratio=ratio, ignored_layers=ignored,
                                  num_heads=num_heads, unwrapped_parameters=unwrapped)
    pruner.step()
    if which == "tv":
        m.hidden_dim = m.conv_proj.out_channels
        for a in m.modules():
            if isinstance(a, nn.MultiheadAttention):
                a.num_heads = pruner.num_heads.get(a, a.num_heads)
                a.head_dim = a.embed_dim // a.num_heads
    else:
        for a in m.modules():
            if hasattr(a, "qkv"):
                a.num_heads = pruner.num_heads.get(a.qkv, a.num_heads)
                a.head_dim = a.qkv.out_features // (3 * a.num_heads)
                a.attn_dim = a.num_heads * a.head_dim
    return m.eval()


def _shape(model, which: str, tp_model: bool) -> str:
    """Heads x head dim, MLP hidden, stream width of the first block, as each model has them."""
    if isinstance(model, torch.fx.GraphModule) or not tp_model:
        return ""
    if which == "tv":
        a, mlp = model.encoder.layers[0].self_attention, model.encoder.layers[0].mlp[0]
        return f"{a.num_heads}x{a.head_dim}, mlp {mlp.out_features}, stream {model.hidden_dim}"
    a, mlp = model.blocks[0].attn, model.blocks[0].mlp.fc1
    return f"{a.num_heads}x{a.head_dim}, mlp {mlp.out_features}, stream {a.qkv.in_features}"


def _fx_shape(opt) -> str:
    gm = opt.graph_module
    heads = [m for n, m in gm.named_modules() if n.endswith(("in_proj", "qkv"))]
    fc1 = [m for n, m in gm.named_modules() if n.endswith(("mlp.0", "mlp.linear_1", "fc1"))]
    if not heads or not fc1:
        return ""
    w = getattr(heads[0], "weight", None)
    return f"qkv {tuple(w.shape) if w is not None else '?'}, mlp {fc1[0].weight.shape[0]}"


def bench(which: str, ratio: float, rounds: int):
    import fxopt

    model = build(which)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        dense_out = model(x)
    t0 = time.perf_counter()
    tp_model = tp_prune(model, which, x, ratio)
    tp_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fx_only = fxopt.optimize(model, x, prune=ratio, pipeline=["cleanup"])
    fx_s = time.perf_counter() - t0
    fx_full = fxopt.optimize(model, x, prune=ratio)
    variants = {"dense eager": model, "Torch-Pruning (eager)": tp_model,
                "fxopt prune only": fx_only, "fxopt prune + default pipeline": fx_full}
    info = {}
    with torch.no_grad():
        for k, v in variants.items():
            out = v(x)
            rel = float((out - dense_out).norm() / dense_out.norm())
            info[k] = (params(v), macs(v, x), rel)
    rec = fx_only.report.record("prune_channels")
    load = [os.getloadavg()[0]]
    lat = median_times(variants, x, rounds, 1)
    load.append(os.getloadavg()[0])
    print(f"{which}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in lat.items()), flush=True)
    return {"which": which, "info": info, "lat": lat, "tp_s": tp_s, "fx_s": fx_s,
            "stats": rec.stats, "load": load, "rel_err": rec.rel_err,
            "tp_shape": _shape(tp_model, which, True), "fx_shape": _fx_shape(fx_only)}


def _cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return ", ".join(f for f in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
                     if f in flags) or "no AVX-512"


def _versions() -> str:
    import timm
    import torch_pruning
    import torchvision

    return (f"torchvision {torchvision.__version__}, timm {timm.__version__}, "
            f"torch-pruning {torch_pruning.__version__}")


_TITLES = {"tv": "torchvision vit_b_16 (nn.MultiheadAttention)",
           "timm": "timm vit_base_patch16_224 (qkv Linear + SDPA)"}


def report(args, rows) -> str:
    lines = [header("ViT-B/16 head + MLP pruning: fxopt vs Torch-Pruning (CPU)"),
             f"- also: {_versions()}", f"- CPU features: {_cpu_flags()}", "",
             f"Ratio {args.ratio}, L1 magnitude, uniform per group, classifier kept, for both. "
             f"224x224, batch 1, `torch.no_grad()`, {args.threads} thread(s); latency: median "
             f"per call over {args.rounds} interleaved rounds. The machine is shared: only "
             f"figures of one table compare, and differences under ~15% are noise. "
             f"`rel. to dense`: the output's relative difference from the unpruned model "
             f"(random weights: both are far from it; it shows the models run).", ""]
    for r in rows:
        dense_p, dense_m, _ = r["info"]["dense eager"]
        dense_t = r["lat"]["dense eager"]
        lines += [f"## {_TITLES[r['which']]}", "",
                  "| variant | params (M) | params ratio | GMACs | MACs ratio | latency b1 (ms) "
                  "| speedup | rel. to dense |", "|---|---|---|---|---|---|---|---|"]
        for k, (p, m, rel) in r["info"].items():
            t = r["lat"][k]
            lines.append(f"| {k} | {p / 1e6:.2f} | {p / dense_p:.3f} | {m / 1e9:.2f} | "
                         f"{m / dense_m:.3f} | {t * 1e3:.1f} | {dense_t / t:.2f}x | {rel:.3f} |")
        lines += ["", f"- Torch-Pruning's first block: {r['tp_shape']}; pruned in "
                      f"{r['tp_s']:.1f} s",
                  f"- fxopt's first block: {r['fx_shape']}; groups {r['stats']}; equals its "
                  f"masked reference to rel. err {r['rel_err']:.1e}; pruned in {r['fx_s']:.1f} s",
                  f"- load average (1 min) before/after timing: "
                  f"{', '.join(f'{v:.2f}' for v in r['load'])}", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tv", "timm"], choices=["tv", "timm"])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="markdown path; '-' prints only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = [bench(w, args.ratio, args.rounds) for w in args.models]
    text = report(args, rows)
    out = args.out
    if out is None:
        import datetime

        out = str(Path(__file__).resolve().parent / "results" /
                  f"prune-vit-{datetime.date.today().isoformat()}.md")
    write_result(text, out, "prune-vit")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
