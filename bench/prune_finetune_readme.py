"""The README's prune -> fine-tune flow, measured on the trained digits model (CPU).

Exactly what the README shows: ``opt = fxopt.optimize(model, x, prune=PruneConfig(ratio=0.5,
importance="l1", round_to=8))`` (the default pipeline: pruned, BatchNorm folded, fused), then
``fxopt.finetune(opt.graph_module, train, val, epochs=8, teacher=model, kd_alpha=0.7,
kd_temperature=4.0)``, the fused graph trained through the fused ops' gradients. Beside it,
the same fine-tuning of the pruned model before folding and fusion (``pipeline=["cleanup"]``).
Test-split accuracy at each stage; validation is 10% of the training split.

    python bench/prune_finetune_readme.py            # prints a Markdown table
"""
from __future__ import annotations

import platform
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

import fxopt
from fxopt.tools import digits
from fxopt.tools.recipes import split_train

CONFIG = fxopt.PruneConfig(ratio=0.5, importance="l1", round_to=8)


def measure(seed: int = 0, epochs: int = 8) -> dict[str, float]:
    model = digits.load_or_train_default(progress=False).model.eval()
    data = digits.load_digits_split()
    (tx, ty), (vx, vy) = split_train(data.train_x, data.train_y, 0.1, seed)
    train = DataLoader(TensorDataset(tx, ty), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    val = DataLoader(TensorDataset(vx, vy), batch_size=256)
    x = digits.example_batch()
    out = {"float": digits.evaluate(model)}
    for name, pipeline in (("fused", None), ("unfused", ["cleanup"])):
        kw = {} if pipeline is None else {"pipeline": pipeline}
        gm = fxopt.optimize(model, x, prune=CONFIG, **kw).graph_module
        out[f"pruned ({name})"] = digits.evaluate(gm)
        t0 = time.perf_counter()
        fxopt.finetune(gm, train, val, epochs=epochs, teacher=model, kd_alpha=0.7,
                       kd_temperature=4.0, progress=False, seed=seed, num_threads=1)
        out[f"fine-tuned ({name})"] = digits.evaluate(gm)
        out[f"seconds ({name})"] = time.perf_counter() - t0
    return out


if __name__ == "__main__":
    r = measure()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print("| stage | test accuracy |\n|---|---|")
    for k, v in r.items():
        print(f"| {k} | {v:.4f} |" if not k.startswith("seconds") else f"| {k} | {v:.1f} s |")
