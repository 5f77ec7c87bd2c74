"""Content-addressed artifact store: one directory per stage result, keyed by a versioned hash of its inputs.

Why this shape: a stage's key is a hash of exactly the inputs that change its result (never batch size, device,
worker count or display options), so a re-run of the same command finds every finished stage and recomputes
nothing; a changed learning rate gets a new key. Entries are written into a temporary directory and renamed into
place atomically, so a killed run never leaves a half-written entry that looks finished; a per-key file lock lets
several workers or concurrent `bench run` invocations share one store without computing a stage twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.specs import thaw

HASH_SCHEME = "bench-stage-v1"  # bump when the meaning of a key's inputs changes


def canonical(obj: Any) -> str:
    return json.dumps(thaw(obj), sort_keys=True, separators=(",", ":"), default=str)


def stage_key(stage: str, inputs: dict[str, Any]) -> str:
    """sha256 over the hash scheme, the stage name and its canonicalised inputs (first 24 hex digits)."""
    payload = canonical({"scheme": HASH_SCHEME, "stage": stage, "inputs": inputs})
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str), encoding="utf-8")
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _cuda() -> Any:
    """torch.cuda when torch is already imported and a GPU is in use; None otherwise (never imports torch)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda


@dataclass
class Entry:
    stage: str
    key: str
    path: Path
    manifest: dict[str, Any]
    cached: bool

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest.get("meta", {})


class NotCached(LookupError):
    """A stage a cached_only store would have had to compute."""


@dataclass
class Store:
    root: Path
    code_version: str = ""
    counts: dict[str, int] = field(default_factory=lambda: {"cached": 0, "computed": 0})
    cached_only: bool = False  # raise NotCached instead of computing (a cheap "is it all done?" probe)

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key[:2] / key

    def lookup(self, stage: str, key: str) -> Entry | None:
        p = self.path(stage, key)
        man = p / "manifest.json"
        if not man.exists():
            return None
        return Entry(stage, key, p, json.loads(man.read_text(encoding="utf-8")), cached=True)

    def get_or_compute(self, stage: str, inputs: dict[str, Any], compute: Callable[[Path], dict[str, Any]]) -> Entry:
        """Return the finished entry for these inputs, computing it (under the key's lock) if it is missing.

        `compute(tmp_dir)` writes its files into tmp_dir and returns a small JSON-able dict of metadata.
        """
        from filelock import FileLock

        key = stage_key(stage, inputs)
        hit = self.lookup(stage, key)
        if hit is not None:
            self.counts["cached"] += 1
            return hit
        if self.cached_only:
            raise NotCached(f"{stage} {key}")
        lock_path = self.root / "locks" / f"{stage}-{key}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock_path)):
            hit = self.lookup(stage, key)  # another worker may have finished it while we waited
            if hit is not None:
                self.counts["cached"] += 1
                return hit
            tmp_root = self.root / "tmp"
            for stale in tmp_root.glob(f"{stage}-{key}.*"):  # left by a killed run; we hold the key's lock
                shutil.rmtree(stale, ignore_errors=True)
            tmp = tmp_root / f"{stage}-{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            started = time.time()
            cuda = _cuda()
            if cuda is not None:
                cuda.reset_peak_memory_stats()
            meta = compute(tmp)
            if cuda is not None:  # provenance: the stage's peak GPU memory
                meta = dict(meta) | {"peak_gpu_memory_gb": round(cuda.max_memory_allocated() / 2**30, 3)}
            files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            manifest = {"scheme": HASH_SCHEME, "stage": stage, "key": key, "inputs": thaw(inputs),
                        "code_version": self.code_version,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "seconds": round(time.time() - started, 3), "files": files, "meta": meta}
            write_json_atomic(tmp / "manifest.json", manifest)
            final = self.path(stage, key)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        self.counts["computed"] += 1
        return Entry(stage, key, final, manifest, cached=False)

    def verify(self, entry: Entry) -> list[str]:
        """Files whose checksum no longer matches the manifest (empty list = intact)."""
        bad = []
        for name, digest in entry.manifest.get("files", {}).items():
            p = entry.path / name
            if not p.exists() or sha256_file(p) != digest:
                bad.append(name)
        return bad
