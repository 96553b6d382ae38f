"""A drawn network's Python source, and the module and inputs made from it.

:func:`source` turns a :class:`~fxopt.fuzz.grammar.Network` into the Python source of an
``nn.Module``, resolving each layer spec against the shape that reaches it (a grouped conv takes
the largest group count that divides its channels; a stride that would shrink the image below 2
pixels becomes 1; a spatial layer after ``flatten`` is left out). So every sub-list of layers is
again a valid network, which is what the minimizer (``fxopt.fuzz.minimize``) relies on, and the
source *is* the network: :func:`build` executes it, and a failure prints it as the reproduction.
:func:`example_input` and :func:`batches` draw the network's inputs from its seed.

    >>> net = generate(5)
    >>> model = build(net)              # nn.Module in eval mode, weights from the layer seeds
    >>> x = example_input(net)          # the same tensor for the same seed
    >>> print(source(net))              # standalone: imports, helpers, the class, the input
"""
from __future__ import annotations

import linecache
import re
from typing import Any

import torch
import torch.nn as nn

from fxopt.fuzz.grammar import ACTIVATION_SPELLINGS, LAYER_KINDS, Layer, Network

__all__ = ["source", "module_source", "build", "example_input", "batches"]

_MAX_HW = 32
_MAX_FEATURES = 2048

# ---- source -------------------------------------------------------------------------------

_PRELUDE = '''\
import torch
import torch.nn as nn
import torch.nn.functional as F


def _randomize_bn(bn, seed):
    """Non-trivial running statistics and affine parameters (eval mode uses them)."""
    g = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
        bn.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g) * 0.5)
    return bn
'''


class _Emitter:
    """Writes ``__init__`` and ``forward`` lines while tracking the shape (C, H, W) or (F,)."""

    def __init__(self, net: Network):
        self.init: list[str] = []
        self.fwd: list[str] = []
        self.n = net.input_shape[0]
        self.shape: tuple[int, ...] = tuple(net.input_shape[1:])
        self.k = 0  # layer index (attribute names)
        self.tmp = 0
        self.protect = net.protect_input
        self.on_input = True  # x may still be the input tensor (or a view or alias of it)

    def inplace_ok(self) -> bool:
        """Whether an in-place op may write into ``x`` (not when it would reach the input)."""
        return not (self.protect and self.on_input)

    @property
    def four_d(self) -> bool:
        return len(self.shape) == 3

    def attr(self, what: str, ctor: str, seed: int | None = None) -> str:
        name = f"{what}{self.k}_{len(self.init)}"
        if seed is not None:
            self.init.append(f"torch.manual_seed({seed})")
        self.init.append(f"self.{name} = {ctor}")
        return f"self.{name}"

    def var(self) -> str:
        self.tmp += 1
        return f"t{self.tmp}"

    def bn(self, c: int, seed: int, dims: int = 2) -> str:
        return self.attr("bn", f"_randomize_bn(nn.BatchNorm{dims}d({c}), {seed})")

    def act(self, p: dict, x: str, out: str) -> None:
        spelling = ACTIVATION_SPELLINGS[p["act"]][p["spelling"]]
        if x == "x" and not self.inplace_ok() and _is_inplace(spelling):
            spelling = ACTIVATION_SPELLINGS[p["act"]][0]  # the first spelling is out of place
        if spelling.startswith("M:"):
            self.fwd.append(f"{out} = {self.attr('act', spelling[2:])}({x})")
        else:
            self.fwd.append(f"{out} = {spelling.format(x=x)}")


def _is_inplace(spelling: str) -> bool:
    return "inplace=True" in spelling or bool(re.search(r"[a-z]_\(", spelling))


def _conv_geometry(p: dict, h: int, w: int) -> tuple[int, int, int]:
    """(stride, padding, dilation) keeping the output at least 2x2 (or the input's size)."""
    k, s, d = p["k"], p["stride"], p["dilation"]
    pad = {"same": d * (k - 1) // 2, "zero": 0, "one": 1}[p["pad"]]

    def out(n, s, pad):
        return (n + 2 * pad - d * (k - 1) - 1) // s + 1

    if min(out(h, s, pad), out(w, s, pad)) < 2:
        s, pad = 1, d * (k - 1) // 2
    return s, pad, d


def _groups(kind: str, cin: int, cout: int) -> tuple[int, int]:
    if kind == "depthwise":
        return cin, cin * (1 if cout <= cin else 2)
    if kind == "grouped":
        for g in (4, 3, 2):
            if cin % g == 0 and cout % g == 0 and cin > g:
                return g, cout
    return 1, cout


def _emit_conv(e: _Emitter, la: Layer, x: str) -> str:
    p = la.params
    c, h, w = e.shape
    g, cout = _groups(p["groups"], c, p["cout"])
    s, pad, d = _conv_geometry(p, h, w)
    k = p["k"]
    mode = ""
    if p.get("reflect") and pad and pad < min(h, w):
        mode = ", padding_mode='reflect'"
    pad_src = "'same'" if p["pad"] == "same" and s == 1 and k % 2 == 1 else str(pad)
    conv = e.attr("conv", f"nn.Conv2d({c}, {cout}, {k}, stride={s}, padding={pad_src}, "
                          f"dilation={d}, groups={g}, bias={p['bias']}{mode})", la.seed)
    e.fwd.append(f"x = {conv}({x})")
    ho = (h + 2 * pad - d * (k - 1) - 1) // s + 1
    wo = (w + 2 * pad - d * (k - 1) - 1) // s + 1
    e.shape = (cout, ho, wo)
    if la.kind == "conv_bn_act":
        if p.get("bn"):
            e.fwd.append(f"x = {e.bn(cout, la.seed + 1)}(x)")
        e.act(p, "x", "x")
    return "x"


def _emit_conv_transpose(e: _Emitter, la: Layer) -> None:
    p = la.params
    c, h, w = e.shape
    k, s, pad, d = p["k"], p["stride"], p["pad"], p["dilation"]
    op = p["out_pad"] if p["out_pad"] < max(s, d) else 0
    if p.get("no_outpad_dilation") and op >= s:
        op = 0

    def out(n, s, op):
        return (n - 1) * s - 2 * pad + d * (k - 1) + op + 1

    if max(out(h, s, op), out(w, s, op)) > _MAX_HW:
        s = 1
        op = op if op < max(s, d) and not (p.get("no_outpad_dilation") and op >= s) else 0
    if min(out(h, s, op), out(w, s, op)) < 2:
        pad = 0
    g = 1
    cout = p["cout"]
    if p["grouped"] and c % 2 == 0 and cout % 2 == 0:
        g = 2
    conv = e.attr("convt", f"nn.ConvTranspose2d({c}, {cout}, {k}, stride={s}, padding={pad}, "
                           f"output_padding={op}, groups={g}, bias={p['bias']}, dilation={d})",
                  la.seed)
    e.fwd.append(f"x = {conv}(x)")
    e.shape = (cout, out(h, s, op), out(w, s, op))


def _emit_residual(e: _Emitter, la: Layer) -> None:
    p = la.params
    c = e.shape[0]
    k = p["k"]
    g = c if p["depthwise"] else 1
    conv = e.attr("conv", f"nn.Conv2d({c}, {c}, {k}, padding={k // 2}, groups={g}, "
                          f"bias={not p['bn']})", la.seed)
    y = e.var()
    e.fwd.append(f"{y} = {conv}(x)")
    if p["bn"]:
        e.fwd.append(f"{y} = {e.bn(c, la.seed + 1)}({y})")
    e.act(p, y, y)
    combine = p["combine"]
    if combine == "iadd" and not e.inplace_ok():
        combine = "add"
    if combine == "iadd":
        e.fwd.append(f"x += {y}")
    elif combine == "torch.add":
        e.fwd.append(f"x = torch.add(x, {y})")
    elif combine == "add_relu":
        e.fwd.append(f"x = F.relu(x + {y})")
    elif combine == "radd":
        e.fwd.append(f"x = {y} + x")
    else:
        e.fwd.append(f"x = x + {y}")


def _emit_concat(e: _Emitter, la: Layer) -> None:
    p = la.params
    c, h, w = e.shape
    k = p["k"]
    conv = e.attr("conv", f"nn.Conv2d({c}, {p['cout']}, {k}, padding={k // 2})", la.seed)
    y = e.var()
    e.fwd.append(f"{y} = {conv}(x)")
    if p["act"]:
        e.fwd.append(f"{y} = F.relu({y})")
    parts = f"[{y}, x]" if p["first"] else f"[x, {y}]"
    e.fwd.append(f"x = torch.cat({parts}, dim=1)")
    e.shape = (c + p["cout"], h, w)


def _emit_pool(e: _Emitter, la: Layer) -> None:
    p = la.params
    c, h, w = e.shape
    t = p["type"]
    if t.startswith("adaptive"):
        o = min(p["out"], h, w)
        cls = "AdaptiveAvgPool2d" if t == "adaptive_avg" else "AdaptiveMaxPool2d"
        e.fwd.append(f"x = {e.attr('pool', f'nn.{cls}({o})')}(x)")
        e.shape = (c, o, o)
        return
    k, s = p["k"], p["stride"]
    pad = min(p["pad"], k // 2)
    ceil = p["ceil"]

    def out(n):
        v = n + 2 * pad - k
        o = (-(-v // s) if ceil else v // s) + 1
        if ceil and (o - 1) * s >= n + pad:
            o -= 1
        return o

    if min(out(h), out(w)) < 1:
        return
    if t in ("max", "fmax"):
        args = f"{k}, stride={s}, padding={pad}, ceil_mode={ceil}"
        e.fwd.append(f"x = {e.attr('pool', f'nn.MaxPool2d({args})')}(x)" if t == "max" else
                     f"x = F.max_pool2d(x, {args})")
    else:
        args = f"{k}, stride={s}, padding={pad}, ceil_mode={ceil}, " \
               f"count_include_pad={p['include_pad']}"
        e.fwd.append(f"x = {e.attr('pool', f'nn.AvgPool2d({args})')}(x)" if t == "avg" else
                     f"x = F.avg_pool2d(x, {args})")
    e.shape = (c, out(h), out(w))


def _emit_se(e: _Emitter, la: Layer) -> None:
    p = la.params
    c = e.shape[0]
    hid = max(1, c // p["reduce"])
    s = e.var()
    if p["fc"] == "conv":
        pooled = "x.mean((2, 3), keepdim=True)" if p["pool"] == "mean" else \
            "F.adaptive_avg_pool2d(x, 1)"
        e.fwd.append(f"{s} = {pooled}")
        fc1 = e.attr("fc", f"nn.Conv2d({c}, {hid}, 1)", la.seed)
        fc2 = e.attr("fc", f"nn.Conv2d({hid}, {c}, 1)", la.seed + 1)
    else:
        e.fwd.append(f"{s} = x.mean((2, 3))" if p["pool"] == "mean" else
                     f"{s} = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)")
        fc1 = e.attr("fc", f"nn.Linear({c}, {hid})", la.seed)
        fc2 = e.attr("fc", f"nn.Linear({hid}, {c})", la.seed + 1)
    inner = "F.relu" if p["inner"] == "relu" else "F.silu"
    e.fwd.append(f"{s} = {fc2}({inner}({fc1}({s})))")
    gate = {"sigmoid": f"torch.sigmoid({s})", "hardsigmoid": f"F.hardsigmoid({s})",
            "method_sigmoid": f"{s}.sigmoid()"}[p["gate"]]
    e.fwd.append(f"{s} = {gate}")
    if p["fc"] == "linear":
        e.fwd.append(f"{s} = {s}.view({e.n}, {c}, 1, 1)")
    mul = "x*s" if p["mul"] == "mul_" and not e.inplace_ok() else p["mul"]
    e.fwd.append({"x*s": f"x = x * {s}", "s*x": f"x = {s} * x", "mul_": f"x = x.mul_({s})",
                  "torch.mul": f"x = torch.mul(x, {s})"}[mul])


def _emit_shuffle(e: _Emitter, la: Layer) -> None:
    c, h, w = e.shape
    g = la.params["groups"]
    if c % g or c == g:
        return
    n = e.n
    style = la.params["style"]
    if style == "size":
        e.fwd.append("n, c, h, w = x.size()")
        e.fwd.append(f"x = x.view(n, {g}, c // {g}, h, w).transpose(1, 2).reshape(n, c, h, w)")
    elif style == "contig":
        e.fwd.append(f"x = x.view({n}, {g}, {c // g}, {h}, {w})")
        e.fwd.append(f"x = torch.transpose(x, 1, 2).contiguous().view({n}, {c}, {h}, {w})")
    else:
        e.fwd.append(f"x = x.view({n}, {g}, {c // g}, {h}, {w}).transpose(1, 2)"
                     f".reshape({n}, {c}, {h}, {w})")


def _emit_dropout(e: _Emitter, la: Layer) -> None:
    t = la.params["type"]
    if t == "F.dropout":
        e.fwd.append("x = F.dropout(x, 0.5, self.training)")
    else:
        if t.startswith("nn.Dropout2d") and not e.four_d:
            t = "nn.Dropout(0.2)"
        e.fwd.append(f"x = {e.attr('drop', t)}(x)")


def _emit_alias(e: _Emitter, la: Layer) -> None:
    """``a`` is ``x`` itself (eval Dropout / Identity, ``.contiguous()`` of a contiguous
    tensor): an in-place op on ``a`` changes ``x`` too, in eager."""
    p = la.params
    if not e.inplace_ok():
        return
    a = e.var()
    if p["alias"] == "contiguous":
        e.fwd.append(f"{a} = x.contiguous()")
    else:
        mod = "nn.Dropout(0.1)" if p["alias"] == "dropout" else "nn.Identity()"
        e.fwd.append(f"{a} = {e.attr('alias', mod)}(x)")
    e.fwd.append({"relu_": f"{a}.relu_()", "mul_": f"{a}.mul_(0.5)",
                  "add_": f"{a}.add_(1.0)"}[p["op"]])
    if p["then"] == "cat" and e.four_d:
        e.fwd.append(f"x = torch.cat([x, {a}], dim=1)")
        e.shape = (2 * e.shape[0], *e.shape[1:])
    else:
        e.fwd.append(f"x = x + {a}")


def _emit_flatten(e: _Emitter, la: Layer) -> None:
    p = la.params
    c, h, w = e.shape
    pool = p["pool"]
    if pool == "none" and c * h * w > _MAX_FEATURES:
        pool = "adaptive"
    if pool == "adaptive":
        e.fwd.append("x = F.adaptive_avg_pool2d(x, 1)")
        h = w = 1
    elif pool == "mean":
        e.fwd.append("x = x.mean((2, 3), keepdim=True)")
        h = w = 1
    f = c * h * w
    e.fwd.append({"torch": "x = torch.flatten(x, 1)", "method": "x = x.flatten(1)",
                  "view": "x = x.view(x.size(0), -1)",
                  "module": f"x = {e.attr('flat', 'nn.Flatten()')}(x)",
                  "reshape": f"x = x.reshape({e.n}, {f})"}[p["style"]])
    e.shape = (f,)


def _emit_linear(e: _Emitter, la: Layer) -> None:
    p = la.params
    f = e.shape[0]
    fc = e.attr("fc", f"nn.Linear({f}, {p['cout']}, bias={p['bias']})", la.seed)
    e.fwd.append(f"x = {fc}(x)")
    e.shape = (p["cout"],)
    if p["act"]:
        e.act(p, "x", "x")


def _emit_layer(e: _Emitter, la: Layer) -> None:
    need = LAYER_KINDS[la.kind][1]
    if (need == "4d") != e.four_d and need != "any":
        return  # a spatial layer after flatten (or a dense one before): left out
    kind = la.kind
    emitted = len(e.fwd)
    _emit_kind(e, la)
    e.k += 1
    if len(e.fwd) == emitted or kind in ("dropout", "shuffle"):
        return  # x is still what it was: maybe the input, or a view or alias of it
    if kind == "flatten" and la.params["pool"] == "none":
        return
    if kind == "act" and _is_inplace(ACTIVATION_SPELLINGS[la.params["act"]][la.params["spelling"]]):
        return
    e.on_input = False


def _emit_kind(e: _Emitter, la: Layer) -> None:
    kind = la.kind
    if kind in ("conv", "conv_bn_act"):
        _emit_conv(e, la, "x")
    elif kind == "conv_transpose":
        _emit_conv_transpose(e, la)
    elif kind == "bn2d":
        e.fwd.append(f"x = {e.bn(e.shape[0], la.seed)}(x)")
    elif kind == "bn1d":
        e.fwd.append(f"x = {e.bn(e.shape[0], la.seed, dims=1)}(x)")
    elif kind == "act":
        e.act(la.params, "x", "x")
    elif kind == "residual":
        _emit_residual(e, la)
    elif kind == "residual_linear":
        f = e.shape[0]
        fc = e.attr("fc", f"nn.Linear({f}, {f})", la.seed)
        iadd = la.params["combine"] == "iadd" and e.inplace_ok()
        e.fwd.append(f"x += {fc}(x)" if iadd else f"x = x + {fc}(x)")
    else:
        {"concat": _emit_concat, "pool": _emit_pool, "se": _emit_se, "shuffle": _emit_shuffle,
         "dropout": _emit_dropout, "alias_inplace": _emit_alias, "flatten": _emit_flatten,
         "linear": _emit_linear}[kind](e, la)


def module_source(net: Network, class_name: str = "FuzzNet") -> str:
    """The ``class FuzzNet(nn.Module)`` source of ``net`` (after ``_PRELUDE``)."""
    e = _Emitter(net)
    if net.input_inplace:
        e.fwd.append("x.mul_(2.0)")
    for la in net.layers:
        _emit_layer(e, la)
    init = e.init or ["pass"]
    lines = [f"class {class_name}(nn.Module):",
             f"    # fxopt.fuzz seed {net.seed}, input {tuple(net.input_shape)}",
             "    def __init__(self):", "        super().__init__()",
             *[f"        {s}" for s in init], "",
             "    def forward(self, x):", *[f"        {s}" for s in e.fwd], "        return x"]
    return "\n".join(lines) + "\n"


def source(net: Network) -> str:
    """Standalone Python source: imports, helpers, the module class, ``model`` and ``x``."""
    n, c, h, w = net.input_shape
    return (_PRELUDE + "\n\n" + module_source(net) + "\n\n"
            f"model = FuzzNet().eval()\n"
            f"x = torch.randn({n}, {c}, {h}, {w}, "
            f"generator=torch.Generator().manual_seed({net.seed}))\n")


def build(net: Network) -> nn.Module:
    """The network as an ``nn.Module`` in eval mode (its source, executed)."""
    code = _PRELUDE + "\n\n" + module_source(net)
    filename = f"<fxopt.fuzz seed {net.seed} #{abs(hash(code)) % 10 ** 8}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    scope: dict[str, Any] = {}
    exec(compile(code, filename, "exec"), scope)  # noqa: S102 - our own generated source
    return scope["FuzzNet"]().eval()


def example_input(net: Network) -> torch.Tensor:
    """The example input of ``net`` (``source`` writes the same expression)."""
    return torch.randn(*net.input_shape, generator=torch.Generator().manual_seed(net.seed))


def batches(net: Network, count: int, stream: int) -> list[torch.Tensor]:
    """``count`` more inputs of ``net``'s shape; ``stream`` 1: calibration, 2: held out."""
    g = torch.Generator().manual_seed(net.seed * 7919 + stream * 104729)
    return [torch.randn(*net.input_shape, generator=g) for _ in range(count)]
