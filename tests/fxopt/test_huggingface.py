"""Hugging Face ``transformers`` models through fxopt: capture, the default pipeline, pruning
(heads, MLP hidden units, the residual stream; checked against the masked reference by the
pass manager) and int8.

Models are built from tiny configs with random weights (no downloads). ``transformers`` 5 has no
fx tracer of its own and plain ``symbolic_trace`` fails on its models, so these go through the
``torch.export`` front end (``capture="export"``); the module is skipped where that front end is
not there. The models return ``ModelOutput`` objects: a two-line wrapper hands fxopt the logits
(``capture="export"`` takes a tensor or a flat tuple). The small cases run by default, the rest
are ``slow``.

Static int8 on the causal LMs (GPT-2, LLaMA) is a default case: every projection int8 (GPT-2's
``Conv1D`` is ``aten.addmm`` after export, ``passes/quant/addmm.py``), the attention, norms and
the residual stream float, the empty KV cache the attention concatenates onto left out of
calibration (it used to raise "no calibration data reached the value of ...attn").
"""

import os

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.ir.tolerances import rel_err
from fxopt.quant.measure import sqnr_db
from untouched import assert_same, snapshot

T = pytest.importorskip("transformers")
pytest.importorskip("fxopt.ir.export_capture")  # capture="export"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Logits(nn.Module):
    """The tensor users read: ``.logits``, or ``.last_hidden_state`` for a bare encoder."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _tokens(seed=0):
    return torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(seed))


def _image():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _bert(cls):
    return cls(T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=32, num_labels=3)), _tokens()


MODELS = {
    "bert": lambda: _bert(T.BertModel),
    "bert_cls": lambda: _bert(T.BertForSequenceClassification),
    "vit": lambda: (T.ViTForImageClassification(T.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=5)), _image()),
    "resnet": lambda: (T.ResNetForImageClassification(T.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5)), _image()),
    "llama": lambda: (T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)), _tokens()),
    "gpt2": lambda: (T.GPT2LMHeadModel(T.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
        eos_token_id=0)), _tokens()),
}
FAST = {("bert_cls", "default"), ("bert_cls", "prune"), ("vit", "prune"),
        ("vit", "int8_dynamic")}
# parameters left by prune=0.5 (the classifier/LM head and, for a bare encoder, the stream
# that reaches the output stay): well below 1 wherever there is something to prune
MAX_PARAMS_LEFT = {"bert": 0.7, "bert_cls": 0.4, "vit": 0.4, "resnet": 0.5, "llama": 0.4,
                   "gpt2": 0.4}


def make(name):
    torch.manual_seed(0)
    model, x = MODELS[name]()
    return Logits(model.eval()).eval(), x


def _cases(modes):
    return [pytest.param(name, mode, marks=() if (name, mode) in FAST else pytest.mark.slow)
            for name in MODELS for mode in modes]


@pytest.mark.parametrize("name, mode", _cases(["default", "int8_dynamic"]))
def test_default_pipeline_and_dynamic_int8_match_eager(name, mode):
    model, x = make(name)
    with torch.no_grad():
        ref = model(x)
    kwargs = {} if mode == "default" else {"quantize": "int8_dynamic"}
    opt = fxopt.optimize(model, x, capture="export", **kwargs)
    with torch.no_grad():
        out = opt(x)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < (1e-4 if mode == "default" else 0.1)


@pytest.mark.parametrize("name, mode", _cases(["prune"]))
def test_prune_removes_heads_and_hidden_units(name, mode):
    model, x = make(name)
    opt = fxopt.optimize(model, x, capture="export", prune=0.5)
    rec = opt.report.record("prune_channels")
    assert rec.status == "ok" and rec.modified
    assert rec.rel_err is not None and rec.rel_err <= rec.tolerance  # the masked reference
    assert rec.params_after / rec.params_before < MAX_PARAMS_LEFT[name]
    assert rec.stats["frozen"] == 1  # only what reaches the output
    with torch.no_grad():
        assert opt(x).shape == model(x).shape


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "bert_cls", "vit", "resnet"])
def test_static_int8_within_bounds(name):
    model, x = make(name)
    with torch.no_grad():
        ref = model(x)
    opt = fxopt.optimize(model, x, capture="export", quantize="int8", calibration_data=[x])
    with torch.no_grad():
        assert rel_err(opt(x), ref) < 0.1


_LINEAR_INT8 = (torch.ops.fxopt.linear_int8.default, torch.ops.fxopt.onednn_linear_int8.default)
# the projections static int8 quantizes (all of them), by module path
CAUSAL_INT8 = {
    "gpt2": [f"model.transformer.h.{i}.{p}" for i in range(2)
             for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")] + ["model.lm_head"],
    "llama": [f"model.model.layers.{i}.{p}" for i in range(2)
              for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    + ["model.lm_head"],
}


@pytest.mark.parametrize("name", sorted(CAUSAL_INT8))
def test_static_int8_causal_lm_projections(name):
    """quantize="int8" with calibration data on GPT-2 / LLaMA: every projection is an int8
    Linear, nothing is left uncalibrated, and the output is within the int8 bounds the other
    tests use (SQNR > 25 dB on tokens not calibrated on, relative error < 0.1) of eager; the
    user's model is unchanged. Before: InputError (the empty KV cache had no grid)."""
    model, x = make(name)
    before = snapshot(model)
    cal = [_tokens(seed) for seed in range(1, 9)]
    # every projection int8 (min_sqnr_db=None: the default's 30 dB target keeps some float)
    opt = fxopt.optimize(model, x, capture="export", quantize=fxopt.QuantConfig(min_sqnr_db=None),
                         calibration_data=cal)
    assert_same(model, before)
    int8 = sorted(n.meta.get("fxopt_path") for n in opt.graph_module.graph.nodes
                  if n.target in _LINEAR_INT8)
    assert int8 == sorted(CAUSAL_INT8[name])
    rec = opt.report.record("quantize_int8")
    assert "uncalibrated" not in rec.stats and rec.stats["kept_float"] == 0
    assert opt.report.int8["measured_on"] == "held_out" and opt.report.int8["sqnr_db"] > 25
    fresh = _tokens(99)
    with torch.no_grad():
        ref, out = model(fresh), opt(fresh)
    assert out.shape == ref.shape
    assert sqnr_db(ref, out) > 25 and rel_err(out, ref) < 0.1


class BertWithMask(nn.Module):
    """``BertModel`` called as a tokenizer's output is fed: ``input_ids`` and
    ``attention_mask``; returns ``pooler_output`` (so the residual stream can be pruned)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def _mask(*lengths):
    """An attention mask for a batch of sequences of 8 tokens with these real lengths."""
    return (torch.arange(8)[None, :] < torch.tensor(lengths)[:, None]).long()


def test_pruned_bert_honours_the_attention_mask():
    """prune=0.5 on BERT fed input_ids and a padding mask: heads, MLP and stream pruned; the
    pruned graph equals the masked reference on masks other than the example's (the mask is an
    input of the graph, not a constant folded from the example), and the mask still matters."""
    from fxopt.infra.registry import PASSES, PassContext
    from fxopt.prune.config import PruneConfig

    torch.manual_seed(0)
    model = BertWithMask(_bert(T.BertModel)[0].eval()).eval()
    x = (_tokens(), _mask(8, 5))
    opt = fxopt.optimize(model, x, capture="export", prune=0.5)
    rec = opt.report.record("prune_channels")
    assert rec.rel_err is not None and rec.rel_err <= rec.tolerance
    assert rec.params_after / rec.params_before < 0.4 and rec.stats["frozen"] == 1
    # the pass again on the graph it saw (after cleanup), for its reference
    gm = fxopt.optimize(model, x, capture="export", pipeline=["cleanup"]).graph_module
    res = PASSES["prune_channels"].fn(gm, PassContext(example_inputs=x,
                                                      configs=[PruneConfig(ratio=0.5)]))
    ids = _tokens(seed=1)
    with torch.no_grad():
        for mask in (_mask(3, 8), _mask(8, 8), _mask(1, 6)):
            out = res.gm(ids, mask)
            assert rel_err(out, res.reference(ids, mask)) < 1e-5
            assert rel_err(opt(ids, mask), out) < 1e-4
        assert rel_err(res.gm(ids, _mask(3, 8)), res.gm(ids, _mask(8, 8))) > 1e-3


@pytest.mark.parametrize("name", ["bert_cls", "vit"])
def test_prune_hand_written_attention(name):
    """attn_implementation="eager" (matmul, softmax, matmul as ATen ops after export) prunes
    heads as SDPA does: only what reaches the output is frozen. Before: aten.matmul had no
    channel rule and froze every query, key and value projection. With fuse_attention (the
    default pipeline) the attention is one SDPA call before pruning; without it the matmul
    rules prune it as it is."""
    torch.manual_seed(0)
    model, x = MODELS[name]()
    model.config._attn_implementation = "eager"
    model = Logits(model.eval()).eval()
    for disable in (["fuse_attention"], []):
        opt = fxopt.optimize(model, x, capture="export", prune=0.5, disable=disable)
        rec = opt.report.record("prune_channels")
        assert rec.rel_err is not None and rec.rel_err <= rec.tolerance
        assert rec.stats["frozen"] == 1, rec.notes
        assert rec.params_after / rec.params_before < MAX_PARAMS_LEFT[name]
        targets = [n.target for n in opt.graph_module.graph.nodes]
        if disable:  # the hand-written attention is what was pruned
            assert torch.ops.aten.matmul.default in targets
        else:
            assert torch.nn.functional.scaled_dot_product_attention in targets


@pytest.mark.parametrize("name", ["bert_cls", "vit"])
def test_dynamic_batch_runs_other_batches_and_guards_the_rest(name):
    """The exported graph is specialized to the example's shapes: any other shape is an
    InputError (an exported BERT at another sequence length raised a raw IndexError, or ran
    on a baked position-embedding constant); with dynamic_batch=True the batch is free."""
    model, x = make(name)
    other = torch.cat([x, x, x[:1]])  # batch 5
    fixed = fxopt.optimize(model, x, capture="export")
    with pytest.raises(fxopt.InputError, match="specialized"):
        fixed(other)
    longer = x[:, :6] if x.dim() == 2 else x[..., :24, :24]  # other sequence / image size
    with pytest.raises(fxopt.InputError, match="specialized"):
        fixed(longer)
    free = fxopt.optimize(model, x, capture="export", dynamic_batch=True)
    with torch.no_grad():
        assert rel_err(free(other), model(other)) < 1e-4
    with pytest.raises(fxopt.InputError, match="specialized"):
        free(longer)
