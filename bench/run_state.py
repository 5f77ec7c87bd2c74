"""What a run has done so far, from progress events: the state `bench run` renders (bench/progress.py), kept apart
from any rendering so it is tested with a fake clock.

Counting: a "stage" is one store lookup (bench/store.py get_or_compute), cached or computed - the unit run.json's
`stages` tallies. A task (seed, method, attack) is estimated up front from the plan; while it runs its live count
is shown (and raises the total if it passes the estimate); when its result arrives its actual counts replace both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Task = tuple[int, int, int]


def duration(seconds: float) -> str:
    """0:42, 12:03, 1:02:03."""
    s = max(0, int(round(seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class WorkerState:
    """One worker: its device, the task it runs, the stages it is inside (nested: a metric's own cached stage runs
    inside its score stage), and the innermost bar it reported ([label, completed, total, info])."""

    device: str = ""
    task: Task | None = None
    stages: list[str] = field(default_factory=list)
    bar: list[Any] | None = None


class RunState:
    def __init__(self, estimate: dict[Task, int], labels: dict[Task, str],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.estimate = dict(estimate)
        self.labels = dict(labels)
        self.clock = clock
        self.started = clock()
        self.live: dict[Task, list[int]] = {}  # unfinished task -> [cached, computed] seen so far
        self.finished: dict[Task, tuple[int, int, bool]] = {}  # task -> (cached, computed, failed)
        self.owner: dict[Task, int] = {}  # task -> the worker that ran it
        self.workers: dict[int, WorkerState] = {}

    # --- events -----------------------------------------------------------------------------------------------
    def apply(self, event: tuple[Any, ...]) -> None:
        """(kind, worker, *payload): ready(device, pid), start(task), end(task), stage(name), staged(name, cached),
        stagefail(name), bar(label, completed, total, info), bardone(label), log(text), warn(text)."""
        kind, worker = event[0], int(event[1])
        w = self.workers.setdefault(worker, WorkerState())
        if kind == "ready":
            w.device = str(event[2])
        elif kind == "start":
            task = tuple(event[2])
            w.task, w.stages, w.bar = task, [], None  # type: ignore[assignment]
            self.owner[task] = worker  # type: ignore[index]
            if task not in self.finished:
                self.live.setdefault(task, [0, 0])  # type: ignore[arg-type]
        elif kind == "end":
            w.task, w.stages, w.bar = None, [], None
        elif kind == "stage":
            w.stages.append(str(event[2]))
            w.bar = None
        elif kind in ("staged", "stagefail"):
            if w.stages:
                w.stages.pop()
            w.bar = None
            if kind == "staged" and w.task is not None and w.task not in self.finished:
                self.live.setdefault(w.task, [0, 0])[0 if event[3] else 1] += 1
        elif kind == "bar":
            w.bar = [str(event[2]), int(event[3]), event[4], str(event[5])]
        elif kind == "bardone" and w.bar and w.bar[0] == event[2]:
            w.bar = None

    def finish(self, task: Task, counts: dict[str, int], failed: bool) -> int:
        """The task's result arrived with its store counts; returns the worker that ran it (0: this process or
        unknown)."""
        task = tuple(task)  # type: ignore[assignment]
        self.live.pop(task, None)
        self.finished[task] = (int(counts.get("cached", 0)), int(counts.get("computed", 0)), bool(failed))
        return self.owner.get(task, 0)

    # --- numbers ----------------------------------------------------------------------------------------------
    def cached(self) -> int:
        return sum(f[0] for f in self.finished.values()) + sum(v[0] for v in self.live.values())

    def computed(self) -> int:
        return sum(f[1] for f in self.finished.values()) + sum(v[1] for v in self.live.values())

    def done(self) -> int:
        return self.cached() + self.computed()

    def total(self) -> int:
        """Finished tasks' actual stages plus, for the others, the larger of their estimate and what they did."""
        unfinished = [t for t in self.estimate if t not in self.finished]
        return (sum(f[0] + f[1] for f in self.finished.values())
                + sum(max(self.estimate[t], sum(self.live.get(t, (0, 0)))) for t in unfinished))

    def tasks_done(self) -> int:
        return len(self.finished)

    def elapsed(self) -> float:
        return self.clock() - self.started

    def eta(self) -> float | None:
        """Seconds left at the average pace so far; None before the first stage or when nothing is left."""
        done, total = self.done(), self.total()
        if done == 0 or total <= done:
            return None
        return self.elapsed() * (total - done) / done

    # --- text -------------------------------------------------------------------------------------------------
    def status_line(self) -> str:
        """`[0:42] 3/4 tasks, stages 12/~16 (4 cached, 8 computed), ~0:14 left` ('~': the total is estimated)."""
        approx = "~" if len(self.finished) < len(self.estimate) else ""
        left = self.eta()
        return (f"[{duration(self.elapsed())}] {self.tasks_done()}/{len(self.estimate)} tasks, stages "
                f"{self.done()}/{approx}{self.total()} ({self.cached()} cached, {self.computed()} computed)"
                + (f", ~{duration(left)} left" if left is not None else ""))

    def worker_text(self, worker: int, with_bar: bool = True, stage_first: bool = False) -> str:
        """`w2: esd x none seed 0 - unlearn (unlearn esd 30/100)`; `now:` for this process; `idle` between tasks.
        stage_first: `w2 unlearn: esd x none seed 0` (for a narrow row that cuts the end off)."""
        w = self.workers.get(worker, WorkerState())
        name = f"w{worker}" if worker else "now"
        if w.task is None:
            return f"{name}: idle"
        label = self.labels.get(w.task, str(w.task))
        if stage_first:
            return f"{name} {w.stages[-1] if w.stages else 'task'}: {label}"
        text = f"{name}: {label}"
        if w.stages:
            text += f" - {w.stages[-1]}"
        if with_bar and w.bar:
            total = "?" if w.bar[2] is None else w.bar[2]
            text += f" ({w.bar[0]} {w.bar[1]}/{total})"
        return text

    def worker_lines(self) -> list[str]:
        """What each worker is doing (this process only while it runs a task)."""
        return [self.worker_text(w) for w in sorted(self.workers) if w or self.workers[w].task is not None]


__all__ = ["RunState", "Task", "WorkerState", "duration"]
