"""Progress on stderr, never on stdout (stdout holds the result: `bench run > out.txt` keeps only the summary).

Two levels:
- `Progress`: the per-stage bars the runner, the training loop and attacks draw (add / advance / done / log / warn).
- `RunProgress`: the whole run - stages done / total, cached vs computed, elapsed and an estimate of what is left,
  and what each worker is doing. Worker processes cannot draw on the parent's terminal, so they send events
  (`RemoteProgress`, and `ObservedStore` for every stage lookup) that the parent applies to one `RunState` and
  renders.

Three modes, chosen once: `rich` (stderr is a terminal: live bars, redrawn in place), `plain` (a pipe or a CI log:
one line per finished task, and a status line every `interval` seconds when nothing else was printed - never
carriage returns), `quiet` (-q: nothing). Display settings never reach a stage key: they live only here.

The run-level total is an estimate made from the plan before anything runs (execute.estimate_stages: store
lookups per task, counting the shared stages every task looks up); each task's share is replaced by its actual count
when it finishes, so the total converges on the truth. What is left is the remaining stages at the average pace so
far (elapsed / stages done), which is what a mix of cached and computed stages allows.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from unlearn_bench.run_state import RunState, duration
from unlearn_bench.store import Store

Event = tuple[Any, ...]  # (kind, worker, *payload); worker 0 is the parent process itself
_PRINT_LOCK = threading.Lock()


def detect_mode(quiet: bool = False) -> str:
    """quiet, rich (stderr is an interactive terminal) or plain (anything else: pipes, files, CI logs)."""
    if quiet:
        return "quiet"
    from rich.console import Console

    console = Console(stderr=True)
    return "rich" if console.is_terminal and not console.is_dumb_terminal else "plain"


def plain_text(message: str) -> str:
    """A log message without rich markup ("[bold]tiny[/bold]" -> "tiny"); unparseable markup stays as it is."""
    try:
        from rich.text import Text

        return Text.from_markup(message).plain
    except Exception:  # noqa: BLE001 - a message with brackets that are not markup
        return message


def print_line(text: str) -> None:
    """One whole line on stderr, flushed (threads print whole lines, never interleaved halves)."""
    with _PRINT_LOCK:
        print(text, file=sys.stderr, flush=True)


class Progress:
    """Per-stage bars (rich mode), plain log lines (plain mode), or nothing (quiet)."""

    def __init__(self, quiet: bool = False, mode: str | None = None) -> None:
        self.mode = "quiet" if quiet else (mode or detect_mode())
        self.quiet = self.mode == "quiet"
        self._bar: Any = None
        if self.mode == "rich":
            self._bar = _rich_progress()

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
        if self._bar:
            self._bar.console.print(message)
        elif not self.quiet:
            print_line(plain_text(message))

    def warn(self, message: str) -> None:
        """A failure as it happens (stderr; the end-of-run summary repeats it even with --quiet)."""
        if self._bar:
            from rich.markup import escape

            self._bar.console.print(f"[red]{escape(message)}[/red]")
        elif not self.quiet:
            print_line(message)


def _rich_progress() -> Any:
    """Rich bars on stderr that fit 80 columns: description and info cut with '…' instead of wrapping."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as RichProgress
    from rich.table import Column

    return RichProgress(
        TextColumn("{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis", max_width=30)),
        BarColumn(bar_width=10), MofNCompleteColumn(table_column=Column(no_wrap=True, min_width=5)),
        TimeElapsedColumn(table_column=Column(no_wrap=True, min_width=7)),
        TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
        console=Console(stderr=True), transient=True)


class RemoteProgress(Progress):
    """The Progress API inside a worker process: bars and messages become events for the parent (bar updates at
    most every `every_s` seconds, so a fast loop does not flood the pipe)."""

    def __init__(self, send: Callable[..., None], every_s: float = 0.5) -> None:
        super().__init__(quiet=True)
        self.mode, self.quiet = "remote", False
        self.send, self.every_s = send, every_s
        self._bars: dict[int, list[Any]] = {}  # id -> [label, completed, total, last sent]
        self._next = 0

    def add(self, label: str, total: int) -> Any:
        self._next += 1
        self._bars[self._next] = [label, 0, total, time.monotonic()]
        self.send("bar", label, 0, total, "")
        return self._next

    def advance(self, task: Any, n: int = 1, loss: float | None = None) -> None:
        bar = self._bars.get(task)
        if bar is None:
            return
        bar[1] += n
        now = time.monotonic()
        if now - bar[3] >= self.every_s or bar[1] >= bar[2]:
            bar[3] = now
            self.send("bar", bar[0], bar[1], bar[2], "" if loss is None else f"loss {loss:.4f}")

    def done(self, task: Any) -> None:
        bar = self._bars.pop(task, None)
        if bar is not None:
            self.send("bardone", bar[0])

    def log(self, message: str) -> None:
        self.send("log", message[:2000])

    def warn(self, message: str) -> None:
        self.send("warn", message[:2000])


@dataclass
class ObservedStore(Store):
    """The store, telling an observer about every stage lookup: ("stage", name) before, then ("staged", name,
    cached) or ("stagefail", name). What a stage IS (its key, its bytes) does not change."""

    observer: Callable[..., None] | None = field(default=None, repr=False, compare=False)

    def get_or_compute(self, stage: str, inputs: dict[str, Any], compute: Callable[..., dict[str, Any]]) -> Any:
        if self.observer is None:
            return super().get_or_compute(stage, inputs, compute)
        self.observer("stage", stage)
        try:
            entry = super().get_or_compute(stage, inputs, compute)
        except BaseException:  # failed, interrupted, or not cached (a probe): the stage is left either way
            self.observer("stagefail", stage)
            raise
        self.observer("staged", stage, entry.cached)
        return entry


class RunProgress:
    """Whole-run progress in the parent: applies events (its own, or forwarded by workers) to a RunState and
    renders it in the chosen mode. Thread-safe: workers' events, results and the plain-mode clock may interleave."""

    def __init__(self, state: RunState, quiet: bool = False, interval: float = 30.0, mode: str | None = None,
                 worker_rows: bool = True) -> None:
        self.state = state
        self.stages = Progress(quiet=quiet, mode=mode)  # stage bars (rich) and log lines
        self.mode = self.stages.mode
        # what the in-process runner draws on: the stage bars on a terminal; in plain mode its bars only feed the
        # status lines (as a worker's do)
        self.runner_progress: Progress = self.stages if self.mode != "plain" else \
            RemoteProgress(lambda kind, *payload: self.handle((kind, 0, *payload)), every_s=0.0)
        self.interval = interval
        self.worker_rows = worker_rows
        self._lock = threading.RLock()
        self._rows: dict[int, Any] = {}
        self._overall: Any = None
        self._last_line = time.monotonic()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    # --- lifetime -----------------------------------------------------------------------------------------------
    def __enter__(self) -> RunProgress:
        self.stages.__enter__()
        bar = self.stages._bar
        if bar is not None:
            self._overall = bar.add_task("stages", total=max(1, self.state.total()), info="")
            self._refresh_overall()
        if self.mode == "rich" or (self.mode == "plain" and self.interval > 0):
            self._ticker = threading.Thread(target=self._tick, name="progress-ticker", daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
        self.stages.__exit__(*exc)

    def _tick(self) -> None:
        """The clock: a rich display's time left moves on between events; a plain log gets a status line (and what
        each worker does) when nothing was printed for `interval` seconds, so a long stage still shows life."""
        while not self._stop.wait(1.0 if self.mode == "rich" else min(1.0, self.interval)):
            with self._lock:
                if self.mode == "rich":
                    self._refresh_overall()
                elif time.monotonic() - self._last_line >= self.interval:
                    self._line(self.state.status_line())
                    for text in self.state.worker_lines():
                        print_line(f"  {text}")

    def _line(self, text: str) -> None:
        self._last_line = time.monotonic()
        print_line(text)

    # --- input ------------------------------------------------------------------------------------------------
    def observer(self, worker: int = 0) -> Callable[..., None]:
        """An ObservedStore observer for stages run in this process (as worker `worker`)."""
        return lambda kind, *payload: self.handle((kind, worker, *payload))

    def task_started(self, task: tuple[int, int, int], worker: int = 0) -> None:
        self.handle(("start", worker, task))

    def handle(self, event: Event) -> None:
        """Apply one event and show what it changes."""
        kind, worker = event[0], event[1]
        with self._lock:
            self.state.apply(event)
            if self.mode == "quiet":
                return
            if kind == "ready" and self.mode == "plain":
                self._line(f"w{worker} started on {event[2]} (pid {event[3]})")
            elif kind == "log":
                self.stages.log(f"w{worker}: {event[2]}" if worker else event[2])
            elif kind == "warn":
                self.stages.warn(f"w{worker}: {event[2]}" if worker else event[2])
            if self.mode == "rich":
                self._refresh_overall()
                if self.worker_rows and kind in ("ready", "start", "end", "stage", "staged", "stagefail", "bar",
                                                 "bardone"):
                    self._refresh_row(worker)

    def task_finished(self, task: tuple[int, int, int], counts: dict[str, int], failed: bool) -> None:
        """A task's result reached the parent: its actual stage counts replace its estimate."""
        with self._lock:
            worker = self.state.finish(task, counts, failed)
            if self.mode == "plain":
                who = f"w{worker} " if worker else ""
                verb = "FAILED" if failed else "finished"
                self._line(f"{self.state.status_line()} | {who}{verb} {self.state.labels.get(task, task)}")
            elif self.mode == "rich":
                self._refresh_overall()

    def log(self, message: str) -> None:
        with self._lock:
            self.stages.log(message)

    def warn(self, message: str) -> None:
        with self._lock:
            self.stages.warn(message)

    # --- rich rendering ---------------------------------------------------------------------------------------
    def _refresh_overall(self) -> None:
        bar, s = self.stages._bar, self.state
        if bar is None or self._overall is None:
            return
        done, total = s.done(), s.total()
        left = s.eta()
        info = f"{s.cached()} cached" + (f", ~{duration(left)} left" if left is not None else "")
        bar.update(self._overall, total=max(total, 1), completed=done, info=info,
                   description=f"stages ({s.tasks_done()}/{len(s.estimate)} tasks)")

    def _refresh_row(self, worker: int) -> None:
        bar = self.stages._bar
        w = self.state.workers.get(worker)
        if bar is None or w is None:
            return
        text = self.state.worker_text(worker, with_bar=False, stage_first=True)
        total = w.bar[2] if w.bar else None
        completed = w.bar[1] if w.bar else 0
        info = w.bar[3] if w.bar else ""
        if worker not in self._rows:
            self._rows[worker] = bar.add_task(text, total=total, info=info)
        bar.update(self._rows[worker], description=text, total=total, completed=completed, info=info)


__all__ = ["ObservedStore", "Progress", "RemoteProgress", "RunProgress", "RunState", "detect_mode", "plain_text"]
