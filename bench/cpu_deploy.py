"""CPU deployment benchmark (issue 13 item 7): fxopt against what a user would deploy instead.

For each torchvision model (random weights seeded, BatchNorm statistics randomized as in
``bench/models.py``; 224x224 random inputs) every variant is built once, checked on held-out
inputs and timed at each batch size:

- ``eager`` float32; ``compile``: ``torch.compile`` (default mode, ``dynamic=False``: one static
  graph per batch size).
- ``ao_int8``: torch.ao FX post-training int8 (``prepare_fx``/``convert_fx``,
  ``get_default_qconfig_mapping("x86")``; ``bench/_int8_baselines.py``).
- ``ov``: OpenVINO's default, ``ov.convert_model(model, example_input=x)`` then
  ``core.compile_model(m, "CPU")`` (reshaped to each batch size first; on a CPU with AVX-512
  BF16 or AMX its default inference precision is bf16, the notes say which it chose).
  ``ov_nncf_int8``: ``nncf.quantize`` of that OpenVINO model over an ``nncf.Dataset`` of the
  calibration batches (NNCF's OpenVINO-backend recipe; ``model_type=TRANSFORMER`` for ViT).
- ``ort_fp32``: ONNX Runtime on fxopt's float export (``fxopt.export_onnx`` of
  ``fxopt.optimize(model, x)``, dynamic batch); ``ort_fp32_torch``: on ``torch.onnx.export`` of
  the eager model. ``ort_int8``: ORT's ``quantize_static`` (after ``quant_pre_process``) of
  fxopt's float file, QDQ, per-channel int8 weights, uint8 activations (U8S8, what ORT advises
  on x86); ``ort_int8_s8``: the same with int8 activations (S8S8, ``quantize_static``'s default
  in ORT 1.32); ``ort_int8_fxopt``: fxopt's own QDQ export of its int8 model.
- ``fxopt_fp32`` / ``fxopt_bf16`` / ``fxopt_int8``: ``fxopt.optimize(model, x, target="cpu",
  precision=..., quantize=..., calibration_data=...)``, fxopt's own PyTorch path;
  ``fxopt_int8_fastest``: the same with ``QuantConfig(cpu_engine="fastest")`` (on a CPU without
  VNNI the lowering measured faster on the example inputs, its note says which).
- ``fxopt_{ov,ort,best}_{fp32,bf16,int8,int8_bf16}``: the same through ``target="openvino"``,
  ``"onnxruntime"`` and ``"best"``; ``int8_bf16`` is ``quantize="int8"`` with
  ``precision="bf16"`` (OpenVINO runs the layers left in float in bf16, as its default does for
  NNCF's model). Where this build of fxopt refuses an option (no such target yet, bf16 not
  supported there) the cell is ``n/a`` with fxopt's reason.

All int8 variants calibrate on the same images (16 by default, one per batch); SQNR is measured
on other, held-out images against eager float32. Latency: after warm-up the variants take turns
(round-robin, so a burst of load on a shared machine hits them alike); in its turn a variant is
called ``--settle`` times untimed (default 1) and then once timed, so every timed call is a
back-to-back call of that runtime, not the first after another's (an engine's thread pool sleeps
while another runtime holds the cores), after a ``--pause`` (default 20 ms) in which the runtime
before it lets go of the cores (PyTorch's OpenMP threads spin for milliseconds after a
model); up to ``--reps`` rounds or about ``--budget`` seconds (calls, not pauses) per variant
per batch size, and the figure is the median. Size: the file each engine deploys
from (OpenVINO's ``save_model`` .xml + .bin with
its default fp16 weight compression for float models, the .onnx, ``torch.save`` of the
state_dict, ``OptimizedModule.save``). A variant that fails to build or run is a cell with the
error's first line; the run goes on.

    python bench/cpu_deploy.py                       # 8 models: bench/results/cpu-deploy-<date>.md
    python bench/cpu_deploy.py --models resnet18 mobilenet_v2 --threads 2
    python bench/cpu_deploy.py --quick --out -       # smoke run: resnet18, 64x64, few reps

``--out X.md`` writes X.md and X.json (every figure, raw); ``--out -`` prints only.

This file is the harness (timing, SQNR, sizes, the report, the command line); how each
variant is built is ``bench/_deploy_variants.py``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _deploy_variants import (BUILDERS, VARIANTS,  # noqa: E402
                              Built, Context, NotApplicable, first_line)
from _deploy_report import fmt_ms, markdown  # noqa: E402
from _int8_baselines import quiet_quant_warnings  # noqa: E402
from _random_weights import redraw_zero_weights  # noqa: E402
from models import _build  # noqa: E402 - the same torchvision models as bench/models.py

__all__ = ["main", "VARIANTS", "MODELS"]

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0",
          "regnet_x_400mf", "convnext_tiny", "vit_b_16"]
CPU_FLAGS = ("avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "avx_vnni")


@dataclass
class Cell:
    status: str = "ok"  # ok, n/a, error
    reason: str = ""
    build_s: float = 0.0
    size: int | None = None
    sqnr: float | None = None
    ms: dict = field(default_factory=dict)  # batch -> median ms, or an error string
    rounds: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)  # batch -> ms of each timed round, in order
    note: str = ""




def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    from fxopt.quant.measure import sqnr_db

    return sqnr_db(ref, out)


def _time(fns: dict[str, Callable], x, reps: int, budget: float, warmup: int,
          settle: int = 1, pause: float = 0.0) -> dict:
    """Median ms of each function, taking turns; ``reps`` rounds at most, stopping after about
    ``budget`` seconds per function (at least 3 rounds). In each round a function is called
    ``settle`` times untimed, then once timed: the timed call is a back-to-back call, as in a
    deployment, not the first after another runtime's (measured on mobilenet_v3_large: an ONNX
    Runtime session called right after another runtime took 8-10 ms, back to back 3.9-5 ms;
    its thread pool sleeps when another runtime holds the cores). Before its turn each function
    waits ``pause`` seconds, so that the runtime before it has let go of the cores: PyTorch's
    OpenMP threads spin for some milliseconds after a parallel region, and an engine called
    within them shares the cores with the spinning threads (OpenVINO's mobilenet_v2 at bs 1, 2
    threads: 3.70 ms timed after one untimed call that followed a PyTorch model, 2.46 ms after
    a 20 ms pause; PyTorch itself after OpenVINO: 13.41 against 13.38 ms). The budget counts
    the calls, not the pauses. A function that raises is dropped and its entry is the error's
    first line."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    errors: dict[str, str] = {}
    live = dict(fns)

    def call(k, f) -> bool:
        try:
            f(x)
            return True
        except Exception as e:  # noqa: BLE001
            errors[k] = first_line(e)
            del live[k]
            return False

    order = random.Random(0)
    with torch.inference_mode():
        for _ in range(warmup):
            for k, f in list(live.items()):
                call(k, f)
        start, rounds, paused = time.perf_counter(), 0, 0.0
        while live and rounds < reps and (rounds < 3 or time.perf_counter() - start - paused
                                           < budget * len(live)):
            # a new order each round (seeded): in a fixed order each variant always ran after
            # the same one, and the same OpenVINO graph compiled twice, one copy always right
            # after PyTorch's bf16 model, lost 44-48 of 50 rounds to the other (3-7% slower)
            turn = list(live.items())
            order.shuffle(turn)
            for k, f in turn:
                if k not in live:
                    continue
                if pause > 0:
                    time.sleep(pause)
                    paused += pause
                if not all(call(k, f) for _ in range(settle)):
                    continue
                t0 = time.perf_counter()
                if call(k, f):
                    times[k].append(time.perf_counter() - t0)
            rounds += 1
    out = {k: (statistics.median(v) * 1e3, len(v), [t * 1e3 for t in v])
           for k, v in times.items() if k in live}
    out.update({k: (e, 0, []) for k, e in errors.items()})
    return out


def _model(name: str) -> tuple[torch.nn.Module, list[str]]:
    """The torchvision model as ``bench/models.py`` builds it, with its all-zero conv/linear
    weights redrawn (``_random_weights.redraw_zero_weights``); the names are returned."""
    model = _build(name)
    return model, redraw_zero_weights(model)


def _bench_model(name: str, args, variants: list[str], log) -> dict:
    model, redrawn = _model(name)
    if redrawn:
        log(f"[{name}] zero-initialized weights redrawn from N(0, 0.02): {', '.join(redrawn)}")
    gen = torch.Generator().manual_seed(1)
    shape = (3, args.size, args.size)
    calib = [torch.randn(1, *shape, generator=gen) for _ in range(args.calib)]
    held = torch.randn(args.heldout, *shape, generator=gen)
    xs = {b: torch.randn(b, *shape, generator=gen) for b in args.batch}
    cells: dict[str, Cell] = {}
    built: dict[str, Built] = {}
    tmp = Path(tempfile.mkdtemp(prefix=f"cpu_deploy_{name}_"))
    try:
        ctx = Context(name, model, calib[0].clone(), calib, tmp, args.threads, args.fxopt_check)
        b_sq = min(args.batch)
        n_held = held.shape[0] - held.shape[0] % b_sq
        with torch.inference_mode():  # the reference in the chunks the variants run
            ref = torch.cat([model(c) for c in held[:n_held].split(b_sq)])
        for v in variants:
            cell = cells[v] = Cell()
            t0 = time.perf_counter()
            try:
                built[v] = BUILDERS[v](ctx)
                cell.size, cell.note = built[v].size, built[v].note
            except NotApplicable as e:
                cell.status, cell.reason = "n/a", str(e)
            except Exception as e:  # noqa: BLE001 - a cell, not the end of the run
                cell.status, cell.reason = "error", first_line(e)
            cell.build_s = time.perf_counter() - t0
            if v in built and built[v].build_s is not None:  # made for a variant before it
                cell.build_s = built[v].build_s
            log(f"[{name}] built {v:16s} {cell.build_s:6.1f} s  {cell.status} {cell.reason}")
        runners: dict[int, dict[str, Callable]] = {}
        for b in args.batch:
            runners[b] = {}
            for v, bl in built.items():
                try:
                    runners[b][v] = bl.runner(b)
                except Exception as e:  # noqa: BLE001
                    cells[v].ms[b] = f"error: {first_line(e)}"
        # SQNR on the held-out images, in chunks of the smallest batch size.
        for v in list(built):
            f = runners[b_sq].get(v)
            if f is None:
                continue
            try:
                with torch.inference_mode():
                    out = torch.cat([f(c) for c in held[:n_held].split(b_sq)])
                cells[v].sqnr = _sqnr(ref, out.float())
                prec = getattr(f, "precision", None)
                if prec:
                    cells[v].note = "; ".join(filter(None, [cells[v].note,
                                                            f"inference precision {prec}"]))
            except Exception as e:  # noqa: BLE001
                cells[v].status, cells[v].reason = "error", f"run: {first_line(e)}"
                for b in args.batch:
                    runners[b].pop(v, None)
        for b in args.batch:
            fns = {v: f for v, f in runners[b].items() if cells[v].status == "ok"}
            log(f"[{name}] timing bs {b}: {len(fns)} variants, up to {args.reps} rounds, "
                f"load {os.getloadavg()[0]:.2f}")
            for v, (ms, n, samples) in _time(fns, xs[b], args.reps, args.budget, args.warmup,
                                               args.settle, args.pause).items():
                cells[v].ms[b] = ms if n else f"error: {ms}"
                cells[v].rounds[b] = n
                cells[v].samples[b] = samples
            log(f"[{name}] bs {b}: " + "  ".join(
                f"{v} {fmt_ms(cells[v].ms.get(b))}" for v in fns))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"model": name, "cells": {v: c.__dict__ for v, c in cells.items()},
            "load_after": os.getloadavg()[0], "redrawn": redrawn}


# ---- the report ---------------------------------------------------------------------------------

def _git_commit() -> str:
    import fxopt

    root = Path(fxopt.__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "-uno", "--",
                                "fxopt", "passes", "triton_kernels", "bench"],
                               capture_output=True, text=True, check=True).stdout.strip()
        branch = subprocess.run(["git", "-C", str(root), "rev-parse", "--abbrev-ref", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        return f"{rev} ({branch}{', uncommitted changes' if dirty else ''}; {root})"
    except (OSError, subprocess.CalledProcessError):
        return f"unknown ({root})"


def _machine() -> dict:
    model, flags = platform.processor() or "unknown CPU", set()
    with contextlib.suppress(OSError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("Flags:"):
                flags = set(line.split(":", 1)[1].split())
    return {"cpu": model, "cores": os.cpu_count(),
            "flags": {f: f in flags for f in CPU_FLAGS}}


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "torchvision", "openvino", "nncf", "onnxruntime", "onnx"):
        try:  # the installed distribution's version, without importing it (nncf takes seconds)
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out["fxopt"] = _git_commit()
    return out


def _render(path: Path) -> str:
    """``path``'s markdown again from its .json (the figures as measured), keeping any
    hand-written section from "## Reading" on."""
    data = json.loads(path.read_text())
    for r in data["results"]:  # JSON wrote the per-batch keys as strings
        for cell in r["cells"].values():
            for key in ("ms", "rounds", "samples"):
                if isinstance(cell.get(key), dict):
                    cell[key] = {int(b): v for b, v in cell[key].items()}
    text = markdown(data["meta"], data["results"], argparse.Namespace(**data["args"]))
    md = path.with_suffix(".md")
    old = md.read_text() if md.exists() else ""
    if "\n## Reading" in old:
        text = text.rstrip("\n") + "\n" + old[old.index("\n## Reading"):]
    md.write_text(text)
    print(f"wrote {md} from {path.name}")
    return text


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=None, help=f"default: {' '.join(MODELS)}")
    p.add_argument("--batch", nargs="+", type=int, default=None, help="default: 1 8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=None, help="timed rounds at most (default 50)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per variant per batch size before timing stops (default 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3)")
    p.add_argument("--settle", type=int, default=1,
                   help="untimed calls of a variant before each timed one (default 1)")
    p.add_argument("--pause", type=float, default=0.02,
                   help="seconds each variant waits before its turn, so the runtime before it "
                        "has let go of the cores (default 0.02)")
    p.add_argument("--variants", default=None,
                   help="comma-separated, default all: " + ",".join(VARIANTS))
    p.add_argument("--size", type=int, default=None, help="image side (default 224)")
    p.add_argument("--calib", type=int, default=None, help="calibration images (default 16)")
    p.add_argument("--heldout", type=int, default=None, help="held-out images (default 8)")
    p.add_argument("--fxopt-check", default="each", choices=["each", "end", "none"],
                   help="fxopt.optimize(check=...); a failed numeric check is rebuilt with "
                        "'none' and noted")
    p.add_argument("--label", default="", help="a note for the title (e.g. 'partial, noisy')")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: resnet18, 64x64, batch 1 and 2, 4 calibration images, 3 reps")
    p.add_argument("--out", default=None, help="markdown file (and .json beside it); '-': "
                   "print only; default bench/results/cpu-deploy-<date>.md")
    p.add_argument("--render", default=None, metavar="X.json",
                   help="measure nothing: write X.md again from the figures in X.json (after a "
                        "change to the report's text); the hand-written reading is kept")
    args = p.parse_args(argv)
    if args.render:
        return _render(Path(args.render))
    quick = dict(models=["resnet18"], batch=[1, 2], reps=3, budget=0.2, warmup=1, size=64,
                 calib=4, heldout=2)
    full = dict(models=MODELS, batch=[1, 8], reps=50, budget=2.0, warmup=3, size=224, calib=16,
                heldout=8)
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    variants = VARIANTS if args.variants is None else [
        v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in BUILDERS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if "eager" not in variants:
        variants = ["eager", *variants]

    quiet_quant_warnings()
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = "x86"
    t_start = time.perf_counter()
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": _machine(), "versions": _versions(),
            "load_before": ", ".join(f"{v:.2f}" for v in os.getloadavg()),
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv[:1] + (
                list(argv) if argv is not None else sys.argv[1:]))}
    print(f"cpu_deploy: {len(args.models)} models x {len(variants)} variants, batch "
          f"{args.batch}, {args.threads} threads, load {meta['load_before']}", flush=True)
    results = []
    for name in args.models:
        try:
            results.append(_bench_model(name, args, variants,
                                        lambda s: print(s, flush=True)))
        except Exception as e:  # noqa: BLE001 - the model itself failed to build
            print(f"[{name}] failed: {first_line(e)}", flush=True)
            results.append({"model": name, "cells": {"eager": Cell(
                "error", first_line(e)).__dict__}, "load_after": os.getloadavg()[0]})
    meta["load_after"] = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    meta["duration_s"] = time.perf_counter() - t_start
    text = markdown(meta, results, args)
    if args.out != "-":
        path = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / (
            f"cpu-deploy-{datetime.date.today().isoformat()}.md")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.with_suffix(".json").write_text(json.dumps(
            {"meta": meta, "args": vars(args), "results": results}, indent=1, default=str))
        print(f"wrote {path} and {path.with_suffix('.json').name}")
    print(text)
    return text


if __name__ == "__main__":
    main()
