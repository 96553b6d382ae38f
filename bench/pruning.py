"""Structured pruning benchmark (CPU): fxopt against Torch-Pruning at the same channel ratio.

Part 1, torchvision models (random weights, BatchNorm statistics randomized, 224x224): the dense
model, Torch-Pruning's magnitude pruner (L1, the classifier ignored) run as the eager model it
returns, and fxopt's ``prune_channels`` both alone (the pruned GraphModule) and with the full
default pipeline (BatchNorm folding, activation fusion). MACs and params, latency at batch 1 and
8 (variants interleaved round by round, median per call), and the realized speedup over the
MAC reduction (speedup / (dense MACs / pruned MACs)).

Part 2, the digits ResNet (``fxopt.digits``, trained): both pruners at the same ratio, then the
same fine-tuning budget (``fxopt.finetune``: epochs, distillation from the unpruned model,
learning rate, augmentation, data order) for each seed; test accuracy before and after.

    python bench/pruning.py                       # writes bench/results/pruning-<date>.md
    python bench/pruning.py --models resnet18 --rounds 5 --digits-seeds 1 --out -

Needs ``torch-pruning`` (a benchmark-only dependency: ``pip install torch-pruning``).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _counts import macs, params  # noqa: E402
from _env import header, write_result  # noqa: E402
from _timing import calls_per_round, median_times  # noqa: E402

__all__ = ["main"]

MODELS = ["resnet18", "resnet50", "mobilenet_v2"]


def _build(name: str):
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.get_model(name, weights=None).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in m.modules():  # trained-like statistics, not the defaults
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-0.2, 0.2, generator=g)
                mod.running_var.uniform_(0.5, 1.5, generator=g)
                mod.weight.uniform_(0.5, 1.5, generator=g)
    return m


def _classifier(model):
    if hasattr(model, "fc"):
        return [model.fc]
    if hasattr(model, "classifier"):
        return [m for m in model.classifier.modules() if isinstance(m, torch.nn.Linear)][-1:]
    raise ValueError("no classifier found")


def tp_prune(model, x, ratio: float, round_to: int | None = None):
    """Torch-Pruning's magnitude pruner (L1 group importance), classifier ignored; eval mode."""
    import torch_pruning as tp

    m = copy.deepcopy(model)
    pruner = tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=_classifier(m),
                                       round_to=round_to)
    pruner.step()
    return m.eval()


def _widths(model) -> dict[str, int]:
    """Output width of every conv and linear layer, by module path."""
    return {n: getattr(m, "out_channels", getattr(m, "out_features", None))
            for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}


def bench_models(names, ratio: float, size: int, batches, rounds: int):
    import fxopt

    rows = []
    for name in names:
        model = _build(name)
        x1 = torch.randn(1, 3, size, size)
        t0 = time.perf_counter()
        tp_model = tp_prune(model, x1, ratio)
        tp_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        fx_prune_only = fxopt.optimize(model, x1, prune=ratio, pipeline=["cleanup"])
        fx_s = time.perf_counter() - t0
        fx_full = fxopt.optimize(model, x1, prune=ratio)
        dense_fx = fxopt.optimize(model, x1)
        rec = fx_prune_only.report.record("prune_channels")
        variants = {"dense eager": model, "dense fxopt": dense_fx, "TP eager": tp_model,
                    "TP + fxopt pipeline": None, "fxopt prune only": fx_prune_only,
                    "fxopt prune + pipeline": fx_full}
        variants["TP + fxopt pipeline"] = fxopt.optimize(tp_model, x1)
        same_arch = _widths(fx_prune_only.graph_module) == _widths(tp_model)
        info = {k: (params(v), macs(v, x1)) for k, v in variants.items()}
        lat = {}
        load = [os.getloadavg()[0]]
        for b in batches:
            x = torch.randn(b, 3, size, size)
            lat[b] = median_times(variants, x, rounds, calls_per_round(model, x, 0.05))
            load.append(os.getloadavg()[0])
            print(f"{name} b{b}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in lat[b].items()),
                  flush=True)
        rows.append({"name": name, "info": info, "lat": lat, "tp_s": tp_s, "fx_s": fx_s,
                     "groups": rec.stats, "same_output": same_arch, "load": load})
    return rows


def bench_digits(ratio: float, epochs: int, seeds: int, progress: bool):
    from fxopt.tools import digits
    from fxopt.train.finetune import finetune

    import fxopt
    from fxopt.tools.recipes import split_train
    from torch.utils.data import DataLoader, TensorDataset

    loaded = digits.load_or_train_default(progress=progress)
    model = loaded.model.eval()
    data = digits.load_digits_split()
    test = digits.test_loader()
    x = digits.example_batch()
    out = {"original": digits.evaluate(model, test), "fxopt": [], "TP": [], "params": {},
           "macs": {}}
    for seed in range(seeds):
        (tx, ty), (vx, vy) = split_train(data.train_x, data.train_y, 0.1, seed)
        for method in ("fxopt", "TP"):
            if method == "fxopt":
                pruned = fxopt.optimize(model, x, prune=ratio, pipeline=["cleanup"]).graph_module
            else:
                pruned = tp_prune(model, x[:1], ratio)
            out["params"][method] = params(pruned)
            out["macs"][method] = macs(pruned, x[:1])
            acc0 = digits.evaluate(pruned, test)
            train = DataLoader(TensorDataset(tx, ty), batch_size=64, shuffle=True,
                               generator=torch.Generator().manual_seed(seed))
            val = DataLoader(TensorDataset(vx, vy), batch_size=256)
            gen = torch.Generator().manual_seed(seed + 1)
            t0 = time.perf_counter()
            finetune(pruned, train, val, epochs=epochs, teacher=model, kd_alpha=0.7,
                     kd_temperature=4.0, lr=2e-3, weight_decay=1e-4, patience=None,
                     augment=lambda b: digits.random_shift(b, gen), progress=False, seed=seed,
                     num_threads=1)
            acc1 = digits.evaluate(pruned, test)
            out[method].append((acc0, acc1, time.perf_counter() - t0))
            print(f"digits seed {seed} {method}: pruned {acc0:.2%} -> fine-tuned {acc1:.2%}",
                  flush=True)
    out["params"]["original"] = params(model)
    out["macs"]["original"] = macs(model, x[:1])
    return out


def _versions() -> str:
    import torch_pruning
    import torchvision

    return f"torchvision {torchvision.__version__}, torch-pruning {torch_pruning.__version__}"


def report(args, rows, dig) -> str:
    lines = [header("Structured pruning: fxopt vs Torch-Pruning (CPU)"),
             f"- also: {_versions()}", "",
             f"Channel ratio {args.ratio} (L1 magnitude importance, uniform per group, the "
             f"classifier kept) for both. {args.size}x{args.size} float32 inputs, "
             f"`torch.no_grad()`, {args.threads} threads; latency: median per call over "
             f"{args.rounds} interleaved rounds (the machine is shared with other jobs: only "
             f"figures from the same table compare). fxopt's pruned model is run as its "
             f"GraphModule (`prune only`) and after the default pipeline (BatchNorm folding, "
             f"activation fusion); `TP + fxopt pipeline` runs the same pipeline on "
             f"Torch-Pruning's model, to separate what pruning does from what fusion does. "
             f"`prune only` is the captured graph, whose activations are out of place (fxopt's "
             f"canonical form), so at batch 8 it may trail the eager model of the same widths, "
             f"whose ReLUs are in place; the fused pipeline has no separate activations.", ""]
    for r in rows:
        info, lat = r["info"], r["lat"]
        dense_macs = info["dense eager"][1]
        bs = sorted(lat)
        lines += [f"## {r['name']}", "",
                  f"Pruning time: fxopt {r['fx_s']:.2f} s (capture, analysis, rewrite and the "
                  f"masked-reference check), Torch-Pruning {r['tp_s']:.2f} s. fxopt groups: "
                  f"{r['groups'].get('groups')} ({r['groups'].get('pruned')} pruned, "
                  f"{r['groups'].get('frozen')} frozen). Same layer widths as Torch-Pruning's: "
                  f"{'yes' if r['same_output'] else 'no'} (the channels each keeps differ: "
                  f"the importances are normalized differently). Load average (1 min) before "
                  f"and after each batch size: {', '.join(f'{v:.2f}' for v in r['load'])} "
                  f"(on {os.cpu_count()} cores: well above {args.threads} means other jobs "
                  f"competed for the CPU).", "",
                  "| variant | params | MACs | MAC reduction | " +
                  " | ".join(f"bs {b} ms | bs {b} speedup | bs {b} speedup / MAC red." for b in bs)
                  + " |",
                  "|---|---|---|---|" + "---|---|---|" * len(bs)]
        for k, (p, mac) in info.items():
            red = dense_macs / mac if mac else float("nan")
            cells = []
            for b in bs:
                ms = lat[b][k] * 1e3
                sp = lat[b]["dense eager"] / lat[b][k]
                cells.append(f"{ms:.2f} | {sp:.2f}x | {sp / red:.2f}")
            lines.append(f"| {k} | {p / 1e6:.2f}M | {mac / 1e9:.3f}G | {red:.2f}x | " +
                         " | ".join(cells) + " |")
        lines.append("")
    lines += _aims(rows, dig)
    if dig is not None:
        def stats(v):
            a = [t[1] for t in v]
            return f"{statistics.mean(a):.2%} (min {min(a):.2%}, max {max(a):.2%})"

        lines += ["## Digits ResNet: accuracy after the same fine-tuning budget", "",
                  f"`fxopt.digits` model (trained, test accuracy {dig['original']:.2%}), ratio "
                  f"{args.ratio}; then `fxopt.finetune` for both: {args.digits_epochs} epochs, "
                  f"Adam lr 2e-3 cosine, distillation from the unpruned model (alpha 0.7, T 4), "
                  f"one-pixel shifts, 90/10 train/validation split of the training data; "
                  f"{args.digits_seeds} seeds (split, data order, augmentation). Test split: "
                  f"359 images.", "",
                  "| method | params | MACs | test acc. after pruning (mean) | "
                  "test acc. after fine-tuning, mean (min, max) |", "|---|---|---|---|---|",
                  f"| original | {dig['params']['original']:,} | {dig['macs']['original']:,} | "
                  f"{dig['original']:.2%} | - |"]
        for method in ("fxopt", "TP"):
            v = dig[method]
            lines.append(f"| {method} | {dig['params'][method]:,} | {dig['macs'][method]:,} | "
                         f"{statistics.mean(t[0] for t in v):.2%} | {stats(v)} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _aims(rows, dig) -> list[str]:
    """The issue's aims, each met or missed, with the numbers behind it."""
    out = ["## Aims", ""]
    for r in rows:
        info, lat = r["info"], r["lat"]
        for b in sorted(lat):
            t = lat[b]
            fx, fxp, tpe, dense, dfx = (t["fxopt prune + pipeline"], t["fxopt prune only"],
                                        t["TP eager"], t["dense eager"], t["dense fxopt"])
            red = info["dense eager"][1] / info["fxopt prune only"][1]
            out.append(
                f"- {r['name']} bs {b}: latency vs Torch-Pruning: fxopt {fx * 1e3:.2f} ms vs TP "
                f"{tpe * 1e3:.2f} ms ({'met' if fx <= tpe else 'missed'}; pruning alone "
                f"{fxp * 1e3:.2f} ms, {tpe / fxp:.2f}x TP's speed). Realized speedup / MAC "
                f"reduction ({red:.2f}x): {dense / fx / red:.2f} against dense eager "
                f"({'met' if dense / fx / red >= 0.7 else 'missed'}), {dfx / fx / red:.2f} "
                f"against the dense model through the same pipeline "
                f"({'met' if dfx / fx / red >= 0.7 else 'missed'}), {dense / fxp / red:.2f} "
                f"for pruning alone against dense eager "
                f"({'met' if dense / fxp / red >= 0.7 else 'missed'}).")
    if dig is not None:
        f = statistics.mean(t[1] for t in dig["fxopt"])
        t = statistics.mean(t[1] for t in dig["TP"])
        out.append(f"- digits accuracy after the same fine-tuning: fxopt {f:.2%} vs Torch-Pruning "
                   f"{t:.2%} ({'met' if f >= t else 'missed'}; one test image is 0.28%).")
    return out + [""]


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=MODELS)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--digits-epochs", type=int, default=8)
    p.add_argument("--digits-seeds", type=int, default=3)
    p.add_argument("--no-digits", action="store_true")
    p.add_argument("--out", default=None, help="markdown file to write ('-': print only)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    rows = bench_models(args.models, args.ratio, args.size, args.batches, args.rounds)
    dig = None if args.no_digits else bench_digits(args.ratio, args.digits_epochs,
                                                   args.digits_seeds, progress=False)
    torch.set_num_threads(args.threads)
    text = report(args, rows, dig)
    write_result(text, args.out, "pruning")
    return text


if __name__ == "__main__":
    main()
