"""The command line's pipeline progress bar: a pass-manager instrument driving a rich bar.

    >>> bar = pipeline_progress(console)
    >>> fxopt.optimize(model, x, instruments=[ProgressInstrument(bar, manage=True)])
"""
from __future__ import annotations

from fxopt.infra.manager import Instrument
from fxopt.infra.registry import PassGroup

__all__ = ["ProgressInstrument", "pipeline_progress"]


class ProgressInstrument(Instrument):
    """Advances a rich progress bar once per pass run.

    A group runs its members until nothing changes, so the number of runs is known only at the
    end: the bar starts at one run per pass and grows when a group iterates again.
    ``manage=True``: the instrument starts the ``rich.progress.Progress`` when the pipeline starts
    and stops it at the end (the caller still stops it on errors), so nothing is drawn when
    ``optimize`` fails before running a pass.
    """

    def __init__(self, progress, description: str = "optimizing", manage: bool = False):
        self.progress = progress
        self.description = description
        self.manage = manage
        self.task = None

    def on_start(self, steps):
        total = sum(len(s.members) if isinstance(s, PassGroup) else 1 for s in steps)
        self.task = self.progress.add_task(self.description, total=max(total, 1))
        if self.manage:
            self.progress.start()

    def before_pass(self, name, gm):
        self.progress.update(self.task, description=f"{self.description}: {name}")

    def after_pass(self, name, gm, record):
        task = self.progress.tasks[self._index()]
        if task.completed + 1 > (task.total or 0):
            self.progress.update(self.task, total=task.completed + 1)
        self.progress.update(self.task, advance=1)

    def on_end(self, report):
        task = self.progress.tasks[self._index()]
        self.progress.update(self.task, completed=task.total,
                             description=f"{self.description}: done")
        if self.manage:
            self.progress.stop()

    def _index(self) -> int:
        return next(i for i, t in enumerate(self.progress.tasks) if t.id == self.task)


def pipeline_progress(console):
    """A rich progress bar for one pipeline run (transient on a terminal)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    return Progress(TextColumn("{task.description}", markup=False), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                    transient=console.is_terminal)
