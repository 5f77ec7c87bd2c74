"""Rich progress bars for stages and training loops; a no-op when --quiet."""

from __future__ import annotations

from typing import Any


class Progress:
    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._bar: Any = None
        if not quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("{task.fields[info]}"), transient=True)

    def __enter__(self) -> Progress:
        if self._bar:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar:
            self._bar.stop()

    def add(self, label: str, total: int) -> Any:
        return self._bar.add_task(label, total=total, info="") if self._bar else None

    def advance(self, task: Any, n: int = 1, loss: float | None = None) -> None:
        if self._bar and task is not None:
            self._bar.update(task, advance=n, info="" if loss is None else f"loss {loss:.4f}")

    def done(self, task: Any) -> None:
        if self._bar and task is not None:
            self._bar.remove_task(task)

    def log(self, message: str) -> None:
        if not self.quiet:
            from rich.console import Console

            (self._bar.console if self._bar else Console(stderr=True)).print(message)

    def warn(self, message: str) -> None:
        """A failure as it happens (stderr; the end-of-run summary repeats it even with --quiet)."""
        if not self.quiet:
            from rich.console import Console
            from rich.markup import escape

            (self._bar.console if self._bar else Console(stderr=True)).print(f"[red]{escape(message)}[/red]")
