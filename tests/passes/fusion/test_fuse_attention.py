"""``fuse_attention``: hand-written attention becomes one ``F.scaled_dot_product_attention``.

Every spelling the pass reads (matmul forms, k^T forms, scales, masks, softmax forms, eval
dropout) is rewritten and equal to eager; what it must leave alone is left as it was; a rewrite
the numeric check refuses is left alone with a note; gradients through the rewritten graph equal
the original's; the default pipeline, ``prune=0.5`` and ``quantize="int8"`` run on SDPA; a tiny
Hugging Face eager BERT and timm ViT (``fused_attn=False``, its mask helpers) through
``optimize``; the real timm models (LeViT, BoTNet, HaloNet) are ``slow``.
"""
import copy
import math
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
import fxopt.passes.fusion.fuse_attention as fa
from fxopt.infra.manager import PassManager
from fxopt.infra.registry import PassContext
from fxopt.ir.tolerances import rel_err
from fxopt.pipelines import expand_pipeline
from untouched import assert_same, snapshot

B, H, L, S, E = 2, 4, 6, 7, 8


def counts(gm) -> Counter:
    out = Counter()
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method"):
            out[n.target if isinstance(n.target, str) else n.target.__name__] += 1
        elif n.op == "call_module":
            out[type(gm.get_submodule(n.target)).__name__] += 1
    return out


def _scores(q, k, form):
    """q @ k^T in one of the spellings the pass reads."""
    if form == "operator":
        return q @ k.transpose(-2, -1)
    if form == "torch_matmul":
        return torch.matmul(q, k.transpose(2, 3))
    if form == "method_mT":
        return q.matmul(k.mT)
    if form == "permute":
        return q @ k.permute(0, 1, 3, 2)
    if form == "swapaxes":
        return torch.matmul(q, torch.transpose(k, -1, -2))
    raise ValueError(form)


class Attn(nn.Module):
    """Cross attention (L != S, Ev != E) from tokens through Linear projections, written in the
    spelling ``form`` (the keyword flags pick the scale, mask, softmax and dropout spellings)."""

    def __init__(self, form="operator", scale="mul", softmax="method", dropout=None, bias=None,
                 mask=False, ev=E, channels_first=False):
        super().__init__()
        self.channels_first = channels_first
        self.form, self.scale, self.softmax, self.dropout = form, scale, softmax, dropout
        self.q, self.k, self.v = nn.Linear(16, H * E), nn.Linear(16, H * E), nn.Linear(16, H * ev)
        self.ev = ev
        # bias: "buffer" (LeViT's eval cache, HF's folded masks), "parameter" or None
        if bias == "buffer":
            self.register_buffer("bias", torch.randn(H, L, S))
        else:
            self.bias = nn.Parameter(torch.randn(H, L, S)) if bias == "parameter" else None
        self.mask = mask
        self.drop = nn.Dropout(0.2)
        self.sm = nn.Softmax(dim=-1)

    def forward(self, x, y, mask=None):
        if self.channels_first:  # [B, H, E, L] in memory, as a conv's [B, C, HW] (BoTNet)
            q, k, v = (t.transpose(1, 2).contiguous().unflatten(1, (H, -1)).transpose(-2, -1)
                       for t in (self.q(x), self.k(y), self.v(y)))
        else:
            q = self.q(x).unflatten(-1, (H, E)).transpose(1, 2)  # [B, H, L, E]
            k = self.k(y).unflatten(-1, (H, E)).transpose(1, 2)  # [B, H, S, E]
            v = self.v(y).unflatten(-1, (H, self.ev)).transpose(1, 2)
        d = q.shape[-1] if self.scale == "size" else E  # "size": the graph computes it
        if self.scale == "on_q":
            a = _scores(q * d ** -0.5, k, self.form)
        elif self.scale == "on_both":
            a = _scores(q * d ** -0.25, k * d ** -0.25, self.form)
        else:
            a = _scores(q, k, self.form)
            if self.scale in ("mul", "size"):
                a = a * d ** -0.5
            elif self.scale == "rmul":
                a = 0.125 * a
            elif self.scale == "div_sqrt":
                a = a / math.sqrt(d)
            elif self.scale == "torch_div":
                a = torch.div(a, 4.0)
        if self.bias is not None:
            a = a + self.bias
        if self.mask:
            a = mask + a  # the mask first: the pass finds the logits on either side
        if self.softmax == "method":
            p = a.softmax(dim=-1)
        elif self.softmax == "F":
            p = F.softmax(a, dim=3)  # the last dim as a positive index
        elif self.softmax == "torch_dtype":
            p = torch.softmax(a, -1, dtype=torch.float32)
        elif self.softmax == "module":
            p = self.sm(a)
        if self.dropout == "module":
            p = self.drop(p)
        elif self.dropout == "function":
            p = F.dropout(p, 0.2, training=self.training)
        o = torch.matmul(p, v) if self.form == "torch_matmul" else p @ v
        return o.transpose(1, 2).flatten(2)


def _inputs(mask=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(B, L, 16, generator=g), torch.randn(B, S, 16, generator=g)
    if not mask:
        return (x, y)
    m = torch.zeros(B, 1, 1, S)
    m[0, ..., -2:] = torch.finfo(torch.float32).min  # padding (HF's fill): never a whole row
    m[1, ..., -1] = -1e4
    return (x, y, m)


def _run(model, inputs, passes=("fuse_attention",)):
    """The captured graph before, and after ``passes`` through the manager (each checked)."""
    torch.manual_seed(0)
    gm = fxopt.capture(model.eval(), inputs)
    before = copy.deepcopy(gm)
    ctx = PassContext(example_inputs=inputs, target="cpu")
    gm, report = PassManager(expand_pipeline(list(passes)), check="each").run(gm, ctx)
    return before, gm, report.record("fuse_attention")


SPELLINGS = {
    "operator": dict(form="operator"),
    "torch_matmul": dict(form="torch_matmul", scale="div_sqrt", softmax="F"),
    "method_mT": dict(form="method_mT", scale="rmul", softmax="torch_dtype"),
    "permute": dict(form="permute", scale="torch_div", softmax="module"),
    "swapaxes": dict(form="swapaxes", scale="none"),
    "scale_on_q": dict(scale="on_q"),
    "scale_on_q_and_k": dict(scale="on_both", dropout="module"),
    "dropout_function": dict(dropout="function"),
    "bias": dict(bias="buffer"),
    "mask": dict(mask=True),
    "bias_and_mask": dict(bias="buffer", mask=True, dropout="module"),
    "scale_from_size": dict(scale="size"),
    "channels_first": dict(channels_first=True, bias="buffer"),
}


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_each_spelling_becomes_sdpa(name):
    kw = SPELLINGS[name]
    model = Attn(**kw).eval()
    inputs = _inputs(mask=kw.get("mask", False))
    before, gm, rec = _run(model, inputs)
    assert rec.status == "ok" and rec.modified, rec.notes
    assert rec.stats["attention"] == 1
    assert rec.stats.get("masked", 0) == int("bias" in kw or kw.get("mask", False))
    c = counts(gm)
    assert c["scaled_dot_product_attention"] == 1
    # a last dim that is not contiguous is copied (the fused kernels need it); none otherwise
    assert c["contiguous"] == counts(before)["contiguous"] + 3 * kw.get("channels_first", 0)
    # a [H, L, S] bias is given q's rank (the CPU's flash kernel takes no 3-d mask)
    assert c["unsqueeze"] == int("bias" in kw and not kw.get("mask"))
    assert c["softmax"] + c["Softmax"] + c["matmul"] + c["Dropout"] + c["dropout"] == 0, c
    sdpa = next(n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention)
    scale = {"none": 1.0, "rmul": 0.125, "torch_div": 0.25}.get(kw.get("scale"), E ** -0.5)
    if kw.get("scale") == "size":  # q.shape[-1] ** -0.5 stays a computation: the scale reads it
        assert isinstance(sdpa.kwargs["scale"], torch.fx.Node)
    else:
        assert sdpa.kwargs["scale"] == pytest.approx(scale, rel=1e-12)  # always written
    with torch.no_grad():
        for seed in (0, 1):  # the example inputs and others
            new = _inputs(mask=kw.get("mask", False), seed=seed)
            out, ref = gm(*new), model(*new)
            assert rel_err(out, ref) < 1e-6 and torch.isfinite(out).all()
    # idempotent
    code = gm.code
    again = fa.fuse_attention(gm, PassContext(example_inputs=inputs))
    assert again.modified is False and gm.code == code


class Bmm(nn.Module):
    """torch.bmm on 3-d heads ([B * H, L, E]), the scale on the logits, then a causal mask."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 3 * H * E)
        self.register_buffer("causal", torch.full((L, L), float("-inf")).triu(1))

    def forward(self, x):
        qkv = self.qkv(x).unflatten(-1, (3, H, E)).permute(2, 0, 3, 1, 4).flatten(1, 2)
        q, k, v = qkv[0], qkv[1], qkv[2]
        p = F.softmax(torch.bmm(q, k.transpose(1, 2)) * E ** -0.5 + self.causal, dim=-1)
        return torch.bmm(p, v)


def test_bmm_on_three_dims():
    model, x = Bmm().eval(), torch.randn(B, L, 16)
    before, gm, rec = _run(model, (x,))
    assert rec.stats["attention"] == 1 and counts(gm)["bmm"] == 0
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) < 1e-6


class MatmulMaskFirst(nn.Module):
    """A mask that is itself a matmul, read twice, written first: ``rel + q @ k^T * s``."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 3 * H * E)
        self.register_buffer("rel_k", torch.randn(H, E, L))

    def forward(self, x):
        qkv = self.qkv(x).unflatten(-1, (3, H, E)).permute(2, 0, 3, 1, 4)
        rel = qkv[0] @ self.rel_k  # [B, H, L, L]
        p = (rel + qkv[0] @ qkv[1].transpose(-2, -1) * 0.3).softmax(-1)
        return p @ qkv[2] + rel.mean()


def test_the_logits_on_either_side_of_the_add():
    model, x = MatmulMaskFirst().eval(), torch.randn(B, L, 16)
    before, gm, rec = _run(model, (x,))
    assert rec.stats["attention"] == 1 and rec.stats["masked"] == 1
    sdpa = next(n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention)
    assert sdpa.kwargs["scale"] == 0.3 and counts(gm)["matmul"] == 1  # rel stays, the mask
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) < 1e-6


class LeftAlone(nn.Module):
    """Softmax-then-matmul shapes the pass must leave alone, one per ``case``."""

    def __init__(self, case):
        super().__init__()
        self.case = case
        self.qkv = nn.Linear(16, 3 * H * E)
        self.t = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        qkv = self.qkv(x).unflatten(-1, (3, H, E)).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        s = q @ k.transpose(-2, -1)
        c = self.case
        if c == "softmax_dim":
            return s.softmax(dim=-2) @ v
        if c == "probabilities_returned":
            p = (s * 0.3).softmax(-1)
            return p @ v, p
        if c == "logits_read":
            s = s * 0.3
            return s.softmax(-1) @ v + s.mean()
        if c == "tensor_scale":
            return (s * self.t.exp()).softmax(-1) @ v
        if c == "input_scale":
            return (s * x.abs().mean()).softmax(-1) @ v
        if c == "masked_fill":
            mask = torch.ones(L, L, dtype=torch.bool).triu(1)
            return s.masked_fill(mask, float("-inf")).softmax(-1) @ v
        if c == "mask_before_scale":
            return ((s + x[:, None, :, :L]) * 0.3).softmax(-1) @ v
        if c == "ranks":  # k 3-d (one sample's k for all), broadcast by the matmul
            k3 = k[0]
            return (q @ k3.transpose(-2, -1)).softmax(-1) @ v
        if c == "broadcast_batch":  # one k for every head: SDPA wants equal batch dims
            return (q @ k[:, :1].transpose(-2, -1)).softmax(-1) @ v
        if c == "mask_grows":  # the mask broadcasts the logits to more dims
            return (s + x[None, :, None, :, :L]).softmax(-1) @ v
        if c == "bool_mask":  # float + bool promotes: not SDPA's boolean mask
            return (s + (x[:, None, :, :L] > 0)).softmax(-1) @ v
        raise ValueError(c)


NEGATIVES = ["softmax_dim", "probabilities_returned", "logits_read", "tensor_scale",
             "input_scale", "masked_fill", "mask_before_scale", "ranks", "broadcast_batch",
             "mask_grows", "bool_mask"]
# the cases where the pass says why (it found q @ k^T under a softmax)
NOTED = {"softmax_dim": "not the last", "probabilities_returned": "read elsewhere",
         "logits_read": "read elsewhere", "mask_before_scale": "before the scale",
         "ranks": "ranks", "broadcast_batch": "batch dims differ",
         "mask_grows": "does not broadcast", "bool_mask": "torch.bool"}


@pytest.mark.parametrize("case", NEGATIVES)
def test_left_alone(case):
    model, x = LeftAlone(case).eval(), torch.randn(B, L, 16)
    gm = fxopt.capture(model, (x,))
    code = gm.code
    res = fa.fuse_attention(gm, PassContext(example_inputs=(x,)))
    assert res.modified is False and gm.code == code
    if case in NOTED:
        assert any(NOTED[case] in n for n in res.notes), res.notes


def test_a_rewrite_the_check_refuses_stays(monkeypatch):
    """The numeric check is real: a reading with a wrong scale is refused on the example
    inputs, the attention stays as it was and a note says by how much SDPA differed."""
    real = fa.read_attention

    def wrong_scale(node):
        att = real(node)
        if isinstance(att, fa.Attention):
            att.scale.append(fa.Factor(1.5))
        return att

    monkeypatch.setattr(fa, "read_attention", wrong_scale)
    model, x = Attn().eval(), _inputs()
    gm = fxopt.capture(model, x)
    code = gm.code
    res = fa.fuse_attention(gm, PassContext(example_inputs=x))
    assert res.modified is False and gm.code == code
    assert res.stats == {"left": 1}
    assert any("SDPA differs by" in n for n in res.notes), res.notes


@pytest.mark.parametrize("kw", [dict(ev=5), dict(bias="parameter")])
def test_left_where_sdpa_takes_its_math_path(kw, monkeypatch):
    """Where PyTorch's dispatch gives SDPA its math fallback on the CPU (v's head dim not q's;
    a mask that requires grad, even under no_grad) SDPA is slower than the hand-written ops
    (LeViT's shapes: 2x, bench/results/attention-sdpa-2026-12-06.md): left, with a note. The
    reading itself is right: with the dispatch rule off, the rewrite is equal to eager."""
    model, x = Attn(**kw).eval(), _inputs()
    gm = fxopt.capture(model, x)
    code = gm.code
    res = fa.fuse_attention(gm, PassContext(example_inputs=x))
    assert res.modified is False and gm.code == code
    assert res.stats == {"left": 1, "left_math_fallback": 1}
    assert any("math fallback on cpu" in n for n in res.notes), res.notes
    monkeypatch.setattr(fa, "math_fallback", lambda *a: False)
    before, gm, rec = _run(model, x)
    assert rec.stats["attention"] == 1
    with torch.no_grad():
        assert rel_err(gm(*x), model(*x)) < 1e-6


def test_gradients_through_sdpa_equal_the_original(monkeypatch):
    """An optimized module can be fine-tuned: the rewritten graph's gradients (input and
    parameters, the attention bias among them) equal the original graph's. (The rewrite with a
    trainable bias is what a device whose fused SDPA takes mask gradients gets.)"""
    monkeypatch.setattr(fa, "math_fallback", lambda *a: False)
    model, inputs = Attn(bias="parameter", mask=True).eval(), _inputs(mask=True)
    before, gm, rec = _run(model, inputs)
    assert rec.stats["attention"] == 1
    grads = []
    for g in (before, gm):
        x = inputs[0].clone().requires_grad_()
        g.zero_grad()
        g(x, *inputs[1:]).square().sum().backward()
        grads.append([x.grad] + [p.grad for _, p in sorted(g.named_parameters())])
    for a, b in zip(*grads):  # k's bias: a zero gradient (softmax ignores a per-row shift)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_default_pipeline_prune_and_int8_see_sdpa():
    """In the default pipeline before pruning and int8: pruning's SDPA rule removes whole
    heads' channels (the scale stays the user's), int8 quantizes the projections around it;
    the user's model is untouched."""
    model, x = Attn(bias="buffer").eval(), _inputs()
    before = snapshot(model)
    opt = fxopt.optimize(model, x)
    assert opt.report.record("fuse_attention").stats["attention"] == 1
    assert opt.report.pipeline.index("fuse_attention") == 1
    off = fxopt.optimize(model, x, disable=["fuse_attention"])
    assert "fuse_attention" not in off.report.pipeline
    assert counts(off.graph_module)["softmax"] == 1
    pruned = fxopt.optimize(model, x, prune=0.5)
    pl = pruned.report.pipeline
    assert pl.index("fuse_attention") < pl.index("prune_channels")
    rec = pruned.report.record("prune_channels")
    assert rec.status == "ok" and rec.params_after < rec.params_before
    assert counts(pruned.graph_module)["scaled_dot_product_attention"] == 1
    cal = [_inputs(seed=s) for s in range(1, 4)]
    q = fxopt.optimize(model, x, quantize="int8", calibration_data=cal)
    assert counts(q.graph_module)["scaled_dot_product_attention"] == 1
    assert q.report.record("quantize_int8").stats["linear"] == 3
    with torch.no_grad():
        assert rel_err(q(*x), model(*x)) < 0.1
    assert_same(model, before)


def test_hugging_face_eager_bert():
    """A tiny BERT with ``attn_implementation="eager"`` (captured through torch.export): both
    layers' attentions, with the padding mask, become SDPA; equal to eager."""
    T = pytest.importorskip("transformers")
    pytest.importorskip("fxopt.ir.export_capture")

    class Hidden(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(ids).last_hidden_state

    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, max_position_embeddings=32)
    model = Hidden(T.BertModel._from_config(cfg, attn_implementation="eager")).eval()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    opt = fxopt.optimize(model, ids, capture="export")
    rec = opt.report.record("fuse_attention")
    assert rec.status == "ok" and rec.stats["attention"] == 2 and rec.stats["masked"] == 2
    assert counts(opt.graph_module)["scaled_dot_product_attention"] == 2
    with torch.no_grad():
        assert rel_err(opt(ids), model(ids)) < 1e-5


def test_timm_vit_unfused_attention_and_its_mask_helpers():
    """timm's ``fused_attn=False`` path (``q * scale``, ``resolve_self_attn_mask`` and
    ``maybe_add_mask``): SDPA reads timm's mask, so a causal or additive mask given at run time
    still gives what the eager model gives."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, depth=2, num_classes=5).eval()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    x = torch.randn(2, 3, 32, 32)
    before, gm, rec = _run(model, (x,), passes=("cleanup", "fuse_attention"))
    assert rec.stats["attention"] == 2 and "masked" not in rec.stats
    assert counts(gm)["softmax"] == 0
    n = 17  # 16 patches and the class token
    bias = torch.randn(n, n)
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) < 1e-5
        assert rel_err(gm(x, bias), model(x, attn_mask=bias)) < 1e-5
        assert rel_err(gm(x, None, True), model(x, is_causal=True)) < 1e-5


class TimmMaskAndBias(nn.Module):
    """timm's mask helpers beside an attention bias: two masks, one of them None unless the
    caller passes ``attn_mask`` or ``is_causal``; the rewrite adds them with timm's own
    ``maybe_add_mask``."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 3 * H * E)
        self.register_buffer("bias", torch.randn(H, L, L))

    def forward(self, x, attn_mask=None, is_causal=False):
        from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

        qkv = self.qkv(x).unflatten(-1, (3, H, E)).permute(2, 0, 3, 1, 4)
        qk = qkv[0] @ qkv[1].transpose(-2, -1)
        attn_bias = resolve_self_attn_mask(L, qk, attn_mask, is_causal=is_causal)
        attn = maybe_add_mask(qk * E ** -0.5 + self.bias, attn_bias)
        return attn.softmax(dim=-1) @ qkv[2]


def test_timm_mask_beside_a_bias():
    pytest.importorskip("timm")
    model, x = TimmMaskAndBias().eval(), torch.randn(B, L, 16)
    before, gm, rec = _run(model, (x,))
    assert rec.stats["attention"] == 1 and rec.stats["masked"] == 1
    assert counts(gm)["maybe_add_mask"] == 1 and counts(gm)["matmul"] == 0
    extra = torch.randn(L, L)
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) < 1e-6
        assert rel_err(gm(x, extra), model(x, extra)) < 1e-6
        assert rel_err(gm(x, None, True), model(x, is_causal=True)) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("name, size, found", [("botnet26t_256", 256, 3),
                                               ("halonet26t", 256, 3),
                                               ("levit_128s", 224, 11)])
def test_timm_models_with_biases_and_relative_positions(name, size, found):
    """BoTNet and HaloNet (relative position logits computed from q, q/k/v channels-first):
    every attention becomes SDPA with its logits as the mask, q/k/v copied contiguous; LeViT
    (attention biases; v's head dim twice q's): all found, all left on the CPU, where SDPA
    would take its math path. Equal to eager with every BatchNorm given a non-zero weight
    (timm zero-inits a block's last one)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    x = torch.randn(1, 3, size, size)
    opt = fxopt.optimize(model, x)
    rec = opt.report.record("fuse_attention")
    if name == "levit_128s":
        assert rec.stats == {"left": found, "left_math_fallback": found}
        assert counts(opt.graph_module)["softmax"] == found
    else:
        assert rec.stats["attention"] == found and rec.stats["masked"] == found
        assert counts(opt.graph_module)["softmax"] == 0
        assert counts(opt.graph_module)["contiguous"] >= 3 * found
    with torch.no_grad():
        assert rel_err(opt(x), model(x)) < 1e-5
