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

Each model is a ``Case`` (how to build it, how Torch-Pruning prunes it, its first block's
shape); ``bench/prune_hf.py`` adds Hugging Face BERT and ViT with the same ``bench``, table and
command line (``run``).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxopt.ir.graph import tensor_meta

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _counts import macs, params  # noqa: E402
from _env import header, write_result  # noqa: E402
from _timing import median_times  # noqa: E402

__all__ = ["Case", "CASES", "bench", "fx_shape", "main", "meta_prune", "randomize",
           "report", "run"]


def randomize(model: nn.Module, head: nn.Linear) -> nn.Module:
    """Non-trivial LayerNorm affines and a non-zero classifier ``head`` (torchvision zero-inits
    it); the model in eval mode."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
        head.weight.normal_(0, 0.02, generator=g)
    return model.eval()


@dataclass(frozen=True)
class Case:
    """One model of the comparison (``bench/prune_hf.py`` adds the Hugging Face ones).

    ``build()``: the eval model and its example inputs (a tuple); ``tp_prune(model, inputs,
    ratio)``: a Torch-Pruning copy, called like the model; ``tp_shape(tp_model)``: its first
    block as it says (heads x head dim, MLP hidden, stream); ``capture``: how the MACs of the
    eager variants are counted (``None``: ``fxopt.capture``; ``"auto"``: as ``optimize``
    captures the model); ``notes``: lines for the report; ``extra(model, inputs, ratio)``: more
    lines, measured."""

    title: str
    build: Callable[[], tuple[nn.Module, tuple]]
    tp_prune: Callable[[nn.Module, tuple, float], nn.Module]
    tp_shape: Callable[[nn.Module], str]
    capture: str | None = None
    notes: tuple[str, ...] = ()
    extra: Callable[[nn.Module, tuple, float], list[str]] | None = None


def _build_tv():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None)
    return randomize(model, model.heads.head), (torch.randn(1, 3, 224, 224),)


def _build_timm():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False)
    return randomize(model, model.head), (torch.randn(1, 3, 224, 224),)


def meta_prune(model: nn.Module, inputs, ratio: float, **kwargs):
    """Torch-Pruning's ``MetaPruner`` with L1 group magnitude importance (fxopt's ``l1``), one
    step; returns the pruner (its ``num_heads`` are the kept head counts)."""
    import torch_pruning as tp

    pruner = tp.pruner.MetaPruner(model, inputs, importance=tp.importance.GroupMagnitudeImportance(
        p=1), pruning_ratio=ratio, **kwargs)
    pruner.step()
    return pruner


def _tp_tv(model: nn.Module, x, ratio: float) -> nn.Module:
    """Torch-Pruning as in its ViT examples (see the module doc)."""
    m = copy.deepcopy(model)
    num_heads = {a: a.num_heads for a in m.modules() if isinstance(a, nn.MultiheadAttention)}
    pruner = meta_prune(m, x[0], ratio, ignored_layers=[m.heads.head], num_heads=num_heads,
                        unwrapped_parameters=[(m.class_token, 2), (m.encoder.pos_embedding, 2)])
    m.hidden_dim = m.conv_proj.out_channels
    for a in m.modules():
        if isinstance(a, nn.MultiheadAttention):
            a.num_heads = pruner.num_heads.get(a, a.num_heads)
            a.head_dim = a.embed_dim // a.num_heads
    return m.eval()


def _tp_timm(model: nn.Module, x, ratio: float) -> nn.Module:
    m = copy.deepcopy(model)
    num_heads = {a.qkv: a.num_heads for a in m.modules() if hasattr(a, "qkv")}
    pruner = meta_prune(m, x[0], ratio, ignored_layers=[m.head], num_heads=num_heads,
                        unwrapped_parameters=[(m.cls_token, 2), (m.pos_embed, 2)])
    for a in m.modules():
        if hasattr(a, "qkv"):
            a.num_heads = pruner.num_heads.get(a.qkv, a.num_heads)
            a.head_dim = a.qkv.out_features // (3 * a.num_heads)
            a.attn_dim = a.num_heads * a.head_dim
    return m.eval()


def _shape_tv(model) -> str:
    a, mlp = model.encoder.layers[0].self_attention, model.encoder.layers[0].mlp[0]
    return f"{a.num_heads}x{a.head_dim}, mlp {mlp.out_features}, stream {model.hidden_dim}"


def _shape_timm(model) -> str:
    a, mlp = model.blocks[0].attn, model.blocks[0].mlp.fc1
    return f"{a.num_heads}x{a.head_dim}, mlp {mlp.out_features}, stream {a.qkv.in_features}"


CASES = {
    "tv": Case("torchvision vit_b_16 (nn.MultiheadAttention)", _build_tv, _tp_tv, _shape_tv),
    "timm": Case("timm vit_base_patch16_224 (qkv Linear + SDPA)", _build_timm, _tp_timm,
                 _shape_timm),
}

_SDPA = (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)
# the first projection into an attention and into an MLP, by module path (torchvision, timm,
# Hugging Face BERT and ViT)
_ATTN_IN = ("in_proj", "qkv", "attention.self.query", "attention.q_proj")
_MLP_IN = ("mlp.0", "mlp.linear_1", "fc1", "intermediate.dense")


def fx_shape(opt) -> str:
    """fxopt's first block from its graph: the first attention's heads x head dim (its query's
    shape), the first MLP's hidden width, the stream (the first attention projection's input)."""
    gm = opt.graph_module
    sdpa = next((n for n in gm.graph.nodes if n.target in _SDPA), None)
    q = tensor_meta(sdpa.args[0]) if sdpa is not None else None
    heads = f"{q.shape[1]}x{q.shape[-1]}" if q is not None and len(q.shape) == 4 else "?"
    attn = [m for n, m in gm.named_modules() if n.endswith(_ATTN_IN) and hasattr(m, "weight")]
    fc1 = [m for n, m in gm.named_modules() if n.endswith(_MLP_IN)]
    if not attn or not fc1:
        return heads
    return f"{heads}, mlp {fc1[0].weight.shape[0]}, stream {attn[0].weight.shape[1]}"


def bench(case: Case, ratio: float, rounds: int):
    import fxopt

    model, x = case.build()
    with torch.no_grad():
        dense_out = model(*x)
    t0 = time.perf_counter()
    tp_model = case.tp_prune(model, x, ratio)
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
            out = v(*x)
            rel = float((out - dense_out).norm() / dense_out.norm())
            info[k] = (params(v), macs(v, x, case.capture), rel)
    rec = fx_only.report.record("prune_channels")
    load = [os.getloadavg()[0]]
    lat = median_times(variants, x, rounds, 1)
    load.append(os.getloadavg()[0])
    print(f"{case.title}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in lat.items()),
          flush=True)
    return {"title": case.title, "info": info, "lat": lat, "tp_s": tp_s, "fx_s": fx_s,
            "stats": rec.stats, "load": load, "rel_err": rec.rel_err,
            "capture": fx_only.report.capture["method"],
            "notes": list(case.notes) + (case.extra(model, x, ratio) if case.extra else []),
            "tp_shape": case.tp_shape(tp_model), "fx_shape": fx_shape(fx_only)}


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


def report(args, rows, title: str, versions: str, inputs: str) -> str:
    """The markdown: the machine, then one table and its notes per model (``bench`` rows)."""
    lines = [header(title), f"- also: {versions}", f"- CPU features: {_cpu_flags()}", "",
             f"Ratio {args.ratio}, L1 magnitude, uniform per group, classifier kept, for both. "
             f"{inputs}, `torch.no_grad()`, {args.threads} thread(s); latency: median "
             f"per call over {args.rounds} interleaved rounds. The machine is shared: only "
             f"figures of one table compare, and differences under ~15% are noise. "
             f"`rel. to dense`: the output's relative difference from the unpruned model "
             f"(random weights: both are far from it; it shows the models run).", ""]
    for r in rows:
        dense_p, dense_m, _ = r["info"]["dense eager"]
        dense_t = r["lat"]["dense eager"]
        lines += [f"## {r['title']}", "",
                  "| variant | params (M) | params ratio | GMACs | MACs ratio | latency b1 (ms) "
                  "| speedup | rel. to dense |", "|---|---|---|---|---|---|---|---|"]
        for k, (p, m, rel) in r["info"].items():
            t = r["lat"][k]
            lines.append(f"| {k} | {p / 1e6:.2f} | {p / dense_p:.3f} | {m / 1e9:.2f} | "
                         f"{m / dense_m:.3f} | {t * 1e3:.1f} | {dense_t / t:.2f}x | {rel:.3f} |")
        lines += ["", f"- Torch-Pruning's first block: {r['tp_shape']}; pruned in "
                      f"{r['tp_s']:.1f} s",
                  f"- fxopt's first block: {r['fx_shape']}; groups {r['stats']}; equals its "
                  f"masked reference to rel. err {r['rel_err']:.1e}; pruned in {r['fx_s']:.1f} s "
                  f"(capture: {r['capture']})",
                  f"- load average (1 min) before/after timing: "
                  f"{', '.join(f'{v:.2f}' for v in r['load'])}"]
        lines += [f"- {n}" for n in r["notes"]] + [""]
    return "\n".join(lines)


def run(argv, cases: dict[str, Case], stem: str, title: str, versions: Callable[[], str],
        inputs: str, description: str) -> int:
    """The command line both scripts share: ``--models`` picks among ``cases``; the markdown
    goes to ``bench/results/<stem>-<date>.md`` unless ``--out`` says otherwise."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--models", nargs="+", default=list(cases), choices=list(cases))
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="markdown path; '-' prints only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = [bench(cases[w], args.ratio, args.rounds) for w in args.models]
    write_result(report(args, rows, title, versions(), inputs), args.out, stem)
    return 0


def main(argv=None) -> int:
    return run(argv, CASES, "prune-vit", "ViT-B/16 head + MLP pruning: fxopt vs Torch-Pruning "
               "(CPU)", _versions, "224x224, batch 1", __doc__.split("\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
