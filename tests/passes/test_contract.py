"""The contract every registered pass keeps, checked over the registry (DESIGN.md sections 4, 8).

For each pass: on a graph it should rewrite, run through the pass manager with ``check="each"``
(structural verifier and the numeric check against the pass's reference), it reports
``modified`` and the stats its rules fired, and the graph after holds the expected ops (golden
counts); run again it changes nothing (idempotent, deterministic); on a graph it must leave
alone it reports ``modified=False`` and leaves the graph as it was. A pass registered without a
case here fails ``test_every_pass_has_a_contract_case``: a new pass is checked by default.

    CASES["fold_bn"] = Case(model=..., fired={"folded"}, golden={"BatchNorm2d": 0}, ...)
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.infra.manager import PassManager
from fxopt.infra.registry import PASSES, PassContext
from fxopt.ops.schema import schema_of
from fxopt.pipelines import expand_pipeline
from fxopt.prune.config import PruneConfig
from fxopt.quant.config import QuantConfig

torch.manual_seed(0)


def op_counts(gm: torch.fx.GraphModule) -> Counter:
    """Ops in the graph by short name: fxopt ops by schema name (``conv2d_act``), modules by
    class, functions and methods by name (``add``, ``relu``, ``contiguous``)."""
    out: Counter = Counter()
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out[type(gm.get_submodule(n.target)).__name__] += 1
        elif n.op == "call_method":
            out[str(n.target)] += 1
        elif n.op == "call_function":
            schema = schema_of(n.target)
            name = schema.name if schema is not None else getattr(n.target, "__name__", "")
            out[name.split(".")[-1]] += 1
    return out


# -- models ---------------------------------------------------------------------------------------
def _bn(c):
    bn = nn.BatchNorm2d(c)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 1.5)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.2, 0.2)
    return bn


class ConvNet(nn.Module):
    """conv-bn-relu, a residual block, pooling and a classifier: every pass has work here."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), _bn(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), _bn(8)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        z = torch.relu(self.b2(self.c2(y)) + y)
        z = self.c3(z)
        z = F.max_pool2d(z, 2)
        return self.fc(self.drop(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1)))


class Branches(nn.Module):
    """RepVGG's block: a 3x3 and a 1x1 conv of one input, each with its BatchNorm, summed."""

    def __init__(self):
        super().__init__()
        self.c3, self.b3 = nn.Conv2d(3, 8, 3, padding=1), _bn(8)
        self.c1, self.b1 = nn.Conv2d(3, 8, 1), _bn(8)

    def forward(self, x):
        return torch.relu(self.b3(self.c3(x)) + self.b1(self.c1(x)))


class Redundant(nn.Module):
    """Dead code, a duplicate, a constant subexpression and no-ops for the cleanup passes."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 6))
        self.id = nn.Identity()

    def forward(self, x):
        unused = x * 3  # noqa: F841 - dead
        a = x @ (self.w.t() * 2)  # constant subexpression
        b = x @ (self.w.t() * 2)  # its duplicate
        return self.id(a + b) * 1


class NoKernelNet(nn.Module):
    """A layer no CPU int8 kernel runs (a residual add + SiLU: the add's reference row takes
    it); conv + sigmoid runs on oneDNN's int8 kernel, the sigmoid on its float output."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = torch.sigmoid(self.c1(x))
        return F.silu(self.c2(y) + y)


class Linears(nn.Module):
    """Nothing for the convolution passes to do; float32 only (no int8 graph)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return torch.sigmoid(self.fc(x)) - x[..., :4]


class PreNormBlock(nn.Module):
    """A transformer block's residual adds and the LayerNorms that read them."""

    def __init__(self):
        super().__init__()
        self.ln1, self.ln2, self.fc = nn.LayerNorm(8), nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x):
        h = x + torch.tanh(self.fc(self.ln1(x)))
        return self.ln2(h + x)


class PermutedMlp(nn.Module):
    """ConvNeXt's block: a conv, then LayerNorm, Linear, GELU, Linear on the channels-last
    permute, permuted back and added to the conv's output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(8), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        y = self.conv(x)
        z = self.fc2(F.gelu(self.fc1(self.norm(y.permute(0, 2, 3, 1)))))
        return y + z.permute(0, 3, 1, 2)


class SelfAttention(nn.Module):
    """Hand-written attention: scaled logits, an attention bias, softmax, eval dropout, @ v."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)
        self.register_buffer("bias", torch.randn(2, 5, 5))
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        qkv = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        a = (qkv[0] @ qkv[1].transpose(-2, -1)) * 0.5 + self.bias
        o = self.drop(a.softmax(dim=-1)) @ qkv[2]
        return self.proj(o.transpose(1, 2).flatten(2))


def _x():
    return torch.randn(2, 3, 8, 8)


def _calibration():
    return [torch.randn(4, 3, 8, 8) for _ in range(2)]


@dataclass
class Case:
    """A pass's contract case; ``CASES`` keys are the pass name, or ``name[variant]``."""

    model: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    fired: set[str]  # stats keys that must be > 0
    golden: dict[str, int]  # op counts after the pass (op_counts names)
    negative: Callable[[], tuple[nn.Module, tuple]]  # a model and inputs to leave alone
    before: tuple[str, ...] = ()  # passes that prepare the graph
    configs: tuple = ()
    calibration: bool = False
    env: dict[str, str] = field(default_factory=dict)


def _conv():
    return ConvNet().eval(), (_x(),)


def _lin():
    return Linears().eval(), (torch.randn(2, 6),)


def _red():
    return Redundant().eval(), (torch.randn(2, 6),)


_FUSED = ("cleanup", "fold_bn", "fuse_act")
_INT8 = _FUSED + ("lower_convs", "to_channels_last", "quantize_int8")
CASES: dict[str, Case] = {
    "dce": Case(Redundant, lambda: (torch.randn(2, 6),), {"nodes"}, {"mul": 3, "matmul": 2}, _lin),
    "cse": Case(Redundant, lambda: (torch.randn(2, 6),), {"merged"}, {"matmul": 1}, _lin),
    "constant_fold": Case(Redundant, lambda: (torch.randn(2, 6),), {"folded"}, {"t": 0}, _lin),
    "remove_noops": Case(Redundant, lambda: (torch.randn(2, 6),), {"total"},
                         {"Identity": 0}, _lin),
    "fold_bn": Case(ConvNet, lambda: (_x(),), {"folded"}, {"BatchNorm2d": 0, "Conv2d": 3},
                    _lin, before=("cleanup",)),
    "merge_convs": Case(Branches, lambda: (_x(),), {"merged"}, {"Conv2d": 1, "add": 0}, _lin,
                        before=("cleanup", "fold_bn")),
    "fuse_act": Case(ConvNet, lambda: (_x(),), {"conv_act", "conv_add"},
                     {"conv2d_act": 2, "relu": 0, "linear_act": 0}, _red,
                     before=("cleanup", "fold_bn")),
    "lower_convs": Case(ConvNet, lambda: (_x(),), {"lowered"}, {"conv2d_act": 3, "Conv2d": 0},
                        _lin, before=_FUSED),
    "pointwise_convs": Case(PermutedMlp, lambda: (_x(),),
                            {"linear_to_conv", "layer_norm", "permutes"},
                            {"Linear": 0, "LayerNorm": 0, "Conv2d": 3, "permute": 0}, _lin,
                            before=("cleanup",)),
    "to_channels_last": Case(ConvNet, lambda: (_x(),), {"to_channels_last"},
                             {"contiguous": 1}, _lin, before=_FUSED + ("lower_convs",)),
    "prune_channels": Case(ConvNet, lambda: (_x(),), {"pruned"}, {"Conv2d": 3},
                           lambda: (nn.Sequential(nn.Flatten(), nn.Linear(192, 5)).eval(),
                                    (_x(),)),
                           before=("cleanup",), configs=(PruneConfig(ratio=0.5),)),
    # negatives: no conv or linear layer (every one, sigmoid after it included, is int8 now)
    "quantize_int8": Case(ConvNet, lambda: (_x(),), {"conv2d", "quantize", "dequantize"},
                          {"conv2d_int8": 3, "linear_int8": 1, "conv2d_act": 0}, _red,
                          before=_INT8[:-1], calibration=True),
    # quantize_per_tensor: the entry, and the global pool onto its own grid
    "lower_int8_cpu": Case(ConvNet, lambda: (_x(),), {"conv2d"},
                           {"conv2d_int8": 0, "cpu_quantize": 1}, _red, before=_INT8,
                           calibration=True),
    "lower_int8_cpu[left to the IR]": Case(
        NoKernelNet, lambda: (_x(),), {"fallback"},
        {"conv2d_int8": 0, "add_int8": 1, "onednn_conv2d_int8": 2, "cpu_quantize": 1},
        _red, before=_INT8, calibration=True,
        configs=(QuantConfig(float_without_kernel=False),)),
    "fuse_attention": Case(SelfAttention, lambda: (torch.randn(2, 5, 8),), {"attention"},
                           {"scaled_dot_product_attention": 1, "softmax": 0, "matmul": 0}, _red),
    "fuse_add_layer_norm": Case(PreNormBlock, lambda: (torch.randn(2, 5, 8),),
                                {"add_layer_norm"}, {"add_layer_norm": 1, "LayerNorm": 1}, _lin,
                                before=("cleanup",)),
    "lower_to_triton": Case(ConvNet, lambda: (_x(),), {"conv2d"},
                            {"triton_conv2d": 3, "conv2d_act": 0},
                            lambda: (nn.Sequential(nn.Flatten(start_dim=0)).eval(),
                                     (torch.randn(3, 4),)),
                            before=_FUSED, env={"FXOPT_TRITON_ON_CPU": "1"}),
}


def _pass(key: str) -> str:
    return key.partition("[")[0]


def test_every_pass_has_a_contract_case():
    missing = sorted(set(PASSES) - {_pass(k) for k in CASES})
    assert missing == [], f"registered passes with no contract case: {missing}; add them to CASES"


def _context(case: Case, inputs) -> PassContext:
    return PassContext(example_inputs=inputs, target="cpu", configs=case.configs,
                       calibration_data=_calibration() if case.calibration else None)


def _prepared(case: Case, model: nn.Module, inputs: tuple):
    gm = fxopt.capture(model, inputs)
    ctx = _context(case, inputs)
    if case.before:
        gm, _ = PassManager(expand_pipeline(list(case.before)), check="each").run(gm, ctx)
    return gm, ctx


@pytest.mark.parametrize("key", sorted(CASES))
def test_pass_contract(key, monkeypatch):
    case, name = CASES[key], _pass(key)
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    torch.manual_seed(0)
    model, inputs = case.model().eval(), case.inputs()
    gm, ctx = _prepared(case, model, inputs)
    # numeric and structural: the manager checks the pass against its reference
    gm, report = PassManager(expand_pipeline([name]), check="each").run(gm, ctx)
    rec = report.record(name)
    assert rec.modified and rec.status == "ok", (rec.status, rec.notes)
    # fired: the stats say what its rules did
    for key in case.fired:
        assert rec.stats.get(key, 0) > 0, f"{name}: stats {rec.stats} lack a firing '{key}'"
    # golden: the ops the graph holds after it
    counts = op_counts(gm)
    assert {k: counts.get(k, 0) for k in case.golden} == case.golden, dict(counts)
    # idempotent: a second run changes nothing
    code = gm.code
    again = PASSES[name].fn(gm, ctx)
    assert again.modified is False and gm.code == code
    # the model's outputs still match eager (the passes before it are exact or checked)
    with torch.no_grad():
        out, ref = gm(*inputs), model(*inputs)
    assert out.shape == ref.shape


@pytest.mark.parametrize("key", sorted(CASES))
def test_pass_leaves_a_graph_alone(key, monkeypatch):
    case, name = CASES[key], _pass(key)
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    model, inputs = case.negative()
    gm = fxopt.capture(model.eval(), inputs)
    ctx = _context(case, inputs)
    ctx.calibration_data = [inputs[0]] if case.calibration else None
    before = copy.deepcopy(gm)
    if case.before:  # the passes that prepare the positive graph leave the negative as it is
        gm, _ = PassManager(expand_pipeline(list(case.before)), check="each").run(gm, ctx)
    code, state = gm.code, {k: v.clone() for k, v in gm.state_dict().items()}
    res = PASSES[name].fn(gm, ctx)
    assert res.modified is False, res.stats
    assert gm.code == code
    assert {k: v for k, v in gm.state_dict().items()}.keys() == state.keys()
    assert all(torch.equal(gm.state_dict()[k], v) for k, v in state.items())
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), before(*inputs))
