"""Latency measured the way a noisy shared machine needs: interleaved rounds, medians.

    >>> (before, after), rounds = measure_latency([model, opt], x)
"""
from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["measure_latency"]


def measure_latency(models: Sequence[nn.Module], inputs: torch.Tensor, *, warmup: int = 3,
                    max_runs: int = 50, budget_s: float = 2.0,
                    calls: int = 1) -> tuple[list[float], int]:
    """Median seconds per call of each model on ``inputs``, and the number of timed rounds.

    The models take turns within each round, so a burst of load on a shared machine hits all
    of them alike rather than whichever happened to be timed then. Stops after ``max_runs``
    rounds or once ``budget_s`` is spent (at least 5 rounds), so a big model costs seconds
    (``budget_s=math.inf``: exactly ``max_runs`` rounds). ``calls``: back-to-back calls a model
    makes in each round, timed together (a round's figure is their mean), for models so fast
    that one call is near the timer's resolution. ``warmup``: untimed calls of each model first.
    """
    cuda = inputs.is_cuda

    def once(model) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            model(inputs)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / calls

    times: list[list[float]] = [[] for _ in models]
    with torch.no_grad():
        for _ in range(warmup):
            for m in models:
                once(m)
        start = time.perf_counter()
        rounds = 0
        while rounds < max_runs and (rounds < 5 or time.perf_counter() - start < budget_s):
            for m, ts in zip(models, times):
                ts.append(once(m))
            rounds += 1
    return [statistics.median(ts) for ts in times], rounds
