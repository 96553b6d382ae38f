"""The shared recognition of a plain self-attention call and the Linear over its weights."""
import torch
import torch.fx as fx
import torch.nn as nn

from fxopt.ir.attention import linear_from, self_attention_blocker


class Net(nn.Module):
    def __init__(self, mask=False, kv_bias=False):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=kv_bias)
        self.mask = torch.zeros(5, 5) if mask else None

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False, attn_mask=self.mask)[0]


def _call(net):
    gm = fx.symbolic_trace(net)
    n = next(n for n in gm.graph.nodes if n.op == "call_module")
    return n, gm.get_submodule(n.target)


def test_a_plain_self_attention_call_has_no_blocker():
    assert self_attention_blocker(*_call(Net())) is None


def test_masks_and_kv_bias_are_named():
    assert self_attention_blocker(*_call(Net(mask=True))) == "attn_mask"
    assert self_attention_blocker(*_call(Net(kv_bias=True))) == "bias_k/bias_v or add_zero_attn"


def test_linear_from_holds_the_modules_own_parameters():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    lin = linear_from(mha.in_proj_weight, mha.in_proj_bias)
    assert lin.weight is mha.in_proj_weight and lin.bias is mha.in_proj_bias
    assert (lin.in_features, lin.out_features) == (8, 24) and not lin.training
