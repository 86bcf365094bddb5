"""Progress bars for long work (training, encoding, scoring), one style everywhere."""

from __future__ import annotations

import math
from collections.abc import Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateAndLossColumn(ProgressColumn):
    """Items per second, and the task's `loss` field when it is set (training)."""

    def render(self, task: Task) -> Text:
        rate = f"{task.speed:,.0f}/s" if task.speed else "-/s"
        loss = task.fields.get("loss")
        if loss is not None and not math.isnan(loss):
            return Text(f"{rate}  loss {loss:.3f}", style="cyan")
        return Text(rate, style="cyan")


def progress_bar(console: Console, transient: bool = False) -> Progress:
    """A rich progress bar: description, bar, done/total, rate (+ loss), elapsed and remaining."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateAndLossColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )


def stage_bars(progress: Progress, prefix: str = "") -> Callable[[str, int, int], None]:
    """A `(stage, done, total)` callback that keeps one bar per stage of `progress`."""
    tasks: dict[str, int] = {}

    def advance(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(prefix + stage, total=total)
        progress.advance(tasks[stage], done)

    return advance
