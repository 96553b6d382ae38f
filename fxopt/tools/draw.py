"""``fxopt.draw``: a picture of the graph, fused / quantized / pruned nodes marked.

The layout is layered top to bottom: each node sits on its topological generation (networkx).
The longest path through the graph runs straight down the left lane of each column; branches
(a projection shortcut, an inception arm) take lanes to its right, and an edge that skips
rows (an identity shortcut) goes round the nodes it passes, on the right, in blue. A deep graph
wraps into columns read left to right, with as many columns as make the page about as wide as
it is tall, each break placed where a single edge crosses it (between two residual blocks, not
inside one), so a 50-layer ResNet fits on one page with labels that stay readable. Weights
(``get_attr``) are not drawn. Labels are short: what the node computes and its output channels
(``conv3x3+add+relu 256``); a pruned layer shows kept/original channels (``conv3x3+relu 32/64``).

Colours: fused ops orange, quantized ops purple (fxopt's int8 ops by their op schema, PyTorch's
``quantized.conv2d_relu``, ``quantize_per_tensor``, ... by name: see ``draw_labels``), other
convolution/linear layers blue, normalization pink, activations green, elementwise ops yellow,
inputs/outputs grey; layers whose output channels pruning removed get a thick red border.

    >>> opt = fxopt.optimize(torchvision.models.resnet50().eval(), x, prune=0.5)
    >>> fxopt.draw(opt, "resnet50.png")        # .png, .svg or .pdf (matplotlib: fxopt[draw])

Needs matplotlib (``pip install fxopt[draw]``).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import torch.fx as fx
import torch.nn as nn

from fxopt.errors import InputError, NotAvailableError
from fxopt.tools.draw_labels import node_kind, node_label, pruned_layers, pruned_of

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
SKIP_COLOR = "#3182bd"
FORMATS = ("png", "svg", "pdf")
FONT_SIZE = 7.0
ROW_IN = 0.34      # inches per row of nodes
ASPECT = 1.3       # the width / height the column count aims for

# -- layout -----------------------------------------------------------------------------------
@dataclass
class _Layout:
    nodes: list
    graph: nx.DiGraph
    pos: dict          # node -> (x, y)
    row: dict          # node -> generation
    lane: dict         # node -> lane within its generation (0: the longest path)
    column: dict       # node -> column
    starts: list       # first generation of each column
    widths: list       # each column's width, in lanes
    x0: list           # each column's left edge
    lanes_in_row: list  # generation -> number of nodes

    @property
    def rows(self) -> int:
        ends = self.starts[1:] + [len(self.lanes_in_row)]
        return max(e - s for s, e in zip(self.starts, ends))


def _rows_per_column(depth: int, lanes: int, lane_in: float) -> int:
    """Rows per column that make the page about ``ASPECT`` times as wide as it is tall."""
    best, best_cost = depth, math.inf
    for columns in range(1, max(1, depth // 8) + 1):
        rows = math.ceil(depth / columns)
        width = columns * (lanes + 0.8) * lane_in
        height = rows * ROW_IN + 1.6
        cost = abs(math.log(width / height / ASPECT))
        if cost < best_cost:
            best, best_cost = rows, cost
    return best


def _column_starts(crossings: list[int], rows_per_column: int) -> list[int]:
    """First row of each column: each break where the fewest edges cross, late rather than early.

    ``crossings[i]``: nodes in rows <= i read in a row > i.
    """
    depth = len(crossings)
    starts = [0]
    while depth - starts[-1] > rows_per_column:
        s = starts[-1]
        lo, hi = s + max(1, (rows_per_column * 3) // 4), s + rows_per_column
        starts.append(min(range(lo, hi + 1), key=lambda b: (crossings[b - 1], -b)))
    return starts


def _layout(gm: fx.GraphModule, rows_per_column: int | None, lane_in: float) -> _Layout:
    nodes = [n for n in gm.graph.nodes if n.op != "get_attr"]
    index = {n: i for i, n in enumerate(nodes)}
    g = nx.DiGraph()
    g.add_nodes_from(nodes)
    for n in nodes:
        for a in n.all_input_nodes:
            if a in index:
                g.add_edge(a, n)
    # Longest path from a source (down) and to a sink (up): the nodes with the longest path
    # through them take lane 0, so the main line runs straight down and branches sit beside it.
    down, up = {}, {}
    for n in nodes:  # graph order is topological
        down[n] = max((down[p] + 1 for p in g.predecessors(n)), default=0)
    for n in reversed(nodes):
        up[n] = max((up[s] + 1 for s in g.successors(n)), default=0)
    generations = [sorted(gen, key=lambda n: (-(down[n] + up[n]), index[n]))
                   for gen in nx.topological_generations(g)]
    row = {n: i for i, gen in enumerate(generations) for n in gen}
    lane = {n: j for gen in generations for j, n in enumerate(gen)}
    depth = len(generations)
    lanes_in_row = [len(gen) for gen in generations]
    # A column break is clean where one tensor crosses it (a residual block's output feeds
    # both the next block and its shortcut): count the nodes whose edges cross, not the edges.
    last_use = {a: max(row[b] for b in g.successors(a)) for a in nodes if g.out_degree(a)}
    crossings = [0] * depth
    for a, end in last_use.items():
        for i in range(row[a], end):
            crossings[i] += 1
    if rows_per_column is None:
        rows_per_column = _rows_per_column(depth, max(lanes_in_row), lane_in)
    starts = _column_starts(crossings, max(1, rows_per_column))
    ends = starts[1:] + [depth]
    column, pos, widths, x0 = {}, {}, [], []
    left = 0.0
    for c, (s, e) in enumerate(zip(starts, ends)):
        # Room for the widest row and, on its right, for shortcuts that go round it.
        width = max(lanes_in_row[s:e]) + 0.9
        x0.append(left)
        widths.append(width)
        for r in range(s, e):
            for n in generations[r]:
                column[n] = c
                pos[n] = (left + lane[n], -(r - s))
        left += width
    return _Layout(nodes, g, pos, row, lane, column, starts, widths, x0, lanes_in_row)


def graph_layout(gm: fx.GraphModule, *, rows_per_column: int | None = None):
    """(nodes drawn, networkx DiGraph, {node: (x, y)}, columns, rows per column, lanes)."""
    lay = _layout(gm, rows_per_column, _lane_inches(gm))
    return (lay.nodes, lay.graph, lay.pos, len(lay.starts), lay.rows, max(lay.lanes_in_row))


def _lane_inches(gm: fx.GraphModule, labels: list[str] | None = None) -> float:
    """A lane's width: the longest label at ``FONT_SIZE`` (about 0.6 em a character) and a gap."""
    if labels is None:
        labels = [node_label(gm, n) for n in gm.graph.nodes if n.op != "get_attr"]
    longest = max((len(s) for s in labels), default=8)
    return max(0.9, longest * FONT_SIZE * 0.6 / 72 + 0.3)


def _busy(lay: _Layout, first: int, stop: int) -> int:
    """The rightmost lane taken in rows ``first .. stop - 1`` (-1 when there are none)."""
    return max((lay.lanes_in_row[r] for r in range(first, stop)), default=0) - 1


def _edge_paths(lay: _Layout):
    """Polylines for the edges: (near, skips, between columns)."""
    near, skips, far = [], [], []
    for a, b in lay.graph.edges:
        (xa, ya), (xb, yb) = lay.pos[a], lay.pos[b]
        ca, cb = lay.column[a], lay.column[b]
        if ca != cb:
            # Out of the bottom of one column, into the top of the next: a diagonal across a
            # column would hide the nodes it crosses. A node not at its column's end leaves (or
            # enters) round the rows it passes, on the right, like a shortcut.
            end_a = lay.starts[ca + 1] - 1
            bottom = -(end_a - lay.starts[ca]) - 0.45
            if lay.row[a] == end_a:
                out = [(xa, ya), (xa, bottom)]
            else:
                side = lay.x0[ca] + _busy(lay, lay.row[a] + 1, end_a + 1) + 0.75
                out = [(xa, ya), (side, ya - 0.4), (side, bottom)]
            if lay.row[b] == lay.starts[cb]:
                into = [(xb, 0.45), (xb, yb)]
            else:
                side = lay.x0[cb] + _busy(lay, lay.starts[cb], lay.row[b]) + 0.75
                into = [(side, 0.45), (side, yb + 0.4), (xb, yb)]
            far += [out, into]
            continue
        span = lay.row[b] - lay.row[a]
        if span <= 1:
            near.append([(xa, ya), (xb, yb)])
            continue
        busy = _busy(lay, lay.row[a] + 1, lay.row[b])
        if lay.lane[a] > busy:      # down its own lane, clear of the rows between
            near.append([(xa, ya), (xa, yb + 0.45), (xb, yb)])
        elif lay.lane[b] > busy:
            near.append([(xa, ya), (xb, ya - 0.45), (xb, yb)])
        else:                       # round the nodes it skips, on the right
            side = lay.x0[ca] + busy + 0.75
            skips.append([(xa, ya), (side, ya - 0.4), (side, yb + 0.4), (xb, yb)])
    return near, skips, far


# -- drawing ----------------------------------------------------------------------------------
def draw(module: nn.Module, path: str | os.PathLike, *, title: str | None = None,
         rows_per_column: int | None = None, dpi: int = 150) -> Path:
    """Render ``module``'s graph (an ``OptimizedModule`` or a ``GraphModule``) to ``path``.

    The format follows the suffix (``.png``, ``.svg``, ``.pdf``). ``rows_per_column``: wrap
    after this many rows (default: what makes the page about as wide as tall). Returns the path.
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
    path, fmt = picture_path(path)

    pruned = pruned_layers(gm)
    drawn = [n for n in gm.graph.nodes if n.op != "get_attr"]
    labels, kinds, cut = {}, {}, {}
    for n in drawn:
        labels[n], kinds[n] = node_label(gm, n), node_kind(gm, n)
        cut[n] = pruned_of(n, pruned)
        if cut[n] is not None and labels[n].endswith(f" {cut[n][0]}"):
            labels[n] += f"/{cut[n][1]}"  # kept/original channels
    lane_in = _lane_inches(gm, list(labels.values()))
    lay = _layout(gm, rows_per_column, lane_in)
    total_w = lay.x0[-1] + lay.widths[-1]
    fig_w = max(5.0, total_w * lane_in + 0.4)
    fig_h = max(3.5, lay.rows * ROW_IN + 1.8)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    near, skips, far = _edge_paths(lay)
    ax.add_collection(LineCollection(near, colors="#555555", linewidths=0.8, zorder=1))
    ax.add_collection(LineCollection(skips, colors=SKIP_COLOR, linewidths=0.9, zorder=1))
    ax.add_collection(LineCollection(far, colors="#888888", linewidths=0.8,
                                     linestyles="dashed", zorder=1))
    for n in drawn:
        x, y = lay.pos[n]
        ax.text(x, y, labels[n], ha="center", va="center", fontsize=FONT_SIZE, zorder=3,
                bbox=dict(boxstyle="round,pad=0.25", fc=KIND_COLORS[kinds[n]],
                          ec=PRUNED_COLOR if cut[n] else "#444444", lw=2.0 if cut[n] else 0.6))
    for x in lay.x0[1:]:  # column separators: read left to right
        ax.axvline(x - 0.5, color="#dddddd", lw=0.8, zorder=0)
    ax.set_xlim(-0.5, total_w - 0.5)
    ax.set_ylim(-lay.rows + 0.4, 0.6)
    ax.axis("off")

    seen = set(kinds.values())
    handles = [Patch(fc=KIND_COLORS[k], ec="#444444", label=KIND_NAMES[k])
               for k in KIND_COLORS if k in seen]
    n_pruned = sum(1 for v in cut.values() if v)
    if n_pruned:
        handles.append(Patch(fc="white", ec=PRUNED_COLOR, lw=2.0,
                             label="pruned channels (kept/original)"))
    if skips:
        handles.append(Line2D([], [], color=SKIP_COLOR, lw=0.9, label="shortcut (skips rows)"))
    if far:
        handles.append(Line2D([], [], color="#888888", lw=0.8, ls="--",
                              label="continues in the next column"))
    ncol = max(1, min(len(handles), int(fig_w / 2.2)))
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=ncol,
              fontsize=8, frameon=False)
    counts = {k: sum(1 for v in kinds.values() if v == k) for k in ("fused", "quantized")}
    summary = f"{len(drawn)} nodes, {counts['fused']} fused"
    if counts["quantized"]:
        summary += f", {counts['quantized']} quantized"
    if n_pruned:
        summary += f", {n_pruned} pruned layers"
    if len(lay.starts) > 1:
        summary += "; columns read left to right"
    legend_rows = math.ceil(len(handles) / ncol)
    ax.set_title(f"{title or 'fxopt graph'}: {summary}", fontsize=10, pad=8 + 15 * legend_rows)
    fig.tight_layout()
    return save_figure(fig, path, fmt, dpi)


# -- files (shared with fxopt.tools.tradeoff) ---------------------------------------------------
def picture_path(path) -> tuple[Path, str]:
    """``path`` as a ``Path`` and its format (png, svg or pdf), its folder created; typed
    errors for anything else."""
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
    return path, fmt


def save_figure(fig, path: Path, fmt: str, dpi: int) -> Path:
    """Write ``fig`` to ``path`` atomically (a temporary file renamed into place), then close
    it: a failed write never leaves half a picture."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format=fmt, dpi=dpi)
        tmp.replace(path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return path
