"""Channel rules of the ATen ops a torch.export capture leaves (fxopt/prune/rules_aten.py).

The models call the ATen overloads directly, so symbolic tracing records them as export does;
each is pruned under the pass manager against its masked reference.
"""

import pytest
import torch
import torch.nn as nn

import fxopt

aten = torch.ops.aten


class GPT2Block(nn.Module):
    """GPT-2's Conv1D (``addmm`` with a [in, out] weight), an ATen layer_norm, transpose, an
    embedding table that starts the stream, a select and a slice along other dims."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.wte = nn.Parameter(torch.randn(50, 16, generator=g))
        self.w1 = nn.Parameter(torch.randn(16, 32, generator=g) * 0.2)
        self.b1 = nn.Parameter(torch.randn(32, generator=g) * 0.1)
        self.w2 = nn.Parameter(torch.randn(32, 16, generator=g) * 0.2)
        self.b2 = nn.Parameter(torch.randn(16, generator=g) * 0.1)
        self.ln_w = nn.Parameter(torch.rand(16, generator=g) + 0.5)
        self.ln_b = nn.Parameter(torch.randn(16, generator=g) * 0.1)
        self.head = nn.Linear(16, 4)

    def forward(self, ids):
        h = aten.embedding.default(self.wte, ids)                      # [B, N, 16]
        a = aten.layer_norm.default(h, [16], self.ln_w, self.ln_b, 1e-5)
        flat = aten.view.default(a, [-1, 16])
        m = aten.addmm.default(self.b1, flat, self.w1)
        m = aten.addmm.default(self.b2, aten.gelu.default(m), self.w2)
        h = h + aten.view.default(m, [ids.shape[0], ids.shape[1], 16])
        t = aten.transpose.int(h, 1, 2)                                 # [B, 16, N]
        t = aten.slice.Tensor(t, 2, 0, 4)                               # tokens 0..3
        return self.head(aten.select.int(t, 2, 0))                      # token 0


def test_export_style_aten_ops_prune_against_the_reference():
    model = GPT2Block().eval()
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    graph = fxopt.channel_groups(model, ids)
    assert graph.analysis.walk.unknown_ops == {}
    g = {gr.name: gr for gr in graph.groups}
    assert not g["addmm_default"].frozen and g["addmm_default"].units == 32  # the hidden units
    assert [gr.name for gr in graph.frozen] == ["head"]
    opt = fxopt.optimize(model, ids, pipeline=["prune_channels"], prune=0.5)
    rec = opt.report.record("prune_channels")
    assert rec.status == "ok" and rec.rel_err <= rec.tolerance
    params = dict(opt.graph_module.named_parameters())
    assert params["w1"].shape == (8, 16) and params["wte"].shape == (50, 8)


def test_slice_of_the_pruned_dim_freezes():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(aten.slice.Tensor(self.fc(x), 1, 0, 4))

    graph = fxopt.channel_groups(M().eval(), torch.randn(2, 8))
    g = {gr.name: gr for gr in graph.groups}
    assert g["fc"].frozen and "slice of the pruned dim" in g["fc"].reasons[0]


@pytest.mark.parametrize("op", [aten.dropout.default, aten.to.dtype])
def test_unary_rows_pass_channels_through(op):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            y = self.fc(x)
            y = op(y, 0.0, False) if op is aten.dropout.default else op(y, torch.float32)
            return self.head(y)

    graph = fxopt.channel_groups(M().eval(), torch.randn(2, 8))
    assert [gr.name for gr in graph.prunable] == ["fc"]


class EagerAttention(nn.Module):
    """Hugging Face's ``attn_implementation="eager"`` after export: q @ k^T and the weighted sum
    as ``aten.matmul``, the softmax over the keys as ``aten.softmax.int``."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.o, self.head = nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        n, t = x.shape[0], x.shape[1]

        def heads(y):
            return aten.transpose.int(aten.view.default(y, [n, t, 2, 8]), 1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = aten.matmul.default(q, aten.transpose.int(k, 2, 3)) * 8 ** -0.5
        a = aten.matmul.default(aten.softmax.int(scores, -1), v)
        a = aten.reshape.default(aten.transpose.int(a, 1, 2), [n, t, 16])
        return self.head(self.o(a).mean(1))


def test_eager_attention_heads_prune_against_the_reference():
    """matmul unites q's and k's channels (they are summed together) and carries v's to the
    output; the softmax runs over the keys, never a channel dim: nothing frozen but the head."""
    model, x = EagerAttention().eval(), torch.randn(2, 5, 16)
    graph = fxopt.channel_groups(model, x)
    assert graph.analysis.walk.unknown_ops == {}
    assert [gr.name for gr in graph.frozen] == ["head"]
    opt = fxopt.optimize(model, x, pipeline=["prune_channels"], prune=0.5)
    rec = opt.report.record("prune_channels")
    assert rec.status == "ok" and rec.rel_err <= rec.tolerance
    assert opt.graph_module.get_submodule("q").out_features == 8
