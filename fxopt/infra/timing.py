"""Timing candidates against each other: what ``target="best"`` and the CPU lowering's
``cpu_engine="fastest"`` decide by."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from fxopt.ir.check import clone_inputs

__all__ = ["measure", "PAUSE_S"]

PAUSE_S = 0.02  # measure(): the wait before each candidate's turn


def measure(candidates: dict[str, Callable], inputs: tuple, *, repeats: int = 5,
            warmup: int = 2, pause: float = PAUSE_S) -> dict[str, float]:
    """Median milliseconds per call of each candidate on ``inputs``, without gradients. The
    candidates take turns (so load on the machine falls on all alike); in its turn a candidate
    waits ``pause`` seconds, is called once untimed and then once timed, so the timed call is
    a back-to-back call of its runtime, not one sharing the cores with the spinning threads of
    the runtime before it (``fxopt.export.engines``' docstring), which could keep the cpu path
    where OpenVINO is faster."""
    times: dict[str, list[float]] = {k: [] for k in candidates}
    with torch.no_grad():
        for i in range(warmup + repeats):
            for key, fn in candidates.items():
                if pause > 0:
                    time.sleep(pause)
                fn(*clone_inputs(inputs))  # the untimed call of its turn
                args = clone_inputs(inputs)
                t0 = time.perf_counter()
                fn(*args)
                if i >= warmup:
                    times[key].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}
