"""``python -m fxopt.fuzz --n N [--seed S] [--jobs J] [--checks ...] [--out results.json]``.

Runs a campaign over seeds S..S+N-1, prints the counts per check and outcome, the seeds of every
failure (grouped) and a minimized reproduction of each group; exits 1 when anything failed.
"""
from __future__ import annotations

import argparse
import json
import sys

from fxopt.fuzz.campaign import format_summary, run_campaign
from fxopt.fuzz.grammar import FEATURES
from fxopt.fuzz.oracle import CHECKS
from fxopt.infra.progress import set_enabled

__all__ = ["main"]


def _names(value: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = tuple(v for v in value.split(",") if v)
    bad = [v for v in names if v not in known]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {what} {bad}; choose from {', '.join(known)}")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fxopt.fuzz", description=(
        "fxopt's differential fuzzer: random eval-mode networks, each from its seed, checked "
        "against eager (default pipeline, pruning, int8, save/load, ONNX Runtime)"))
    p.add_argument("--n", type=int, default=100, help="number of graphs (default 100)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--checks", type=lambda v: _names(v, CHECKS, "checks"), default=CHECKS,
                   help=f"comma-separated, from {','.join(CHECKS)} (default: all)")
    p.add_argument("--exclude", type=lambda v: _names(v, FEATURES, "features"), default=(),
                   help=f"grammar features to leave out, from {','.join(FEATURES)}")
    p.add_argument("--max-repros", type=int, default=8,
                   help="failure groups to minimize (default 8; 0: none)")
    p.add_argument("--out", help="write the summary as JSON here")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.n < 1 or args.jobs < 1:
        p.error("--n and --jobs must be at least 1")
    set_enabled(False if args.no_progress else None)
    summary = run_campaign(range(args.seed, args.seed + args.n), checks=args.checks,
                           exclude=args.exclude, jobs=args.jobs, max_repros=args.max_repros)
    print(format_summary(summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**summary.to_dict(), "command": " ".join(["python -m fxopt.fuzz",
                                                                 *sys.argv[1:]])}, f, indent=1)
    return 1 if summary.n_failures else 0


if __name__ == "__main__":
    sys.exit(main())
