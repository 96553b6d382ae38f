"""Hand-written attention as one SDPA call (``fuse_attention``): what it finds, and does it pay
on the CPU?

Three tables, one thread unless ``--threads``, variants interleaved round by round, medians:

1. models (random weights; every BatchNorm given a non-zero weight, timm zero-inits a block's
   last one): attentions found and rewritten by the default pipeline, the largest relative error
   of one rewrite's check, the optimized model against eager; and ``prune=0.5`` /
   ``quantize="int8"`` run with the pass (parameters left by pruning with and without it,
   int8's SQNR);
2. the op: ``softmax(q @ k^T * s [+ mask]) @ v`` in eager PyTorch against
   ``F.scaled_dot_product_attention`` at the shapes of the models below (and longer ones);
3. models timed: eager, ``optimize`` with ``disable=["fuse_attention"]``, ``optimize`` with it,
   and the library's own SDPA path in eager for reference (timm ``fused_attn=True``, HF
   ``attn_implementation="sdpa"``): timm ``vit_small_patch16_224`` with ``fused_attn=False``
   (batch 1, 224 x 224) and a BERT-base-sized HF ``BertModel`` with eager attention (12 x 768,
   seq 128, batch 1, capture="export").

    python bench/attention_sdpa.py                  # writes bench/results/attention-sdpa-<date>.md
    python bench/attention_sdpa.py --out - --skip-models
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.ir.tolerances import rel_err

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header, write_result  # noqa: E402
from _timing import calls_per_round, median_times  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Hidden(nn.Module):
    """An HF model's ``last_hidden_state`` (capture="export" takes a tensor output)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x).last_hidden_state


def _bn_nonzero(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return model


def _timm(name: str, size: int, fused: bool = True, **kw):
    import timm

    m = timm.create_model(name, pretrained=False, **kw)
    for mod in m.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = fused
    return _bn_nonzero(m.eval()), torch.randn(1, 3, size, size)


def _hf(kind: str, impl: str = "eager", **cfg):
    import transformers as T

    if kind == "bert":
        c = T.BertConfig(**{**dict(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=32), **cfg})
        m, x = T.BertModel._from_config(c, attn_implementation=impl), \
            torch.randint(0, 100, (2, 8))
    elif kind == "gpt2":
        c = T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                         bos_token_id=0, eos_token_id=0)
        m, x = T.GPT2Model._from_config(c, attn_implementation=impl), torch.randint(0, 100, (2, 8))
    else:
        c = T.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64)
        m, x = T.ViTModel._from_config(c, attn_implementation=impl), torch.randn(2, 3, 32, 32)
    return Hidden(m.eval()).eval(), x


MODELS = {  # name -> (builder, capture)
    "timm vit_tiny_patch16_224 (fused_attn=False)":
        (lambda: _timm("vit_tiny_patch16_224", 224, fused=False), "auto"),
    "timm levit_128s": (lambda: _timm("levit_128s", 224), "auto"),
    "timm botnet26t_256": (lambda: _timm("botnet26t_256", 256), "auto"),
    "timm halonet26t": (lambda: _timm("halonet26t", 256), "auto"),
    "HF BertModel eager (tiny)": (lambda: _hf("bert"), "export"),
    "HF GPT2Model eager (tiny)": (lambda: _hf("gpt2"), "export"),
    "HF ViTModel eager (tiny)": (lambda: _hf("vit"), "export"),
}


def _softmaxes(gm) -> int:
    return sum(1 for n in gm.graph.nodes if "softmax" in str(n.target))


def model_rows() -> list[str]:
    rows = []
    for name, (build, capture) in MODELS.items():
        torch.manual_seed(0)
        model, x = build()
        with torch.no_grad():
            ref = model(x)
        opt = fxopt.optimize(model, x, capture=capture)
        off = fxopt.optimize(model, x, capture=capture, disable=["fuse_attention"])
        st = opt.report.record("fuse_attention").stats
        with torch.no_grad():
            err = rel_err(opt(x), ref)
        left = []
        for dis in ([], ["fuse_attention"]):
            p = fxopt.optimize(model, x, capture=capture, prune=0.5, disable=dis)
            r = p.report.record("prune_channels")
            left.append(f"{r.params_after / r.params_before:.2f}" if r.status == "ok"
                        else r.status)
        q = fxopt.optimize(model, x, capture=capture, quantize="int8", calibration_data=[x])
        sqnr = q.report.int8.get("sqnr_db", float("nan"))
        rows.append(f"| {name} | {_softmaxes(off.graph_module)} | {st.get('attention', 0)} | "
                    f"{st.get('masked', 0)} | {st.get('worst_rel_err', 0):.1e} | {err:.1e} | "
                    f"{left[0]} / {left[1]} | {sqnr:.1f} dB |")
        print(rows[-1], flush=True)
    return rows


OP_SHAPES = [  # name, B, H, L, S, E, Ev, mask, q/k/v channels-first (BoTNet's layout)
    ("ViT-S, bs1", 1, 6, 197, 197, 64, 64, None, False),
    ("BERT-base seq 128, bs1, padding mask", 1, 12, 128, 128, 64, 64, "pad", False),
    ("BERT-base seq 128, bs8, padding mask", 8, 12, 128, 128, 64, 64, "pad", False),
    ("seq 512, bs1, padding mask", 1, 12, 512, 512, 64, 64, "pad", False),
    ("LeViT stage 1 (bias [H, L, S], Ev=32)", 1, 4, 196, 196, 16, 32, "bias", False),
    ("LeViT-like, Ev=E, bias as [1, H, L, S]", 1, 4, 196, 196, 16, 16, "bias4", False),
    ("BoTNet stage 3 (3-d, rel. pos. logits)", 4, None, 256, 256, 64, 64, "full", False),
    ("the same, q/k/v channels-first (+ 3 copies)", 4, None, 256, 256, 64, 64, "full", True),
]


def _kernel(q, k, v, mask, scale) -> str:
    from torch.nn.attention import SDPBackend

    choice = int(torch._fused_sdp_choice(q, k, v, mask, 0.0, False, scale=scale))
    return {int(b): b.name for b in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION)}.get(
        choice, str(choice)).lower()


def op_rows(rounds: int) -> list[str]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for name, b, h, length, s, e, ev, kind, strided in OP_SHAPES:
        lead = (b, h) if h is not None else (b,)

        def rand(n, d):
            if strided:  # [.., d, n] memory, read as [.., n, d] (a conv's [B, C, HW])
                return torch.randn(*lead, d, n, generator=g).transpose(-2, -1)
            return torch.randn(*lead, n, d, generator=g)

        q, k, v = rand(length, e), rand(s, e), rand(s, ev)
        mask = None
        if kind == "pad":
            mask = torch.zeros(b, 1, 1, s)
            mask[..., -s // 8:] = torch.finfo(torch.float32).min
        elif kind in ("bias", "bias4"):
            mask = torch.randn(h, length, s, generator=g)
            mask = mask[None] if kind == "bias4" else mask
        elif kind == "full":
            mask = torch.randn(*lead, length, s, generator=g)
        scale = e ** -0.5

        def manual(q):
            a = q @ k.transpose(-2, -1) * scale
            return (a if mask is None else a + mask).softmax(dim=-1) @ v

        def sdpa(q):  # as fuse_attention writes it: a last dim that is not contiguous copied
            q, kk, vv = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
            return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale)

        assert rel_err(sdpa(q), manual(q)) < 1e-5
        calls = calls_per_round(manual, q, 0.05)
        t = median_times({"manual": manual, "sdpa": sdpa}, q, rounds, calls)
        shape = f"{list(lead)} L{length} S{s} E{e}" + (f" Ev{ev}" if ev != e else "")
        kernel = _kernel(*(x.contiguous() for x in (q, k, v)), mask, scale)
        rows.append(f"| {name} | {shape} | {kernel} | {t['manual'] * 1e6:.0f} | "
                    f"{t['sdpa'] * 1e6:.0f} | {t['manual'] / t['sdpa']:.2f}x |")
        print(rows[-1], flush=True)
    return rows


def _timed(name: str, unfused, reference, x, capture: str, rounds: int) -> str:
    opt_off = fxopt.optimize(unfused, x, capture=capture, check="end",
                             disable=["fuse_attention"])
    opt_on = fxopt.optimize(unfused, x, capture=capture, check="end")
    n = opt_on.report.record("fuse_attention").stats.get("attention", 0)
    fns = {"eager": unfused, "off": opt_off, "on": opt_on, "ref": reference}
    calls = calls_per_round(unfused, x, 0.3)
    t = median_times(fns, x, rounds, calls)
    ms = {k: v * 1e3 for k, v in t.items()}
    return (f"| {name} | {n} | {ms['eager']:.1f} | {ms['off']:.1f} | {ms['on']:.1f} | "
            f"{ms['ref']:.1f} | {t['off'] / t['on']:.2f}x | {t['eager'] / t['on']:.2f}x |")


def timed_rows(rounds: int) -> list[str]:
    rows = []
    torch.manual_seed(0)
    vit, x = _timm("vit_small_patch16_224", 224, fused=False)
    ref, _ = _timm("vit_small_patch16_224", 224, fused=True)
    ref.load_state_dict(vit.state_dict())
    rows.append(_timed("timm vit_small_patch16_224, bs1", vit, ref, x, "auto", rounds))
    print(rows[-1], flush=True)
    big = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072, max_position_embeddings=512)
    torch.manual_seed(0)
    bert, _ = _hf("bert", "eager", **big)
    sdpa_bert, _ = _hf("bert", "sdpa", **big)
    sdpa_bert.load_state_dict(bert.state_dict())
    ids = torch.randint(0, 30522, (1, 128), generator=torch.Generator().manual_seed(0))
    rows.append(_timed("HF BertModel (BERT-base size), seq 128, bs1", bert, sdpa_bert, ids,
                       "export", rounds))
    print(rows[-1], flush=True)
    for name, size in (("botnet26t_256", 256), ("halonet26t", 256), ("levit_128s", 224)):
        torch.manual_seed(0)
        m, x = _timm(name, size)  # their attention is hand-written whatever fused_attn says
        rows.append(_timed(f"timm {name}, bs1", m, m, x, "auto", rounds))
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="a .md file; '-': print only")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--skip-models", action="store_true", help="timings only (tables 2 and 3)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import timm
    import transformers

    load = os.getloadavg()
    text = header("Hand-written attention as one SDPA call (fuse_attention), CPU") + \
        f"- timm: {timm.__version__}, transformers: {transformers.__version__}\n"
    if not args.skip_models:
        text += ("\n## 1. models: attentions found and rewritten by the default pipeline\n\n"
                 "softmax: softmax nodes without the pass; worst check: the largest relative "
                 "error of one rewrite's check (SDPA of the recorded q, k, v, mask against the "
                 "recorded attention output); vs eager: the optimized model's output; params "
                 "left by prune=0.5 with / without the pass; int8: SQNR vs float.\n\n"
                 "| model | softmax | rewritten | with a mask | worst check | vs eager | "
                 "prune=0.5 params left (with / without) | int8 SQNR |\n"
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
                 + "\n".join(model_rows()) + "\n")
    text += ("\n## 2. the op: eager softmax(q @ k^T * s [+ mask]) @ v against SDPA "
             "(us per call, medians)\n\n"
             "| shape | [batch dims] L S E | SDPA kernel | eager | SDPA | eager / SDPA |\n"
             "| --- | --- | --- | ---: | ---: | ---: |\n" + "\n".join(op_rows(args.rounds))
             + "\n")
    text += ("\n## 3. models timed (ms per call, medians): eager, optimize without and with "
             "fuse_attention, and the library's own SDPA path in eager\n\n"
             "| model | rewritten | eager (hand-written) | fxopt without | fxopt with | "
             "eager, library SDPA | without / with | eager / with |\n"
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
             + "\n".join(timed_rows(args.rounds)) + "\n")
    after = os.getloadavg()
    text += (f"\nLoad average (1, 5, 15 min) at the start: {load[0]:.2f}, {load[1]:.2f}, "
             f"{load[2]:.2f}; at the end: {after[0]:.2f}, {after[1]:.2f}, {after[2]:.2f} "
             f"(a shared 2-core machine: differences under ~15% are noise).\n")
    write_result(text, args.out, "attention-sdpa")
    return 0


if __name__ == "__main__":
    sys.exit(main())
