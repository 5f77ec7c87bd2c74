"""`python -m unlearn_bench` is the `bench` console script."""

from unlearn_bench.cli import app

app(prog_name="bench")
