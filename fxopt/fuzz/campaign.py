"""A fuzz campaign: many seeds, in worker processes, then a summary and minimized repros.

    >>> summary = run_campaign(range(1000), checks=CHECKS, jobs=2)
    >>> print(format_summary(summary))

Each worker runs with ``torch.set_num_threads(1)`` (a campaign is parallel over graphs, not
inside one). Failures are grouped by signature (``fxopt.fuzz.minimize.signature``); the first
seed of each group is minimized into a standalone reproduction.
"""
from __future__ import annotations

import multiprocessing as mp
import platform
import re
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import torch

from fxopt.fuzz.grammar import generate
from fxopt.fuzz.minimize import minimize, reproduction, signature
from fxopt.fuzz.oracle import CHECKS, FAILURES, OUTCOMES, CheckResult, check_network
from fxopt.infra.progress import progress

__all__ = ["Summary", "run_campaign", "format_summary", "fuzz_one", "minimize_one"]


@dataclass
class Summary:
    seeds: list[int]
    checks: tuple[str, ...]
    exclude: tuple[str, ...]
    jobs: int
    seconds: float = 0.0
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # check -> outcome -> n
    ok_kinds: dict[str, dict[str, int]] = field(default_factory=dict)  # check -> what ok said
    failures: dict[str, list[int]] = field(default_factory=dict)  # signature -> seeds
    refusals: dict[str, list[int]] = field(default_factory=dict)  # reason -> seeds
    details: dict[str, str] = field(default_factory=dict)  # signature -> first detail
    repros: dict[str, str] = field(default_factory=dict)  # signature -> source
    machine: str = ""
    torch: str = ""

    @property
    def n_failures(self) -> int:
        return sum(len(v) for v in self.failures.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["seeds"] = [min(self.seeds), max(self.seeds)] if self.seeds else []
        return d


def _init_worker() -> None:
    torch.set_num_threads(1)


def fuzz_one(args: tuple[int, tuple[str, ...], tuple[str, ...]]) -> tuple[int, list[CheckResult]]:
    seed, checks, exclude = args
    return seed, check_network(generate(seed, exclude=exclude), checks).checks


def minimize_one(args: tuple[int, str, tuple[str, ...], CheckResult]) -> str:
    seed, check, exclude, result = args
    small = minimize(generate(seed, exclude=exclude), check, result)
    return reproduction(small, check, result)


def _kind(detail: str) -> str:
    """What an ``ok`` said, without its numbers ("nothing pruned", "params", "bitwise: float")."""
    return re.split(r"\s[\d(]", detail, maxsplit=1)[0].strip(" :-") or "ok"


def _key(sig: tuple[str, str, str]) -> str:
    return " | ".join(s for s in sig if s)


def run_campaign(seeds: Iterable[int], *, checks: Sequence[str] = CHECKS,
                 exclude: Sequence[str] = (), jobs: int = 1, max_repros: int = 8,
                 describe: str = "fuzzing") -> Summary:
    """Check every seed; group the failures; minimize the first seed of each group."""
    seeds = list(seeds)
    checks, exclude = tuple(checks), tuple(exclude)
    summary = Summary(seeds, checks, exclude, jobs, machine=platform.processor() or
                      platform.machine(), torch=torch.__version__)
    counts: dict[str, Counter] = {c: Counter() for c in checks}
    ok_kinds: dict[str, Counter] = {c: Counter() for c in checks}
    first: dict[str, tuple[int, str, CheckResult]] = {}
    failures: dict[str, list[int]] = defaultdict(list)
    refusals: dict[str, list[int]] = defaultdict(list)
    work = [(s, checks, exclude) for s in seeds]
    t0 = time.perf_counter()
    pool = ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"),
                               initializer=_init_worker) if jobs > 1 else None
    try:
        results = pool.map(fuzz_one, work, chunksize=4) if pool else map(fuzz_one, work)
        for seed, res in progress(results, describe, total=len(work)):
            for r in res:
                counts[r.check][r.outcome] += 1
                if r.outcome == "ok":
                    ok_kinds[r.check][_kind(r.detail)] += 1
                if r.outcome in FAILURES:
                    key = _key(signature(r))
                    failures[key].append(seed)
                    first.setdefault(key, (seed, r.check, r))
                elif r.outcome == "refused":
                    refusals[f"{r.check}: {r.detail[:90]}"].append(seed)
        summary.seconds = time.perf_counter() - t0
        todo = list(first.items())[:max_repros]
        args = [(seed, check, exclude, r) for _, (seed, check, r) in todo]
        repros = pool.map(minimize_one, args) if pool else map(minimize_one, args)
        for (key, _), src in progress(zip(todo, repros), "minimizing", total=len(todo)):
            summary.repros[key] = src
    finally:
        if pool:
            pool.shutdown()
    summary.counts = {c: {o: counts[c][o] for o in OUTCOMES if counts[c][o]} for c in checks}
    summary.ok_kinds = {c: dict(ok_kinds[c].most_common()) for c in checks}
    summary.failures = dict(failures)
    summary.refusals = dict(refusals)
    summary.details = {k: v[2].detail for k, v in first.items()}
    return summary


def format_summary(s: Summary, repros: bool = True) -> str:
    n = len(s.seeds)
    lines = [f"fxopt.fuzz: {n} graphs (seeds {min(s.seeds)}..{max(s.seeds)}), checks "
             f"{','.join(s.checks)}, jobs {s.jobs}, {s.seconds:.0f} s "
             f"({s.seconds * s.jobs / max(n, 1):.2f} s per graph per worker)"
             if n else "fxopt.fuzz: no graphs"]
    if s.exclude:
        lines.append(f"excluded features: {', '.join(s.exclude)}")
    for check, outcomes in s.counts.items():
        lines.append(f"  {check:8s} " + "  ".join(f"{o} {k}" for o, k in outcomes.items()))
        kinds = s.ok_kinds.get(check, {})
        if len(kinds) > 1:
            lines.append(" " * 11 + "ok: " + ", ".join(f"{k} {n}" for k, n in kinds.items()))
    if s.refusals:
        lines.append("refusals (typed, with a hint):")
        for why, seeds in sorted(s.refusals.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"  {len(seeds):5d}  {why}  (seeds {_seeds(seeds)})")
    if s.failures:
        lines.append(f"FAILURES: {s.n_failures}")
        for key, seeds in sorted(s.failures.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"  {len(seeds):5d}  {key}  (seeds {_seeds(seeds)})")
            lines.append(f"         {s.details.get(key, '')[:200]}")
        if repros:
            for key, src in s.repros.items():
                lines += ["", f"---- minimized reproduction: {key}", src]
    else:
        lines.append("no failures")
    return "\n".join(lines)


def _seeds(seeds: list[int], most: int = 12) -> str:
    shown = ", ".join(map(str, seeds[:most]))
    return shown + (f", ... ({len(seeds)})" if len(seeds) > most else "")
