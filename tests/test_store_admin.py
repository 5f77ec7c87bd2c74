"""`bench store du|verify|gc`: usage per stage, full checksums with --fix, and a gc that keeps every entry a kept run
uses (directly or through a kept entry's inputs) and refuses to run without any run to keep."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from unlearn_bench.store import Store, _host
from unlearn_bench.store_admin import human, store_app

app = typer.Typer()
app.add_typer(store_app, name="store")


@app.callback()
def _root() -> None:
    """A group, so `store` stays a sub-command as in bench.cli."""


def cli(*args: str, env: dict | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["store", *args], env=env)
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def files(n: int):
    def compute(d: Path) -> dict:
        (d / "data.bin").write_bytes(b"x" * n)
        return {}
    return compute


@pytest.fixture
def world(tmp_path):
    """A store with a chain data -> unlearn -> generate -> score (each naming the previous key in its inputs), plus
    an unrelated generate entry, a quarantined entry, a stale temp dir and a failure marker."""
    store = Store(tmp_path / "store")
    data = store.get_or_compute("data", {"n": 1}, files(100))
    unlearn = store.get_or_compute("unlearn", {"data": {"forget": data.key}}, files(200))
    gen = store.get_or_compute("generate", {"state": [unlearn.key, None, 0]}, files(300))
    score = store.get_or_compute("score", {"images": gen.key}, files(10))
    other = store.get_or_compute("generate", {"state": ["x", None, 0]}, files(5000))
    (tmp_path / "store" / "quarantine" / "old-entry").mkdir(parents=True)
    (tmp_path / "store" / "quarantine" / "old-entry" / "f").write_bytes(b"q" * 70)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / "store" / "tmp" / f"generate-{'9' * 24}.{_host()}.{dead.pid}.abcd"
    stale.mkdir(parents=True)
    store.mark_failed("attack", "7" * 24, "boom", "r1")
    return {"root": tmp_path / "store", "store": store, "data": data, "unlearn": unlearn, "gen": gen,
            "score": score, "other": other, "stale": stale, "tmp": tmp_path}


def test_du_lists_stages_quarantine_tmp_failed_and_a_total(world):
    code, out = cli("du", "--store", str(world["root"]))
    assert code == 0
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    gen_bytes = sum(f.stat().st_size for e in (world["gen"], world["other"]) for f in e.path.rglob("*"))
    assert 5300 < gen_bytes < 8000 and lines["generate"] == ["2", *human(gen_bytes).split()]
    assert lines["data"][0] == "1" and lines["score"][0] == "1" and "unlearn" in lines
    assert lines["quarantine"][0] == "1" and lines["tmp"][0] == "1" and lines["failed"][:2] == ["markers", "1"]
    assert lines["total"][0] == str(5 + 1 + 1 + 1 + len(list((world["root"] / "locks").iterdir())))
    assert human(0) == "0 B" and human(1536) == "1.5 KiB" and human(3 * 2**30) == "3.0 GiB"


def test_verify_finds_damage_exits_1_and_fix_quarantines_it(world):
    root = world["root"]
    assert cli("verify", "--store", str(root)) == (0, "5 entries checked, 0 damaged\n")
    world["gen"].file("data.bin").write_bytes(b"y" * 300)  # same size: only the full checksum sees it
    (world["data"].path / "manifest.json").unlink()
    code, out = cli("verify", "--store", str(root))
    assert code == 1 and "2 damaged" in out
    assert f"generate/{world['gen'].key}: data.bin: sha256 mismatch" in out
    assert f"data/{world['data'].key}: no manifest.json" in out
    code, out = cli("verify", "--store", str(root), "--fix")
    assert code == 0 and "moved to quarantine" in out
    assert not world["gen"].path.exists() and len(list((root / "quarantine").iterdir())) == 3
    assert cli("verify", "--store", str(root)) == (0, "3 entries checked, 0 damaged\n")


def write_run(folder: Path, store_keys: dict | None = None, records: list[dict] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if store_keys is not None:
        (folder / "run.json").write_text(json.dumps({"plan": {}, "store_keys": store_keys}))
    if records is not None:
        with (folder / "records.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["method", "unlearn_key", "attack_key", "images_key", "cell_hash"])
            writer.writeheader()
            writer.writerows(records)


def test_gc_keeps_the_keys_run_json_names_and_removes_the_rest(world):
    root, results = world["root"], world["tmp"] / "results"
    write_run(results / "suite-a", {"generate": [world["gen"].key], "score": [world["score"].key]})
    code, out = cli("gc", str(results), "--store", str(root), "--dry-run")
    assert code == 0 and f"would remove unused generate/{world['other'].key}" in out and "would free" in out
    assert "stale tmp" in out and "failure marker" in out and "quarantined" not in out
    assert world["other"].path.exists() and world["stale"].exists()  # a dry run removes nothing
    code, out = cli("gc", str(results), "--store", str(root), "--quarantine")
    assert code == 0 and "freed 5." in out
    # the chain behind the kept entries survives through their manifests' inputs
    for name in ("data", "unlearn", "gen", "score"):
        assert world["store"].lookup(world[name].stage, world[name].key) is not None, name
    assert not world["other"].path.exists() and not world["stale"].exists()
    assert not (root / "locks" / f"generate-{world['other'].key}.lock").exists()
    assert (root / "locks" / f"generate-{world['gen'].key}.lock").exists()
    assert not list((root / "quarantine").iterdir()) and not list((root / "failed").iterdir())


def test_gc_falls_back_to_the_key_columns_of_records_csv(world):
    root, results = world["root"], world["tmp"] / "old-results"
    write_run(results / "nested" / "deeper", records=[
        {"method": "esd", "unlearn_key": "", "attack_key": "", "images_key": world["other"].key, "cell_hash": ""}])
    assert cli("gc", str(results), "--store", str(root))[0] == 0
    assert world["other"].path.exists()
    assert not world["gen"].path.exists() and not world["data"].path.exists()


def test_gc_refuses_without_any_run_to_keep(world):
    root, empty = world["root"], world["tmp"] / "empty"
    empty.mkdir()
    code, out = cli("gc", str(empty), "--store", str(root))
    assert code == 2 and "no run.json or records.csv" in out and str(empty) in out
    code, out = cli("gc", str(world["tmp"] / "typo"), "--store", str(root))
    assert code == 2 and "typo: no such folder" in out
    bad = world["tmp"] / "broken"
    bad.mkdir()
    (bad / "run.json").write_text("{not json")
    code, out = cli("gc", str(bad), "--store", str(root))
    assert code == 2 and str(bad / "run.json") in out
    assert world["other"].path.exists() and world["stale"].exists()  # nothing was touched


def test_gc_refuses_while_a_process_is_computing_into_the_store(world):
    write_run(world["tmp"] / "r", {"generate": []})
    (world["root"] / "tmp" / f"generate-{'8' * 24}.{_host()}.{os.getpid()}.abcd").mkdir()
    code, out = cli("gc", str(world["tmp"] / "r"), "--store", str(world["root"]))
    assert code == 2 and "computing into it" in out and world["other"].path.exists()


def test_bad_store_paths_exit_2_naming_the_path(tmp_path, monkeypatch):
    missing = tmp_path / "nope"
    code, out = cli("du", "--store", str(missing))
    assert code == 2 and str(missing) in out
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, out = cli("verify", "--store", str(a_file))
    assert code == 2 and f"{a_file}: not a folder" in out
    monkeypatch.chdir(tmp_path)  # no --store, no BENCH_CACHE: results/.store under the working directory
    code, out = cli("du", env={"BENCH_CACHE": ""})
    assert code == 2 and "results/.store" in out


def test_store_option_defaults_to_bench_cache(world):
    code, out = cli("du", env={"BENCH_CACHE": str(world["root"])})
    assert code == 0 and f"store {world['root']}" in out


def test_store_admin_does_not_import_torch():
    code = "import unlearn_bench.store_admin, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
