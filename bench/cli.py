"""`bench`: the command line. Heavy imports (torch, diffusers) happen inside commands that need them, so
`bench --help`, `bench ls` and `bench validate` start instantly."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from unlearn_bench.registry import Registry, RegistryError, suggest
from unlearn_bench.store_admin import store_app

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Relearning-robustness benchmark for concept unlearning in text-to-image diffusion models.")
toy_app = typer.Typer(no_args_is_help=True, help="The toy world: build (train) the shipped toy model and detector.")
app.add_typer(toy_app, name="toy")
app.add_typer(store_app, name="store")

def _version(value: bool) -> None:
    if value:
        from importlib import metadata

        try:
            version = metadata.version("unlearn-bench")
        except metadata.PackageNotFoundError:  # run from a source tree that was never installed
            version = "unknown (not installed)"
        typer.echo(f"unlearn-bench {version}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the installed version and exit")] = False) -> None:
    """Relearning-robustness benchmark for concept unlearning in text-to-image diffusion models."""


LS_SECTIONS = ("methods", "attacks", "metrics", "models", "concepts", "suites", "prompt_sets", "wrappers")
DEVICE = re.compile(r"auto|cpu|mps|cuda(?::\d+)?")
GPUS = re.compile(r"all|\d+(?:-\d+)?(?:\s*,\s*\d+(?:-\d+)?)*")
EXECUTORS = ("local", "slurm", "submitit-local")
RegistryOpt = Annotated[Path | None, typer.Option("--registry", help="registry YAML (default: the project's)")]
IncludeOpt = Annotated[list[Path] | None, typer.Option(
    "--include", help="a registry file merged into the catalogue (new entries; `override:` for existing ones); "
                      "repeatable, after those in $BENCH_INCLUDE (os.pathsep-separated)")]


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def unwritable(folder: Path) -> str | None:
    """Why results or store entries could not be written under `folder` (None if they can): checked before any
    work, so a typo in --out or --store is exit 2, not a failure of every cell."""
    import os
    import tempfile

    if folder.exists() and not folder.is_dir():
        return "exists and is not a directory"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"cannot be created or written ({exc.strerror or exc})"
    return None


def _registry(path: Path | None, overrides: list[str] | None = None, includes: list[Path] | None = None) -> Registry:
    """The catalogue a command uses: the registry file, installed plug-ins, $BENCH_INCLUDE and --include files."""
    try:
        return Registry.load(path, overrides or [], includes or [])
    except RegistryError as exc:
        fail(str(exc))
        raise  # unreachable


@app.command("ls")
def ls(section: Annotated[str, typer.Argument(help=f"one of {', '.join(LS_SECTIONS)}")] = "methods",
       registry: RegistryOpt = None, include: IncludeOpt = None) -> None:
    """List registry entries with a one-line description (and the paper or source)."""
    reg = _registry(registry, includes=include)
    if section not in LS_SECTIONS:
        from unlearn_bench.registry import suggest

        fail(f"unknown section '{section}'.{suggest(section, LS_SECTIONS)} Choose from: {', '.join(LS_SECTIONS)}")
    from rich.console import Console
    from rich.table import Table

    table = Table(title=section, show_lines=False)
    origins = {name: reg.origin(section, name) for name in reg.names(section)}
    for col in ("name", "description", "paper / source", *(("from",) if any(origins.values()) else ())):
        table.add_column(col, overflow="fold")
    for name, desc, extra in reg.describe(section):
        table.add_row(name, desc, extra, *((origins[name],) if any(origins.values()) else ()))
    Console().print(table)


@app.command()
def validate(file: Annotated[Path | None, typer.Argument(help="registry YAML to check")] = None,
             import_modules: Annotated[bool, typer.Option(
                 "--import/--no-import",
                 help="import every module the registry names (proves its dependencies import; loads torch), "
                      "or with --no-import only find and parse it (instant)")] = True,
             include: IncludeOpt = None,
             ) -> None:
    """Check every registry entry (structure, schemas, names, paths, modules); exit 2 listing the problems."""
    try:
        reg = Registry.load(file, (), include or [])
        problems = reg.validate(import_modules)
    except RegistryError as exc:
        reg, problems = None, exc.problems or [str(exc)]
    if problems:
        for p in problems:
            typer.echo(f"  - {p}", err=True)
        merged = "".join(f" + {s.short()}" for s in reg.includes) if reg else ""
        fail(f"{reg.path if reg else file or 'registry'}{merged}: {len(problems)} problem(s)")
    merged = "".join(f" + {s.short()}" for s in reg.includes)
    typer.echo(f"{reg.path}{merged}: OK ({', '.join(f'{len(reg.names(s))} {s}' for s in LS_SECTIONS)})")


def check_run_options(device: str, batch_size: int, workers: int, executor: str, gpus: str | None,
                      gpus_per_job: int, time_limit: int) -> None:
    """Options that need no registry, checked before planning and without importing torch."""
    if not DEVICE.fullmatch(device):
        fail(f"--device {device!r}: allowed: auto, cpu, cuda, cuda:N (e.g. cuda:1), mps")
    for option, value in (("--batch-size", batch_size), ("--workers", workers), ("--gpus-per-job", gpus_per_job),
                          ("--time", time_limit)):
        if value < 1:
            fail(f"{option} {value}: must be >= 1")
    if executor not in EXECUTORS:
        fail(f"--executor {executor!r}: allowed: {', '.join(EXECUTORS)}.{suggest(executor, EXECUTORS)}")
    if gpus is not None and not GPUS.fullmatch(gpus.strip()):
        fail(f"--gpus {gpus!r}: expected GPU indices like 0,1 or a range 0-3, or all")


@app.command()
def run(
    suite: Annotated[str | None, typer.Option(help="named preset (default: the registry's default suite)")] = None,
    model: Annotated[str | None, typer.Option(help="model name, e.g. toy, tiny, sd14")] = None,
    concept: Annotated[str | None, typer.Option(help="concept to erase, e.g. nudity, red")] = None,
    methods: Annotated[str | None, typer.Option(help="comma list, e.g. none,esd,esd+meta")] = None,
    attacks: Annotated[str | None, typer.Option(help="comma list, e.g. none,ft-lr1e-5")] = None,
    metrics: Annotated[str | None, typer.Option(help="comma list, e.g. nudenet")] = None,
    seeds: Annotated[str | None, typer.Option(help="comma list of seeds, e.g. 0,1,2")] = None,
    out: Annotated[Path | None, typer.Option(help="output directory (default results/<suite or run name>)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. method.esd.lr=1e-4")] = None,
    store: Annotated[Path | None, typer.Option(help="artifact store (default $BENCH_CACHE or <out>/../.store)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1")] = "auto",
    batch_size: Annotated[int, typer.Option(
        help="generation batch size (changes pixels by rounding: part of the key of the stages that sample)")] = 16,
    threads: Annotated[int, typer.Option(
        help="torch CPU threads per process; 0 = torch's default, or cores / workers (part of every stage key)")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
    workers: Annotated[int, typer.Option(help="CPU worker processes sharing the store")] = 1,
    gpus: Annotated[str | None, typer.Option(help="one worker per GPU: 0,1 or 0-7 or all")] = None,
    executor: Annotated[str, typer.Option(help="local, slurm (submitit) or submitit-local")] = "local",
    partition: Annotated[str | None, typer.Option(help="Slurm partition")] = None,
    gpus_per_job: Annotated[int, typer.Option(help="Slurm GPUs per job")] = 1,
    time: Annotated[int, typer.Option("--time", help="Slurm time limit per job, minutes")] = 240,
    registry: RegistryOpt = None,
    include: IncludeOpt = None,
) -> None:
    """Run the method x attack x metric matrix; every stage is cached, so re-running resumes."""
    import os

    from unlearn_bench.plan import make_plan, request_from

    check_run_options(device, batch_size, workers, executor, gpus, gpus_per_job, time)
    if threads < 0:
        fail(f"--threads {threads}: must be >= 0 (0 = the default split)")
    from unlearn_bench.external_methods import registry_for_run

    try:  # --methods LABEL=path:PATH labels exist before --set is applied (--set method.LABEL.allow_pickle=true)
        reg = registry_for_run(registry, set_ or [], methods, include)
        req = request_from(reg, suite, model, concept, methods, attacks, metrics, seeds)
        plan = make_plan(reg, req)
    except RegistryError as exc:
        fail(str(exc))
    out_dir = out or Path("results") / req.name
    store_dir = store or (Path(os.environ["BENCH_CACHE"]) if os.environ.get("BENCH_CACHE") else
                          out_dir.resolve().parent / ".store")
    for what, folder in (("--out", out_dir), ("--store", store_dir)):
        problem = unwritable(folder)
        if problem:
            fail(f"{what} {folder}: {problem}")
    from unlearn_bench.execute import execute

    slurm = {"partition": partition, "gpus_per_node": gpus_per_job, "timeout_min": time}
    outcome = execute(plan, out_dir, store_dir, device=device, batch_size=batch_size, quiet=quiet, workers=workers,
                      gpus=gpus, executor=executor, slurm=slurm, threads=threads)
    if outcome.failures:
        from unlearn_bench.execute import EXIT_FAILED_CELLS

        raise typer.Exit(EXIT_FAILED_CELLS)


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


@app.command()
def perf(
    model: Annotated[str, typer.Option(help="tiny, toy, or sd14-shaped (random SD-1.4-shaped weights)")] = "tiny",
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    iters: Annotated[int, typer.Option(help="timed ESD iterations")] = 5,
    batch_sizes: Annotated[str, typer.Option(help="generation batch sizes")] = "1,8",
    steps: Annotated[int, typer.Option(help="sampling steps")] = 10,
) -> None:
    """Measure ESD it/s vs a plain fp32 loop, images/s vs diffusers' pipeline, and peak memory."""
    import json

    from unlearn_bench.perf import run_perf

    rows = run_perf(model, device, iters, [int(b) for b in batch_sizes.split(",")], steps)
    for row in rows:
        typer.echo(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))


@toy_app.command("build")
def toy_build(
    out: Annotated[Path | None, typer.Option(help="weights directory (default: the shipped bench/toy/weights)")] = None,
    steps: Annotated[int, typer.Option(help="diffusion training steps")] = 4000,
    seed: Annotated[int, typer.Option(help="training seed")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Train the toy text-to-image model and its concept detector (seeded, resumable)."""
    from unlearn_bench.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from unlearn_bench.toy.build import build

    target = out or Path(__file__).resolve().parent / "toy" / "weights"
    figures = build(target, seed=seed, steps=steps, device=device, quiet=quiet)
    typer.echo(figures)


def main() -> None:  # pragma: no cover - console entry
    start = time.time()
    try:
        app()
    finally:
        if "--verbose-time" in sys.argv:
            print(f"{time.time() - start:.2f}s", file=sys.stderr)
