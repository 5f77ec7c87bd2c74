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
    return subprocess.run([sys.executable, "-m", "bench", *args], env=env, capture_output=True, text=True,
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


def test_stage_inputs_never_hold_execution_settings(finished):
    for man in manifests(finished / "store"):
        text = json.dumps(man["inputs"])
        assert "batch_size\": 16" not in text and "device" not in text and "quiet" not in text


def test_rerun_is_fully_cached_even_with_another_batch_size(finished):
    proc = bench([*CMD, "--out", str(finished / "out2"), "--batch-size", "3"], finished / "store")
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
    proc = subprocess.Popen([sys.executable, "-m", "bench", *CMD, "--out", str(tmp_path / "out"), "--quiet"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(store.rglob("manifest.json"))) < 4 and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(store.rglob("manifest.json")))
    assert not (tmp_path / "out" / "records.csv").exists()
    again = bench([*CMD, "--out", str(tmp_path / "out")], store)
    assert again.returncode == 0, again.stderr
    total = len(list(store.rglob("manifest.json")))
    assert done < total and f", {total - done} computed" in again.stderr  # finished stages were not redone
    assert (tmp_path / "out" / "records.csv").read_text() == (finished / "out" / "records.csv").read_text()


def _run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def test_two_cpu_workers_compute_each_stage_once_and_match(finished, tmp_path):
    store = tmp_path / "store"
    proc = bench([*CMD, "--out", str(tmp_path / "out"), "--workers", "2", "--quiet"], store)
    assert proc.returncode == 0, proc.stderr
    assert _run_json(tmp_path / "out")["stages"]["computed"] == len(manifests(store))  # nothing computed twice
    assert (tmp_path / "out" / "records.csv").read_text() == (finished / "out" / "records.csv").read_text()
    # everything cached: answered in this process, no worker processes started, same records
    again = bench([*CMD, "--out", str(tmp_path / "out2"), "--workers", "2"], store)
    assert again.returncode == 0, again.stderr
    assert "running 2 workers" not in again.stderr and _run_json(tmp_path / "out2")["stages"]["computed"] == 0
    assert (tmp_path / "out2" / "records.csv").read_text() == (finished / "out" / "records.csv").read_text()


def test_submitit_local_executor(finished, tmp_path):
    pytest.importorskip("submitit")
    store = tmp_path / "store"
    proc = bench([*CMD, "--out", str(tmp_path / "out"), "--executor", "submitit-local", "--quiet"], store)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "records.csv").read_text() == (finished / "out" / "records.csv").read_text()
    again = bench([*CMD, "--out", str(tmp_path / "out2"), "--executor", "submitit-local", "--quiet"], store)
    assert again.returncode == 0 and _run_json(tmp_path / "out2")["stages"]["computed"] == 0  # resumable
