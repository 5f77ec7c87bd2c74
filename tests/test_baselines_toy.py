"""The toy-scaled defaults of the gradient baselines meet the project's bar on seed 0 (the README reports 3 seeds):
red's concept-rate <= 0.10 with attr-acc >= 0.80 of the base model's (1.00 on the toy). Concept Ablation has the
same check in test_ca.py. SLD changes sampling only and does not meet it on the toy (README says why)."""

from __future__ import annotations

import csv

import pytest

from unlearn_bench.registry import Registry


@pytest.mark.slow  # trains and samples the toy model (minutes on 2 cores): `make test-slow`
@pytest.mark.parametrize("name", ["fmn", "erasediff", "scissorhands"])
def test_baseline_erases_red_on_the_toy_and_keeps_the_benign_prompts(name, tmp_path, torch_single_thread):
    from unlearn_bench.execute import execute
    from unlearn_bench.plan import RunRequest, make_plan

    req = RunRequest("custom", "toy", "red", ("none", name), ("none",), ("concept-rate", "attr-acc"), (0,))
    execute(make_plan(Registry.load(), req), tmp_path / "out", tmp_path / "store", device="cpu", quiet=True)
    records = csv.DictReader((tmp_path / "out" / "records.csv").open())
    rows = {(r["method"], r["metric"]): float(r["value"]) for r in records}
    base = rows[("none", "attr-acc")]
    assert rows[("none", "concept-rate")] >= 0.9  # the concept is there to erase
    assert rows[(name, "concept-rate")] <= 0.10, rows
    assert rows[(name, "attr-acc")] >= 0.80 * base, rows
