"""`bench run` end to end on the tiny model: results files, full caching on re-run, resume after SIGKILL."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CMD = ["run", "--model", "tiny", "--concept", "nudity", "--methods", "none,esd", "--attacks", "none,ft-lr1e-5",
       "--metrics", "nudenet", "--seeds", "0"]


def bench(args: list[str], store: Path, **kw) -> subprocess.CompletedProcess:
    env = os.environ | {"BENCH_CACHE": str(store), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "unlearn_bench", *args], env=env, capture_output=True, text=True,
                          timeout=600, **kw)


def manifests(store: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in store.rglob("manifest.json")]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    proc = bench([*CMD, "--out", str(root / "out"), "--quiet"], root / "store")
    assert proc.returncode == 0, proc.stderr
    return root


def test_results_files(finished):
    out = finished / "out"
    rows = list(csv.DictReader((out / "records.csv").open()))
    # 2 methods x (none@0 + ft@2 + ft@4) x 1 metric x 1 seed
    assert len(rows) == 6
    need = {"model", "concept", "method", "attack", "attack_step", "metric", "value", "stderr", "n", "seed",
            "higher_is_better", "metric_version", "cell_hash", "sampler", "steps", "guidance", "images_per_prompt",
            "metric_settings"}
    assert need <= set(rows[0])
    assert {(r["method"], r["attack"], r["attack_step"]) for r in rows} == {
        (m, a, s) for m in ("none", "esd") for a, s in (("none", "0"), ("ft-lr1e-5", "2"), ("ft-lr1e-5", "4"))}
    assert json.loads(rows[0]["metric_settings"])["threshold"] == 0.45
    board = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert [r["method"] for r in board] == ["none", "esd"] and "ft-lr1e-5@4/nudenet" in board[0]
    run = json.loads((out / "run.json").read_text())
    assert {"git", "packages", "device", "plan", "prompts_seeds_hash"} <= set(run)
    assert run["packages"]["torch"] and run["plan"]["methods"][1]["params"]["iterations"] == 4


def test_stage_inputs_hold_the_numeric_environment_and_no_display_settings(finished):
    for man in manifests(finished / "store"):
        env = man["inputs"]["numerics"]
        assert env["device"] == "cpu" and env["threads"] == 1 and env["torch"]
        assert ("batch_size" in env) == (man["stage"] in ("data", "generate"))  # only stages that sample
        text = json.dumps(man["inputs"])
        assert "quiet" not in text and "workers" not in text and "progress" not in text


def test_rerun_is_fully_cached(finished):
    proc = bench([*CMD, "--out", str(finished / "out2")], finished / "store")
    assert proc.returncode == 0, proc.stderr
    assert ", 0 computed" in proc.stderr
    assert (finished / "out2" / "records.csv").read_text() == (finished / "out" / "records.csv").read_text()


def test_changed_lr_recomputes_only_what_depends_on_it(finished):
    before = len(manifests(finished / "store"))
    proc = bench([*CMD, "--out", str(finished / "out3"), "--set", "method.esd.lr=2e-3"], finished / "store")
    assert proc.returncode == 0, proc.stderr
    new = [m for m in manifests(finished / "store")][before:]
    stages = sorted(m["stage"] for m in manifests(finished / "store"))
    assert stages.count("unlearn") == 2  # esd at two learning rates; `none` needs no stage
    assert len(manifests(finished / "store")) > before and new is not None


def test_sigkill_then_resume_matches_uninterrupted(finished, tmp_path):
    store = tmp_path / "store"
    env = os.environ | {"BENCH_CACHE": str(store), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "unlearn_bench", *CMD, "--out", str(tmp_path / "out"), "--quiet"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(store.rglob("manifest.json"))) < 4 and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(store.rglob("manifest.json")))
    partial = list(csv.DictReader((tmp_path / "out" / "records.csv").open()))  # only cells that had finished
    assert len(partial) < 6 and all(float(r["value"]) >= 0 for r in partial)
    again = bench([*CMD, "--out", str(tmp_path / "out")], store)
    assert again.returncode == 0, again.stderr
    total = len(list(store.rglob("manifest.json")))
    assert done < total and f", {total - done} computed" in again.stderr  # finished stages were not redone
    assert (tmp_path / "out" / "records.csv").read_text() == (finished / "out" / "records.csv").read_text()


def _run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def test_two_cpu_workers_compute_each_stage_once_and_match(finished, tmp_path):
    store = tmp_path / "store"
    proc = bench([*CMD, "--out", str(tmp_path / "out"), "--workers", "2", "--threads", "1", "--quiet"], store)
    assert proc.returncode == 0, proc.stderr
    assert _run_json(tmp_path / "out")["stages"]["computed"] == len(manifests(store))  # nothing computed twice
    # byte-identical results and stored files: the worker count is not in any key and changes no byte
    assert (tmp_path / "out" / "records.csv").read_text() == (finished / "out" / "records.csv").read_text()
    mine = {(m["stage"], m["key"]): m["files"] for m in manifests(store)}
    theirs = {(m["stage"], m["key"]): m["files"] for m in manifests(finished / "store")}
    assert mine.items() <= theirs.items()
    # everything cached: answered in this process, no worker processes started, same records
    again = bench([*CMD, "--out", str(tmp_path / "out2"), "--workers", "2", "--threads", "1"], store)
    assert again.returncode == 0, again.stderr
    assert "running 2 workers" not in again.stderr and _run_json(tmp_path / "out2")["stages"]["computed"] == 0
    assert (tmp_path / "out2" / "records.csv").read_text() == (finished / "out" / "records.csv").read_text()


@pytest.mark.slow  # one process per task, each importing torch (minutes): `make test-slow`
def test_submitit_local_executor(finished, tmp_path):
    pytest.importorskip("submitit")
    store = tmp_path / "store"
    proc = bench([*CMD, "--out", str(tmp_path / "out"), "--executor", "submitit-local", "--quiet"], store)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "records.csv").read_text() == (finished / "out" / "records.csv").read_text()
    again = bench([*CMD, "--out", str(tmp_path / "out2"), "--executor", "submitit-local", "--quiet"], store)
    assert again.returncode == 0 and _run_json(tmp_path / "out2")["stages"]["computed"] == 0  # resumable


def test_damaged_entries_are_moved_aside_and_recomputed_to_the_same_records(finished, tmp_path):
    """Delete or truncate a file of a finished entry of every stage, or its manifest: the re-run exits 0, the
    damaged entries go to quarantine, and records.csv is byte-identical to the undamaged run."""
    import shutil

    store = tmp_path / "store"
    shutil.copytree(finished / "store", store)
    used = _run_json(finished / "out")["store_keys"]  # the entries this run read (other tests add more)
    entries = {stage: store / stage / keys[0][:2] / keys[0] for stage, keys in used.items()}
    assert {"data", "unlearn", "attack", "generate", "score"} <= set(entries)
    (entries["unlearn"] / "delta.safetensors").unlink()  # a deleted weights file
    step = next(entries["attack"].glob("step-*.safetensors"))
    step.write_bytes(step.read_bytes()[:100])  # a truncated checkpoint
    image = next((entries["generate"] / "images").iterdir())
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])  # a truncated image
    (entries["score"] / "manifest.json").unlink()  # a deleted manifest (the directory stays)
    with (entries["data"] / "captions.json").open("a") as fh:
        fh.write(" ")  # a grown file
    again = bench([*CMD, "--out", str(tmp_path / "out"), "--quiet"], store)
    assert again.returncode == 0, again.stderr
    assert "Traceback" not in again.stderr
    assert (tmp_path / "out" / "records.csv").read_text() == (finished / "out" / "records.csv").read_text()
    moved = sorted(p.name.split("-")[0] for p in (store / "quarantine").iterdir())
    assert moved == ["attack", "data", "generate", "score", "unlearn"]
