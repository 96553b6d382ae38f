"""``bench/models.py --target cuda``: ResNet-50 on a CUDA GPU against what a user would run.

Per model and batch, in one run: eager fp32, eager fp16 channels-last, ``torch.compile`` fp16
(channels-last, ``dynamic=False``: compiled per batch size), fxopt fp16
(``optimize(target="cuda", precision="fp16")``) and fxopt int8 (``quantize="int8"``, random
calibration batches); at batch 1 only (host-bound: launch overhead), the same with CUDA graphs:
``torch.compile(mode="reduce-overhead")`` fp16 and fxopt fp16 / int8 ``.with_cuda_graphs()``
(the modules optimized above, no second optimize). Times are ``triton.testing.do_bench``
medians after a first untimed call (autotuning, compilation, graph capture); fp16 variants
get a channels-last fp16 input, the int8 one a channels-last fp32 input, eager fp32 a plain
NCHW one. Beside them: the error of each variant against eager fp32 (reported, not asserted:
random weights and inputs), the time
``fxopt.optimize`` took (once per model, on the first batch size; the optimized module serves
every batch size) and torch.compile's first call per batch size.

A time budget skips what is left once it is spent (the rows say so) and the table is rewritten
after every row, so a run cut short still leaves its figures.

    python bench/models.py --target cuda --out DIR          # DIR/models-cuda-<date>.md
    python bench/models.py --target cuda --batches 256 --variants eager_fp16 fxopt_fp16
"""
from __future__ import annotations

import copy
import datetime
import os
import time
import traceback
from pathlib import Path

import torch

from _env import header

__all__ = ["run_cuda", "VARIANTS"]

VARIANTS = ["eager_fp32", "eager_fp16", "compile_fp16", "fxopt_fp16", "fxopt_int8",
            "compile_fp16_cg", "fxopt_fp16_cg", "fxopt_int8_cg"]
_TITLES = {"eager_fp32": "eager fp32", "eager_fp16": "eager fp16 CL", "compile_fp16":
           "torch.compile fp16", "fxopt_fp16": "fxopt fp16", "fxopt_int8": "fxopt int8",
           "compile_fp16_cg": "torch.compile fp16 CG", "fxopt_fp16_cg": "fxopt fp16 CG",
           "fxopt_int8_cg": "fxopt int8 CG"}
CG_BATCHES = (1,)  # CUDA-graph variants: only where the host bounds the time
_CL = torch.channels_last
# A dry run of this script's logic on the CPU (Triton interpreted, no timing that means anything):
# FXOPT_BENCH_DEVICE=cpu FXOPT_TRITON_ON_CPU=1 with a tiny model. For checking the script only.
DEVICE = os.environ.get("FXOPT_BENCH_DEVICE", "cuda")


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _bench(fn, rep_ms: int) -> float:
    import triton.testing
    if DEVICE != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    try:
        return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
    except TypeError:  # older signature
        return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.5])[0]


def _rel(out, ref) -> float:
    o, r = out.detach().double(), ref.detach().double()
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


def _sync_time(fn) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


class _Model:
    """One model's variants, built lazily (optimize once, compile per batch)."""

    def __init__(self, name, build, calib_batches: int):
        self.name = name
        self.fp32 = build(name).to(DEVICE).eval()
        self.fp16 = copy.deepcopy(self.fp32).half().to(memory_format=_CL)
        self.calib_batches = calib_batches
        self.opt: dict[str, object] = {}
        self.prep_s: dict[str, float] = {}
        self.notes: list[str] = []

    def fn(self, variant: str, x32: torch.Tensor):
        """(callable, input, preparation seconds or None)."""
        import fxopt

        target = {"target": "cuda"} if DEVICE == "cuda" else {"target": "cpu",
                                                               "passes": ["lower_to_triton"]}
        x16 = x32.half().contiguous(memory_format=_CL)
        if variant == "eager_fp32":
            return self.fp32, x32, None
        if variant == "eager_fp16":
            return self.fp16, x16, None
        if variant.endswith("_cg") and DEVICE != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        if variant in ("compile_fp16", "compile_fp16_cg"):
            torch._dynamo.reset()  # a fresh first compile per batch size
            mode = "reduce-overhead" if variant.endswith("_cg") else None  # CUDA graphs
            compiled = torch.compile(self.fp16, dynamic=False, mode=mode)
            with torch.no_grad():
                secs = _sync_time(lambda: compiled(x16))
            return compiled, x16, secs
        if variant.endswith("_cg"):  # the module optimized above, replayed from CUDA graphs
            if variant[:-3] not in self.opt:
                raise RuntimeError(f"{variant[:-3]} did not run or failed: nothing to graph")
            x = x16 if variant == "fxopt_fp16_cg" else x32.contiguous(memory_format=_CL)
            return self.opt[variant[:-3]].with_cuda_graphs(), x, None
        if variant not in self.opt:
            t0 = time.perf_counter()
            if variant == "fxopt_fp16":
                self.opt[variant] = fxopt.optimize(self.fp32, x32, precision="fp16", **target)
            else:
                g = torch.Generator(device=DEVICE).manual_seed(0)
                cal = [torch.randn(x32.shape, device=DEVICE, generator=g)
                       for _ in range(self.calib_batches)]
                self.opt[variant] = fxopt.optimize(self.fp32, x32, quantize="int8",
                                                   calibration_data=cal, **target)
            _sync()
            self.prep_s[variant] = time.perf_counter() - t0
            rec = next((r for r in self.opt[variant].report.passes
                        if r.name == "lower_to_triton"), None)
            if rec is not None:
                self.notes.append(f"{self.name} {variant}: lower_to_triton {rec.status}, "
                                  f"{rec.stats}; " + " ".join(rec.notes))
            secs = self.prep_s[variant]
        else:
            secs = None
        x = x16 if variant == "fxopt_fp16" else x32.contiguous(memory_format=_CL)
        return self.opt[variant], x, secs


def _table(args, rows, prep, notes, elapsed, done: bool) -> str:
    lines = [header("Model benchmark on CUDA: eager, torch.compile and fxopt (fp16, int8)"), "",
             f"Input {args.size}x{args.size}, random weights (BatchNorm statistics set), "
             f"`torch.no_grad()`. `triton.testing.do_bench` medians (rep {args.rep_ms} ms) after "
             f"one untimed call. Error: relative norm error of the output against eager fp32.", "",
             "| model | batch | " + " | ".join(f"{_TITLES[v]} ms" for v in args.variants) +
             " | fxopt fp16 vs compile | fxopt int8 vs compile | fxopt fp16 CG vs compile CG "
             "| fxopt int8 CG vs compile CG | error (" +
             ", ".join(_TITLES[v] for v in args.variants if v != "eager_fp32") + ") |",
             "|---|---|" + "---:|" * len(args.variants) + "---:|---:|---:|---:|---|"]
    for (name, batch), res in rows.items():
        cells = []
        for v in args.variants:
            r = res.get(v)
            cells.append(f"{r['ms']:.2f}" if r and "ms" in r else (r or {}).get("skip", "-"))
        c = res.get("compile_fp16", {}).get("ms")
        ccg = res.get("compile_fp16_cg", {}).get("ms")
        ratio = [f"{ref / res[v]['ms']:.2f}x" if ref and "ms" in res.get(v, {}) else "-"
                 for ref, v in ((c, "fxopt_fp16"), (c, "fxopt_int8"), (ccg, "fxopt_fp16_cg"),
                                (ccg, "fxopt_int8_cg"))]
        errs = ", ".join(f"{res[v]['err']:.1e}" if "err" in res.get(v, {}) else "-"
                         for v in args.variants if v != "eager_fp32")
        lines.append(f"| {name} | {batch} | " + " | ".join(cells) + f" | {' | '.join(ratio)} "
                     f"| {errs} |")
    lines += ["", "Ratios: torch.compile fp16 time / fxopt time (above 1: fxopt faster). Aims "
              "(issue 6): batch 256 int8 >= 1.3x, fp16 >= 1.0x; optimize time <= half of "
              "torch.compile's first compile. CG: CUDA graphs, batch 1 only (torch.compile "
              "mode='reduce-overhead' / fxopt with_cuda_graphs()); aim (issue 14): >= 1.0x.", "",
              "| model | preparation | seconds |", "|---|---|---:|"]
    for (name, what), secs in prep.items():
        lines.append(f"| {name} | {what} | {secs:.1f} |")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    lines += ["", f"{'total' if done else 'cut short after'} {elapsed:.0f} s"]
    return "\n".join(lines) + "\n"


def _out_path(out: str | None) -> Path | None:
    if out == "-":
        return None
    if out is None:
        return Path(__file__).resolve().parent / "results" / (
            f"models-cuda-{datetime.date.today().isoformat()}.md")
    p = Path(out)
    if not out.endswith(".md"):
        p = p / f"models-cuda-{datetime.date.today().isoformat()}.md"
    return p


def run_cuda(args, build) -> str | None:
    """The CUDA benchmark; None (after saying why) where it cannot run."""
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench/models.py --target cuda: no CUDA device here (torch.cuda.is_available() is "
              "False); nothing measured. Run it (or bench/gpu_check.sh) on a CUDA machine.")
        return None
    if DEVICE == "cuda" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench/models.py --target cuda: TRITON_INTERPRET is set; unset it to benchmark "
              "compiled kernels.")
        return None
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {VARIANTS}")
    torch.backends.cudnn.benchmark = True
    path = _out_path(args.out)
    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    rows: dict = {}
    prep: dict = {}
    notes: list[str] = []
    for name in args.models:
        model = _Model(name, build, args.calib_batches)
        for batch in args.batches:
            res = rows.setdefault((name, batch), {})
            x32 = torch.randn(batch, 3, args.size, args.size, device=DEVICE)
            with torch.no_grad():
                ref = model.fp32(x32).float()
            for v in args.variants:
                if v.endswith("_cg") and batch not in CG_BATCHES:
                    res[v] = {"skip": "-"}
                    continue
                if time.monotonic() > deadline:
                    res[v] = {"skip": "skipped (budget)"}
                    continue
                try:
                    fn, x, secs = model.fn(v, x32)
                    with torch.no_grad():
                        out = fn(x)  # the untimed first call (autotuning, compilation)
                        res[v] = {"err": _rel(out.float(), ref)}
                        res[v]["ms"] = _bench(lambda: fn(x), args.rep_ms)
                    graphs = getattr(fn, "cuda_graphs", None)  # fxopt *_cg: did it replay?
                    if graphs is not None and (graphs.disabled or not graphs.replays):
                        res[v]["ms_note"] = "no graph"
                        notes.append(f"{name} b{batch} {v}: ran WITHOUT CUDA graphs "
                                     f"({graphs.disabled or 'never replayed'}); its time is the "
                                     f"plain module's")
                    if secs is not None:
                        what = (f"{_TITLES[v]} first call, batch {batch}"
                                if v.startswith("compile")
                                else f"fxopt.optimize {v[6:]} (example batch {batch})")
                        prep[(name, what)] = secs
                except Exception as e:  # noqa: BLE001 - a failing variant is a row, not the end
                    res[v] = {"skip": f"failed: {type(e).__name__}"}
                    msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                    notes.append(f"{name} b{batch} {v}: {type(e).__name__}: {msg}")
                    traceback.print_exc()
                print(f"{name} b{batch} {v}: {res[v]}", flush=True)
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
            if path is not None:  # rewrite after each row: a run cut short keeps its figures
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(_table(args, rows, prep, notes + model.notes,
                                       time.monotonic() - t0, False))
        notes += model.notes
        del model
    text = _table(args, rows, prep, notes, time.monotonic() - t0, True)
    if path is not None:
        path.write_text(text)
        print(f"wrote {path}")
    print(text)
    return text
