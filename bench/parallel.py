"""Running a plan's tasks on several workers: one process per GPU (or N CPU processes), or Slurm via submitit.

Why this shape: every stage is already memoised in a store with per-key file locks, so workers need no scheduler
of their own. A task is (seed, method, attack); workers take tasks in the order given; two tasks that need the same
unlearned model or data set meet at that stage's lock, and the second reuses what the first wrote. Each finished
task comes back to the parent at once (so records.csv grows as cells finish) with its rows or its failure, and the
parent reassembles rows in canonical order, so records.csv is identical to a single-worker run at the same thread
count. Workers die with their parent (a killed `bench run` leaves no orphans computing). Clusters go through
submitit (an existing engine), not a home-made scheduler.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unlearn_bench.plan import Plan

Task = tuple[int, int, int]
TaskResult = tuple[Task, list[dict[str, Any]], dict[str, Any] | None, dict[str, int], list[tuple[str, str]]]

_RUNNER: Any = None  # the worker process's Runner (one model load per worker, reused by its tasks)
_EVENTS: Any = None  # the worker's progress channel to the parent (_Events)


class _Events:
    """A worker's progress events to the parent, over its own pipe: (kind, worker, *payload). A pipe per worker
    (not one shared queue) so a worker killed mid-send cannot leave a lock held that blocks the others; a send is
    synchronous, so every event of a task is in the pipe before the task's result is (the parent drains the pipes
    before it handles a result, so it attributes each stage to the right task). Progress is best-effort: a broken
    pipe only stops the events."""

    def __init__(self, conn: Any, worker: int) -> None:
        self.conn, self.worker = conn, worker

    def __call__(self, kind: str, *payload: Any) -> None:
        if self.conn is None:
            return
        try:
            self.conn.send((kind, self.worker, *payload))
        except (OSError, ValueError):
            self.conn = None


def die_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """Make this worker exit when its parent dies: the kernel's parent-death signal on Linux (immediate), and
    a polling thread everywhere (a reparented process sees its parent pid change)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before we got here
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _init_worker(plan: Plan, store_dir: str, code_version: str, run_id: str, devices: Any, batch_size: int,
                 threads: int, parent_pid: int, pipes: list[Any] | None = None) -> None:
    """Worker start-up: follow the parent's fate, leave Ctrl-C to the parent, load nothing until a stage needs it.
    `devices` hands out (worker number, device) pairs; worker N reports progress on pipes[N - 1]."""
    global _RUNNER, _EVENTS
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates the pool
    from unlearn_bench.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    worker, device = devices.get()
    from unlearn_bench.progress import ObservedStore, RemoteProgress
    from unlearn_bench.runner import Runner

    _EVENTS = _Events(pipes[worker - 1] if pipes else None, worker)
    store = ObservedStore(Path(store_dir), code_version=code_version, run_id=run_id, observer=_EVENTS)
    _RUNNER = Runner(plan, store, device=device, batch_size=batch_size, progress=RemoteProgress(_EVENTS),
                     threads=threads or None)
    _EVENTS("ready", device, os.getpid())


def _do_task(task: Task) -> TaskResult:
    """One task in a worker: its rows or failure, plus the store counts and entries it used."""
    _EVENTS("start", task)
    try:
        return _RUNNER.task_result(task)
    finally:
        _EVENTS("end", task)


def worker_threads(devices: list[str]) -> int:
    """CPU workers split the cores evenly (the thread count is part of every stage key); GPU workers keep torch's."""
    return max(1, (os.cpu_count() or 1) // len(devices)) if all(d == "cpu" for d in devices) else 0


def worker_order(tasks: list[Task], cost: dict[Task, int] | None = None) -> list[Task]:
    """The order workers take tasks in: longest first, so the run does not end on one worker finishing a long
    relearning cell while the others idle (the cost is the task's foreseen stage count, execute.estimate_stages:
    a task with more checkpoints trains and generates more). Among equal costs attack-major, then seed, then
    method, so that tasks running side by side need different (seed, method) unlearn stages and seeds' data
    sets, and workers compute distinct expensive stages instead of waiting at one lock."""
    cost = cost or {}
    return sorted(tasks, key=lambda t: (-cost.get(t, 0), t[2], t[0], t[1]))


def run_workers(plan: Plan, store_dir: Path, code_version: str, devices: list[str], batch_size: int,
                on_result: Callable[[TaskResult], None], run_id: str = "", threads: int | None = None,
                on_event: Callable[[tuple[Any, ...]], None] | None = None,
                cost: dict[Task, int] | None = None) -> None:
    """Run all tasks on len(devices) spawned workers; on_result(result) in the parent as each task finishes, and
    on_event(event) for each progress event (bench/progress.py) - always before the result of the task it is part of.
    cost: each task's foreseen size, for worker_order (none: attack-major order).

    A worker that dies (out of memory, killed) fails the tasks it had not returned, with that reason."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    from unlearn_bench.runner import Runner

    tasks = Runner.task_list(plan)
    ctx = mp.get_context("spawn")
    device_queue = ctx.Queue()
    for i, d in enumerate(devices):
        device_queue.put((i + 1, d))
    pipes = [ctx.Pipe(duplex=False) for _ in devices]  # (parent's reader, worker's writer) per worker
    threads = worker_threads(devices) if threads is None else threads
    init = (plan, str(store_dir), code_version, run_id, device_queue, batch_size, threads, os.getpid(),
            [w for _, w in pipes])
    pool = ProcessPoolExecutor(len(devices), mp_context=ctx, initializer=_init_worker, initargs=init)
    old_term = signal.signal(signal.SIGTERM, _raise_exit) if threading.current_thread() is threading.main_thread() \
        else None
    readers = [r for r, _ in pipes]
    try:
        # longest first, spread over seeds (worker_order); rows are reassembled in canonical order
        futures = {pool.submit(_do_task, t): t for t in worker_order(tasks, cost)}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(readers, on_event)  # the finished tasks' events are all in the pipes by now
            for fut in sorted(done, key=lambda f: futures[f]):
                try:
                    on_result(fut.result())
                except BrokenProcessPool as exc:
                    on_result((futures[fut], [], _dead_worker(plan, futures[fut], exc), {}, []))
    finally:
        _stop(pool)
        _drain(readers, on_event)
        for reader, writer in pipes:
            reader.close()
            writer.close()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _drain(readers: list[Any], on_event: Callable[[tuple[Any, ...]], None] | None) -> None:
    """Hand every event waiting in the workers' pipes to on_event (or drop them), without blocking."""
    from multiprocessing.connection import wait as ready

    for conn in ready([r for r in readers if not r.closed], timeout=0):
        try:
            while conn.poll():
                event = conn.recv()
                if on_event is not None:
                    on_event(event)
        except (EOFError, OSError):
            continue


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # SIGTERM: unwind so the pool is terminated, like Ctrl-C


def _stop(pool: Any) -> None:
    """Shut the pool down; on an interrupted run terminate workers still computing (they hold no finished data:
    the store renames entries into place only when complete)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=10)


def _dead_worker(plan: Plan, task: Task, exc: BaseException, stage: str = "worker") -> dict[str, Any]:
    from unlearn_bench.runner import failure_record

    return failure_record(plan, task, stage, "worker process",
                          f"the worker process died ({type(exc).__name__}: {exc})")


def _worker_run(plan: Plan, store_dir: str, code_version: str, device: str, batch_size: int, run_id: str,
                task: Task) -> TaskResult:
    """Body of one Slurm (submitit) job: one task against the shared store."""
    from unlearn_bench.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import torch

    from unlearn_bench.runner import Runner
    from unlearn_bench.store import Store

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    store = Store(Path(store_dir), code_version=code_version, run_id=run_id)
    return Runner(plan, store, device=device, batch_size=batch_size).task_result(task)


def run_submitit(plan: Plan, store_dir: Path, code_version: str, batch_size: int, folder: Path,
                 cluster: str | None, slurm: dict[str, Any], on_result: Callable[[TaskResult], None],
                 run_id: str = "") -> None:
    """One submitit job per task (a job array), each running its task against the shared store; resumable
    because finished stages are found in the store when the same command is submitted again."""
    try:
        import submitit
    except ImportError as exc:
        raise RuntimeError("--executor slurm needs submitit: pip install 'submitit>=1.5' (the [slurm] extra)") from exc
    from unlearn_bench.runner import Runner

    tasks = Runner.task_list(plan)
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params = {k: v for k, v in slurm.items() if v is not None}
    if cluster != "local" and cluster != "debug":
        params = {f"slurm_{k}" if not k.startswith("slurm_") else k: v for k, v in params.items()}
    else:
        params = {k: v for k, v in params.items() if k in ("timeout_min",)}
    executor.update_parameters(**params)
    device = "auto"  # resolved inside each job: its allocated GPU when it has one
    jobs = executor.map_array(_worker_run, *zip(*[(plan, str(store_dir), code_version, device, batch_size, run_id, t)
                                                  for t in tasks], strict=True))
    for task, job in zip(tasks, jobs, strict=True):
        try:
            on_result(job.result())
        except Exception as exc:  # noqa: BLE001 - a job that crashed or was cancelled fails its task only
            on_result((task, [], _dead_worker(plan, task, exc, stage="job"), {}, []))
