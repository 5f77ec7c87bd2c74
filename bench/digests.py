"""sha256 of large files (external checkpoints), remembered so that planning a run does not re-read gigabytes.

Why: an external checkpoint's identity in every stage key is a digest of its content, never its path (moving a
folder keeps the cache; changing one tensor recomputes). Hashing a 3.4 GB UNet takes tens of seconds, and every
`bench run` plans again, so digests are cached in a small JSON file keyed by the file's absolute path, size,
mtime_ns and ctime_ns: a rewritten file changes at least one of them and is hashed again; a moved file is hashed
once at its new place. ctime cannot be set back by a user (`touch -d` sets only mtime), so an edit that restores
size and mtime is still noticed.

The cache lives at $BENCH_HOME/checkpoint-digests.json (default ~/.cache/unlearn-bench/). It is only a memo: a lost,
stale or unwritable file costs a re-hash, never a wrong key. Writes are atomic (temp file + rename); two processes
writing at once may drop each other's new entries, which again only costs a re-hash. Entries of files that no
longer exist are dropped when the file is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from unlearn_bench.checkpoints import CheckpointError, Layout
from unlearn_bench.store import sha256_file, write_json_atomic

CACHE_FILE = "checkpoint-digests.json"
MAX_ENTRIES = 2000
FINGERPRINT_SCHEME = 1


def cache_path() -> Path:
    root = os.environ.get("BENCH_HOME") or Path.home() / ".cache" / "unlearn-bench"
    return Path(root).expanduser() / CACHE_FILE


def _read(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _stamp(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def file_digest(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes, from the cache when the file's size and times are unchanged."""
    p = Path(path).resolve()
    stamp = _stamp(p.stat())
    where = cache_path()
    cache = _read(where)
    hit = cache.get(str(p))
    if isinstance(hit, dict) and all(hit.get(k) == v for k, v in stamp.items()) and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    digest = sha256_file(p)
    if _stamp(p.stat()) != stamp:  # written to while we read it: do not remember a digest of a moving target
        return digest
    cache = {k: v for k, v in _read(where).items() if os.path.exists(k)}
    cache[str(p)] = stamp | {"sha256": digest}
    if len(cache) > MAX_ENTRIES:
        cache = dict(list(cache.items())[-MAX_ENTRIES:])
    try:
        write_json_atomic(where, cache)
    except OSError:
        pass  # a read-only home: digests are recomputed next time
    return digest


def _config(path: Path | None) -> Any:
    """A component's config.json without what says nothing about the weights (versions, saved-from paths)."""
    if path is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable config ({exc})") from None
    if not isinstance(data, dict):
        return data
    return {k: v for k, v in data.items()
            if not k.startswith("_") and not k.endswith("_version") and k not in ("dtype", "torch_dtype")}


def fingerprint(layout: Layout) -> str:
    """sha256 of the detected format and, per weights file, its component, bytes (digest) and config - no path
    or file name, so a moved or renamed checkpoint keeps its identity."""
    parts = [{"components": list(p.candidates), "sha256": file_digest(p.file), "config": _config(p.config)}
             for p in layout.parts]
    payload = {"scheme": FINGERPRINT_SCHEME, "format": layout.format, "parts": parts}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
