"""The accuracy / latency / size trade-off: measured rows, the plot, and ``--out`` writing it.

Digits runs use a one-epoch model (cached in this module's own folder) and one fine-tuning
epoch per ratio: the numbers are not the point here, the rows and the files are.
"""
from __future__ import annotations

import io
import json
import struct

import pytest
import torch

import fxopt
from fxopt.tools import cli, digits
from fxopt.tools.tradeoff import (ROW_FIELDS, measure_pruning_tradeoff, model_precision,
                                  plot_tradeoff, tradeoff_table)

pytest.importorskip("matplotlib", reason="plots need matplotlib (pip install 'fxopt[draw]')")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fxopt-cache")


@pytest.fixture(autouse=True)
def cache(shared_cache, monkeypatch):
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(shared_cache))
    monkeypatch.setattr(cli, "LATENCY_BUDGET_S", 0.0)
    return shared_cache


@pytest.fixture(scope="module")
def quick_model(shared_cache):
    return digits.load_or_train_default(cache_dir=shared_cache, epochs=1, progress=False).model


def _png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG) and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


ROWS = [
    {"ratio": 0.0, "precision": "fp32", "accuracy": 0.991, "latency_ms": 0.42, "params": 150858,
     "size_bytes": 603_000, "label": "0"},
    {"ratio": 0.25, "precision": "fp32", "accuracy": 0.990, "latency_ms": 0.36, "params": 85114,
     "size_bytes": 340_000, "label": "0.25"},
    {"ratio": 0.5, "precision": "fp32", "accuracy": 0.989, "latency_ms": 0.31, "params": 38058,
     "size_bytes": 152_000, "label": "0.5 (this run)", "this_run": True},
    {"ratio": 0.75, "precision": "fp32", "accuracy": 0.919, "latency_ms": 0.26, "params": 9690,
     "size_bytes": 38_000, "label": "0.75"},
    {"ratio": 0.5, "precision": "int8", "accuracy": 0.985, "latency_ms": 0.20, "params": 38058,
     "size_bytes": 40_000, "label": "0.5 int8"},
]


def test_plot_png_and_svg(tmp_path):
    png = plot_tradeoff(ROWS, tmp_path / "tradeoff.png")
    data = png.read_bytes()
    w, h = _png_size(data)
    assert len(data) > 30_000 and 1200 <= w <= 2500 and 500 <= h <= 1200
    svg = plot_tradeoff(ROWS, tmp_path / "tradeoff.svg", title="my title").read_text()
    for text in ("<svg", "my title", "0.5 int8", "0.75", "this run", "test accuracy"):
        assert text in svg, text
    assert not list(tmp_path.glob(".*.tmp"))


def test_plot_without_int8_has_no_int8_legend(tmp_path):
    svg = plot_tradeoff(ROWS[:2], tmp_path / "t.svg").read_text()
    assert "int8" not in svg


def test_plot_bad_arguments(tmp_path):
    with pytest.raises(fxopt.InputError, match="no rows"):
        plot_tradeoff([], tmp_path / "t.png")
    with pytest.raises(fxopt.InputError, match="lacks latency_ms"):
        plot_tradeoff([{"ratio": 0.0, "accuracy": 0.9, "size_bytes": 1}], tmp_path / "t.png")
    with pytest.raises(fxopt.InputError, match="format"):
        plot_tradeoff(ROWS, tmp_path / "t.txt")


def test_table_lists_every_row():
    from rich.console import Console

    console = Console(width=120, record=True, color_system=None)
    console.print(tradeoff_table(ROWS))
    text = console.export_text()
    assert "0.5 (this run)" in text and "int8" in text and "91.90%" in text


def test_measure_rows_have_the_fields(quick_model):
    before = {k: v.clone() for k, v in quick_model.state_dict().items()}
    rows = measure_pruning_tradeoff((0.0, 0.5), model=quick_model, epochs=1, latency_repeats=5)
    assert [r["ratio"] for r in rows] == [0.0, 0.5]
    for r in rows:
        assert set(ROW_FIELDS) <= set(r)
        assert r["precision"] == "fp32" and 0.0 <= r["accuracy"] <= 1.0
        assert r["latency_ms"] > 0 and r["size_bytes"] > 0
    assert rows[1]["params"] < rows[0]["params"] / 2  # half the channels: about a quarter
    assert all(torch.equal(v, quick_model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(fxopt.InputError, match="ratios"):
        measure_pruning_tradeoff((1.5,), model=quick_model)


def test_model_precision():
    assert model_precision(torch.nn.Linear(2, 2)) == "fp32"
    linear = fxopt.capture(torch.nn.Linear(2, 2).eval(), torch.randn(1, 2))
    assert model_precision(linear) == "fp32"


def _run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_write_tradeoff_adds_the_runs_own_point(tmp_path, quick_model, monkeypatch):
    """What ``--out`` does after the run, on an already optimized model (the quick way)."""
    from rich.console import Console

    monkeypatch.setattr(cli, "TRADEOFF_RATIOS", (0.0, 0.25))
    args = cli.build_parser().parse_args(["optimize", "--finetune-epochs", "1", "--check", "end",
                                          "--out", str(tmp_path)])
    x = digits.example_batch()
    opt = fxopt.optimize(quick_model, x, prune=0.25, check="none")
    console = Console(file=io.StringIO(), width=120)
    cli._write_tradeoff(console, console, args, quick_model, x, 0.25, opt, tmp_path, False)
    rows = json.loads((tmp_path / "tradeoff.json").read_text())
    assert [(r["ratio"], r.get("this_run", False)) for r in rows] == [(0.0, False), (0.25, True)]
    w, h = _png_size((tmp_path / "tradeoff.png").read_bytes())
    assert w > 1000 and h > 400


@pytest.mark.slow
def test_cli_out_writes_the_tradeoff_plot(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "TRADEOFF_RATIOS", (0.0, 0.5))  # 0.5 is the run's own point
    out_dir = tmp_path / "build"
    rc, out, err = _run(capsys, "optimize", "--epochs", "1", "--finetune-epochs", "1",
                        "--check", "end", "--no-progress", "--out", str(out_dir))
    assert rc == 0, err
    data = (out_dir / "tradeoff.png").read_bytes()
    assert data.startswith(PNG) and len(data) > 30_000
    rows = json.loads((out_dir / "tradeoff.json").read_text())
    # the default run ends in int8: its point (0.5, int8) beside the float ratios
    assert [(r["ratio"], r["precision"]) for r in rows] == [(0.0, "fp32"), (0.5, "fp32"),
                                                             (0.5, "int8")]
    assert [r.get("this_run", False) for r in rows] == [False, False, True]
    assert "tradeoff.png" in out and "trade-off by pruning ratio" in out
    assert "trade-off: ratio" not in err  # --no-progress: no per-point lines


def test_cli_tradeoff_defaults():
    parse = cli.build_parser().parse_args
    spec = type("Spec", (), {"name": "digits"})()
    assert cli._wants_tradeoff(parse(["optimize", "--out", "d"]), spec, "cpu")
    assert not cli._wants_tradeoff(parse(["optimize", "--out", "d", "--no-tradeoff"]), spec, "cpu")
    assert not cli._wants_tradeoff(parse(["optimize", "--out", "d", "--no-prune"]), spec, "cpu")
    spec.name = "torchvision:resnet18"
    assert not cli._wants_tradeoff(parse(["optimize", "--out", "d"]), spec, "cpu")


def test_cli_tradeoff_bad_combinations(capsys, tmp_path):
    rc, out, err = _run(capsys, "optimize", "--no-progress", "--tradeoff")
    assert rc == 1 and "needs --out" in err
    rc, out, err = _run(capsys, "optimize", "--model", "torchvision:resnet18", "--tradeoff",
                        "--out", str(tmp_path / "b"))
    assert rc == 1 and "digits model" in err and not (tmp_path / "b").exists()
