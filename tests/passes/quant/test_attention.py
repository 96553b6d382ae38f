"""quantize_int8 decomposes a standard nn.MultiheadAttention leaf so its projections are int8
(passes/quant/attention.py): the decomposition equals the leaf call, the two projections are
found and quantized, the other cases stay whole and are named, the user's model is untouched."""
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt

attention = __import__("fxopt.passes.quant.attention", fromlist=["attention"])


class Block(nn.Module):
    """A pre-norm encoder block's attention half, as torchvision's ViT writes it."""

    def __init__(self, d=32, h=4, batch_first=True, mask=False, weights=False):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.mha = nn.MultiheadAttention(d, h, batch_first=batch_first)
        self.fc = nn.Linear(d, d)
        self.mask, self.weights = mask, weights
        self.register_buffer("attn_mask", torch.zeros(10, 10))

    def forward(self, x):
        y = self.ln(x)
        if self.mask:
            a, _ = self.mha(y, y, y, need_weights=False, attn_mask=self.attn_mask)
        elif self.weights:
            a, w = self.mha(y, y, y)
            a = a + w.mean()
        else:
            a, _ = self.mha(y, y, y, need_weights=False)
        return self.fc(torch.relu(x + a))


def _cal(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 10, 32, generator=g) for _ in range(n)]


def test_decomposition_equals_the_leaf_call():
    torch.manual_seed(0)
    m, x = Block().eval(), torch.randn(2, 10, 32)
    gm = fxopt.capture(m, x)
    out, done, notes = attention.decompose_attention(gm, (x,))
    assert done == ["mha"] and notes == [] and out is not gm
    targets = [n.target for n in out.graph.nodes]
    assert F.scaled_dot_product_attention in targets and "mha" not in targets
    assert {"mha.in_proj", "mha.out_proj"} <= set(targets)
    assert type(out.get_submodule("mha.out_proj")) is nn.Linear
    assert any(n.op == "call_module" and n.target == "mha" for n in gm.graph.nodes)  # untouched
    for xb in _cal(2, 3):
        with torch.no_grad():
            assert torch.allclose(out(xb), m(xb), atol=1e-5)


def test_projections_int8_on_the_cpu():
    torch.manual_seed(0)
    m, x = Block().eval(), torch.randn(2, 10, 32)
    opt = fxopt.optimize(m, x, quantize="int8", calibration_data=_cal())
    q, low = opt.report.record("quantize_int8"), opt.report.record("lower_int8_cpu")
    assert q.status == "ok" and low.status == "ok", (q.notes, low.notes)
    assert q.stats["linear"] == 3 and q.stats["attention_decomposed"] == 1
    assert q.stats["kept_float"] == 0 and q.stats["sqnr_db"] > 25
    assert any("attention call(s) decomposed" in n for n in q.notes)
    assert low.stats["fallback"] == 0
    # the user's module is not modified: no in_proj added, out_proj keeps its type
    assert not hasattr(m.mha, "in_proj") and type(m.mha.out_proj) is not nn.Linear
    with torch.no_grad():
        assert (opt(x) - m(x)).abs().max() < 0.2


def test_decomposed_int8_module_saves_and_loads(tmp_path):
    """The decomposed graph (Linear modules, scaled_dot_product_attention) saves and loads."""
    torch.manual_seed(0)
    m, x = Block().eval(), torch.randn(2, 10, 32)
    opt = fxopt.optimize(m, x, quantize="int8", calibration_data=_cal())
    back = fxopt.load(opt.save(tmp_path / "block.fxopt"))
    with torch.no_grad():
        assert torch.equal(back(x), opt(x))


@pytest.mark.parametrize("kw,why", [({"batch_first": False}, "batch_first"),
                                    ({"mask": True}, "attn_mask"),
                                    ({"weights": True}, "need_weights")])
def test_other_cases_stay_whole_and_are_named(kw, why):
    torch.manual_seed(0)
    m = Block(**kw).eval()
    x = torch.randn(2, 10, 32)
    gm = fxopt.capture(m, x)
    out, done, notes = attention.decompose_attention(gm, (x,))
    assert out is gm and done == [] and len(notes) == 1 and why in notes[0], notes
    assert any(n.op == "call_module" and n.target == "mha" for n in gm.graph.nodes)


def test_attention_weights_read_keeps_it_whole():
    class Reads(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            out = self.mha(x, x, x, need_weights=False)
            return out[0] * 2

    m, x = Reads().eval(), torch.randn(1, 4, 16)
    gm = fxopt.capture(m, x)
    n = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert attention.standard_self_attention(gm, n) is None
    assert all(u.target is operator.getitem for u in n.users)


@pytest.mark.slow
def test_torchvision_vit_every_linear_int8():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = torchvision.models.vit_b_32(weights=None, image_size=64).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 64, 64, generator=g)
    cal = [torch.randn(2, 3, 64, 64, generator=g) for _ in range(2)]
    opt = fxopt.optimize(m, x, quantize="int8", calibration_data=cal)
    q = opt.report.record("quantize_int8")
    assert q.status == "ok" and q.stats["attention_decomposed"] == 12
    linears = sum(isinstance(mod, nn.Linear) for mod in m.modules()) + 12  # + in_proj
    assert q.stats["linear"] == linears and "no_cpu_kernel" not in q.stats


# -- torchvision's Swin ---------------------------------------------------------------------
@pytest.mark.parametrize("hw,shift,v2", [((7, 7), [3, 3], False), ((9, 5), [3, 3], False),
                                         ((9, 5), [3, 3], True), ((4, 4), [3, 3], True)])
def test_window_attention_between_projections_equals_torchvision(hw, shift, v2):
    """The core between the projections, the projections applied per token around it, equals
    torchvision's shifted_window_attention: padded (9x5, 4x4), shifted, V2's cosine attention
    and q/v-only bias."""
    swin = pytest.importorskip("torchvision.models.swin_transformer")
    g = torch.Generator().manual_seed(0)
    c, heads, win = 16, 2, [7, 7]
    x = torch.randn(2, *hw, c, generator=g)
    w_qkv, b_qkv = torch.randn(3 * c, c, generator=g) * 0.2, torch.randn(3 * c, generator=g)
    w_p, b_p = torch.randn(c, c, generator=g) * 0.2, torch.randn(c, generator=g)
    rel = torch.randn(heads, 49, 49, generator=g)
    logit = torch.log(10 * torch.ones(heads, 1, 1)) if v2 else None
    want = swin.shifted_window_attention(x, w_qkv, w_p, rel, win, heads, shift, qkv_bias=b_qkv,
                                         proj_bias=b_p, logit_scale=logit, training=False)
    b = b_qkv.clone()
    if v2:
        b[c:2 * c] = 0
    core = attention.window_attention(F.linear(x, w_qkv, b), rel, win, heads, shift,
                                      logit_scale=logit, pad_value=b)
    assert torch.allclose(F.linear(core, w_p, b_p), want, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["swin_t", "swin_v2_t"])
def test_torchvision_swin_projections_int8(name):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = torchvision.models.get_model(name, weights=None).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 64, 64, generator=g)
    gm = fxopt.capture(m, x)
    out, done, notes = attention.decompose_attention(gm, (x,))
    assert len(done) == 12 and notes == []
    with torch.no_grad():
        assert torch.allclose(out(x), m(x), atol=1e-5)
    # every projection int8 (min_sqnr_db=None: the default's target keeps some float)
    opt = fxopt.optimize(m, x, quantize=fxopt.QuantConfig(min_sqnr_db=None), calibration_data=[
        torch.randn(2, 3, 64, 64, generator=g) for _ in range(2)])
    q = opt.report.record("quantize_int8")
    assert q.status == "ok" and q.stats["attention_decomposed"] == 12
    linears = sum(isinstance(mod, nn.Linear) and "cpb_mlp" not in p  # V2's: constant-folded
                  for p, mod in m.named_modules())
    assert q.stats["linear"] == linears and "no_cpu_kernel" not in q.stats
