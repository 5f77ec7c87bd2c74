"""`bench run` after planning: load nothing until needed, run the stages, write results and provenance."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.plan import Plan
from bench.progress import Progress


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device}: no CUDA device is available (use --device cpu)")
    return device


def parse_gpus(text: str | None) -> list[int]:
    """`--gpus 0,1,3`, `0-3` or `all` -> device indices (checked against the visible devices)."""
    if not text:
        return []
    import torch

    n = torch.cuda.device_count()
    if text == "all":
        ids = list(range(n))
    else:
        ids = []
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            try:
                ids += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
            except ValueError as exc:
                raise SystemExit(f"error: --gpus {text!r}: expected e.g. 0,1 or 0-3 or all") from exc
    bad = [i for i in ids if i >= n or i < 0]
    if not ids or bad:
        raise SystemExit(f"error: --gpus {text!r}: {n} CUDA device(s) visible; bad: {bad or 'none selected'}")
    return ids


def execute(plan: Plan, out_dir: Path, store_dir: Path, device: str = "auto", batch_size: int = 16,
            quiet: bool = False, workers: int = 1, gpus: str | None = None, executor: str = "local",
            slurm: dict | None = None) -> list[dict]:
    from bench.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from bench.results import code_version, provenance, write_leaderboard, write_records, write_run_json
    from bench.runner import Runner
    from bench.store import Store

    started = time.time()
    device = resolve_device(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    cv = code_version()
    store = Store(store_dir, code_version=f"{cv['commit'][:12]}{'+dirty' if cv['dirty'] else ''}")
    gpu_ids = parse_gpus(gpus)
    if executor in ("slurm", "submitit-local"):
        from bench.parallel import run_submitit

        rows, counts = run_submitit(plan, store_dir, store.code_version, batch_size, out_dir / "submitit",
                                    "local" if executor == "submitit-local" else "slurm", slurm or {})
        store.counts.update(counts)
    elif gpu_ids or workers > 1:
        # everything cached: answer in this process, without starting workers (seconds of imports each)
        rows = _all_cached(plan, store, device, batch_size)
        if rows is None:
            from bench.parallel import run_workers

            devices = [f"cuda:{i}" for i in gpu_ids] if gpu_ids else ["cpu"] * workers
            if not quiet:
                Progress().log(f"running {len(devices)} workers: {', '.join(devices)}")
            rows, counts = run_workers(plan, store_dir, store.code_version, devices, batch_size)
            store.counts.update(counts)
    else:
        with Progress(quiet=quiet) as progress:
            runner = Runner(plan, store, device=device, batch_size=batch_size, progress=progress)
            rows = runner.run()
    write_records(out_dir / "records.csv", rows)
    board = write_leaderboard(out_dir)
    info = provenance(device) | {
        "plan": plan.resolved(), "prompts_seeds_hash": plan.prompts_seeds_hash(), "store": str(store_dir.resolve()),
        "stages": dict(store.counts), "seconds": round(time.time() - started, 2),
    }
    write_run_json(out_dir, info)
    if not quiet:
        print_board(board, store.counts, info["seconds"], out_dir)
    return rows


def _all_cached(plan: Plan, store: Any, device: str, batch_size: int) -> list[dict] | None:
    """The run's rows if every stage is already in the store (read in this process), else None."""
    from dataclasses import replace

    from bench.runner import Runner
    from bench.store import NotCached

    probe = replace(store, cached_only=True, counts={"cached": 0, "computed": 0})
    try:
        rows = Runner(plan, probe, device=device, batch_size=batch_size, progress=Progress(quiet=True)).run()
    except NotCached:
        return None
    store.counts.update(probe.counts)
    return rows


def print_board(board: object, counts: dict[str, int], seconds: float, out_dir: Path) -> None:
    """Leaderboard as a rich table: mean (± std over seeds) per attack@step/metric column."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    console.print(f"stages: {counts['cached']} cached, {counts['computed']} computed ({seconds:.1f}s); "
                  f"results in {out_dir}/")
    cols = [c for c in board.columns if not c.endswith(" std") and c != "n_seeds"]
    table = Table(title="leaderboard (mean ± std over seeds)")
    table.add_column("method")
    for c in cols:
        table.add_column(c.replace("/", "\n"), justify="right")
    for method, row in board.iterrows():
        table.add_row(str(method), *[f"{row[c]:.3f} ± {row[c + ' std']:.3f}" for c in cols])
    console.print(table)
