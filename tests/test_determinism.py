"""README's determinism claims, each shown: within one numeric environment (device, torch, CPU threads, and for
stages that sample, the batch size) results are bit for bit the same whatever the worker count; changing one of
those settings computes new entries instead of silently reusing bytes made under another."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from unlearn_bench.cli import app

SPLIT = max(1, (os.cpu_count() or 1) // 2)  # the threads per worker of `make run` (2 workers)
# the cheapest cell that samples and scores (the full matrix's claims are in test_run_e2e.py)
CMD = ["run", "--model", "tiny", "--concept", "nudity", "--methods", "none", "--attacks", "none",
       "--metrics", "nudenet", "--seeds", "0", "--quiet"]


def bench(out: Path, store: Path, *extra: str) -> dict:
    result = CliRunner().invoke(app, [*CMD, "--out", str(out), "--store", str(store), *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "run.json").read_text())


def entries(store: Path) -> dict[tuple[str, str], dict]:
    out = {}
    for p in store.glob("*/*/*/manifest.json"):
        man = json.loads(p.read_text())
        out[(man["stage"], man["key"])] = man
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process at make run's per-worker thread count."""
    root = tmp_path_factory.mktemp("det")
    bench(root / "out", root / "store", "--threads", str(SPLIT))
    return root


def test_make_run_thread_split_matches_one_process_at_that_thread_count(single, tmp_path):
    run = bench(tmp_path / "out", tmp_path / "store", "--workers", "2")  # make run's default split
    assert run["stages"]["computed"] > 0 and run["stages"]["cached"] >= 0
    assert (tmp_path / "out" / "records.csv").read_bytes() == (single / "out" / "records.csv").read_bytes()
    mine, theirs = entries(tmp_path / "store"), entries(single / "store")
    assert set(mine) == set(theirs)  # the same stage keys ...
    assert all(mine[k]["files"] == theirs[k]["files"] for k in mine)  # ... holding the same bytes (checksums)
    threads = {m["inputs"]["numerics"]["threads"] for m in mine.values()}
    assert threads == {SPLIT}


def test_thread_count_is_in_every_key(single, tmp_path):
    other = SPLIT + 1
    bench(tmp_path / "out", single / "store", "--threads", str(other))
    by_threads: dict[int, set[str]] = {}
    for (stage, _), man in entries(single / "store").items():
        by_threads.setdefault(man["inputs"]["numerics"]["threads"], set()).add(stage)
    assert set(by_threads) == {SPLIT, other} and by_threads[SPLIT] == by_threads[other]


@pytest.mark.parametrize("batch", ["1", "3", "16"])
def test_batch_size_keys_the_stages_that_sample(single, tmp_path, batch):
    base = entries(single / "store")
    run = bench(tmp_path / "out", single / "store", "--threads", str(SPLIT), "--batch-size", batch)
    made = {k: m for k, m in entries(single / "store").items() if k not in base}
    if batch == "16":  # the default: the fixture's run already made every entry
        assert run["stages"]["computed"] == 0 and not made
    else:
        assert run["stages"]["computed"] > 0
        sizes = {m["inputs"]["numerics"].get("batch_size") for (stage, _), m in made.items()
                 if stage in ("data", "generate")}
        assert sizes == {int(batch)}
    again = bench(tmp_path / "out2", single / "store", "--threads", str(SPLIT), "--batch-size", batch)
    assert again["stages"]["computed"] == 0  # the same setting is found, never recomputed
    assert (tmp_path / "out2" / "records.csv").read_bytes() == (tmp_path / "out" / "records.csv").read_bytes()
    rows = list(csv.DictReader((tmp_path / "out" / "records.csv").open()))
    assert len(rows) == 1
