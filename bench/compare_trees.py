"""One benchmark, two fxopt trees, alternating runs: does a refactoring keep the figures?

Runs ``bench/<script>`` (with ``--out -``, which prints its markdown tables) under a "before"
and an "after" fxopt, alternately, ``--repeats`` times each, and writes one table per bench
table: every numeric cell as the median of the before runs, the median of the after runs and
their ratio. The two trees run in separate processes (one import of ``fxopt`` each), one after
the other, so a slow spell on a shared machine hits both; the load average is in the header.

    # the tree before, installed without dependencies into a folder:
    pip install --no-deps --target /tmp/before_site <checkout of the old commit>
    python bench/compare_trees.py --before /tmp/before_site --repeats 3 \\
        -- models.py --models resnet18 --batches 1 --rounds 20

``--before`` / ``--after``: a folder put first on ``PYTHONPATH`` (a ``pip install --target``
of that tree), or ``installed`` for the fxopt this Python imports (the default for
``--after``). The new tree runs this checkout's bench script; the old one too, unless
``--before-bench`` names the old checkout's ``bench/`` (when the script imports modules that
moved between the two).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header, write_result  # noqa: E402

__all__ = ["main"]

HERE = Path(__file__).resolve().parent


def _run(site: str, bench: Path, script_args: list[str]) -> str:
    env = dict(os.environ)
    if site != "installed":
        env["PYTHONPATH"] = site + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(bench / script_args[0]), *script_args[1:], "--out", "-"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd="/tmp")
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done.stdout


def _tables(text: str) -> list[list[list[str]]]:
    """Markdown tables in ``text``: lists of rows of cells (the separator row dropped)."""
    tables, cur = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                cur.append(cells)
        elif cur:
            tables.append(cur)
            cur = []
    if cur:
        tables.append(cur)
    return tables


def _number(cell: str) -> float | None:
    text = cell.split(" ")[0].rstrip("x%")
    try:
        return float(text)
    except ValueError:
        return None


def _merge(runs_before: list, runs_after: list) -> list[str]:
    out = []
    for t, table in enumerate(runs_before[0]):
        head = table[0]
        out += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r, row in enumerate(table[1:], 1):
            cells = []
            for c, cell in enumerate(row):
                before = [_number(run[t][r][c]) for run in runs_before]
                after = [_number(run[t][r][c]) for run in runs_after]
                if c == 0 or None in before or None in after or not before or \
                        head[c] in ("batch", "load") and len(set(before + after)) == 1:
                    cells.append(cell)  # a key or a label: the same in every run
                    continue
                b, a = statistics.median(before), statistics.median(after)
                ratio = f" ({a / b:.2f})" if b else ""
                cells.append(f"{b:.4g} -> {a:.4g}{ratio}")
            out.append("| " + " | ".join(cells) + " |")
    return out


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="folder of the old tree, or 'installed'")
    p.add_argument("--after", default="installed", help="folder of the new tree, or 'installed'")
    p.add_argument("--before-bench", default=str(HERE),
                   help="the bench/ folder whose script the old tree runs (its own checkout's, "
                        "when the scripts import modules that moved; default: this one)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="markdown file ('-': print only)")
    p.add_argument("script", nargs=argparse.REMAINDER, help="-- <bench script> [its arguments]")
    args = p.parse_args(argv)
    script = [a for a in args.script if a != "--"]
    if not script:
        p.error("give the bench script after --")
    before, after = [], []
    for i in range(args.repeats):
        for site, bench, runs in ((args.before, Path(args.before_bench), before),
                                  (args.after, HERE, after)):
            runs.append(_tables(_run(site, bench, script)))
            print(f"[{i + 1}/{args.repeats}] {'before' if runs is before else 'after'} done "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    if {len(r) for r in before + after} != {len(before[0])}:
        raise SystemExit("the runs printed different tables; compare them by hand")
    lines = [header(f"Before/after: bench/{script[0]}"),
             f"Each numeric cell: median of {args.repeats} runs of the old tree -> median of "
        f"{args.repeats} runs of the new tree (new/old). Runs alternate old, new, old, new, in "
        f"separate processes. Old: `{args.before}`; new: `{args.after}`. 1-minute load at the "
        f"end: {os.getloadavg()[0]:.1f}.", *_merge(before, after)]
    text = "\n".join(lines) + "\n"
    write_result(text, args.out, f"compare-{Path(script[0]).stem}")
    return text


if __name__ == "__main__":
    main()
