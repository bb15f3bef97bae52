"""A rich progress bar over rounds: round, accuracy, loss, elapsed time."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

# One console for the progress bar and the log handler, so log lines print above the bar
CONSOLE = Console()


class RoundProgress:
    """Progress over rounds; ``enabled=False`` makes every call a no-op (tests, benches)."""

    def __init__(self, total: int, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(),
            TextColumn("acc {task.fields[acc]}"), TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(), console=console or CONSOLE, transient=False,
        ) if enabled else None
        self._task = None
        self.total = total

    def __enter__(self) -> RoundProgress:
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task("rounds", total=self.total, acc="-", loss="-")
        return self

    def advance_to(self, completed: int, accuracy: float | None, loss: float | None) -> None:
        if self._progress is None:
            return
        fields = {}
        if accuracy is not None:
            fields["acc"] = f"{accuracy:.4f}"
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        self._progress.update(self._task, completed=completed, **fields)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
