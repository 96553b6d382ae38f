"""Random, valid eval-mode networks from a grammar of the ops fxopt handles, each from a seed.

A network is a :class:`Network`: an input shape and a flat list of :class:`Layer` specs. A spec
holds abstract choices (a kind, a spelling, wanted channels, kernel, stride, ...) and its own
weight seed; nothing here knows shapes: ``fxopt.fuzz.emit`` resolves each spec against the
shape that reaches it and writes the network's Python source.

    >>> net = generate(5)               # the same seed gives the same network

The grammar: convolutions (plain, grouped, depthwise, dilated, strided, padded, reflect-padded,
transposed), BatchNorm2d/1d with random running statistics and affine parameters, every
activation of ``fxopt.ir.activations`` in its module, function, method and in-place spellings,
residual adds (``+``, ``+=``, ``torch.add``, add then ReLU), channel concatenation, max / average /
adaptive pooling, squeeze-excitation gates, channel shuffle, dropout / identity, flatten + Linear
+ BatchNorm1d, and two features that hit known weak spots (``FEATURES``): an in-place op through
an alias (the output of eval Dropout is its input) and an in-place op on the model's input.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["Layer", "Network", "generate", "FEATURES", "ACTIVATION_SPELLINGS", "LAYER_KINDS"]

# Optional features: generate(seed, exclude=...) leaves them out.
# alias_inplace: an in-place op through an alias (the output of eval Dropout / Identity /
#   ``.contiguous()`` is its input); input_inplace: an in-place op that reaches the input;
# reflect_pad: Conv2d(padding_mode="reflect"); convt_outpad_dilation: ConvTranspose2d with an
#   output_padding not below its stride (PyTorch allows it when under the dilation).
FEATURES = ("alias_inplace", "input_inplace", "reflect_pad", "convt_outpad_dilation")

# activation name -> spellings; "{x}" is the operand. "M:" spellings are modules.
ACTIVATION_SPELLINGS: dict[str, tuple[str, ...]] = {
    "relu": ("M:nn.ReLU()", "M:nn.ReLU(inplace=True)", "F.relu({x})", "torch.relu({x})",
             "{x}.relu()", "{x}.relu_()", "F.relu({x}, inplace=True)"),
    "relu6": ("M:nn.ReLU6()", "F.relu6({x})", "M:nn.ReLU6(inplace=True)"),
    "leaky_relu": ("M:nn.LeakyReLU(0.1)", "F.leaky_relu({x}, 0.2)", "F.leaky_relu_({x}, 0.05)",
                   "M:nn.LeakyReLU(0.01, inplace=True)"),
    "hardtanh": ("M:nn.Hardtanh(-0.5, 1.5)", "F.hardtanh({x}, -2.0, 2.0)"),
    "clamp": ("{x}.clamp(-1.0, 1.0)", "torch.clamp({x}, min=0.0)", "{x}.clamp(max=0.5)"),
    "elu": ("M:nn.ELU()", "F.elu({x}, alpha=0.5)"),
    "gelu": ("M:nn.GELU()", "F.gelu({x})"),
    "gelu_tanh": ("M:nn.GELU(approximate='tanh')", "F.gelu({x}, approximate='tanh')"),
    "silu": ("M:nn.SiLU()", "F.silu({x})", "M:nn.SiLU(inplace=True)"),
    "mish": ("M:nn.Mish()", "F.mish({x})"),
    "hardswish": ("M:nn.Hardswish()", "F.hardswish({x})", "M:nn.Hardswish(inplace=True)"),
    "hardsigmoid": ("M:nn.Hardsigmoid()", "F.hardsigmoid({x})"),
    "sigmoid": ("M:nn.Sigmoid()", "torch.sigmoid({x})", "{x}.sigmoid()", "{x}.sigmoid_()"),
    "tanh": ("M:nn.Tanh()", "torch.tanh({x})", "{x}.tanh()", "{x}.tanh_()"),
}

# kind -> (weight, state it needs: "4d", "2d" or "any")
LAYER_KINDS: dict[str, tuple[int, str]] = {
    "conv": (6, "4d"), "conv_bn_act": (8, "4d"), "conv_transpose": (2, "4d"), "bn2d": (2, "4d"),
    "act": (4, "any"), "residual": (5, "4d"), "concat": (3, "4d"), "pool": (3, "4d"),
    "se": (3, "4d"), "shuffle": (2, "4d"), "dropout": (2, "any"), "alias_inplace": (1, "any"),
    "flatten": (2, "4d"), "linear": (3, "2d"), "bn1d": (2, "2d"), "residual_linear": (1, "2d"),
}


@dataclass(frozen=True)
class Layer:
    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


@dataclass(frozen=True)
class Network:
    seed: int
    input_shape: tuple[int, int, int, int]
    layers: tuple[Layer, ...]
    input_inplace: bool = False  # the forward starts with ``x.mul_(2.0)``
    protect_input: bool = False  # no in-place op reaches the input (out-of-place spellings)

    def with_layers(self, layers) -> "Network":
        return replace(self, layers=tuple(layers))


# ---- generation ---------------------------------------------------------------------------

def _act_choice(r: random.Random, names=None) -> dict:
    name = r.choice(names or sorted(ACTIVATION_SPELLINGS))
    return {"act": name, "spelling": r.randrange(len(ACTIVATION_SPELLINGS[name]))}


def _conv_params(r: random.Random) -> dict:
    return {"cout": r.randint(3, 16), "k": r.choice((1, 3, 3, 5)), "stride": r.choice((1, 1, 2)),
            "dilation": r.choice((1, 1, 1, 2)), "groups": r.choice(("plain",) * 3 +
                                                                    ("grouped", "depthwise")),
            "pad": r.choice(("same", "same", "zero", "one")), "bias": r.random() < 0.5,
            "reflect": r.random() < 0.08}


def _layer_params(kind: str, r: random.Random) -> dict:
    if kind in ("conv", "conv_bn_act"):
        p = _conv_params(r)
        if kind == "conv_bn_act":
            p.update(_act_choice(r), bn=r.random() < 0.85)
        return p
    if kind == "conv_transpose":
        return {"cout": r.randint(3, 12), "k": r.choice((2, 3, 4)), "stride": r.choice((1, 2)),
                "pad": r.choice((0, 1)), "out_pad": r.choice((0, 0, 1)),
                "dilation": r.choice((1, 1, 2)), "grouped": r.random() < 0.25,
                "bias": r.random() < 0.5}
    if kind == "act":
        return _act_choice(r)
    if kind == "residual":
        return {"depthwise": r.random() < 0.3, "k": r.choice((1, 3)), "bn": r.random() < 0.8,
                "combine": r.choice(("add", "iadd", "torch.add", "add_relu", "radd")),
                **_act_choice(r, ["relu", "relu6", "silu", "hardswish", "gelu", "leaky_relu"])}
    if kind == "concat":
        return {"cout": r.randint(2, 8), "k": r.choice((1, 3)), "first": r.random() < 0.5,
                "act": r.random() < 0.5}
    if kind == "pool":
        return {"type": r.choice(("max", "avg", "adaptive_avg", "adaptive_max", "fmax", "favg")),
                "k": r.choice((2, 3)), "stride": r.choice((1, 2)), "pad": r.choice((0, 1)),
                "ceil": r.random() < 0.3, "include_pad": r.random() < 0.7,
                "out": r.choice((1, 2, 3, 4))}
    if kind == "se":
        return {"reduce": r.choice((2, 4)), "pool": r.choice(("mean", "adaptive")),
                "fc": r.choice(("conv", "linear")), "inner": r.choice(("relu", "silu")),
                "gate": r.choice(("sigmoid", "hardsigmoid", "method_sigmoid")),
                "mul": r.choice(("x*s", "s*x", "mul_", "torch.mul"))}
    if kind == "shuffle":
        return {"groups": r.choice((2, 3, 4)), "style": r.choice(("literal", "size", "contig"))}
    if kind == "dropout":
        return {"type": r.choice(("nn.Dropout(0.3)", "nn.Identity()", "nn.Dropout2d(0.2)",
                                  "F.dropout", "nn.AlphaDropout(0.1)"))}
    if kind == "alias_inplace":
        return {"alias": r.choice(("dropout", "identity", "contiguous")),
                "op": r.choice(("relu_", "mul_", "add_")), "then": r.choice(("add", "cat"))}
    if kind == "flatten":
        return {"pool": r.choice(("none", "adaptive", "mean", "adaptive")),
                "style": r.choice(("torch", "method", "view", "module", "reshape"))}
    if kind == "linear":
        return {"cout": r.randint(4, 32), "bias": r.random() < 0.8, "act": r.random() < 0.5,
                **_act_choice(r)}
    if kind == "residual_linear":
        return {"combine": r.choice(("add", "iadd"))}
    return {}


def generate(seed: int, *, exclude: tuple[str, ...] = ()) -> Network:
    """The network of ``seed`` (the same seed gives the same network, weights and inputs).

    ``exclude``: names from ``FEATURES`` to leave out (an excluded layer becomes an Identity,
    so the rest of the network stays the same).
    """
    r = random.Random(seed)
    shape = (r.choice((1, 2)), r.randint(3, 16), r.randint(8, 16), r.randint(8, 16))
    kinds4 = [k for k, (_, s) in LAYER_KINDS.items() if s != "2d" and k != "flatten"]
    kinds2 = [k for k, (_, s) in LAYER_KINDS.items() if s != "4d"]

    def draw(kinds):
        kind = r.choices(kinds, [LAYER_KINDS[k][0] for k in kinds])[0]
        layer = Layer(kind, _layer_params(kind, r), r.randrange(2 ** 31))
        if kind in exclude:  # the same draws either way: the other layers stay as they were
            layer = Layer("dropout", {"type": "nn.Identity()"}, layer.seed)
        return layer

    layers = [draw(kinds4) for _ in range(r.randint(2, 7))]
    if r.random() < 0.5:
        layers.append(Layer("flatten", _layer_params("flatten", r), r.randrange(2 ** 31)))
        layers += [draw(kinds2) for _ in range(r.randint(1, 3))]
    if "convt_outpad_dilation" in exclude:
        layers = [replace(la, params={**la.params, "no_outpad_dilation": True})
                  if la.kind == "conv_transpose" else la for la in layers]
    if "reflect_pad" in exclude:
        layers = [replace(la, params={**la.params, "reflect": False})
                  if "reflect" in la.params else la for la in layers]
    unknown = set(exclude) - set(FEATURES)
    if unknown:
        raise ValueError(f"unknown fuzz features {sorted(unknown)}; known: {FEATURES}")
    inplace_input = r.random() < 0.05 and "input_inplace" not in exclude
    return Network(seed, shape, tuple(layers), inplace_input,
                   protect_input="input_inplace" in exclude)
