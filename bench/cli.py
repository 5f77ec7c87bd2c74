"""`bench`: the command line. Heavy imports (torch, diffusers) happen inside commands that need them, so
`bench --help`, `bench ls` and `bench validate` start instantly."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from bench.registry import Registry, RegistryError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Relearning-robustness benchmark for concept unlearning in text-to-image diffusion models.")
toy_app = typer.Typer(no_args_is_help=True, help="The toy world: build (train) the shipped toy model and detector.")
app.add_typer(toy_app, name="toy")

LS_SECTIONS = ("methods", "attacks", "metrics", "models", "concepts", "suites", "prompt_sets", "wrappers")
RegistryOpt = Annotated[Path | None, typer.Option("--registry", help="registry YAML (default: the project's)")]


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _registry(path: Path | None, overrides: list[str] | None = None) -> Registry:
    try:
        return Registry.load(path, overrides or [])
    except RegistryError as exc:
        fail(str(exc))
        raise  # unreachable


@app.command("ls")
def ls(section: Annotated[str, typer.Argument(help=f"one of {', '.join(LS_SECTIONS)}")] = "methods",
       registry: RegistryOpt = None) -> None:
    """List registry entries with a one-line description (and the paper or source)."""
    reg = _registry(registry)
    if section not in LS_SECTIONS:
        from bench.registry import suggest

        fail(f"unknown section '{section}'.{suggest(section, LS_SECTIONS)} Choose from: {', '.join(LS_SECTIONS)}")
    from rich.console import Console
    from rich.table import Table

    table = Table(title=section, show_lines=False)
    for col in ("name", "description", "paper / source"):
        table.add_column(col, overflow="fold")
    for name, desc, extra in reg.describe(section):
        table.add_row(name, desc, extra)
    Console().print(table)


@app.command()
def validate(file: Annotated[Path | None, typer.Argument(help="registry YAML to check")] = None) -> None:
    """Resolve every registry entry against every model; exit 2 listing the problems, if any."""
    reg = _registry(file)
    problems = reg.validate()
    if problems:
        for p in problems:
            typer.echo(f"  - {p}", err=True)
        fail(f"{reg.path}: {len(problems)} problem(s)")
    typer.echo(f"{reg.path}: OK ({', '.join(f'{len(reg.names(s))} {s}' for s in LS_SECTIONS)})")


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
    batch_size: Annotated[int, typer.Option(help="generation batch size (does not change results)")] = 16,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
    registry: RegistryOpt = None,
) -> None:
    """Run the method x attack x metric matrix; every stage is cached, so re-running resumes."""
    import os

    from bench.plan import make_plan, request_from

    reg = _registry(registry, set_)
    try:
        req = request_from(reg, suite, model, concept, methods, attacks, metrics, seeds)
        plan = make_plan(reg, req)
    except RegistryError as exc:
        fail(str(exc))
    if batch_size < 1:
        fail(f"--batch-size {batch_size}: must be >= 1")
    out_dir = out or Path("results") / req.name
    store_dir = store or (Path(os.environ["BENCH_CACHE"]) if os.environ.get("BENCH_CACHE") else
                          out_dir.resolve().parent / ".store")
    from bench.execute import execute

    execute(plan, out_dir, store_dir, device=device, batch_size=batch_size, quiet=quiet)


@app.command()
def table(out: Annotated[Path, typer.Argument(help="a results directory holding records.csv")]) -> None:
    """Print the leaderboard of a results directory as a Markdown table (what README's tables are made with)."""
    if not (out / "records.csv").exists():
        fail(f"{out}/records.csv not found; run `bench run --out {out}` first")
    from bench.results import markdown_table

    typer.echo(markdown_table(out))


@toy_app.command("build")
def toy_build(
    out: Annotated[Path | None, typer.Option(help="weights directory (default: the shipped bench/toy/weights)")] = None,
    steps: Annotated[int, typer.Option(help="diffusion training steps")] = 4000,
    seed: Annotated[int, typer.Option(help="training seed")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Train the toy text-to-image model and its concept detector (seeded, resumable)."""
    from bench.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from bench.toy.build import build

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
