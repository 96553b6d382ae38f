"""What ``fxopt.draw`` writes in each box: the kind of a node (its colour) and its short label.

``node_kind`` sorts a node into fused / quantized / layer / norm / activation / elementwise /
io / other (quantized: any op whose name says ``int8``, ``quantize`` or ``quantized``, or whose
output is an int8 tensor); ``node_label`` is what it computes and its output channels
(``conv3x3/2+add+relu 256``); a pruned layer shows kept/original channels (``32/64``).

    >>> node_label(gm, node)      # 'conv3x3+relu 32/64'
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

__all__ = ["node_kind", "node_label", "pruned_layers", "pruned_of"]

_QUANTIZED_WORDS = ("int8", "quantize", "quantized")
_ACTIVATIONS = {"relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid",
                "leaky_relu", "elu", "mish", "hardtanh", "softmax", "clamp"}
_ELEMENTWISE = {"add", "iadd", "mul", "imul", "sub", "truediv", "cat", "concat", "stack"}
_SHORT = {"conv1d": "conv", "conv2d": "conv", "batchnorm2d": "bn", "batchnorm1d": "bn",
          "layernorm": "ln", "adaptiveavgpool2d": "avgpool", "maxpool2d": "maxpool",
          "avgpool2d": "avgpool", "adaptive_avg_pool2d": "avgpool", "max_pool2d": "maxpool",
          "avg_pool2d": "avgpool", "adaptive_avg_pool": "avgpool", "max_pool": "maxpool",
          "avg_pool": "avgpool", "quantize_per_tensor": "quantize",
          "quantize_per_channel": "quantize"}


# -- what a node is ---------------------------------------------------------------------------
def _module(gm: fx.GraphModule, target: str):
    try:
        return gm.get_submodule(target)
    except AttributeError:
        return None


def _qualified_name(target) -> str | None:
    """``fxopt::conv2d_int8`` for a torch op (an overload or an overload packet), else None."""
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return schema.name
    name = getattr(target, "_qualified_op_name", None)
    return name if isinstance(name, str) else None


def _op_name(target) -> str:
    """``conv2d_int8`` for ``torch.ops.fxopt.conv2d_int8.default``, ``relu`` for ``torch.relu``."""
    qualified = _qualified_name(target)
    if qualified is not None:
        return qualified.split("::")[-1].lower()
    name = getattr(target, "__name__", None) or str(target)
    return name.split(".")[-1].lower()


def _namespace(target) -> str:
    qualified = _qualified_name(target)
    return qualified.partition("::")[0] if qualified is not None else ""


def _is_fxopt(target) -> bool:
    return _namespace(target) == "fxopt" or "fxopt" in str(target)


def _is_quantized(target) -> bool:
    text = f"{target} {_namespace(target)} {_op_name(target)}".lower()
    return any(word in text for word in _QUANTIZED_WORDS)


def _op_args(node: fx.Node) -> dict:
    """A torch op call's arguments by name (its schema), positional ones included."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return dict(node.kwargs)
    named = {a.name: v for a, v in zip(schema.arguments, node.args)}
    named.update(node.kwargs)
    return named


_QUANTIZED_DTYPES = (torch.quint8, torch.qint8, torch.qint32, torch.int8)


def node_kind(gm: fx.GraphModule, node: fx.Node) -> str:
    """One of ``KIND_COLORS``'s keys.

    Quantized: an op whose name says int8 / quantize / quantized (``x.dequantize()`` too), or
    any op whose output is an int8 or quantized tensor (a max-pool on ``quint8`` data).
    """
    if node.op in ("placeholder", "output"):
        return "io"
    if node.op in ("call_function", "call_method") and _is_quantized(node.target):
        return "quantized"
    if getattr(node.meta.get("tensor_meta"), "dtype", None) in _QUANTIZED_DTYPES:
        return "quantized"
    if node.op == "call_function" and _is_fxopt(node.target):
        return "fused"
    if node.op == "call_module":
        m = _module(gm, node.target)
        name = type(m).__name__.lower()
        if "quant" in name or "quant" in type(m).__module__:
            return "quantized"
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            return "layer"
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
            return "norm"
        return "activation" if name in _ACTIVATIONS else "other"
    name = _op_name(node.target)
    if name in ("conv1d", "conv2d", "linear"):
        return "layer"
    if name in ("batch_norm", "layer_norm"):
        return "norm"
    if name.rstrip("_") in _ACTIVATIONS:
        return "activation"
    if name.rstrip("_") in _ELEMENTWISE:
        return "elementwise"
    return "other"


# -- labels -----------------------------------------------------------------------------------
def _channels(node: fx.Node) -> str:
    tm = node.meta.get("tensor_meta")
    shape = getattr(tm, "shape", None)
    return f" {shape[1]}" if shape is not None and len(shape) >= 2 else ""


def _kernel(weight) -> str:
    shape = getattr(weight, "shape", None)
    return "x".join(str(k) for k in shape[2:]) if shape is not None else ""


def _attr(gm: fx.GraphModule, arg):
    """What a ``get_attr`` node reads (None for anything else)."""
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        return None
    value = gm
    try:
        for part in arg.target.split("."):
            value = getattr(value, part)
    except AttributeError:
        return None
    return value


def _attr_value(gm: fx.GraphModule, arg):
    """The tensor a ``get_attr`` node reads (None for anything else)."""
    value = _attr(gm, arg)
    return value if isinstance(value, torch.Tensor) else None


def _packed_conv(gm: fx.GraphModule, node: fx.Node):
    """(weight, stride) of a ``quantized::conv2d*`` call's packed parameters, or (None, 1)."""
    packed = _attr(gm, node.args[1]) if len(node.args) > 1 else None
    try:
        return packed.unpack()[0], _stride(list(packed.stride()))
    except Exception:  # noqa: BLE001 - only a label: without the kernel size it says "conv"
        return None, 1


def _stride(value) -> int:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else 1
    return value if isinstance(value, int) else 1


def _op_label(gm: fx.GraphModule, node: fx.Node) -> str:
    """``conv3x3/2+add+relu`` for a fused or int8 conv, ``quantize``, ``add+relu``, ..."""
    a = _op_args(node)
    base = _op_name(node.target)
    for word in ("_int8", "_act", "2d", "1d"):
        base = base.replace(word, "")
    rest = ""
    if base.startswith("conv"):
        weight = _attr_value(gm, a.get("weight", a.get("w_q")))
        stride = _stride(a.get("stride", 1))
        if weight is None and _namespace(node.target) == "quantized":
            weight, stride = _packed_conv(gm, node)
        head, rest = f"conv{_kernel(weight)}{'/' + str(stride) if stride > 1 else ''}", base[4:]
    elif base.startswith("linear"):
        head, rest = "linear", base[6:]
    elif base.endswith("_relu"):  # quantized::add_relu
        head, rest = _SHORT.get(base[:-5], base[:-5]), "_relu"
    else:
        head = _SHORT.get(base, base)
    parts = [head] + (["add"] if a.get("residual") is not None else [])
    act = a.get("act", "none")
    parts += [act] if isinstance(act, str) and act != "none" else []
    parts += [p for p in rest.split("_") if p]  # quantized::conv2d_relu -> conv+relu
    return "+".join(parts)


def node_label(gm: fx.GraphModule, node: fx.Node) -> str:
    """A short label: what the node computes and its output channels."""
    if node.op == "placeholder":
        return f"input {node.name}"
    if node.op == "output":
        return "output"
    ch = _channels(node)
    if node.op == "call_module":
        m = _module(gm, node.target)
        name = type(m).__name__.lower()
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            return f"conv{_kernel(m.weight)}{'/' + str(m.stride[0]) if m.stride[0] > 1 else ''}{ch}"
        return _SHORT.get(name, name) + ch
    if node.op == "call_function" and _qualified_name(node.target) is not None:
        return _op_label(gm, node) + ch
    if node.op == "call_method":
        if node.target == "contiguous" and node.kwargs.get("memory_format") is torch.channels_last:
            return "to NHWC"
        return node.target + ch
    if node.op == "get_attr":
        return node.target.split(".")[-1]
    name = _op_name(node.target)
    return _SHORT.get(name, name.rstrip("_")) + ch


# -- pruning ----------------------------------------------------------------------------------
def pruned_layers(gm: fx.GraphModule) -> dict[str, tuple[int, int]]:
    """``{module path or node name: (kept, original channels)}`` of the layers pruning cut."""
    out = {}
    for group in gm.meta.get("fxopt_prune_groups", []):
        kept, channels = group.get("kept"), group.get("channels", 0)
        if kept is not None and kept < channels:
            for layer in group.get("layers", []):
                out[layer] = out[layer.replace(".", "_")] = (kept, channels)
    return out


def _layer_path(node: fx.Node) -> str | None:
    if node.op == "call_module":
        return node.target
    if node.op == "call_function" and _is_fxopt(node.target) and len(node.args) > 1:
        w = node.args[1]
        if isinstance(w, fx.Node) and w.op == "get_attr":
            return w.target.rpartition(".")[0]
    return None


def pruned_of(node: fx.Node, pruned: dict) -> tuple[int, int] | None:
    """(kept, original) output channels when ``node`` is (or stands for) a pruned layer.

    A fused or quantized op names the layers it stands for in ``meta["fxopt_from"]``.
    """
    if not pruned:
        return None
    path = _layer_path(node)
    if path in pruned:
        return pruned[path]
    for name in node.meta.get("fxopt_from", ()) or ():
        if name in pruned:
            return pruned[name]
    return None


