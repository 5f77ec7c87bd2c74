"""Content-addressed artifact store: one directory per stage result, keyed by a versioned hash of its inputs.

Why this shape: a stage's key is a hash of exactly the inputs that change its stored bytes (the runner adds the
numeric environment - device, torch build, CPU threads, and for sampling stages the batch size - and never the
worker count or display options), so a re-run of the same command finds every finished stage and recomputes
nothing; a changed learning rate gets a new key. Entries are written into a temporary directory and renamed into
place atomically, so a killed run never leaves a half-written entry that looks finished; a per-key file lock lets
several workers or concurrent `bench run` invocations share one store without computing a stage twice.

Why it checks itself: a disk that filled up, a user who deleted a file, or a copy that was cut short would otherwise
feed wrong bytes into every later stage. Every read compares each file's size with the manifest (cheap), and a
damaged entry is moved to `quarantine/` (never deleted: it may be the only copy of hours of work) and recomputed.
Full sha256 checks are `verify` (`bench store verify`). A stage that failed is marked under `failed/` with the run's
id, so the other workers of that run skip it instead of failing on it again, while a new run retries it.

Layout under the root: <stage>/<key[:2]>/<key>/ (entries), locks/, tmp/, quarantine/, failed/.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearn_bench.specs import thaw

HASH_SCHEME = "bench-stage-v2"  # bump when the meaning of a key's inputs (or the manifest layout) changes
# Manifests this code can read: v1 listed files as {name: sha256} (no sizes). Entries of v1 keys are only looked up
# by older records (reports, rescoring); accepting them keeps an upgrade from quarantining a whole store.
READABLE_SCHEMES = ("bench-stage-v1", HASH_SCHEME)
RESERVED = ("locks", "tmp", "quarantine", "failed")  # top-level folders that are not stages
LOCK_TIMEOUT_S = 120.0  # a lookup that finds damage waits this long for the key's lock before leaving it be

log = logging.getLogger("unlearn_bench.store")


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


def _host() -> str:
    return socket.gethostname().replace("/", "_").replace(" ", "_") or "localhost"


def _utc_stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def pid_alive(pid: int) -> bool:
    """False only when no such process exists (a process of another user still counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def parse_tmp_name(name: str) -> tuple[str, str, int] | None:
    """(stage-key prefix, host, pid) of a temp dir named <stage>-<key>.<host>.<pid>.<uuid>; None if not that form.
    The host may contain dots (a FQDN), so it is what lies between the first dot and the last two."""
    prefix, _, rest = name.partition(".")
    parts = rest.rsplit(".", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return prefix, parts[0], int(parts[1])


def _file_table(manifest: dict[str, Any]) -> dict[str, tuple[str | None, int | None]]:
    """name -> (sha256, size) for both manifest layouts (v1: name -> sha256; v2: name -> {sha256, size})."""
    out: dict[str, tuple[str | None, int | None]] = {}
    for name, rec in manifest["files"].items():
        if isinstance(rec, dict):
            out[name] = (rec.get("sha256"), rec.get("size"))
        else:
            out[name] = (str(rec), None)
    return out


def read_entry(path: Path, stage: str, key: str) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) when the entry at `path` is whole as far as sizes tell, else (None, why it is damaged)."""
    man = path / "manifest.json"
    if not path.is_dir():
        return None, "not a directory"
    if not man.is_file():
        return None, "no manifest.json"
    try:
        manifest = json.loads(man.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"manifest.json unreadable ({type(exc).__name__}: {str(exc)[:80]})"
    if not isinstance(manifest, dict):
        return None, "manifest.json is not a JSON object"
    if manifest.get("scheme") not in READABLE_SCHEMES:
        return None, f"manifest scheme {manifest.get('scheme')!r}, expected {HASH_SCHEME!r}"
    if manifest.get("stage") != stage or manifest.get("key") != key:
        return None, f"manifest names {manifest.get('stage')}/{manifest.get('key')}, expected {stage}/{key}"
    if not isinstance(manifest.get("files"), dict):
        return None, "manifest has no files table"
    for name, (_, size) in _file_table(manifest).items():
        p = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return None, f"manifest lists a path outside the entry: {name!r}"
        try:
            actual = p.stat().st_size
        except OSError:
            return None, f"{name} is missing"
        if size is not None and actual != size:
            return None, f"{name} has {actual} bytes, manifest says {size}"
    return manifest, None


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


class StageFailed(RuntimeError):
    """This stage already failed in this run (a marker with the same run id): not computed again by this run."""

    def __init__(self, stage: str, key: str, reason: str) -> None:
        super().__init__(f"{stage} {key} failed earlier in this run: {reason}")
        self.stage, self.key, self.reason = stage, key, reason

    def __reduce__(self) -> tuple[Any, tuple[str, str, str]]:
        return (StageFailed, (self.stage, self.key, self.reason))  # crosses worker-process boundaries


@dataclass
class Store:
    root: Path
    code_version: str = ""
    counts: dict[str, int] = field(default_factory=lambda: {"cached": 0, "computed": 0})
    cached_only: bool = False  # raise NotCached instead of computing (a cheap "is it all done?" probe)
    run_id: str = ""  # when set, a failed compute leaves a marker that this run's other workers honour
    touched: set[tuple[str, str]] = field(default_factory=set)  # (stage, key) of every entry get_or_compute gave
    _swept: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key[:2] / key

    def lock_path(self, stage: str, key: str) -> Path:
        return self.root / "locks" / f"{stage}-{key}.lock"

    def _lock(self, stage: str, key: str, timeout: float = -1) -> Any:
        from filelock import FileLock

        p = self.lock_path(stage, key)
        p.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(p), timeout=timeout)

    # --- reading -----------------------------------------------------------------------------------------------
    def lookup(self, stage: str, key: str) -> Entry | None:
        """The finished entry, or None. A damaged one is moved to quarantine (under the key's lock) and reads as
        missing, so the next get_or_compute recomputes it."""
        return self._lookup(stage, key, locked=False)

    def _lookup(self, stage: str, key: str, locked: bool) -> Entry | None:
        p = self.path(stage, key)
        if not os.path.lexists(p):
            return None
        manifest, why = read_entry(p, stage, key)
        if manifest is not None:
            return Entry(stage, key, p, manifest, cached=True)
        if locked:
            self._quarantine(stage, key, str(why))
            return None
        from filelock import Timeout

        try:
            with self._lock(stage, key, timeout=LOCK_TIMEOUT_S):
                return self._lookup(stage, key, locked=True)  # another worker may have repaired it meanwhile
        except Timeout:
            log.warning("store: %s/%s looks damaged (%s) but its lock is held; left in place", stage, key, why)
        except OSError as exc:  # a read-only store: report the damage, move nothing
            log.warning("store: %s/%s looks damaged (%s); cannot lock it to move it aside (%s)", stage, key, why, exc)
        return None

    def quarantine(self, stage: str, key: str, reason: str) -> Path | None:
        """Move an entry aside to quarantine/ under its lock (for `bench store verify --fix`)."""
        with self._lock(stage, key):
            return self._quarantine(stage, key, reason)

    def _quarantine(self, stage: str, key: str, reason: str) -> Path | None:
        src = self.path(stage, key)
        if not os.path.lexists(src):
            return None
        dest = self.root / "quarantine" / f"{stage}-{key}-{_utc_stamp()}-{uuid.uuid4().hex[:6]}"
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)
        except OSError as exc:
            log.warning("store: damaged entry %s/%s (%s) could not be moved aside: %s", stage, key, reason, exc)
            return None
        log.warning("store: damaged entry %s/%s (%s) moved to %s; it will be recomputed", stage, key, reason, dest)
        return dest

    def verify(self, entry: Entry) -> list[str]:
        """Problems of an entry's files against its manifest, by size and full sha256 (empty list = intact)."""
        problems = []
        for name, (digest, size) in _file_table(entry.manifest).items():
            p = entry.path / name
            if not p.is_file():
                problems.append(f"{name}: missing")
            elif size is not None and p.stat().st_size != size:
                problems.append(f"{name}: {p.stat().st_size} bytes, manifest says {size}")
            elif digest is not None and sha256_file(p) != digest:
                problems.append(f"{name}: sha256 mismatch")
        return problems

    # --- temp dirs ---------------------------------------------------------------------------------------------
    def sweep_tmp(self) -> list[Path]:
        """Remove temp dirs left by dead processes of this host (a killed run); returns what was removed. Temp dirs
        of other hosts are left alone: their pids mean nothing here (a shared store on a network filesystem)."""
        removed: list[Path] = []
        tmp_root, host = self.root / "tmp", _host()
        if not tmp_root.is_dir():
            return removed
        for d in tmp_root.iterdir():
            parsed = parse_tmp_name(d.name)
            if parsed is None or parsed[1] != host or pid_alive(parsed[2]):
                continue
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
        return removed

    # --- failure markers ---------------------------------------------------------------------------------------
    def failure_path(self, stage: str, key: str) -> Path:
        return self.root / "failed" / f"{stage}-{key}.json"

    def mark_failed(self, stage: str, inputs_or_key: dict[str, Any] | str, reason: str, run_id: str) -> Path:
        """Record that a stage failed in run `run_id` (atomically; the latest failure wins)."""
        key = inputs_or_key if isinstance(inputs_or_key, str) else stage_key(stage, inputs_or_key)
        path = self.failure_path(stage, key)
        write_json_atomic(path, {"stage": stage, "key": key, "reason": reason[:4000], "run_id": run_id,
                                 "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": _host(),
                                 "pid": os.getpid()})
        return path

    def failure(self, stage: str, key: str, run_id: str) -> str | None:
        """The recorded reason if this stage failed in the same run (an empty run id matches nothing)."""
        if not run_id:
            return None
        try:
            marker = json.loads(self.failure_path(stage, key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(marker, dict) or marker.get("run_id") != run_id:
            return None
        return str(marker.get("reason", ""))

    def _raise_if_failed(self, stage: str, key: str) -> None:
        reason = self.failure(stage, key, self.run_id)
        if reason is not None:
            raise StageFailed(stage, key, reason)

    # --- computing ---------------------------------------------------------------------------------------------
    def _hit(self, entry: Entry) -> Entry:
        self.counts["cached"] += 1
        self.touched.add((entry.stage, entry.key))
        return entry

    def get_or_compute(self, stage: str, inputs: dict[str, Any], compute: Callable[[Path], dict[str, Any]]) -> Entry:
        """Return the finished entry for these inputs, computing it (under the key's lock) if it is missing.

        `compute(tmp_dir)` writes its files into tmp_dir and returns a small JSON-able dict of metadata. Raises
        NotCached (cached_only store) or StageFailed (it failed earlier in this run) instead of computing.
        """
        key = stage_key(stage, inputs)
        if not self._swept and not self.cached_only:
            self._swept = True
            self.sweep_tmp()
        hit = self._lookup(stage, key, locked=False)
        if hit is not None:
            return self._hit(hit)
        if self.cached_only:
            raise NotCached(f"{stage} {key}")
        self._raise_if_failed(stage, key)
        with self._lock(stage, key):
            hit = self._lookup(stage, key, locked=True)  # another worker may have finished it while we waited
            if hit is not None:
                return self._hit(hit)
            self._raise_if_failed(stage, key)  # ... or failed on it
            entry = self._compute(stage, key, inputs, compute)
        self.counts["computed"] += 1
        self.touched.add((stage, key))
        return entry

    def _compute(self, stage: str, key: str, inputs: dict[str, Any], compute: Callable[[Path], dict[str, Any]]
                 ) -> Entry:
        """Run compute into a fresh temp dir and rename it into place; the caller holds the key's lock."""
        tmp_root = self.root / "tmp"
        for stale in tmp_root.glob(f"{stage}-{key}.*"):  # left by a killed run; we hold the key's lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = tmp_root / f"{stage}-{key}.{_host()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            started = time.time()
            cuda = _cuda()
            if cuda is not None:
                cuda.reset_peak_memory_stats()
            meta = compute(tmp)
            if cuda is not None:  # provenance: the stage's peak GPU memory
                meta = dict(meta) | {"peak_gpu_memory_gb": round(cuda.max_memory_allocated() / 2**30, 3)}
            files = {p.relative_to(tmp).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
                     for p in sorted(tmp.rglob("*")) if p.is_file()}
            manifest = {"scheme": HASH_SCHEME, "stage": stage, "key": key, "inputs": thaw(inputs),
                        "code_version": self.code_version, "run_id": self.run_id,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "seconds": round(time.time() - started, 3), "files": files, "meta": meta}
            write_json_atomic(tmp / "manifest.json", manifest)
            final = self.path(stage, key)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if self.run_id and isinstance(exc, Exception):
                self.mark_failed(stage, key, f"{type(exc).__name__}: {exc}", self.run_id)
            raise
        self.failure_path(stage, key).unlink(missing_ok=True)
        return Entry(stage, key, final, manifest, cached=False)
