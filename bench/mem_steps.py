"""Where ``fxopt.optimize`` holds copies of the weights (issue 15: peak memory of int8 on the
largest models), step by step.

At the entry and exit of each step (the model copy, capture, every pass, and inside
``quantize_int8``: calibration, bias correction, the sensitivity fallback, the plan, the
simulated reference, the rewrite, the measurements; the int8 lowering's reference) it records
the bytes of the distinct tensor storages alive (every tensor the garbage collector can reach,
deduplicated by storage pointer: deterministic, whatever the allocator keeps), in units of the
model's own weights, and the peak resident memory during the step (a thread sampling
/proc/self/status every 5 ms; with ``MALLOC_MMAP_THRESHOLD_`` set so freed tensors go back).

    MALLOC_MMAP_THRESHOLD_=65536 python bench/mem_steps.py --model regnet_y_16gf --mode int8
"""
from __future__ import annotations

import argparse
import functools
import gc
import threading
import time
from pathlib import Path

import torch

__all__ = ["main", "live_storage_bytes"]


def live_storage_bytes() -> int:
    """Bytes of the distinct CPU tensor storages reachable by the garbage collector."""
    gc.collect()
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    seen: dict[int, int] = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and not o.is_meta and o.device.type == "cpu":
            try:
                s = o.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
    return sum(seen.values())


def _rss() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0.0


class Tracker:
    def __init__(self, unit: float):
        self.unit, self.rows, self.peak, self.stack = unit, [], 0.0, []
        self.stop = False
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while not self.stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def enter(self, label):
        self.stack.append((label, live_storage_bytes(), self.peak))
        self.peak = _rss()

    def exit(self):
        label, live0, outer_peak = self.stack.pop()
        live1 = live_storage_bytes()
        peak = max(self.peak, _rss())
        self.rows.append(("  " * len(self.stack) + label, live0 / self.unit, live1 / self.unit,
                          peak / 2**30))
        self.peak = max(outer_peak, peak)

    def wrap(self, owner, name, label=None):
        fn = getattr(owner, name)
        tracker = self

        @functools.wraps(fn)
        def wrapped(*a, **k):
            tracker.enter(label or name)
            try:
                return fn(*a, **k)
            finally:
                tracker.exit()
        setattr(owner, name, wrapped)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="regnet_y_16gf", help="a torchvision model name")
    ap.add_argument("--mode", default="int8", choices=["default", "prune", "int8"])
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import torchvision

    import fxopt
    import fxopt.api as api
    import fxopt.passes.lower.cpu as lower_cpu
    import fxopt.passes.quant.quantize as qz
    from fxopt.infra import manager

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    size = args.size if not args.model.startswith("vit_h") else 224
    x = torch.randn(1, 3, size, size)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    t = Tracker(weights)
    for name in ("copy_model", "capture_with"):
        t.wrap(api, name)
    for name in ("calibrate", "bias_corrections", "fallback", "make_plan", "simulated_copy",
                 "outputs", "decompose_attention", "smooth_layernorms"):
        t.wrap(qz, name, "quantize_int8: " + name)
    t.wrap(qz.Writer, "run", "quantize_int8: Writer.run")
    t.wrap(lower_cpu.LockstepReference, "forward", "lower_int8_cpu: lockstep run")
    orig_run_pass = manager.PassManager._run_pass

    def run_pass(self, name, *a, **k):
        t.enter(f"pass {name}")
        try:
            return orig_run_pass(self, name, *a, **k)
        finally:
            t.exit()
    manager.PassManager._run_pass = run_pass
    kw = {"default": {}, "prune": {"prune": 0.5},
          "int8": {"quantize": "int8", "calibration_data": [x]}}[args.mode]
    t.enter("optimize")
    opt = fxopt.optimize(model, x, **kw)
    t.exit()
    t.stop = True
    print(f"{args.model} {args.mode}: weights {weights / 2**30:.3f} GB; live storages in units "
          f"of the weights (the user's model is 1.0), peak RSS in GB during the step")
    print(f"{'step':58s} {'live in':>8s} {'live out':>8s} {'peak RSS':>8s}")
    for label, a, b, p in t.rows:
        print(f"{label[:58]:58s} {a:8.2f} {b:8.2f} {p:8.2f}")
    del opt
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
