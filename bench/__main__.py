"""`python -m bench` is the `bench` console script."""

from bench.cli import app

app(prog_name="bench")
