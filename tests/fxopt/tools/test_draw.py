"""Graph pictures: files exist, are real images, and mark fused, quantized and pruned nodes."""
import struct
import uuid
from types import SimpleNamespace

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxopt
from fxopt.ir.activations import ACTIVATIONS
from fxopt.ops.schema import OPS, define_op
from fxopt.tools.draw import graph_layout, node_kind, node_label

pytest.importorskip("matplotlib", reason="fxopt.draw needs matplotlib (pip install 'fxopt[draw]')")
PNG = b"\x89PNG\r\n\x1a\n"


class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.mean((2, 3)))


def test_small_model_png_and_svg(tmp_path):
    x = torch.randn(1, 3, 8, 8)
    opt = fxopt.optimize(_Small().eval(), x)
    png = fxopt.draw(opt, tmp_path / "small.png")
    data = png.read_bytes()
    assert data.startswith(PNG) and len(data) > 5_000
    svg = fxopt.draw(opt.graph_module, tmp_path / "small.svg")
    text = svg.read_text()
    assert "<svg" in text and "conv3x3+relu" in text  # the fused conv's label
    assert not list(tmp_path.glob(".*.tmp"))


def test_resnet18_before_after_pruned(tmp_path):
    tv = pytest.importorskip("torchvision")
    m = tv.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    before = fxopt.capture(m, x)
    after = fxopt.optimize(m, x, prune=0.5, check="none")
    kinds = {node_kind(after.graph_module, n) for n in after.graph_module.graph.nodes}
    assert "fused" in kinds
    for name, opt in (("before", before), ("after", after)):
        path = fxopt.draw(opt, tmp_path / f"{name}.png", title=f"resnet18 {name}")
        data = path.read_bytes()
        assert data.startswith(PNG) and len(data) > 20_000
    # a deep graph wraps into several columns
    _, _, _, columns, rows, _ = graph_layout(before)
    assert columns >= 2 and rows < 60
    svg = fxopt.draw(after, tmp_path / "after.svg").read_text()
    assert "pruned channels" in svg  # the legend entry for pruned layers


def test_labels_are_short():
    x = torch.randn(1, 3, 8, 8)
    gm = fxopt.optimize(_Small().eval(), x, pipeline=["cleanup"]).graph_module
    labels = [node_label(gm, n) for n in gm.graph.nodes if n.op != "get_attr"]
    assert "conv3x3 8" in labels and all(len(s) <= 24 for s in labels)


def test_bad_arguments(tmp_path):
    opt = fxopt.optimize(_Small().eval(), torch.randn(1, 3, 8, 8))
    with pytest.raises(fxopt.InputError, match="format"):
        fxopt.draw(opt, tmp_path / "graph.txt")
    with pytest.raises(fxopt.InputError):
        fxopt.draw(nn.Linear(2, 2), tmp_path / "graph.png")
    with pytest.raises(fxopt.InputError):
        fxopt.draw(opt, 3)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG) and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


class _Block(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.down = nn.Conv2d(cin, cout, 1, stride) if stride > 1 or cin != cout else None

    def forward(self, x):
        skip = x if self.down is None else self.down(x)
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + skip)


class _Deep(nn.Module):
    """Twelve residual blocks: deep enough to wrap into columns, small enough to be quick."""

    def __init__(self):
        super().__init__()
        chans = [4, 4, 4, 8, 8, 8, 8, 16, 16, 16, 16, 16, 16]
        self.blocks = nn.Sequential(*[_Block(a, b, 2 if b > a else 1)
                                      for a, b in zip(chans, chans[1:])])

    def forward(self, x):
        return self.blocks(x).mean((2, 3))


def test_layout_main_line_branches_and_clean_column_breaks():
    gm = fxopt.capture(_Deep().eval(), torch.randn(1, 4, 8, 8))
    nodes, g, pos, columns, rows, lanes = graph_layout(gm)
    assert columns >= 2 and lanes == 2
    # Projection shortcuts sit in a lane of their own, right of the main line.
    downs = [n for n in nodes if n.op == "call_module" and n.target.endswith(".down")]
    mains = [n for n in nodes if n.op == "call_module" and n.target.endswith(".conv1")]
    assert downs and all(pos[d][0] > pos[m][0] for d, m in zip(downs, mains[1:]) if
                         d.target.split(".")[1] == m.target.split(".")[1])
    # Every column starts on a row that only one tensor crosses into (between two blocks).
    ys = sorted({y for _, y in pos.values()}, reverse=True)
    assert len(ys) == rows
    starts = [n for n in nodes if pos[n][1] == 0]
    for first in starts[1:]:
        column_x = pos[first][0]
        above = {a for n in nodes if pos[n][1] == 0 and abs(pos[n][0] - column_x) < 1.5
                 for a in n.all_input_nodes}
        assert len(above) <= 1, f"column starting at {first} is cut inside a block"


def test_deep_graph_png_is_readable_size(tmp_path):
    opt = fxopt.optimize(_Deep().eval(), torch.randn(1, 4, 8, 8), check="none")
    data = fxopt.draw(opt, tmp_path / "deep.png", title="deep").read_bytes()
    w, h = _png_size(data)
    assert len(data) > 20_000 and 600 <= w <= 6000 and 400 <= h <= 6000
    assert 0.4 < w / h < 3.0  # wrapped into columns, not one long strip


def _fake_quantize(x):
    return x


def test_quantized_ops_are_marked(tmp_path):
    """fxopt int8 ops, torch's quantized ops and anything named quantize count as quantized."""
    g = fx.Graph()
    x = g.placeholder("x")
    q = g.call_function(_fake_quantize, (x,))
    y = g.call_function(torch.ops.quantized.add.default, (q, q, 1.0, 0))
    z = g.call_function(torch.ops.aten.dequantize.self, (y,))
    r = g.call_function(torch.relu, (z,))
    pool = g.call_function(torch.nn.functional.max_pool2d, (q, 2))  # on quint8 data
    pool.meta["tensor_meta"] = SimpleNamespace(dtype=torch.quint8, shape=(1, 4, 2, 2))
    add_relu = g.call_function(torch.ops.quantized.add_relu, (pool, pool, 1.0, 0))
    deq = g.call_method("dequantize", (add_relu,))
    g.output((r, deq))
    gm = fx.GraphModule(nn.Module(), g)
    kinds = [node_kind(gm, n) for n in gm.graph.nodes]
    assert kinds == ["io", "quantized", "quantized", "quantized", "activation", "quantized",
                     "quantized", "quantized", "io"]
    assert node_label(gm, y) == "add" and node_label(gm, z) == "dequantize"
    assert node_label(gm, add_relu) == "add+relu" and node_label(gm, pool) == "maxpool 4"
    svg = fxopt.draw(gm, tmp_path / "q.svg").read_text()
    assert "quantized op (int8)" in svg and "6 quantized" in svg


def test_fxopt_int8_op_label():
    g = fx.Graph()
    x = g.placeholder("x")
    names = ["w_q", "w_scale", "bias", "x_scale", "x_zp", "y_scale", "y_zp"]
    a = {n: g.get_attr(n) for n in names}
    y = g.call_function(torch.ops.fxopt.conv2d_int8.default,
                        (x, a["w_q"], a["w_scale"], a["bias"], [2, 2], [1, 1], [1, 1], 1,
                         a["x_scale"], a["x_zp"], a["y_scale"], a["y_zp"], x), {"act": "relu"})
    g.output(y)
    root = nn.Module()
    for n in names:
        root.register_buffer(n, torch.zeros(8, 4, 3, 3, dtype=torch.int8) if n == "w_q" else
                             torch.ones(()))
    gm = fx.GraphModule(root, g)
    assert node_kind(gm, y) == "quantized"
    assert node_label(gm, y) == "conv3x3/2+add+relu"


@pytest.fixture
def declare_op():
    """Declare throwaway fxopt ops (unique names: the torch.library namespace keeps them), and
    take them out of ``OPS`` afterwards so tests that walk every declared op never see them."""
    declared = []

    def declare(signature: str, family: str, quantized: bool | None = None):
        # digits only: the label drops "1d"/"2d" from op names (conv2d -> conv)
        name = f"{signature.partition('(')[0]}_{uuid.uuid4().int % 10 ** 8}"
        op = define_op(name + signature[signature.index("("):], family=family,
                       quantized=quantized,
                       reference=lambda x, *args, **kwargs: x.clone(),
                       fake=lambda x, *args, **kwargs: torch.empty_like(x))
        declared.append(op)
        return op

    yield declare
    for op in declared:
        OPS.pop(op.name, None)


@pytest.mark.parametrize("signature,family,quantized,kind", [
    ("drawtest_fused(Tensor x, Tensor weight, *, str act='none') -> Tensor", "fused", None,
     "fused"),
    ("drawtest_codes(Tensor x, Tensor scale, Tensor zp) -> Tensor", "int8", None, "quantized"),
    ("drawtest_plain(Tensor x) -> Tensor", "int8", None, "quantized"),  # the family decides
    ("drawtest_kernel(Tensor x, Tensor weight) -> Tensor", "triton", None, "fused"),
    ("drawtest_kernel_codes(Tensor q, float scale, int zp) -> Tensor", "triton", True,
     "quantized"),  # declared quantized
])
def test_new_fxopt_op_is_drawn_by_its_schema(declare_op, signature, family, quantized, kind):
    """An op declared with define_op gets its kind from its schema and a label from its
    arguments by name, with no change to draw_labels (the names here say nothing of int8)."""
    op = declare_op(signature, family, quantized)
    g = fx.Graph()
    x = g.placeholder("x")
    w = g.get_attr("w")
    values = {op.params[0].name: x}
    for p in op.params[1:]:
        values[p.name] = {"Tensor": w, "float": 0.5, "int": 3}.get(p.type, "relu")
    y = op.emit(g, **values)
    g.output(y)
    root = nn.Module()
    root.register_buffer("w", torch.ones(4, 4, 3, 3))
    gm = fx.GraphModule(root, g)
    assert node_kind(gm, y) == kind
    expected = op.name + ("+relu" if "act" in op.param_names else "")
    assert node_label(gm, y) == expected


def test_activation_modules_come_from_the_activation_table():
    """Every module type the activation table lists is drawn as an activation (LeakyReLU too,
    whose class name is not the table's row name), and softmax as well."""
    types = [m for row in ACTIVATIONS.values() for m in row.modules] + [nn.Softmax]
    root = nn.Module()
    g = fx.Graph()
    x = g.placeholder("x")
    for i, t in enumerate(types):
        root.add_module(f"act{i}", t())
        x = g.call_module(f"act{i}", (x,))
    g.output(x)
    gm = fx.GraphModule(root, g)
    kinds = {n.target: node_kind(gm, n) for n in gm.graph.nodes if n.op == "call_module"}
    assert "act0" in kinds and set(kinds.values()) == {"activation"}


def test_pruned_layers_show_kept_over_original(tmp_path):
    opt = fxopt.optimize(_Small().eval(), torch.randn(1, 3, 8, 8), prune=0.5, check="none")
    svg = fxopt.draw(opt, tmp_path / "pruned.svg").read_text()
    assert "conv3x3+relu 4/8" in svg and "pruned channels" in svg


@pytest.mark.slow
def test_resnet50_pictures(tmp_path):
    """The acceptance pictures: resnet50 optimized and pruned by half, PNG and SVG."""
    tv = pytest.importorskip("torchvision")
    m = tv.models.resnet50(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    for name, kw in (("opt", {}), ("pruned", {"prune": 0.5})):
        opt = fxopt.optimize(m, x, check="none", **kw)
        data = fxopt.draw(opt, tmp_path / f"{name}.png", title=f"resnet50 {name}").read_bytes()
        w, h = _png_size(data)
        assert len(data) > 50_000 and 0.5 < w / h < 2.5 and max(w, h) < 5000
        svg = fxopt.draw(opt, tmp_path / f"{name}.svg").read_text()
        assert "conv1x1+add+relu" in svg and "columns read left to right" in svg
    assert "pruned channels" in svg
