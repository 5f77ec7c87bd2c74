"""Worker processes die with their parent: killing `bench run --workers 2` leaves nothing computing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

# long enough to be killed mid-run: an ESD run of many iterations on the tiny model
LONG = ["run", "--model", "tiny", "--concept", "nudity", "--methods", "esd,esd-x", "--attacks", "none",
        "--metrics", "nudenet", "--seeds", "0", "--workers", "2", "--quiet",
        "--set", "method.esd.iterations=100000", "--set", "method.esd-x.iterations=100000"]


def children(pid: int) -> set[int]:
    """Every descendant of pid (from /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    out, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier} - out
        out |= frontier
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start(tmp_path: Path) -> tuple[subprocess.Popen, set[int]]:
    env = os.environ | {"BENCH_CACHE": str(tmp_path / "store"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "unlearn_bench", *LONG, "--out", str(tmp_path / "out")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    workers: set[int] = set()
    while time.time() < deadline and proc.poll() is None:
        # both workers are computing once the store holds their temp directories
        if len([p for p in (tmp_path / "store" / "tmp").glob("unlearn-*") if p.is_dir()]) >= 2:
            workers = children(proc.pid)
            break
        time.sleep(0.2)
    assert proc.poll() is None and len(workers) >= 2, "the workers never started"
    return proc, workers


def wait_gone(pids: set[int], timeout: float = 30) -> set[int]:
    deadline = time.time() + timeout
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    return {p for p in pids if alive(p)}


def test_sigkill_of_the_parent_stops_the_workers(tmp_path):
    proc, workers = start(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert wait_gone(workers) == set()


def test_sigterm_of_the_parent_stops_the_workers_and_keeps_finished_files(tmp_path):
    proc, workers = start(tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert wait_gone(workers) == set()
    assert (tmp_path / "out" / "records.csv").read_text().startswith("suite,")  # written, not half-written
