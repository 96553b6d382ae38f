"""Accuracy against latency and size at several pruning ratios, measured and plotted.

``measure_pruning_tradeoff`` runs the digits recipe (``recipes``) once per ratio, short:
prune the trained digits model, fine-tune it a couple of epochs with distillation from the
unpruned model, optimize it with the default pipeline, then measure test accuracy, batch-1 CPU
latency (``latency``, one thread, as the recipe does) and parameters / bytes. Ratio 0 is
the unpruned model, optimized, so every point went through the same pipeline. ``int8_ratios``
adds an int8 point (``quantize="int8"``, calibrated on training batches) for those ratios.
``plot_tradeoff`` draws the rows: accuracy against latency, and against size, each point
labelled with its ratio, int8 points as purple diamonds. ``fxopt optimize --out DIR`` writes
``DIR/tradeoff.png`` and ``DIR/tradeoff.json`` this way for the digits model.

    >>> from fxopt.tools.tradeoff import measure_pruning_tradeoff, plot_tradeoff
    >>> rows = measure_pruning_tradeoff((0.0, 0.25, 0.5, 0.75), epochs=2)
    >>> rows[2]   # {'ratio': 0.5, 'precision': 'fp32', 'accuracy': 0.986, 'latency_ms': ..., ...}
    >>> plot_tradeoff(rows, "tradeoff.png")      # .png, .svg or .pdf (matplotlib: fxopt[draw])

Accuracy is on the digits test split (360 images: one image is 0.28 points). Latency is
measured on this machine and noisy on a busy one; the plot says so.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from fxopt.api import OptimizedModule, optimize
from fxopt.errors import InputError, NotAvailableError
from fxopt.ir.graph import count_bytes, count_params
from fxopt.tools.draw import node_kind, picture_path, save_figure
from fxopt.tools.recipes import cpu_latency, split_train
from fxopt.train.finetune import finetune

__all__ = ["TRADEOFF_RATIOS", "TRADEOFF_EPOCHS", "ROW_FIELDS", "measure_pruning_tradeoff",
           "tradeoff_row", "model_precision", "plot_tradeoff", "tradeoff_table"]

TRADEOFF_RATIOS = (0.0, 0.25, 0.5, 0.75)
TRADEOFF_EPOCHS = 2  # fine-tuning per ratio: the shape of the curve, in seconds
ROW_FIELDS = ("ratio", "precision", "accuracy", "latency_ms", "params", "size_bytes", "label")
FLOAT_COLOR, INT8_COLOR = "#1f77b4", "#756bb1"


def model_precision(model: nn.Module) -> str:
    """``"int8"`` when the graph holds quantized ops (as ``fxopt.draw`` marks them), else fp32."""
    gm = getattr(model, "graph_module", model)
    graph = getattr(gm, "graph", None)
    if graph is None:
        return "fp32"
    return "int8" if any(node_kind(gm, n) == "quantized" for n in graph.nodes) else "fp32"


def tradeoff_row(model: nn.Module, x1: torch.Tensor, *, ratio: float,
                 accuracy: float | None = None, test: DataLoader | None = None,
                 precision: str | None = None, label: str | None = None,
                 latency_repeats: int = 30, latency_threads: int | None = 1) -> dict[str, Any]:
    """One point: accuracy (given, or measured on ``test``), batch-1 latency, params, bytes."""
    from fxopt.tools import digits

    if accuracy is None:
        accuracy = digits.evaluate(model, test if test is not None else digits.test_loader())
    gm = model.graph_module if isinstance(model, OptimizedModule) else model
    precision = precision or model_precision(model)
    ms = cpu_latency(model, x1, repeats=latency_repeats, warmup=5, threads=latency_threads) * 1e3
    return {"ratio": float(ratio), "precision": precision, "accuracy": float(accuracy),
            "latency_ms": ms, "params": count_params(gm), "size_bytes": count_bytes(gm),
            "label": label or (f"{ratio:g}" + (" int8" if precision == "int8" else ""))}


def measure_pruning_tradeoff(ratios: Sequence[float] = TRADEOFF_RATIOS, *,
                             model: nn.Module | None = None, epochs: int = TRADEOFF_EPOCHS,
                             int8_ratios: Sequence[float] = (), pipeline="default",
                             kd_alpha: float = 0.7, kd_temperature: float = 4.0,
                             lr: float = 2e-3, batch_size: int = 64, seed: int = 0,
                             check: str = "end", latency_repeats: int = 30,
                             num_threads: int | None = 1, progress: bool = False,
                             console=None, cache_dir: str | None = None) -> list[dict[str, Any]]:
    """One row (a dict with ``ROW_FIELDS``) per pruning ratio, in ratio order.

    ``model``: a trained digits model (default: ``digits.load_or_train_default``); it is
    never changed. ``epochs``: fine-tuning per ratio (short: the point is the shape of the
    curve, not the last tenth of a point). ``int8_ratios``: also an int8 row at these ratios.
    ``progress``: one line per point on ``console`` (stderr). ``num_threads``: torch's threads
    while measuring (restored after); the digits model is too small to gain from more.
    """
    from fxopt.tools import digits

    ratios = [float(r) for r in ratios]
    for r in [*ratios, *int8_ratios]:
        if not 0.0 <= r < 1.0:
            raise InputError(f"pruning ratios must be in [0, 1), got {r!r}")
    if model is None:
        model = digits.load_or_train_default(cache_dir=cache_dir, progress=progress,
                                             console=console).model
    model = model.eval()
    before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        data = digits.load_digits_split()
        (tx, ty), (vx, vy) = split_train(data.train_x, data.train_y, 0.1, seed)
        test = digits.test_loader()
        x = digits.example_batch()
        calibration = digits.calibration_batches() if int8_ratios else None
        rows = []
        for ratio in sorted(set(ratios) | {float(r) for r in int8_ratios}):
            if ratio > 0:
                pruned = optimize(model, x, prune=ratio, pipeline=["cleanup"],
                                  check=check).graph_module
                train = DataLoader(TensorDataset(tx, ty), batch_size=batch_size, shuffle=True,
                                   generator=torch.Generator().manual_seed(seed))
                val = DataLoader(TensorDataset(vx, vy), batch_size=256)
                finetune(pruned, train, val, epochs=epochs, teacher=model, kd_alpha=kd_alpha,
                         kd_temperature=kd_temperature, lr=lr, progress=False, seed=seed,
                         num_threads=num_threads)
            else:
                pruned = model
            finals = []
            if ratio in ratios:
                finals.append(optimize(pruned, x, pipeline=pipeline, check=check))
            if ratio in int8_ratios:
                finals.append(optimize(pruned, x, pipeline=pipeline, check=check,
                                       quantize="int8", calibration_data=calibration))
            for final in finals:
                rows.append(tradeoff_row(final, x[:1], ratio=ratio, test=test,
                                         latency_repeats=latency_repeats, latency_threads=None))
                if progress:
                    _say(console, rows[-1])
        return rows
    finally:
        torch.set_num_threads(before)


def _say(console, row: dict) -> None:
    line = (f"trade-off: ratio {row['ratio']:g} {row['precision']}: accuracy "
            f"{row['accuracy']:.2%}, {row['latency_ms']:.3f} ms, {row['params']:,} params")
    if console is not None:
        console.print(line, markup=False, highlight=False)
    else:
        print(line, file=sys.stderr)


def _check_rows(rows: Sequence[dict]) -> None:
    if not rows:
        raise InputError("no rows to plot", hint="rows = measure_pruning_tradeoff(...)")
    for row in rows:
        missing = [f for f in ("ratio", "accuracy", "latency_ms", "size_bytes") if f not in row]
        if missing:
            raise InputError(f"a trade-off row lacks {', '.join(missing)}: {row!r}",
                             hint="rows from measure_pruning_tradeoff or tradeoff_row")


def plot_tradeoff(rows: Sequence[dict], path: str | os.PathLike, *,
                  title: str | None = None, dpi: int = 150) -> Path:
    """Accuracy against latency (left) and against size (right), one point per row.

    Float rows are joined in ratio order; int8 rows (``"precision": "int8"``) are purple
    diamonds; a row with ``"this_run": True`` gets a red ring. Each point is labelled with
    ``row["label"]`` (default: its ratio). Returns the path.
    """
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError as e:
        raise NotAvailableError("plot_tradeoff needs matplotlib",
                                hint="pip install 'fxopt[draw]' (or matplotlib)") from e
    _check_rows(rows)
    path, fmt = picture_path(path)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    panels = (("latency_ms", "CPU latency, batch 1 (ms, median, measured on this machine)", 1.0),
              ("size_bytes", "weights (KiB)", 1 / 1024))
    floats = sorted((r for r in rows if r.get("precision", "fp32") != "int8"),
                    key=lambda r: r["ratio"])
    int8 = [r for r in rows if r.get("precision") == "int8"]
    for ax, (field, xlabel, scale) in zip(axes, panels):
        for group, color, marker, style in ((floats, FLOAT_COLOR, "o", "-"),
                                            (int8, INT8_COLOR, "D", "--")):
            if not group:
                continue
            xs = [r[field] * scale for r in group]
            ys = [r["accuracy"] * 100 for r in group]
            ax.plot(xs, ys, style, color=color, marker=marker, markersize=7, lw=1.2, zorder=2)
            for i, (r, xv, yv) in enumerate(zip(group, xs, ys)):
                if r.get("this_run"):
                    ax.plot([xv], [yv], "o", ms=15, mfc="none", mec="#d62728", mew=1.5, zorder=3)
                label = r.get("label") or f"{r['ratio']:g}"
                # Alternately above and below: neighbouring ratios often sit close together.
                ax.annotate(label, (xv, yv), textcoords="offset points",
                            xytext=(7, 7) if i % 2 == 0 else (7, -15), fontsize=9, color=color)
        ax.set_xlabel(xlabel)
        ax.grid(True, color="#e5e5e5", lw=0.8)
        ax.margins(x=0.15, y=0.2)
    axes[0].set_ylabel("test accuracy (%)")
    handles = [Line2D([], [], color=FLOAT_COLOR, marker="o", label="float, pruned by the ratio "
                                                                    "shown, fine-tuned")]
    if int8:
        handles.append(Line2D([], [], color=INT8_COLOR, marker="D", ls="--", label="int8"))
    if any(r.get("this_run") for r in rows):
        handles.append(Line2D([], [], ls="", marker="o", ms=12, mfc="none", mec="#d62728",
                              mew=1.5, label="this run's model"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
    fig.suptitle(title or "accuracy against latency and size, by pruning ratio "
                          "(up and to the left is better)", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return save_figure(fig, path, fmt, dpi)


def tradeoff_table(rows: Sequence[dict]):
    """A rich table of the rows (ratio, precision, accuracy, latency, params, size)."""
    from rich.table import Table

    from fxopt.infra.report import format_bytes

    t = Table(title="trade-off by pruning ratio (each fine-tuned briefly, then optimized)",
              title_justify="left")
    for col in ("ratio", "precision", "accuracy", "latency (bs 1, CPU)", "params", "size"):
        t.add_column(col, justify="right")
    for r in sorted(rows, key=lambda r: (r["ratio"], r.get("precision", ""))):
        t.add_row(r.get("label") or f"{r['ratio']:g}", r.get("precision", "fp32"),
                  f"{r['accuracy']:.2%}", f"{r['latency_ms']:.3f} ms", f"{r['params']:,}",
                  format_bytes(r["size_bytes"]))
    return t

