"""Opening nn.MultiheadAttention leaves into heads (fxopt/prune/attention.py)."""

import torch
import torch.nn as nn

import fxopt
from fxopt.prune.attention import open_attention
from fxopt.prune.channels import analyze_channels

import prune_zoo as zoo  # noqa: E402  (tests/support, on the path from tests/conftest.py)


def test_opened_attention_computes_the_same_and_heads_are_units():
    model, x = zoo.make("attention_mha")
    gm = fxopt.capture(model, x)
    opened, k = open_attention(gm, (x,))
    assert k == 1 and not any(isinstance(m, nn.MultiheadAttention) for m in opened.modules())
    assert any(isinstance(m, nn.MultiheadAttention) for m in gm.modules())  # gm untouched
    with torch.no_grad():
        torch.testing.assert_close(opened(x), model(x), rtol=1e-5, atol=1e-6)
    g = {gr.name: gr for gr in analyze_channels(opened).groups}
    heads = g["attn.mha_in_proj"]
    # 4 heads of dim 4: a unit is one head's q, k and v rows (12 channels)
    assert not heads.frozen and heads.units == 4 and set(heads.unit_widths) == {12}


def test_prune_removes_whole_heads():
    model, x = zoo.make("attention_mha")
    opt = fxopt.optimize(model, x, pipeline=["prune_channels"], prune=0.5)
    rec = opt.report.record("prune_channels")
    assert rec.status == "ok" and rec.stats["attention_opened"] == 1
    w = dict(opt.graph_module.named_parameters())["attn.mha_in_proj.weight"]
    assert w.shape[0] == 3 * 2 * 4  # 2 heads of dim 4 left, q/k/v
    assert model.attn.mha.in_proj_weight.shape == (48, 16)  # the user's model is not changed


class MaskedMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.fc(x)
        y, w = self.mha(h, h, h, attn_mask=torch.zeros(5, 5))
        return self.head(y) + w.sum()


def test_a_call_it_cannot_open_stays_a_leaf_and_freezes():
    x = torch.randn(2, 5, 8)
    gm = fxopt.capture(MaskedMHA().eval(), x)
    same, k = open_attention(gm, (x,))
    assert k == 0 and same is gm
    g = {gr.name: gr for gr in analyze_channels(gm).groups}
    assert g["fc"].frozen


def test_pruned_opened_attention_saves_and_loads(tmp_path):
    model, x = zoo.make("attention_mha")
    opt = fxopt.optimize(model, x, prune=0.5)
    back = fxopt.load(opt.save(tmp_path / "vit.fxopt"))
    with torch.no_grad():
        torch.testing.assert_close(back(x), opt(x))
