"""Attention-head and MLP pruning of Hugging Face BERT and ViT (CPU): fxopt against Torch-Pruning.

The Hugging Face half of ``bench/prune_vit.py`` (its ``Case``, ``bench`` and table code; this
file only says how to build and prune each model). Random weights from a config, no downloads,
``attn_implementation="sdpa"`` (transformers' default):

- ``hf_bert``: ``BertModel`` at bert-base size (hidden 768, 12 layers, 12 heads, intermediate
  3072), batch 1, 128 int64 ``input_ids`` and an ``attention_mask`` (96 tokens, 32 padding).
  The model's output is ``pooler_output``, the tensor Torch-Pruning's ``prune_hf_bert.py``
  ranks by (``output_transform``); its pooler is ignored there, and fxopt never prunes what
  reaches the output. fxopt keeps the shape of every model output, so with
  ``last_hidden_state`` as the output the residual stream stays: measured below the table.
- ``hf_vit``: ``ViTForImageClassification`` at vit-base size, 1000 classes, 224x224, the logits.

Torch-Pruning runs as its ``examples/transformers/prune_hf_bert.py`` and ``prune_hf_vit.py`` set
it up: ``num_heads`` for the query, key and value projections of every attention; whole heads
for BERT (``prune_num_heads=True, prune_head_dims=False, head_pruning_ratio`` = the ratio), head
dims for ViT (``prune_head_dims=True``); pooler / classifier ignored; then each attention's
``num_attention_heads`` and head size are set from the pruned projections, as the examples do.
Two differences from them: the importance is L1 group magnitude for both (fxopt's ``l1``; the
BERT example uses L2), and transformers 5 renamed ViT's attention (``ViTAttention`` with
``q_proj``/``k_proj``/``v_proj`` and ``head_dim``; the example imports ``ViTSelfAttention`` and
fails with ImportError), so the ViT setup names the new module and attributes.

    python bench/prune_hf.py                 # writes bench/results/prune-hf-<date>.md
    python bench/prune_hf.py --rounds 3 --models hf_bert --out -

Needs ``transformers`` and ``torch-pruning`` (the ``bench`` extra).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn as nn

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
from prune_vit import Case, meta_prune, randomize, run  # noqa: E402

__all__ = ["CASES", "Pooled", "Logits", "main"]

SEQ_LEN, REAL_TOKENS = 128, 96


class Pooled(nn.Module):
    """A ``BertModel`` called with ``input_ids`` and ``attention_mask``, returning
    ``pooler_output`` (``last_hidden_state`` with ``hidden=True``)."""

    def __init__(self, model: nn.Module, hidden: bool = False):
        super().__init__()
        self.model, self.hidden = model, hidden

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state if self.hidden else out.pooler_output


class Logits(nn.Module):
    """A Hugging Face classifier's ``.logits``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


def _bert_inputs():
    ids = torch.randint(0, 30522, (1, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, SEQ_LEN, dtype=torch.int64)
    mask[:, :REAL_TOKENS] = 1
    return ids, mask


def _build_bert():
    import transformers as T

    torch.manual_seed(0)
    bert = T.BertModel(T.BertConfig(attn_implementation="sdpa"))
    return Pooled(randomize(bert, bert.pooler.dense)).eval(), _bert_inputs()


def _build_vit():
    import transformers as T

    torch.manual_seed(0)
    vit = T.ViTForImageClassification(T.ViTConfig(num_labels=1000, attn_implementation="sdpa"))
    return Logits(randomize(vit, vit.classifier)).eval(), (torch.randn(1, 3, 224, 224),)


def _tp_bert(model: Pooled, x, ratio: float) -> nn.Module:
    """As ``prune_hf_bert.py``: whole heads, the pooler ignored, ranked by ``pooler_output``."""
    from transformers.models.bert.modeling_bert import BertSelfAttention

    m = copy.deepcopy(model.model)
    attns = [a for a in m.modules() if isinstance(a, BertSelfAttention)]
    num_heads = {p: a.num_attention_heads for a in attns for p in (a.query, a.key, a.value)}
    pruner = meta_prune(m, {"input_ids": x[0], "attention_mask": x[1]}, ratio,
                        num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
                        head_pruning_ratio=ratio, ignored_layers=[m.pooler],
                        output_transform=lambda out: out.pooler_output.sum())
    for a in attns:
        a.num_attention_heads = pruner.num_heads[a.query]
        a.attention_head_size = a.query.out_features // a.num_attention_heads
        a.all_head_size = a.query.out_features
    return Pooled(m.eval()).eval()


def _tp_vit(model: Logits, x, ratio: float) -> nn.Module:
    """As ``prune_hf_vit.py`` (head dims, the classifier ignored), on transformers 5's names."""
    from transformers.models.vit.modeling_vit import ViTAttention

    m = copy.deepcopy(model.model)
    attns = [a for a in m.modules() if isinstance(a, ViTAttention)]
    num_heads = {p: a.num_attention_heads for a in attns for p in (a.q_proj, a.k_proj, a.v_proj)}
    emb = m.vit.embeddings
    pruner = meta_prune(m, x[0], ratio, num_heads=num_heads, prune_num_heads=False,
                        prune_head_dims=True, ignored_layers=[m.classifier],
                        output_transform=lambda out: out.logits.sum(),
                        unwrapped_parameters=[(emb.cls_token, 2), (emb.position_embeddings, 2)])
    for a in attns:
        a.num_attention_heads = pruner.num_heads[a.q_proj]
        a.head_dim = a.q_proj.out_features // a.num_attention_heads
    return Logits(m.eval()).eval()


def _shape_bert(model: Pooled) -> str:
    layer = model.model.encoder.layer[0]
    a = layer.attention.self
    return (f"{a.num_attention_heads}x{a.attention_head_size}, mlp "
            f"{layer.intermediate.dense.out_features}, stream {a.query.in_features}")


def _shape_vit(model: Logits) -> str:
    layer = model.model.vit.layers[0]
    a = layer.attention
    return (f"{a.num_attention_heads}x{a.head_dim}, mlp {layer.mlp.fc1.out_features}, stream "
            f"{a.q_proj.in_features}")


def _bert_variants(model: Pooled, x, ratio: float) -> list[str]:
    """fxopt on two variants of the same BERT: ``last_hidden_state`` as the output, and
    ``attn_implementation="eager"`` (matmul, softmax, matmul instead of SDPA)."""
    import fxopt

    def pruned(m: nn.Module) -> str:
        rec = fxopt.optimize(m, x, prune=ratio, pipeline=["cleanup"]).report.record(
            "prune_channels")
        return (f"params ratio {rec.params_after / rec.params_before:.3f}, frozen "
                f"{rec.stats['frozen']} of {rec.stats['groups']} groups, equals its masked "
                f"reference to rel. err {rec.rel_err:.1e}")

    eager = copy.deepcopy(model.model)
    eager.config._attn_implementation = "eager"
    hidden = pruned(Pooled(model.model, hidden=True).eval())
    return [f"fxopt with `last_hidden_state` as the output instead: {hidden}; the frozen group "
            f"is the residual stream, which is the output (fxopt keeps every output's shape; "
            f"Torch-Pruning's BERT returns `last_hidden_state` at its pruned stream width)",
            f"fxopt with `attn_implementation='eager'`: {pruned(Pooled(eager).eval())}"]


CASES = {
    "hf_bert": Case("Hugging Face BertModel, bert-base (pooler_output, seq 128, attention_mask)",
                    _build_bert, _tp_bert, _shape_bert, capture="auto",
                    notes=("attn_implementation: sdpa; inputs: 128 input_ids, attention_mask "
                           f"with {REAL_TOKENS} tokens and {SEQ_LEN - REAL_TOKENS} padding",
                           "fxopt's params count the captured graph: torch.export specializes "
                           "it to seq len 128, so it holds 128 of the 512 position embeddings "
                           "(and the one token type row) as constants"),
                    extra=_bert_variants),
    "hf_vit": Case("Hugging Face ViTForImageClassification, vit-base (224x224)", _build_vit,
                   _tp_vit, _shape_vit, capture="auto",
                   notes=("attn_implementation: sdpa",)),
}


def _versions() -> str:
    import torch_pruning
    import transformers

    return f"transformers {transformers.__version__}, torch-pruning {torch_pruning.__version__}"


def main(argv=None) -> int:
    return run(argv, CASES, "prune-hf", "Hugging Face BERT / ViT head + MLP pruning: fxopt vs "
               "Torch-Pruning (CPU)", _versions, "Batch 1 (BERT: 128 tokens; ViT: 224x224)",
               __doc__.split("\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
