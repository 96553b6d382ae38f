"""Graph pictures: files exist, are real images, and mark fused and pruned nodes."""
import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.draw import graph_layout, node_kind, node_label

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
    before = fxopt.optimize(m, x, pipeline=["cleanup"])
    after = fxopt.optimize(m, x, prune=0.5)
    kinds = {node_kind(after.graph_module, n) for n in after.graph_module.graph.nodes}
    assert "fused" in kinds
    for name, opt in (("before", before), ("after", after)):
        path = fxopt.draw(opt, tmp_path / f"{name}.png", title=f"resnet18 {name}")
        data = path.read_bytes()
        assert data.startswith(PNG) and len(data) > 20_000
    # a deep graph wraps into several columns
    _, _, _, columns, rows, _ = graph_layout(before.graph_module)
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
