"""``fxopt.draw``: a picture of the graph, fused / quantized / pruned nodes marked.

The layout is layered top to bottom: each node sits on its topological generation (networkx),
the nodes of one generation side by side (a residual block's shortcut beside its main path).
A deep graph wraps into several columns, read left to right, so a 50-layer ResNet fits on one
page with labels that stay readable. Weights (``get_attr``) are not drawn. Labels are short:
what the node computes and its output channels (``conv3x3+add+relu 256``). Identity
shortcuts go round the nodes they skip, on the right, in blue.

Colours: fused ops orange, quantized ops purple, other convolution/linear layers blue,
normalization pink, activations green, elementwise ops yellow, inputs/outputs grey; layers whose
output channels pruning removed get a thick red border.

    >>> opt = fxopt.optimize(torchvision.models.resnet50().eval(), x, prune=0.5)
    >>> fxopt.draw(opt, "resnet50.png")        # .png, .svg or .pdf (matplotlib: fxopt[draw])

Needs matplotlib (``pip install fxopt[draw]``).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn

from .errors import InputError, NotAvailableError

__all__ = ["draw", "graph_layout", "node_kind", "node_label", "KIND_COLORS", "PRUNED_COLOR"]

KIND_COLORS = {
    "fused": "#fdae6b",
    "quantized": "#bcbddc",
    "layer": "#9ecae1",
    "norm": "#fcc5c0",
    "activation": "#c7e9c0",
    "elementwise": "#fff7bc",
    "io": "#d9d9d9",
    "other": "#f7f7f7",
}
KIND_NAMES = {
    "fused": "fused op (fxopt)", "quantized": "quantized op (int8)", "layer": "conv / linear",
    "norm": "normalization", "activation": "activation", "elementwise": "add / mul / cat",
    "io": "input / output", "other": "other (pool, reshape, layout)",
}
PRUNED_COLOR = "#d62728"
FORMATS = ("png", "svg", "pdf")

_ACTIVATIONS = {"relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid",
                "leaky_relu", "elu", "mish", "hardtanh", "softmax", "clamp"}
_ELEMENTWISE = {"add", "iadd", "mul", "imul", "sub", "truediv", "cat", "concat", "stack"}
_SHORT = {"conv1d": "conv", "conv2d": "conv", "batchnorm2d": "bn", "batchnorm1d": "bn",
          "layernorm": "ln", "adaptiveavgpool2d": "avgpool", "maxpool2d": "maxpool",
          "avgpool2d": "avgpool", "adaptive_avg_pool2d": "avgpool", "max_pool2d": "maxpool"}


def _module(gm: fx.GraphModule, target: str):
    try:
        return gm.get_submodule(target)
    except AttributeError:
        return None


def _fn_name(target) -> str:
    name = getattr(target, "__name__", None) or str(target)
    return name.split(".")[-1].lower()


def _is_fxopt(target) -> bool:
    return "fxopt" in str(target)


def node_kind(gm: fx.GraphModule, node: fx.Node) -> str:
    """One of ``KIND_COLORS``'s keys."""
    if node.op in ("placeholder", "output"):
        return "io"
    if node.op == "call_function" and _is_fxopt(node.target):
        name = str(node.target)
        return "quantized" if ("int8" in name or "quant" in name) else "fused"
    if node.op == "call_module":
        m = _module(gm, node.target)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            return "layer"
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
            return "norm"
        name = type(m).__name__.lower()
        if "quant" in name:
            return "quantized"
        return "activation" if name in _ACTIVATIONS else "other"
    name = _fn_name(node.target)
    if name in ("conv1d", "conv2d", "linear"):
        return "layer"
    if name in ("batch_norm", "layer_norm"):
        return "norm"
    if name.rstrip("_") in _ACTIVATIONS:
        return "activation"
    if name in _ELEMENTWISE:
        return "elementwise"
    return "other"


def _channels(node: fx.Node) -> str:
    tm = node.meta.get("tensor_meta")
    shape = getattr(tm, "shape", None)
    return f" {shape[1]}" if shape is not None and len(shape) >= 2 else ""


def _kernel(weight) -> str:
    return "x".join(str(k) for k in weight.shape[2:]) if weight is not None else ""


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
    if node.op == "call_function" and _is_fxopt(node.target):
        op = str(node.target).split(".")[-2] if "." in str(node.target) else str(node.target)
        base = op.replace("_act", "").replace("2d", "").replace("1d", "")
        if base.startswith("conv"):
            w = node.args[1]
            weight = gm.get_parameter(w.target) if isinstance(w, fx.Node) and \
                w.op == "get_attr" else None
            stride = node.args[3][0] if len(node.args) > 3 else 1
            base = f"conv{_kernel(weight)}{'/' + str(stride) if stride > 1 else ''}"
        residual = node.args[-1] if len(node.args) in (4, 8) else node.kwargs.get("residual")
        parts = [base] + (["add"] if residual is not None else [])
        act = node.kwargs.get("act", "none")
        parts += [act] if act != "none" else []
        return "+".join(parts) + ch
    if node.op == "call_method":
        if node.target == "contiguous" and node.kwargs.get("memory_format") is torch.channels_last:
            return "to NHWC"
        return node.target + ch
    if node.op == "get_attr":
        return node.target.split(".")[-1]
    name = _fn_name(node.target)
    return _SHORT.get(name, name.rstrip("_")) + ch


def _pruned_layers(gm: fx.GraphModule) -> set[str]:
    """Module paths of layers whose output channels pruning removed."""
    out = set()
    for group in gm.meta.get("fxopt_prune_groups", []):
        if group.get("kept") is not None and group["kept"] < group.get("channels", 0):
            out.update(group.get("layers", []))
    return out


def _layer_path(node: fx.Node) -> str | None:
    if node.op == "call_module":
        return node.target
    if node.op == "call_function" and _is_fxopt(node.target) and len(node.args) > 1:
        w = node.args[1]
        if isinstance(w, fx.Node) and w.op == "get_attr":
            return w.target.rpartition(".")[0]
    return None


def graph_layout(gm: fx.GraphModule, *, rows_per_column: int | None = None):
    """(nodes drawn, networkx DiGraph, {node: (x, y)}, number of columns, rows per column)."""
    nodes = [n for n in gm.graph.nodes if n.op != "get_attr"]
    g = nx.DiGraph()
    g.add_nodes_from(nodes)
    for n in nodes:
        for a in n.all_input_nodes:
            if a in g:
                g.add_edge(a, n)
    generations = [sorted(gen, key=lambda n: nodes.index(n))
                   for gen in nx.topological_generations(g)]
    depth = len(generations)
    if rows_per_column is None:
        columns = max(1, round(math.sqrt(depth / 10)))
        rows_per_column = math.ceil(depth / columns)
    columns = math.ceil(depth / rows_per_column)
    lanes = max(len(gen) for gen in generations)
    pos = {}
    for i, gen in enumerate(generations):
        col, row = divmod(i, rows_per_column)
        x0 = col * (lanes + 0.6)
        for j, n in enumerate(gen):
            pos[n] = (x0 + (lanes - 1) / 2 + j - (len(gen) - 1) / 2, -row)
    return nodes, g, pos, columns, rows_per_column, lanes


def draw(module: nn.Module, path: str | os.PathLike, *, title: str | None = None,
         rows_per_column: int | None = None, dpi: int = 110) -> Path:
    """Render ``module``'s graph (an ``OptimizedModule`` or a ``GraphModule``) to ``path``.

    The format follows the suffix (``.png``, ``.svg``, ``.pdf``). Returns the path.
    """
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.collections import LineCollection
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError as e:
        raise NotAvailableError("fxopt.draw needs matplotlib",
                                hint="pip install 'fxopt[draw]' (or matplotlib)") from e
    gm = getattr(module, "graph_module", module)
    if not isinstance(gm, fx.GraphModule):
        raise InputError(f"draw needs an fx graph: an OptimizedModule or a GraphModule, got "
                         f"{type(module).__name__}", hint="draw(fxopt.optimize(model, x), path)")
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"path must be a str or a path, got {type(path).__name__}")
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        suffixes = ", ".join("." + f for f in FORMATS)
        raise InputError(f"cannot tell the picture format from '{path.name}'",
                         hint=f"end the file name with one of: {suffixes}")
    if path.is_dir():
        raise InputError(f"{path} is a directory", hint="give a file name, e.g. DIR/graph.png")
    path.parent.mkdir(parents=True, exist_ok=True)

    nodes, g, pos, columns, rows, lanes = graph_layout(gm, rows_per_column=rows_per_column)
    pruned = _pruned_layers(gm)
    col_w = lanes + 0.6
    fig_w = max(6.0, columns * col_w * 1.3)
    fig_h = max(4.0, rows * 0.36 + 1.6)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    near, skips, far = [], [], []
    for a, b in g.edges:
        (xa, ya), (xb, yb) = pos[a], pos[b]
        if abs(xa - xb) >= col_w / 2:
            far.append([(xa, ya), (xb, yb)])
        elif abs(xa - xb) < 1e-6 and ya - yb > 1:
            # A straight skip edge (an identity shortcut) would hide behind the nodes it
            # passes: it goes round them on the right.
            side = xa + 0.8
            skips.append([(xa, ya), (side, ya - 0.4), (side, yb + 0.4), (xb, yb)])
        else:
            near.append([(xa, ya), (xb, yb)])
    ax.add_collection(LineCollection(near, colors="#555555", linewidths=0.8, zorder=1))
    ax.add_collection(LineCollection(skips, colors="#3182bd", linewidths=0.9, zorder=1))
    # An edge into the next column is drawn as two stubs (out of the bottom, into the top):
    # long diagonals across a column would hide the nodes they cross.
    stubs = [seg for (a, b) in far for seg in ([a, (a[0], -rows + 0.55)], [(b[0], 0.45), b])]
    ax.add_collection(LineCollection(stubs, colors="#888888", linewidths=0.8,
                                     linestyles="dashed", zorder=1))
    kinds_seen, any_pruned = set(), False
    for n in nodes:
        kind = node_kind(gm, n)
        kinds_seen.add(kind)
        is_pruned = _layer_path(n) in pruned
        any_pruned |= is_pruned
        x, y = pos[n]
        ax.text(x, y, node_label(gm, n), ha="center", va="center", fontsize=7, zorder=3,
                bbox=dict(boxstyle="round,pad=0.25", fc=KIND_COLORS[kind],
                          ec=PRUNED_COLOR if is_pruned else "#444444",
                          lw=2.0 if is_pruned else 0.6))
    for c in range(1, columns):  # column separators: read left to right
        ax.axvline(c * col_w - 0.8, color="#dddddd", lw=0.8, zorder=0)
    ax.set_xlim(-0.8, columns * col_w - 0.8)
    ax.set_ylim(-rows + 0.4, 0.6)
    ax.axis("off")
    handles = [Patch(fc=KIND_COLORS[k], ec="#444444", label=KIND_NAMES[k])
               for k in KIND_COLORS if k in kinds_seen]
    if any_pruned:
        handles.append(Patch(fc="white", ec=PRUNED_COLOR, lw=2.0, label="pruned channels"))
    if skips:
        handles.append(Line2D([], [], color="#3182bd", lw=0.9, label="identity shortcut"))
    if far:
        handles.append(Line2D([], [], color="#888888", lw=0.8, ls="--",
                              label="continues in the next column"))
    ncol = min(len(handles), max(2, int(fig_w / 2.3)))
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=ncol,
              fontsize=8, frameon=False)
    n_fused = sum(1 for n in nodes if node_kind(gm, n) == "fused")
    n_pruned = sum(1 for n in nodes if _layer_path(n) in pruned)
    summary = f"{len(nodes)} nodes, {n_fused} fused" + (f", {n_pruned} pruned layers"
                                                         if any_pruned else "")
    if columns > 1:
        summary += "; columns read left to right"
    legend_rows = math.ceil(len(handles) / ncol)
    ax.set_title(f"{title or 'fxopt graph'}: {summary}", fontsize=10, pad=8 + 16 * legend_rows)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format=fmt, dpi=dpi)
        tmp.replace(path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return path
