"""Progress bars for long work inside passes (calibration, sensitivity): rich, on stderr.

Shown only when stderr is a terminal (never in logs or tests), unless ``set_enabled`` says
otherwise; the command line's ``--no-progress`` turns them off.

    >>> for batch in progress(batches, "calibrating"):
    ...     run(batch)
"""
from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["progress", "set_enabled", "enabled"]

T = TypeVar("T")
_ENABLED: bool | None = None  # None: when stderr is a terminal


def set_enabled(value: bool | None) -> None:
    """True / False forces bars on / off; None restores the default (stderr is a terminal)."""
    global _ENABLED
    _ENABLED = value


def enabled() -> bool:
    return sys.stderr.isatty() if _ENABLED is None else _ENABLED


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """``items``, with a transient progress bar while they are consumed."""
    if not enabled():
        yield from items
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
