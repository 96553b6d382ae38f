"""bf16 on the CPU: fxopt fp32 and bf16 against eager bf16, torch.compile bf16 and OpenVINO.

Per torchvision model (random weights, BatchNorm statistics randomized as in ``bench/models.py``,
224x224), thread count and batch size, variants interleaved round by round in one process,
median per-call time under ``torch.inference_mode()``; every variant takes a float32 NCHW input
and returns float32 (what a user's code passes and gets):

- ``fxopt-fp32``: ``fxopt.optimize(model, x)``
- ``fxopt-bf16``: ``fxopt.optimize(model, x, precision="bf16")`` (casts at its boundary)
- ``eager-bf16``: ``model.to(torch.bfloat16)`` channels-last, input cast and made channels-last,
  output cast back
- ``compile-bf16``: ``torch.compile`` of that (Inductor, default mode; ``--no-compile`` skips it:
  compiling costs minutes per model on 2 cores)
- ``openvino``: ``ov.convert_model(model, example_input=x)``, ``core.compile_model(m, "CPU",
  {"INFERENCE_NUM_THREADS": threads})``: OpenVINO's default, whose inference precision is bf16
  on a CPU with AVX-512 BF16 (the table says which precision it chose)

``rel err`` is each variant's output against the float32 eager model's (bs 1, 1 thread). The
ratio column is OpenVINO's time over fxopt-bf16's (above 1: fxopt faster).

    python bench/cpu_bf16.py                         # writes bench/results/cpu-bf16-<date>.md
    python bench/cpu_bf16.py --models resnet18 --threads 1 --batch-sizes 1 --out -   # smoke
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header, write_result  # noqa: E402
from models import _build  # noqa: E402 - the same torchvision models as bench/models.py

__all__ = ["main"]

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0",
          "regnet_x_400mf", "convnext_tiny", "vit_b_16"]
VARIANTS = ("fxopt-fp32", "fxopt-bf16", "eager-bf16", "compile-bf16", "openvino")
CL = torch.channels_last


class _Bf16Eager(torch.nn.Module):
    """The model in bf16 channels-last, float32 NCHW in and out."""

    def __init__(self, model):
        super().__init__()
        self.m = copy.deepcopy(model).to(torch.bfloat16).to(memory_format=CL)

    def forward(self, x):
        if x.dim() == 4:
            x = x.to(torch.bfloat16, memory_format=CL)
        else:
            x = x.to(torch.bfloat16)
        return self.m(x).float()


class _OpenVINO:
    """An OpenVINO compiled model behind a callable: float32 in, float32 out."""

    def __init__(self, ov_model, threads: int):
        import openvino as ov

        core = ov.Core()
        self.compiled = core.compile_model(ov_model, "CPU",
                                           {"INFERENCE_NUM_THREADS": threads})
        self.request = self.compiled.create_infer_request()
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)

    def __call__(self, x):
        self.request.infer({0: x.numpy()})
        return torch.from_numpy(self.request.get_output_tensor(0).data.copy())


def _median_ms(fns: dict, x, rounds: int, seconds: float) -> dict[str, float]:
    """Interleaved rounds: in each, every variant makes enough back-to-back calls to last about
    ``seconds`` (decided from one timed call); medians of the per-call means, in ms."""
    times = {k: [] for k in fns}
    with torch.inference_mode():
        calls = {}
        for k, f in fns.items():
            for _ in range(2):
                f(x)
            t0 = time.perf_counter()
            f(x)
            calls[k] = max(1, int(seconds / max(time.perf_counter() - t0, 1e-6)))
        for _ in range(rounds):
            for k, f in fns.items():
                t0 = time.perf_counter()
                for _ in range(calls[k]):
                    f(x)
                times[k].append((time.perf_counter() - t0) / calls[k])
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def _variants(name: str, model, x, want: set[str], notes: list[str]) -> dict:
    """The PyTorch variants, built once per model (they take any batch size) and OpenVINO's
    converted model (compiled per thread count: ``_OpenVINO``)."""
    import fxopt

    fns = {}
    if "fxopt-fp32" in want:
        fns["fxopt-fp32"] = fxopt.optimize(model, x)
    if "fxopt-bf16" in want:
        opt = fxopt.optimize(model, x, precision="bf16")
        notes += [f"{name}: {n}" for n in opt.report.notes if "precision" in n]
        fns["fxopt-bf16"] = opt
    eager = _Bf16Eager(model).eval()
    if "eager-bf16" in want:
        fns["eager-bf16"] = eager
    if "compile-bf16" in want:
        fns["compile-bf16"] = torch.compile(eager)
    if "openvino" in want:
        try:
            import openvino as ov

            try:
                fns["openvino"] = ov.convert_model(model, example_input=x)
            except Exception as e:  # noqa: BLE001 - its TorchScript trace check (vit_b_16)
                notes.append(f"{name}: openvino converted through torch.export (the "
                             f"TorchScript trace failed: {type(e).__name__})")
                fns["openvino"] = ov.convert_model(torch.export.export(model, (x,)))
        except Exception as e:  # noqa: BLE001 - a benchmark row, not library code
            notes.append(f"{name}: openvino failed: {type(e).__name__}: {str(e)[:200]}")
    return fns


def _render(rows, cols, notes, args, load) -> str:
    text = header("bf16 on the CPU: fxopt fp32 / bf16, eager bf16, torch.compile bf16, OpenVINO")
    flags = " ".join(sorted({f for f in Path("/proc/cpuinfo").read_text().split()
                             if f in ("avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni",
                                      "avx512_fp16", "amx_tile")}))
    try:
        import openvino as ov
        ov_version = ov.get_version()
    except ImportError:
        ov_version = "not installed"
    text += (f"- cpu flags: {flags}\n- openvino: {ov_version}\n"
             f"- load average at start (1, 5, 15 min): {load[0]:.2f} {load[1]:.2f} "
             f"{load[2]:.2f}; at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n"
             f"- rounds {args.rounds}, about {args.seconds} s each, variants interleaved\n\n")
    text += ("Median ms per call (float32 in, float32 out). ov/bf16: OpenVINO's time over "
             "fxopt-bf16's (above 1: fxopt faster).\n\n")
    text += "| model | bs | threads | " + " | ".join(cols) + " | ov/bf16 |\n"
    text += "|---" * (len(cols) + 4) + "|\n"
    for name, bs, threads, ms, _, _ in rows:
        ratio = (f"{ms['openvino'] / ms['fxopt-bf16']:.2f}"
                 if "openvino" in ms and "fxopt-bf16" in ms else "")
        text += (f"| {name} | {bs} | {threads} | "
                 + " | ".join(f"{ms[c]:.2f}" if c in ms else "-" for c in cols)
                 + f" | {ratio} |\n")
    text += "\nRel err against the float32 eager model (first batch size and thread count):\n\n"
    text += "| model | " + " | ".join(cols) + " | openvino precision |\n"
    text += "|---" * (len(cols) + 2) + "|\n"
    for name, _, _, _, errs, prec in rows:
        if errs:
            text += (f"| {name} | " + " | ".join(f"{errs[c]:.1e}" if c in errs else "-"
                                                 for c in cols) + f" | {prec} |\n")
    if notes:
        text += "\nNotes:\n\n" + "".join(f"- {n}\n" for n in dict.fromkeys(notes))
    return text


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--seconds", type=float, default=0.3, help="about how long a round lasts")
    p.add_argument("--out", default=None, help="output .md ('-': print only)")
    args = p.parse_args(argv)
    want = set(args.variants) - ({"compile-bf16"} if args.no_compile else set())
    cols = [v for v in VARIANTS if v in want]
    notes: list[str] = []
    rows = []
    load = os.getloadavg()
    for name in args.models:
        model = _build(name)
        for mod in model.modules():  # vit_b_16's head starts at zero: its output would be 0
            if isinstance(mod, torch.nn.Linear) and not mod.weight.any():
                torch.nn.init.normal_(mod.weight, std=0.02)
                notes.append(f"{name}: a zero-initialized Linear re-initialized (normal, 0.02)")
        x1 = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        built = _variants(name, model, x1, want, notes)
        for bs in args.batch_sizes:
            x = torch.randn(bs, 3, 224, 224, generator=torch.Generator().manual_seed(1))
            for threads in args.threads:
                torch.set_num_threads(threads)
                fns = dict(built)
                if "openvino" in fns:
                    fns["openvino"] = _OpenVINO(built["openvino"], threads)
                errs = {}
                if bs == args.batch_sizes[0] and threads == args.threads[0]:
                    with torch.inference_mode():
                        ref = model(x)
                        errs = {k: _rel_err(f(x), ref) for k, f in fns.items()}
                ms = _median_ms(fns, x, args.rounds, args.seconds)
                ov = fns.get("openvino")
                rows.append((name, bs, threads, ms, errs,
                             ov.precision if ov is not None else ""))
                print(name, bs, threads, {k: round(v, 2) for k, v in ms.items()}, flush=True)
            if args.out != "-":  # the figures so far, in case the run is cut short
                Path(args.out or "/tmp/cpu-bf16-partial.md").write_text(
                    _render(rows, cols, notes, args, load))
    text = _render(rows, cols, notes, args, load)
    write_result(text, args.out, "cpu-bf16")
    return text


if __name__ == "__main__":
    main()
