"""Latency as the CPU benchmarks measure it: variants interleaved round by round, medians.

A thin layer over ``fxopt.tools.latency.measure_latency`` that keys the figures by variant name and
picks how many back-to-back calls make a round (enough that a round lasts a set time).
"""
from __future__ import annotations

import math
import random
import time

import torch

from fxopt.tools.latency import measure_latency

__all__ = ["calls_per_round", "median_times", "turns"]


def calls_per_round(fn, x, seconds: float) -> int:
    """How many calls of ``fn(x)`` take about ``seconds`` (at least 1), from one timed call."""
    with torch.no_grad():
        t0 = time.perf_counter()
        fn(x)
        return max(1, int(seconds / max(time.perf_counter() - t0, 1e-6)))


def median_times(fns: dict, x, rounds: int, calls: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each variant over ``rounds`` interleaved rounds.

    In each round every variant makes ``calls`` back-to-back calls (timed together); ``warmup``
    untimed calls of each variant come first. Under ``torch.no_grad()``. ``x``: a tensor, or a
    tuple of them for models with several inputs (each variant is called as ``fn(*x)``).
    """
    models, first = list(fns.values()), x
    if isinstance(x, tuple):
        models, first = [lambda _, f=f, xs=x: f(*xs) for f in models], x[0]
    meds, _ = measure_latency(models, first, warmup=warmup, max_runs=rounds, budget_s=math.inf,
                              calls=calls)
    return dict(zip(fns, meds))


def turns(fns: dict, seconds: float, pause: float = 0.02) -> dict[str, list[float]]:
    """Seconds per call of each variant (``fns``: name -> a function of no arguments), round
    after round for about ``seconds`` (one round at least), the variants in a new random order
    each round, each timed call after a ``pause`` and one untimed call of the same variant.
    Round i of one variant sits beside round i of every other: paired comparisons count the
    rounds one won."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    end = time.time() + seconds
    while time.time() < end or not samples[next(iter(fns))]:
        for key in random.sample(list(fns), len(fns)):
            if pause:
                time.sleep(pause)
            fns[key]()
            t0 = time.perf_counter()
            fns[key]()
            samples[key].append(time.perf_counter() - t0)
    return samples
