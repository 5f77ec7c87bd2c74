"""Speed figures (pytest-benchmark; `make bench`). Never part of `make test`'s assertions about time."""

from __future__ import annotations

import pytest

pytest.importorskip("pytest_benchmark")


def test_esd_iteration_speed(benchmark, registry, tiny_model):
    from unlearn_bench.perf import time_esd

    spec = registry.method("esd", registry.model("tiny"))
    result = benchmark.pedantic(time_esd, args=(tiny_model, spec, registry.concept("nudity"), 3, False), rounds=3)
    assert result["it_per_s"] > 0


def test_sampling_speed(benchmark, tiny_model):
    images = benchmark(tiny_model.sample, ["a"] * 8, list(range(8)), None, 4, 8)
    assert images.shape[0] == 8


def test_reference_esd_iteration_speed(benchmark, registry, tiny_model):
    """The plain loop from ESD's equation that `bench perf` sets the harness against (same inputs, same losses)."""
    from unlearn_bench.perf import reference_esd

    spec = registry.method("esd", registry.model("tiny"))
    result = benchmark.pedantic(reference_esd, args=(tiny_model, spec, registry.concept("nudity"), 3), rounds=3)
    assert result["it_per_s"] > 0 and len(result["losses"]) == 4
