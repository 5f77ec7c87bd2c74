"""`bench run` after planning: load nothing until needed, run the stages, write results and provenance."""

from __future__ import annotations

import time
from pathlib import Path

from bench.plan import Plan
from bench.progress import Progress


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device}: no CUDA device is available (use --device cpu)")
    return device


def execute(plan: Plan, out_dir: Path, store_dir: Path, device: str = "auto", batch_size: int = 16,
            quiet: bool = False) -> list[dict]:
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
