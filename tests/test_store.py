"""The artifact store: atomic entries, resume after a failed compute, checksums, manifests, self-checks on read,
quarantine of damaged entries, stale temp dirs, failure markers shared by the workers of one run."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from unlearn_bench.store import HASH_SCHEME, NotCached, StageFailed, Store, _host, parse_tmp_name, stage_key


def write_two(d: Path) -> dict:
    (d / "a.txt").write_text("hello")
    (d / "sub").mkdir()
    (d / "sub" / "b.bin").write_bytes(bytes(range(50)))
    return {"v": 1}


class Counter:
    """A compute function that records how often it ran (picklable state is not needed: tests run in-process)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, d: Path) -> dict:
        self.calls += 1
        return write_two(d)


def snapshot(entry_path: Path) -> dict[str, bytes]:
    return {p.relative_to(entry_path).as_posix(): p.read_bytes() for p in sorted(entry_path.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def test_key_is_canonical_and_versioned():
    assert stage_key("s", {"a": 1, "b": [1, 2]}) == stage_key("s", {"b": [1, 2], "a": 1})
    assert stage_key("s", {"a": 1}) != stage_key("t", {"a": 1})
    assert HASH_SCHEME == "bench-stage-v2"


def test_compute_once_then_cached(tmp_path):
    store = Store(tmp_path)
    compute = Counter()
    e1 = store.get_or_compute("st", {"k": 1}, compute)
    e2 = store.get_or_compute("st", {"k": 1}, compute)
    assert compute.calls == 1 and not e1.cached and e2.cached
    assert e2.meta == {"v": 1} and e2.file("a.txt").read_text() == "hello"
    man = json.loads((e2.path / "manifest.json").read_text())
    assert man["inputs"] == {"k": 1} and man["scheme"] == HASH_SCHEME
    assert man["files"]["a.txt"]["size"] == 5 and len(man["files"]["sub/b.bin"]["sha256"]) == 64
    assert store.verify(e2) == []
    e2.file("a.txt").write_text("HELLO")  # same size: only the checksum can tell
    assert store.verify(e2) == ["a.txt: sha256 mismatch"]
    e2.file("sub/b.bin").unlink()
    assert store.verify(e2) == ["a.txt: sha256 mismatch", "sub/b.bin: missing"]


def test_a_failed_compute_leaves_no_entry_and_is_retried(tmp_path):
    store = Store(tmp_path)

    def boom(d):
        (d / "partial.bin").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        store.get_or_compute("st", {"k": 2}, boom)
    assert store.lookup("st", stage_key("st", {"k": 2})) is None
    assert not list((tmp_path / "tmp").iterdir())  # the temp dir went with the failure
    assert not (tmp_path / "failed").exists()  # no run id: no marker
    e = store.get_or_compute("st", {"k": 2}, lambda d: {"ok": True})
    assert not e.cached and e.meta == {"ok": True}


def test_cached_only_store_answers_hits_and_refuses_to_compute(tmp_path):
    Store(tmp_path).get_or_compute("s", {"a": 1}, lambda d: {"v": 1})
    probe = Store(tmp_path, cached_only=True)
    assert probe.get_or_compute("s", {"a": 1}, lambda d: {"v": 2}).meta == {"v": 1}
    with pytest.raises(NotCached):
        probe.get_or_compute("s", {"a": 2}, lambda d: {"v": 3})
    assert not (tmp_path / "s" / stage_key("s", {"a": 2})[:2]).exists()


def _delete(name):
    return lambda p: (p / name).unlink()


def _truncate(p):
    (p / "sub" / "b.bin").write_bytes(bytes(range(10)))


def _append(p):
    with (p / "a.txt").open("ab") as fh:
        fh.write(b"!")


def _manifest(edit):
    def apply(p):
        man = json.loads((p / "manifest.json").read_text())
        (p / "manifest.json").write_text(json.dumps(edit(man)))
    return apply


def _to_file(p):
    shutil.rmtree(p)
    p.write_text("not an entry")


DAMAGE = {
    "text file deleted": (_delete("a.txt"), "a.txt is missing"),
    "nested file deleted": (_delete("sub/b.bin"), "sub/b.bin is missing"),
    "file truncated": (_truncate, "sub/b.bin has 10 bytes, manifest says 50"),
    "bytes appended": (_append, "a.txt has 6 bytes, manifest says 5"),
    "manifest deleted": (_delete("manifest.json"), "no manifest.json"),
    "manifest not JSON": (lambda p: (p / "manifest.json").write_text('{"scheme": "bench-st'), "unreadable"),
    "manifest not an object": (lambda p: (p / "manifest.json").write_text("[1, 2]"), "not a JSON object"),
    "manifest of another key": (_manifest(lambda m: m | {"key": "0" * 24}), "expected st/"),
    "manifest of another stage": (_manifest(lambda m: m | {"stage": "other"}), "expected st/"),
    "manifest of an unknown scheme": (_manifest(lambda m: m | {"scheme": "x"}), "scheme 'x'"),
    "manifest without files": (_manifest(lambda m: {k: v for k, v in m.items() if k != "files"}), "no files"),
    "manifest escaping the entry": (_manifest(lambda m: m | {"files": {"../x": {"size": 1}}}), "outside"),
    "entry is a file": (_to_file, "not a directory"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_entry_is_quarantined_and_recomputed_identically(tmp_path, caplog, case):
    damage, why = DAMAGE[case]
    store = Store(tmp_path)
    compute = Counter()
    first = store.get_or_compute("st", {"k": 1}, compute)
    original = snapshot(first.path)
    damage(first.path)
    with caplog.at_level(logging.WARNING, logger="unlearn_bench.store"):
        assert store.lookup("st", first.key) is None
    assert len(caplog.records) == 1 and why in caplog.text and first.key in caplog.text
    moved = list((tmp_path / "quarantine").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith(f"st-{first.key}-")
    again = store.get_or_compute("st", {"k": 1}, compute)
    assert compute.calls == 2 and not again.cached and snapshot(again.path) == original
    assert store.verify(again) == [] and store.get_or_compute("st", {"k": 1}, compute).cached


def test_damage_found_inside_get_or_compute_recomputes_without_error(tmp_path):
    store = Store(tmp_path)
    compute = Counter()
    e = store.get_or_compute("st", {"k": 1}, compute)
    (e.path / "manifest.json").unlink()  # the old failure mode: os.replace onto a non-empty directory
    assert not store.get_or_compute("st", {"k": 1}, compute).cached and compute.calls == 2


def test_stray_extra_files_do_not_count_as_damage(tmp_path):
    store = Store(tmp_path)
    e = store.get_or_compute("st", {"k": 1}, write_two)
    (e.path / "notes.txt").write_text("a user's note")
    assert store.lookup("st", e.key) is not None and not (tmp_path / "quarantine").exists()


def test_entries_of_the_previous_manifest_layout_still_read(tmp_path):
    """v1 manifests listed {name: sha256}; reports of older runs look their keys up, so they must not be
    quarantined by the upgrade."""
    store = Store(tmp_path)
    p = store.path("generate", "ab" * 12)
    p.mkdir(parents=True)
    (p / "x.txt").write_text("old")
    digest = __import__("hashlib").sha256(b"old").hexdigest()
    (p / "manifest.json").write_text(json.dumps({"scheme": "bench-stage-v1", "stage": "generate", "key": "ab" * 12,
                                                 "files": {"x.txt": digest}}))
    entry = store.lookup("generate", "ab" * 12)
    assert entry is not None and store.verify(entry) == []
    (p / "x.txt").write_text("new")
    assert store.verify(entry) == ["x.txt: sha256 mismatch"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_dirs_of_dead_processes_are_swept_at_first_compute(tmp_path):
    tmp = tmp_path / "tmp"
    dead = tmp / f"st-{'1' * 24}.{_host()}.{_dead_pid()}.abcd1234"
    live = tmp / f"st-{'2' * 24}.{_host()}.{os.getpid()}.abcd1234"
    elsewhere = tmp / f"st-{'3' * 24}.some-other-host.example.org.{_dead_pid()}.abcd1234"
    odd = tmp / "not-a-temp-dir"
    for d in (dead, live, elsewhere, odd):
        (d / "sub").mkdir(parents=True)
    store = Store(tmp_path)
    store.get_or_compute("st", {"k": 1}, write_two)
    assert not dead.exists() and live.exists() and elsewhere.exists() and odd.exists()
    assert parse_tmp_name(elsewhere.name) == (f"st-{'3' * 24}", "some-other-host.example.org",
                                              int(elsewhere.name.split(".")[-2]))


def test_touched_lists_hits_and_computes_and_survives_pickle_and_replace(tmp_path):
    store = Store(tmp_path)
    a = store.get_or_compute("st", {"k": 1}, write_two)
    b = Store(tmp_path).get_or_compute("other", {"k": 2}, write_two)  # exists, but this store never used it
    assert store.touched == {("st", a.key)}
    store.get_or_compute("other", {"k": 2}, write_two)
    assert store.touched == {("st", a.key), ("other", b.key)} and store.counts == {"cached": 1, "computed": 1}
    clone = pickle.loads(pickle.dumps(store))
    assert clone.touched == store.touched and clone.root == store.root
    probe = replace(store, cached_only=True, counts={"cached": 0, "computed": 0})
    assert probe.get_or_compute("st", {"k": 1}, write_two).cached and probe.cached_only


def test_failure_marker_stops_the_same_run_and_a_new_run_retries(tmp_path):
    store = Store(tmp_path, run_id="run-1")
    key = stage_key("st", {"k": 1})
    store.mark_failed("st", {"k": 1}, "CUDA out of memory", "run-1")
    assert store.failure("st", key, "run-1") == "CUDA out of memory" and store.failure("st", key, "run-2") is None
    compute = Counter()
    with pytest.raises(StageFailed) as info:
        store.get_or_compute("st", {"k": 1}, compute)
    assert compute.calls == 0 and info.value.reason == "CUDA out of memory" and info.value.key == key
    assert pickle.loads(pickle.dumps(info.value)).stage == "st"
    retry = replace(store, run_id="run-2")
    assert not retry.get_or_compute("st", {"k": 1}, compute).cached and compute.calls == 1
    assert not store.failure_path("st", key).exists()  # a success clears the marker
    assert store.get_or_compute("st", {"k": 1}, compute).cached  # a finished entry wins over any marker


def test_a_compute_exception_writes_a_marker_and_leaves_nothing(tmp_path):
    store = Store(tmp_path, run_id="run-7")

    def boom(d):
        (d / "half.bin").write_bytes(b"x" * 10)
        raise ValueError("bad prompt file")

    with pytest.raises(ValueError, match="bad prompt file"):
        store.get_or_compute("st", {"k": 3}, boom)
    key = stage_key("st", {"k": 3})
    marker = json.loads(store.failure_path("st", key).read_text())
    assert marker["run_id"] == "run-7" and "ValueError: bad prompt file" in marker["reason"] and marker["time"]
    assert not os.path.lexists(store.path("st", key)) and not list((tmp_path / "tmp").iterdir())
    other_worker = Store(tmp_path, run_id="run-7")
    with pytest.raises(StageFailed, match="bad prompt file"):
        other_worker.get_or_compute("st", {"k": 3}, write_two)
    assert other_worker.failure("st", key, "") is None  # an empty run id matches nothing


def test_cached_only_probe_reports_not_cached_even_for_a_failed_stage(tmp_path):
    store = Store(tmp_path, run_id="r")
    store.mark_failed("st", {"k": 1}, "boom", "r")
    with pytest.raises(NotCached):
        replace(store, cached_only=True).get_or_compute("st", {"k": 1}, write_two)
