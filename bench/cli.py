"""`bench`: the command line. Heavy imports (torch, diffusers) happen inside commands that need them, so
`bench --help`, `bench ls` and `bench validate` start instantly."""

from __future__ import annotations

import functools
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Any

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

    table = Table(title=section, show_lines=False, caption_justify="left", caption="details, every value and where "
                  f"it is set: bench show {'prompt-set' if section == 'prompt_sets' else section[:-1]} NAME")
    origins = {name: reg.origin(section, name) for name in reg.names(section)}
    for col in ("name", "description", "paper / source", *(("from",) if any(origins.values()) else ())):
        table.add_column(col, overflow="fold")
    for name, desc, extra in reg.describe(section):
        table.add_row(name, desc, extra, *((origins[name],) if any(origins.values()) else ()))
    Console().print(table)


@app.command("show")
def show_cmd(
    kind: Annotated[str, typer.Argument(help="method, attack, metric, wrapper, model, concept, suite or prompt-set")],
    name: Annotated[str, typer.Argument(help="the entry, e.g. esd, esd+meta, ft-lr1e-5, nudenet, nudity, toy")],
    model: Annotated[str | None, typer.Option(help="only this model's parameter group, e.g. toy, tiny, sd14")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. method.esd.lr=1e-4")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the entry as JSON")] = False,
    registry: RegistryOpt = None,
    include: IncludeOpt = None,
) -> None:
    """Show one registry entry: every parameter with its type, value per model group, and where each comes from.

    Examples: `bench show method esd`, `bench show attack ft-lr1e-5 --model toy`, `bench show method esd+meta`,
    `bench show concept nudity`, `bench show model sd14`."""
    from unlearn_bench.show import render, show_data

    reg = _registry(registry, set_, include)
    try:
        data = show_data(reg, kind, name, model)
    except RegistryError as exc:
        fail(str(exc))
        raise  # unreachable
    if as_json:
        import json

        typer.echo(json.dumps(data, indent=2, default=str))
        return
    from rich.console import Console

    Console().print(render(data))


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


def check_run_options(batch_size: int, workers: int, gpus: str | None, gpus_per_job: int, time_limit: int) -> None:
    """Options that need no registry, checked before planning and without importing torch (--device and
    --executor are checked by their option callbacks, while the command line is parsed)."""
    for option, value in (("--batch-size", batch_size), ("--workers", workers), ("--gpus-per-job", gpus_per_job),
                          ("--time", time_limit)):
        if value < 1:
            fail(f"{option} {value}: must be >= 1")
    if gpus is not None and not GPUS.fullmatch(gpus.strip()):
        fail(f"--gpus {gpus!r}: expected GPU indices like 0,1 or a range 0-3, or all")


def device_option(value: str) -> str:
    """--device: auto, cpu, mps, cuda or cuda:N (typer reports a bad value with the usage, exit 2)."""
    if not DEVICE.fullmatch(value):
        raise typer.BadParameter(f"{value!r}: allowed: auto, cpu, cuda, cuda:N (e.g. cuda:1), mps")
    return value


def executor_option(value: str) -> str:
    """--executor: one of EXECUTORS, with the nearest name when it is a typo (a plain choice list would not say)."""
    if value not in EXECUTORS:
        raise typer.BadParameter(f"{value!r}:{suggest(value, EXECUTORS) or ''} allowed: {', '.join(EXECUTORS)}")
    return value


def _panel(title: str) -> Any:
    """typer.Option placed in one group of `bench run --help`."""
    return functools.partial(typer.Option, rich_help_panel=title)


What, Where, How, Slurm, Output = map(_panel, ("What to run", "Where", "How (device, workers, executor)", "Slurm",
                                                "Output"))


@app.command()
def run(
    suite: Annotated[str | None, What(help="named preset (default: the registry's default suite)")] = None,
    model: Annotated[str | None, What(help="model name, e.g. toy, tiny, sd14")] = None,
    concept: Annotated[str | None, What(help="concept to erase, e.g. nudity, red")] = None,
    methods: Annotated[str | None, What(help="comma list, e.g. none,esd,esd+meta")] = None,
    attacks: Annotated[str | None, What(help="comma list, e.g. none,ft-lr1e-5")] = None,
    metrics: Annotated[str | None, What(help="comma list, e.g. nudenet")] = None,
    seeds: Annotated[str | None, What(help="comma list of seeds, e.g. 0,1,2")] = None,
    set_: Annotated[list[str] | None, What("--set", help="override, e.g. method.esd.lr=1e-4")] = None,
    registry: Annotated[Path | None, What("--registry", help="registry YAML (default: the project's)")] = None,
    include: Annotated[list[Path] | None, What(
        "--include", help="a registry file merged into the catalogue (new entries; `override:` for existing ones); "
                          "repeatable, after those in $BENCH_INCLUDE (os.pathsep-separated)")] = None,
    out: Annotated[Path | None, Where(help="output directory (default results/<suite or run name>)")] = None,
    store: Annotated[Path | None, Where(envvar="BENCH_CACHE", show_envvar=True,
                                        help="artifact store (default: $BENCH_CACHE, else <out>/../.store)")] = None,
    device: Annotated[str, How(help="auto, cpu, cuda, cuda:1, mps", callback=device_option)] = "auto",
    workers: Annotated[int, How(help="CPU worker processes sharing the store")] = 1,
    gpus: Annotated[str | None, How(help="one worker per GPU: 0,1 or 0-7 or all")] = None,
    executor: Annotated[str, How(help="local, slurm (submitit) or submitit-local", callback=executor_option)]
    = "local",
    batch_size: Annotated[int, How(
        help="generation batch size (changes pixels by rounding: part of the key of the stages that sample)")] = 16,
    threads: Annotated[int, How(
        help="torch CPU threads per process; 0 = torch's default, or cores / workers (part of every stage key)")] = 0,
    partition: Annotated[str | None, Slurm(help="Slurm partition")] = None,
    gpus_per_job: Annotated[int, Slurm(help="Slurm GPUs per job")] = 1,
    time: Annotated[int, Slurm("--time", help="Slurm time limit per job, minutes")] = 240,
    quiet: Annotated[bool, Output("--quiet", "-q", help="no progress on stderr; the summary (stdout) still prints")]
    = False,
    progress_interval: Annotated[float, Output(
        envvar="BENCH_PROGRESS_INTERVAL", show_envvar=True,
        help="when stderr is not a terminal: a status line at least every this many seconds (0: only one per "
             "finished task)")] = 30.0,
) -> None:
    """Run the method x attack x metric matrix; every stage is cached, so re-running resumes.

    Progress goes to stderr; the summary (a line per method, 80 columns wide) and where the results are, to stdout.
    """
    from unlearn_bench.plan import make_plan, request_from

    check_run_options(batch_size, workers, gpus, gpus_per_job, time)
    if threads < 0:
        fail(f"--threads {threads}: must be >= 0 (0 = the default split)")
    if progress_interval < 0:
        fail(f"--progress-interval {progress_interval}: must be >= 0 (0 = a line per finished task only)")
    from unlearn_bench.external_methods import registry_for_run

    try:  # --methods LABEL=path:PATH labels exist before --set is applied (--set method.LABEL.allow_pickle=true)
        reg = registry_for_run(registry, set_ or [], methods, include)
        req = request_from(reg, suite, model, concept, methods, attacks, metrics, seeds)
        plan = make_plan(reg, req)
    except RegistryError as exc:
        fail(str(exc))
    out_dir = out or Path("results") / req.name
    store_dir = store or out_dir.resolve().parent / ".store"  # --store, else $BENCH_CACHE (typer), else beside out
    for what, folder in (("--out", out_dir), ("--store", store_dir)):
        problem = unwritable(folder)
        if problem:
            fail(f"{what} {folder}: {problem}")
    from unlearn_bench.execute import execute

    slurm = {"partition": partition, "gpus_per_node": gpus_per_job, "timeout_min": time}
    outcome = execute(plan, out_dir, store_dir, device=device, batch_size=batch_size, quiet=quiet, workers=workers,
                      gpus=gpus, executor=executor, slurm=slurm, threads=threads, progress_interval=progress_interval)
    if outcome.failures:
        from unlearn_bench.execute import EXIT_FAILED_CELLS

        raise typer.Exit(EXIT_FAILED_CELLS)


@app.command()
def perf(
    model: Annotated[str, typer.Option(
        help="tiny, toy, sd14-shaped (random SD-1.4-shaped weights, for GPUs), or a registry model on disk")] = "tiny",
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N")] = "cpu",
    iters: Annotated[int, typer.Option(help="timed ESD iterations per loop (after one warm-up)")] = 5,
    batch_sizes: Annotated[str, typer.Option(help="comma list of generation batch sizes")] = "1,8",
    steps: Annotated[int, typer.Option(help="sampling steps")] = 10,
    threads: Annotated[int, typer.Option(help="torch CPU threads; 0 = torch's default")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print the figures as one JSON object")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. method.esd.batch_size=2")] = None,
    registry: RegistryOpt = None,
    include: IncludeOpt = None,
) -> None:
    """ESD it/s of the harness vs a plain reference loop (and bf16 vs fp32 on CUDA); images/s vs diffusers.

    Examples: `bench perf --model toy`, `bench perf --model tiny --iters 2`, `bench perf --model sd14-shaped
    --device cuda`."""
    from unlearn_bench.perf import perf_command

    try:
        typer.echo(perf_command(_registry(registry, set_, include), model, device, iters, batch_sizes, steps,
                                threads, as_json))
    except RegistryError as exc:  # a bad option, or a real model whose weights are not on this machine
        fail(str(exc))


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


from unlearn_bench import cli_results as _cli_results  # noqa: E402,F401 - registers the results commands


def main() -> None:  # pragma: no cover - console entry
    start = time.time()
    try:
        app()
    finally:
        if "--verbose-time" in sys.argv:
            print(f"{time.time() - start:.2f}s", file=sys.stderr)
