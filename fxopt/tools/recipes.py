"""End-to-end recipes: prune, fine-tune with distillation, optimize, and measure each stage.

``prune_and_finetune_digits`` is what the default ``fxopt optimize`` run shows: the built-in
digits ResNet (``fxopt.tools.digits``) pruned, fine-tuned from the unpruned model as a teacher,
then optimized with the full pipeline and (``quantize="int8"``) quantized to int8, with
accuracy, parameters, size, MACs and CPU latency per stage::

    >>> from fxopt.tools.recipes import prune_and_finetune_digits
    >>> result = prune_and_finetune_digits(prune=0.5, epochs=8, quantize="int8")
    >>> print(result)           # a table: original / pruned / fine-tuned / optimized / int8
    >>> result.final            # the OptimizedModule
    >>> result.rows[-1].accuracy

The training split is cut 90/10 (``split_train``, fixed seed) into fine-tuning and validation
data; the validation part drives early stopping, the test split only measures.
"""
from __future__ import annotations

import copy
import io
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from fxopt.api import OptimizedModule, optimize
from fxopt.infra.report import format_bytes
from fxopt.ir.capture import capture, propagate_shapes
from fxopt.ir.graph import count_bytes, count_params
from fxopt.ir.metrics import count_macs
from fxopt.prune.config import PruneConfig
from fxopt.tools.latency import measure_latency
from fxopt.train.finetune import FinetuneResult, finetune

__all__ = ["StageRow", "PruneFinetuneResult", "prune_and_finetune_digits", "cpu_latency",
           "stage_row", "split_train"]


@dataclass
class StageRow:
    stage: str
    accuracy: float | None
    params: int
    macs: int  # per image
    latency_ms: float  # batch 1, median
    size_bytes: int = 0  # weights, as held in memory (int8 weights count one byte)


@dataclass
class PruneFinetuneResult:
    rows: list[StageRow]
    final: OptimizedModule
    pruned_report: Any  # the Report of the pruning run
    finetune: FinetuneResult
    config: PruneConfig
    notes: list[str] = field(default_factory=list)
    float_final: OptimizedModule | None = None  # the float model when ``final`` is int8

    def table(self):
        from rich.table import Table

        t = Table(title=f"prune ({self.config.describe()}) + fine-tune with distillation",
                  title_justify="left")
        for col in ("stage", "accuracy", "params", "size", "MACs", "latency (bs 1, CPU)",
                    "speedup"):
            t.add_column(col, justify="left" if col == "stage" else "right")
        base = self.rows[0].latency_ms
        for r in self.rows:
            t.add_row(r.stage, "n/a" if r.accuracy is None else f"{r.accuracy:.2%}",
                      f"{r.params:,}", format_bytes(r.size_bytes), f"{r.macs:,}",
                      f"{r.latency_ms:.3f} ms",
                      f"{base / r.latency_ms:.2f}x" if r.latency_ms > 0 else "")
        return t

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        Console(file=buf, width=120, color_system=None).print(self.table())
        for n in self.notes:
            buf.write(f"note: {n}\n")
        return buf.getvalue()

    __repr__ = __str__


@torch.no_grad()
def cpu_latency(model: nn.Module, x: torch.Tensor, *, repeats: int = 50, warmup: int = 10,
                threads: int | None = None) -> float:
    """Median seconds of ``model(x)`` over ``repeats`` runs after ``warmup`` runs.

    ``threads``: torch's CPU thread count while measuring (restored after).
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        (median,), _ = measure_latency([model], x, warmup=warmup, max_runs=repeats,
                                       budget_s=math.inf)
    finally:
        torch.set_num_threads(before)
    return median


def stage_row(stage: str, model: nn.Module, x1: torch.Tensor, accuracy: float | None,
              repeats: int = 50, threads: int | None = 1) -> StageRow:
    """Accuracy (given), parameters, MACs per image and batch-1 latency of ``model``."""
    gm = model.graph_module if isinstance(model, OptimizedModule) else model
    return StageRow(stage, accuracy, count_params(gm), _macs_per_image(gm, x1),
                    cpu_latency(model, x1, repeats=repeats, threads=threads) * 1e3,
                    count_bytes(gm))


def _macs_per_image(model: nn.Module, x1: torch.Tensor) -> int:
    try:
        if isinstance(model, fx.GraphModule):
            g = copy.deepcopy(model)  # shapes at batch 1, without touching the model's metadata
            propagate_shapes(g, (x1,))
            return count_macs(g)
        return count_macs(capture(model, x1))
    except Exception:  # noqa: BLE001 - MACs are informative; a model fx cannot run shows 0
        return 0


def split_train(x: torch.Tensor, y: torch.Tensor, val_fraction: float, seed: int):
    """``((x, y) to train on, (x, y) to validate on)``: a random ``val_fraction`` of the
    samples (at least one) held out, the same ones for the same ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    n_val = max(1, int(round(len(x) * val_fraction)))
    va, tr = perm[:n_val], perm[n_val:]
    return (x[tr], y[tr]), (x[va], y[va])



def prune_and_finetune_digits(prune: float | PruneConfig | dict = 0.5, *, epochs: int = 8,
                              kd_alpha: float = 0.7, kd_temperature: float = 4.0,
                              lr: float = 2e-3, weight_decay: float = 1e-4,
                              patience: int | None = 3, model: nn.Module | None = None,
                              pipeline: str | Sequence[str] = "default",
                              disable: Sequence[str] = (), batch_size: int = 64,
                              seed: int = 0, progress: bool = True, console=None,
                              log_dir: str | None = None, cache_dir: str | None = None,
                              latency_repeats: int = 50, num_threads: int | None = 1,
                              latency_threads: int | None = 1,
                              check: str = "each", on_mismatch: str = "raise",
                              instruments: Sequence[Any] = (), quantize: Any = None,
                              calibration_batches: int = 8) -> PruneFinetuneResult:
    """Prune the digits model, fine-tune it with distillation, optimize it; measure every stage.

    ``model``: a trained digits model (default: ``digits.load_or_train_default``).
    ``prune``: ratio or ``PruneConfig``. ``pipeline``: what runs after fine-tuning (the default
    pipeline: folding and fusion). Rows: the original model, the pruned one before and after
    fine-tuning, and the optimized result; accuracy on the test split, MACs per image, batch-1
    CPU latency (median of ``latency_repeats`` on ``latency_threads`` threads: an 8x8 image
    is too small to gain from more, and spin-waiting threads on a busy machine distort it).
    ``num_threads``: torch's threads while fine-tuning. ``quantize``: ``"int8"`` or a
    ``QuantConfig`` adds a last stage, the optimized model in int8, calibrated on
    ``calibration_batches`` batches of the fine-tuning data (it becomes ``result.final``).
    """
    from fxopt.tools import digits

    cfg = PruneConfig.coerce(prune)
    if model is None:
        model = digits.load_or_train_default(cache_dir=cache_dir, progress=progress,
                                             console=console).model
    model = model.eval()
    data = digits.load_digits_split()
    (tx, ty), (vx, vy) = split_train(data.train_x, data.train_y, 0.1, seed)
    train = DataLoader(TensorDataset(tx, ty), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    val = DataLoader(TensorDataset(vx, vy), batch_size=256)
    test = digits.test_loader()
    x = digits.example_batch()
    x1 = x[:1]

    def row(stage: str, m: nn.Module) -> StageRow:
        return stage_row(stage, m, x1, digits.evaluate(m, test), latency_repeats, latency_threads)

    rows = [row("original", model)]
    pruned_opt = optimize(model, x, prune=cfg, pipeline=["cleanup"], check=check,
                          on_mismatch=on_mismatch)
    pruned = pruned_opt.graph_module
    rows.append(row("pruned", pruned))
    gen = torch.Generator().manual_seed(seed + 1)

    def augment(batch: torch.Tensor) -> torch.Tensor:
        return digits.random_shift(batch, gen)

    ft = finetune(pruned, train, val, epochs=epochs, teacher=model, kd_alpha=kd_alpha,
                  kd_temperature=kd_temperature, lr=lr, weight_decay=weight_decay,
                  patience=patience, augment=augment, log_dir=log_dir, progress=progress,
                  console=console, seed=seed, num_threads=num_threads)
    rows.append(row("pruned + fine-tuned", pruned))
    final = optimize(pruned, x, pipeline=pipeline, disable=disable, check=check,
                     on_mismatch=on_mismatch, instruments=() if quantize else instruments)
    rows.append(row("pruned + fine-tuned, optimized", final))
    float_final = None
    if quantize is not None:
        float_final = final
        calib = [tx[i:i + 32] for i in range(0, 32 * calibration_batches, 32) if i < len(tx)]
        final = optimize(pruned, x, pipeline=pipeline, disable=disable, check=check,
                         on_mismatch=on_mismatch, instruments=instruments, quantize=quantize,
                         calibration_data=calib)
        rows.append(row("pruned + fine-tuned, optimized, int8", final))
    notes = []
    rec = pruned_opt.report.record("prune_channels")
    if rec is not None:
        notes.append(f"pruning: {rec.stats.get('pruned', 0)} groups pruned, "
                     f"{rec.stats.get('frozen', 0)} frozen; rel err vs the masked model "
                     f"{rec.rel_err if rec.rel_err is not None else 'n/a'}")
    notes.append(f"fine-tuning: {len(ft.history)} epochs, best {ft.best_epoch}"
                 + (" (stopped early)" if ft.stopped_early else "") + f", {ft.seconds:.1f} s")
    q = final.report.record("quantize_int8") if quantize is not None else None
    if q is not None and q.stats.get("sqnr_db") is not None:
        on = {"held_out": "batches held out of calibration",
              "example_inputs": "the example inputs (not a calibration batch)",
              "calibration": "the calibration batches themselves (nothing held out)"}.get(
            q.stats.get("measured_on"), "calibration batches")
        notes.append(f"int8: SQNR {q.stats['sqnr_db']:.1f} dB against the float model on "
                     f"{q.stats.get('measured_batches', '?')} {on} (calibrated on "
                     f"{q.stats.get('calibration_batches', 0)}); "
                     f"{q.stats.get('kept_float', 0)} layers kept in float")
    return PruneFinetuneResult(rows, final, pruned_opt.report, ft, cfg, notes, float_final)
