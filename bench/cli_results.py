"""`bench table`, `score`, `report`, `export`, `check`: the commands that read a results folder (registered on the
one `bench` app; split from bench/cli.py to keep each file readable). Heavy imports stay inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from unlearn_bench.cli import DEVICE, IncludeOpt, RegistryOpt, _registry, app, fail
from unlearn_bench.registry import RegistryError


@app.command()
def table(out: Annotated[Path, typer.Argument(help="a results directory holding records.csv")],
          long: Annotated[bool, typer.Option("--long", help="a row per method and attack@step, a column per metric")]
          = False,
          metrics: Annotated[str | None, typer.Option(help="comma list: only these metrics")] = None) -> None:
    """Print the leaderboard of a results directory as a Markdown table (what README's tables are made with)."""
    if not (out / "records.csv").exists():
        fail(f"{out}/records.csv not found; run `bench run --out {out}` first")
    from unlearn_bench.results import markdown_table

    keep = tuple(m.strip() for m in metrics.split(",") if m.strip()) if metrics else None
    try:
        typer.echo(markdown_table(out, long=long, metrics=keep))
    except ValueError as e:
        fail(str(e))


@app.command("score")
def score_cmd(
    out: Annotated[Path, typer.Argument(help="a results directory (records.csv + run.json) of `bench run`")],
    metrics: Annotated[str | None, typer.Option(help="comma list (default: the run's own metrics)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="e.g. metric.nudenet.thresholds=0.5,0.6")] = None,
    store: Annotated[Path | None, typer.Option(help="artifact store (default: the one run.json names)")] = None,
    to: Annotated[Path | None, typer.Option("--to", help="write results here instead of in place")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
    registry: RegistryOpt = None,
    include: IncludeOpt = None,
) -> None:
    """Re-score a run's stored images with new or changed metrics, without generating anything."""
    reg = _registry(registry, set_, include)
    names = tuple(m.strip() for m in (metrics or "").split(",") if m.strip())
    from unlearn_bench.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from unlearn_bench.execute import resolve_device
    from unlearn_bench.progress import Progress
    from unlearn_bench.results import markdown_table
    from unlearn_bench.score import rescore

    try:
        with Progress(quiet=quiet) as progress:
            rows = rescore(out, reg, names, store, resolve_device(device), progress, dest=to)
    except RegistryError as exc:
        fail(str(exc))
        raise  # unreachable
    typer.echo(f"{len(rows)} rows in {(to or out) / 'records.csv'}", err=True)
    if not quiet:
        typer.echo(markdown_table(to or out))


@app.command()
def report(
    out: Annotated[Path, typer.Argument(help="a results directory (records.csv + run.json) of `bench run`")],
    store: Annotated[Path | None, typer.Option(help="artifact store (default: the one run.json names)")] = None,
    images: Annotated[int, typer.Option(help="images per grid row")] = 8,
) -> None:
    """Write OUT/report.html (self-contained: leaderboard, relearning curves, image grids, settings, provenance)."""
    for name in ("records.csv", "run.json"):
        if not (out / name).exists():
            fail(f"{out}/{name} not found; run `bench run --out {out}` first")
    if images < 1:
        fail(f"--images {images}: must be >= 1")
    from unlearn_bench.report import build_report

    typer.echo(build_report(out, store, images))


@app.command("export")
def export_cmd(
    out: Annotated[Path, typer.Argument(help="a results directory (records.csv + run.json) of `bench run`")],
    method: Annotated[str, typer.Option(help="the method of the state, e.g. esd")],
    to: Annotated[Path, typer.Option("--to", help="new folder to write the diffusers model into")],
    attack: Annotated[str, typer.Option(help="the attack of the state, e.g. ft-lr1e-5 (none: the unlearned model)")]
    = "none",
    step: Annotated[int | None, typer.Option(help="attack step (default: the only one there is)")] = None,
    seed: Annotated[int | None, typer.Option(help="run seed (default: the only one there is)")] = None,
    only_changed: Annotated[bool, typer.Option(
        "--only-changed", help="write only the components whose weights differ from the base (e.g. unet/)")] = False,
    force: Annotated[bool, typer.Option("--force", help="replace a previous export at --to")] = False,
    store: Annotated[Path | None, typer.Option(help="artifact store (default: the one run.json names)")] = None,
    device: Annotated[str, typer.Option(
        help="where to rebuild the state: cpu, or the run's device to merge LoRA factors bit-for-bit")] = "cpu",
) -> None:
    """Export a state the run evaluated (base + unlearn delta + attack checkpoint) as a diffusers model folder."""
    if not DEVICE.fullmatch(device) or device == "auto":
        fail(f"--device {device!r}: allowed: cpu, cuda, cuda:N (e.g. cuda:1), mps")
    from unlearn_bench.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from unlearn_bench.execute import resolve_device
    from unlearn_bench.export import export_state, summary

    try:
        resolved = resolve_device(device)
    except SystemExit as exc:  # no such device here: bad input, like every other check of this command
        fail(str(exc).removeprefix("error: "))
        raise  # unreachable
    try:
        info = export_state(out, method, to, attack=attack, step=step, seed=seed, only_changed=only_changed,
                            force=force, store=store, device=resolved)
    except RegistryError as exc:
        fail(str(exc))
        raise  # unreachable
    typer.echo(summary(info, to))


@app.command()
def check(
    out: Annotated[Path, typer.Argument(help="a results directory (or a records CSV) to judge")],
    baseline: Annotated[Path, typer.Option(help="baseline records CSV, e.g. results/baselines/toy-ci.csv")],
    tolerance: Annotated[list[str] | None, typer.Option(
        help="[METRIC=]VALUE, repeatable: 0.02 (absolute) or 2se (standard errors); default 2se")] = None,
    allow_missing: Annotated[bool, typer.Option(help="baseline cells absent from the run do not fail")] = False,
    show_all: Annotated[bool, typer.Option("--all", help="list unchanged cells too")] = False,
    update: Annotated[bool, typer.Option(help="write the run as the new baseline instead of checking")] = False,
) -> None:
    """Compare every metric with the baseline in its own direction; exit 1 on any regression."""
    from unlearn_bench.check import compare, failed, parse_tolerances, read_table, render, write_baseline

    try:
        tol = parse_tolerances(tolerance)
        current = read_table(out)
        if update:
            baseline.parent.mkdir(parents=True, exist_ok=True)
            write_baseline(current, baseline)
            typer.echo(f"wrote baseline {baseline} ({len(current)} rows)")
            return
        base = read_table(baseline)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
        raise  # unreachable
    results = compare(current, base, tol)
    table, summary = render(results, show_all)
    from rich.console import Console

    Console(width=160).print(table)
    typer.echo(summary)
    if failed(results, allow_missing):
        raise typer.Exit(1)


def robustness_settings(fraction: float, threshold: float | None, base_value: float | None, auc_x: str,
                        n_boot: int, n_perm: int, level: float, seed: int) -> object:
    """The score definitions' parameters from the command line; a bad value exits 2 naming it."""
    from unlearn_bench.robustness import Settings

    try:
        return Settings(fraction, threshold, base_value, auc_x, n_boot, n_perm, level, seed)
    except ValueError as exc:
        fail(str(exc))
        raise  # unreachable


@app.command("compare")
def compare_cmd(
    out: Annotated[Path, typer.Argument(help="a results directory (records.csv, run.json) of `bench run`")],
    a: Annotated[str, typer.Argument(help="method A, e.g. esd")],
    b: Annotated[str, typer.Argument(help="method B, e.g. esd+meta (differences are B - A)")],
    store: Annotated[Path | None, typer.Option(
        help="store holding the per-image values (default: the one run.json names; without one: seeds only)")]
    = None,
    concept_metric: Annotated[str | None, typer.Option(help="default: the concept's judge (run.json)")] = None,
    fraction: Annotated[float, typer.Option(help="relearned at this share of the base model's concept value")]
    = 0.5,
    threshold: Annotated[float | None, typer.Option(help="absolute threshold on the concept metric instead")]
    = None,
    base_value: Annotated[float | None, typer.Option(
        help="the base model's concept value, for runs without method none")] = None,
    auc_x: Annotated[str, typer.Option(help="area axis: linear or log1p (weights the first steps more)")]
    = "linear",
    n_boot: Annotated[int, typer.Option(help="bootstrap draws (seeds, then images)")] = 1000,
    n_perm: Annotated[int, typer.Option(help="permutations for the p-values")] = 2000,
    level: Annotated[float, typer.Option(help="interval coverage")] = 0.95,
    seed: Annotated[int, typer.Option(help="seed of the draws")] = 0,
    steps: Annotated[bool, typer.Option("--steps/--no-steps", help="also every metric at every attack step")]
    = True,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="also write the rows to this CSV")] = None,
) -> None:
    """Paired comparison of two methods of one run: B - A per summary score and attack step, with a bootstrap
    interval over seeds and images and a permutation p-value. Example: `bench compare results/toy-meta esd
    esd+meta`."""
    settings = robustness_settings(fraction, threshold, base_value, auc_x, n_boot, n_perm, level, seed)
    if not (out / "records.csv").exists():
        fail(f"{out}/records.csv not found; run `bench run --out {out}` first")
    from unlearn_bench.robustness_data import compare_rows, load_curves, render_compare

    try:
        curves = load_curves(out, store, concept_metric)
        rows = compare_rows(curves, a, b, settings, steps)  # type: ignore[arg-type]
    except ValueError as exc:  # RegistryError too: unknown method names
        fail(str(exc))
        raise  # unreachable
    if csv_out is not None:
        import pandas as pd

        pd.DataFrame(rows).to_csv(csv_out, index=False, float_format="%.6g")
    typer.echo(render_compare(rows, curves.notes))
