"""The artifact store: atomic entries, resume after a failed compute, checksums, manifests."""

from __future__ import annotations

import json

import pytest

from bench.store import Store, stage_key


def test_key_is_canonical_and_versioned():
    assert stage_key("s", {"a": 1, "b": [1, 2]}) == stage_key("s", {"b": [1, 2], "a": 1})
    assert stage_key("s", {"a": 1}) != stage_key("t", {"a": 1})


def test_compute_once_then_cached(tmp_path):
    store = Store(tmp_path)
    calls = []

    def compute(d):
        calls.append(1)
        (d / "x.txt").write_text("hello")
        return {"v": 3}

    e1 = store.get_or_compute("st", {"k": 1}, compute)
    e2 = store.get_or_compute("st", {"k": 1}, compute)
    assert len(calls) == 1 and not e1.cached and e2.cached
    assert e2.meta == {"v": 3} and e2.file("x.txt").read_text() == "hello"
    man = json.loads((e2.path / "manifest.json").read_text())
    assert man["inputs"] == {"k": 1} and "x.txt" in man["files"]
    assert store.verify(e2) == []
    e2.file("x.txt").write_text("tampered")
    assert store.verify(e2) == ["x.txt"]


def test_a_failed_compute_leaves_no_entry_and_is_retried(tmp_path):
    store = Store(tmp_path)

    def boom(d):
        (d / "partial.bin").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        store.get_or_compute("st", {"k": 2}, boom)
    assert store.lookup("st", stage_key("st", {"k": 2})) is None
    e = store.get_or_compute("st", {"k": 2}, lambda d: {"ok": True})
    assert not e.cached and e.meta == {"ok": True}
    assert not list((tmp_path / "tmp").glob("st-*"))  # the stale temp dir was cleaned under the lock


def test_cached_only_store_answers_hits_and_refuses_to_compute(tmp_path):
    from bench.store import NotCached

    Store(tmp_path).get_or_compute("s", {"a": 1}, lambda d: {"v": 1})
    probe = Store(tmp_path, cached_only=True)
    assert probe.get_or_compute("s", {"a": 1}, lambda d: {"v": 2}).meta == {"v": 1}
    with pytest.raises(NotCached):
        probe.get_or_compute("s", {"a": 2}, lambda d: {"v": 3})
    assert not (tmp_path / "s" / stage_key("s", {"a": 2})[:2]).exists()
