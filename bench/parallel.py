"""Running a plan's tasks on several workers: one process per GPU (or N CPU processes), or Slurm via submitit.

Why this shape: every stage is already memoised in a store with per-key file locks, so workers need no scheduler
of their own. A task is (seed, method, attack); workers pull tasks from a shared queue in canonical order; two
tasks that need the same unlearned model or data set meet at that stage's lock, and the second reuses what the
first wrote. Rows come back per task and are reassembled in canonical order, so records.csv is identical to a
single-worker run. Clusters go through submitit (an existing engine), not a home-made scheduler.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.plan import Plan


def _worker_run(plan: Plan, store_dir: str, code_version: str, device: str, batch_size: int, threads: int,
                tasks: list[tuple[int, int, int]]) -> tuple[list[list[dict[str, Any]]], dict[str, int]]:
    """Body of one worker process (also of one Slurm job): run the given tasks, return their rows."""
    from bench.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    from bench.runner import Runner
    from bench.store import Store

    store = Store(Path(store_dir), code_version=code_version)
    runner = Runner(plan, store, device=device, batch_size=batch_size)
    return [runner.run_task(t) for t in tasks], dict(store.counts)


def _pull_loop(args: tuple[Any, ...]) -> tuple[dict[tuple[int, int, int], list[dict[str, Any]]], dict[str, int]]:
    """A worker pulling tasks from the shared queue until it is empty."""
    plan, store_dir, code_version, device, batch_size, threads, queue = args
    from bench.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    from bench.runner import Runner
    from bench.store import Store

    store = Store(Path(store_dir), code_version=code_version)
    runner = Runner(plan, store, device=device, batch_size=batch_size)
    done: dict[tuple[int, int, int], list[dict[str, Any]]] = {}
    while True:
        try:
            task = queue.get_nowait()
        except Exception:  # noqa: BLE001 - queue.Empty from a manager proxy
            break
        done[tuple(task)] = runner.run_task(tuple(task))
    return done, dict(store.counts)


def run_workers(plan: Plan, store_dir: Path, code_version: str, devices: list[str], batch_size: int,
                progress: Any = None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Run all tasks on len(devices) worker processes (spawned), pulling from one queue."""
    import multiprocessing as mp

    from bench.runner import Runner
    from bench.store import Store

    tasks = Runner(plan, Store(store_dir)).tasks()
    ctx = mp.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // len(devices)) if all(d == "cpu" for d in devices) else 0
    with ctx.Manager() as manager:
        queue = manager.Queue()
        # queue attack-major: the first tasks each need a different (seed, method) unlearn stage, so workers start
        # distinct expensive stages instead of waiting at one lock; rows are still returned in canonical order
        for t in sorted(tasks, key=lambda t: (t[2], t[0], t[1])):
            queue.put(t)
        with ctx.Pool(len(devices)) as pool:
            results = pool.map(_pull_loop, [(plan, str(store_dir), code_version, d, batch_size, threads, queue)
                                            for d in devices])
    merged: dict[tuple[int, int, int], list[dict[str, Any]]] = {}
    counts = {"cached": 0, "computed": 0}
    for done, c in results:
        merged.update(done)
        for k in counts:
            counts[k] += c.get(k, 0)
    missing = [t for t in tasks if t not in merged]
    if missing:
        raise RuntimeError(f"{len(missing)} tasks were not run by any worker, e.g. {missing[:3]}")
    return [row for t in tasks for row in merged[t]], counts


def run_submitit(plan: Plan, store_dir: Path, code_version: str, batch_size: int, folder: Path,
                 cluster: str | None, slurm: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """One submitit job per task (a job array), each running its task against the shared store; resumable
    because finished stages are found in the store when the same command is submitted again."""
    try:
        import submitit
    except ImportError as exc:
        raise RuntimeError("--executor slurm needs submitit: pip install 'submitit>=1.5' (the [slurm] extra)") from exc
    from bench.runner import Runner
    from bench.store import Store

    tasks = Runner(plan, Store(store_dir)).tasks()
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params = {k: v for k, v in slurm.items() if v is not None}
    if cluster != "local" and cluster != "debug":
        params = {f"slurm_{k}" if not k.startswith("slurm_") else k: v for k, v in params.items()}
    else:
        params = {k: v for k, v in params.items() if k in ("timeout_min",)}
    executor.update_parameters(**params)
    device = "auto"  # resolved inside each job: its allocated GPU when it has one
    jobs = executor.map_array(_worker_run, *zip(*[(plan, str(store_dir), code_version, device, batch_size, 0, [t])
                                                  for t in tasks], strict=True))
    counts = {"cached": 0, "computed": 0}
    rows: list[dict[str, Any]] = []
    for job in jobs:
        task_rows, c = job.result()
        rows += task_rows[0]
        for k in counts:
            counts[k] += c.get(k, 0)
    return rows, counts
