"""`bench store du|verify|gc`: see what the artifact store holds, check every byte of it, and remove what no run uses.

Why here and not in bench/store.py: these walk the whole store (a run only ever touches its own keys) and must start
instantly, so this module imports neither torch nor the runner. gc keeps an entry when any run.json or records.csv
under the given results folders names its key, or when a kept entry's manifest inputs name it (an unlearned model
names its training data, a score names FID's reference features), so a run's whole chain survives even when its
run.json predates "store_keys". It refuses to run without any such file: a typo must not empty the store.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from unlearn_bench.store import RESERVED, Entry, Store, _host, parse_tmp_name, pid_alive, read_entry

KEY_RE = re.compile(r"[0-9a-f]{24}")
RECORD_KEY_COLUMNS = ("unlearn_key", "attack_key", "images_key", "cell_hash")
DEFAULT_STORE = Path("results") / ".store"  # where `bench run` puts it: <out>/../.store with out=results/<suite>


class StoreAdminError(ValueError):
    """Bad input to a store command (a missing store, no results to keep): exit status 2."""


@dataclass
class Damage:
    stage: str
    key: str
    path: Path
    problems: list[str]


@dataclass
class Removal:
    path: Path
    size: int
    what: str


@dataclass
class GcPlan:
    removals: list[Removal] = field(default_factory=list)
    kept: int = 0
    sources: list[Path] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(r.size for r in self.removals)


# --- walking the store ---------------------------------------------------------------------------------------------
def open_store(path: Path | None) -> Path:
    """The store folder to work on (option, else $BENCH_CACHE via typer, else results/.store), checked to exist."""
    root = Path(path) if path is not None else DEFAULT_STORE
    if not root.exists():
        raise StoreAdminError(f"store {root}: no such folder (pass --store DIR or set BENCH_CACHE)")
    if not root.is_dir():
        raise StoreAdminError(f"store {root}: not a folder")
    if not os.access(root, os.R_OK | os.X_OK):
        raise StoreAdminError(f"store {root}: not readable")
    return root


def entries(root: Path) -> Iterator[tuple[str, str, Path]]:
    """(stage, key, path) of every entry folder, <stage>/<key[:2]>/<key>; anything else under a stage is ignored
    (so a folder that is not a store yields nothing to delete)."""
    for stage_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in RESERVED
                            and not p.name.startswith(".")):
        for shard in sorted(p for p in stage_dir.iterdir() if p.is_dir() and len(p.name) == 2):
            for entry in sorted(shard.iterdir()):
                if KEY_RE.fullmatch(entry.name) and entry.name[:2] == shard.name:
                    yield stage_dir.name, entry.name, entry


def tree_size(path: Path) -> int:
    """Bytes of the files under a path (links not followed)."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # unreachable


def _children(path: Path) -> list[Path]:
    return sorted(path.iterdir()) if path.is_dir() else []


def disk_usage(root: Path) -> list[tuple[str, int, int]]:
    """(label, items, bytes) per stage, then quarantine, tmp, failed markers and locks."""
    rows: dict[str, list[int]] = {}
    for stage, _, path in entries(root):
        row = rows.setdefault(stage, [0, 0])
        row[0] += 1
        row[1] += tree_size(path)
    out = [(stage, n, size) for stage, (n, size) in sorted(rows.items())]
    for label, folder in (("quarantine", "quarantine"), ("tmp", "tmp"), ("failed markers", "failed"),
                          ("locks", "locks")):
        items = _children(root / folder)
        out.append((label, len(items), sum(tree_size(p) for p in items)))
    return out


# --- verify --------------------------------------------------------------------------------------------------------
def verify_store(root: Path, fix: bool = False) -> tuple[int, list[Damage]]:
    """Full check of every entry (manifest, sizes, sha256): (entries checked, damaged ones). With fix, damaged
    entries are moved to quarantine/ (under their locks), where a re-run recomputes them from."""
    store = Store(root)
    damaged: list[Damage] = []
    checked = 0
    for stage, key, path in entries(root):
        checked += 1
        manifest, why = read_entry(path, stage, key)
        if manifest is None:
            problems = [str(why)]
        else:
            problems = store.verify(Entry(stage, key, path, manifest, cached=True))
        if problems:
            damaged.append(Damage(stage, key, path, problems))
            if fix:
                store.quarantine(stage, key, "; ".join(problems))
    return checked, damaged


# --- gc ------------------------------------------------------------------------------------------------------------
def _result_files(folder: Path, skip: Path) -> Iterator[Path]:
    if folder.is_file():
        if folder.name in ("run.json", "records.csv"):
            yield folder
        return
    for dirpath, dirnames, files in os.walk(folder):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() != skip)
        for name in ("run.json", "records.csv"):
            if name in files:
                yield here / name


def keys_of(path: Path) -> set[str]:
    """Store keys a run.json ("store_keys": {stage: [keys]}) or records.csv (key columns) names."""
    try:
        if path.name == "run.json":
            data = json.loads(path.read_text(encoding="utf-8"))
            store_keys = data.get("store_keys", {}) if isinstance(data, dict) else None
            if not isinstance(store_keys, dict) or not all(isinstance(v, list) for v in store_keys.values()):
                raise ValueError("'store_keys' is not {stage: [keys]}")
            return {str(k) for keys in store_keys.values() for k in keys}
        with path.open(newline="", encoding="utf-8") as fh:
            return {row[c] for row in csv.DictReader(fh) for c in RECORD_KEY_COLUMNS if row.get(c)}
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as exc:
        raise StoreAdminError(f"{path}: cannot read the keys it uses ({exc}); fix or move it, then gc again") from exc


def used_keys(results: list[Path], root: Path) -> tuple[set[str], list[Path]]:
    """Every key named under the results folders, and the files that named them. Raises when none is found."""
    keys: set[str] = set()
    sources: list[Path] = []
    for folder in results:
        if not folder.exists():
            raise StoreAdminError(f"results folder {folder}: no such folder")
        for f in _result_files(folder, root.resolve()):
            sources.append(f)
            keys |= keys_of(f)
    if not sources:
        names = ", ".join(str(r) for r in results)
        raise StoreAdminError(f"no run.json or records.csv under {names}: refusing to collect garbage, since every "
                              f"entry would look unused. Pass the folders of the runs whose results you keep.")
    return keys, sources


def _named_keys(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        if KEY_RE.fullmatch(obj):
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _named_keys(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _named_keys(v)


def _closure(index: dict[str, list[tuple[str, Path]]], roots: set[str]) -> set[str]:
    """The given keys plus every stored key that a kept entry's manifest inputs name, transitively."""
    keep = {k for k in roots if k in index}
    todo = list(keep)
    while todo:
        key = todo.pop()
        for stage, path in index[key]:
            manifest, _ = read_entry(path, stage, key)
            for k in _named_keys((manifest or {}).get("inputs", {})):
                if k in index and k not in keep:
                    keep.add(k)
                    todo.append(k)
    return keep


def plan_gc(root: Path, results: list[Path], quarantine: bool = False) -> GcPlan:
    """What gc would remove: entries no run uses, their locks and failure markers, stale temp dirs, and (with
    quarantine) the quarantine folder. Refuses while this host has a process computing into the store."""
    busy = [d for d in _children(root / "tmp") if (p := parse_tmp_name(d.name)) and p[1] == _host() and pid_alive(p[2])]
    if busy:
        raise StoreAdminError(f"store {root}: a process is computing into it ({busy[0].name}); run gc when it ends")
    keys, sources = used_keys(results, root)
    index: dict[str, list[tuple[str, Path]]] = {}
    for stage, key, path in entries(root):
        index.setdefault(key, []).append((stage, path))
    keep = _closure(index, keys)
    plan = GcPlan(kept=sum(len(index[k]) for k in keep), sources=sources)
    for key, found in sorted(index.items()):
        if key in keep:
            continue
        for stage, path in found:
            plan.removals.append(Removal(path, tree_size(path), f"unused {stage}/{key}"))
            lock = root / "locks" / f"{stage}-{key}.lock"
            if lock.exists():
                plan.removals.append(Removal(lock, tree_size(lock), f"lock of {stage}/{key}"))
    for marker in _children(root / "failed"):
        if marker.stem.rpartition("-")[2] not in keep:
            plan.removals.append(Removal(marker, tree_size(marker), "failure marker"))
    for d in _children(root / "tmp"):
        parsed = parse_tmp_name(d.name)
        if parsed and parsed[1] == _host() and not pid_alive(parsed[2]):
            plan.removals.append(Removal(d, tree_size(d), "stale tmp"))
    if quarantine:
        plan.removals += [Removal(p, tree_size(p), "quarantined") for p in _children(root / "quarantine")]
    return plan


def apply_gc(root: Path, plan: GcPlan) -> None:
    """Remove what the plan lists; an entry under its key's lock, so no worker is reading it while it goes."""
    store = Store(root)
    for r in plan.removals:
        if r.what.startswith("unused "):
            stage, _, key = r.what.removeprefix("unused ").partition("/")
            with store._lock(stage, key):
                shutil.rmtree(r.path, ignore_errors=True)
            store.lock_path(stage, key).unlink(missing_ok=True)  # taking the lock may have made it again
        elif r.path.is_dir() and not r.path.is_symlink():
            shutil.rmtree(r.path, ignore_errors=True)
        else:
            r.path.unlink(missing_ok=True)


# --- the typer sub-app ---------------------------------------------------------------------------------------------
store_app = typer.Typer(no_args_is_help=True, help="The artifact store: disk usage, full checksum, garbage collection.")
StoreOpt = Annotated[Path | None, typer.Option(
    "--store", envvar="BENCH_CACHE", help=f"artifact store (default $BENCH_CACHE, else {DEFAULT_STORE})")]


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _open(store: Path | None) -> Path:
    try:
        return open_store(store)
    except StoreAdminError as exc:
        _fail(str(exc))
        raise  # unreachable


@store_app.command("du")
def du_cmd(store: StoreOpt = None) -> None:
    """Entries and bytes per stage, plus quarantine, temp dirs, failure markers and a total."""
    root = _open(store)
    rows = disk_usage(root)
    typer.echo(f"store {root}")
    typer.echo(f"{'':16}{'items':>8}{'size':>12}")
    for label, n, size in rows:
        typer.echo(f"{label:16}{n:>8}{human(size):>12}")
    typer.echo(f"{'total':16}{sum(r[1] for r in rows):>8}{human(sum(r[2] for r in rows)):>12}")


@store_app.command("verify")
def verify_cmd(store: StoreOpt = None,
               fix: Annotated[bool, typer.Option("--fix", help="move damaged entries to quarantine")] = False) -> None:
    """Check every entry's files against its manifest (sizes and sha256); exit 1 when damage remains."""
    root = _open(store)
    checked, damaged = verify_store(root, fix=fix)
    for d in damaged:
        typer.echo(f"damaged {d.stage}/{d.key}: {'; '.join(d.problems)}" + (" -> quarantine" if fix else ""))
    typer.echo(f"{checked} entries checked, {len(damaged)} damaged" + (", moved to quarantine" if fix and damaged
                                                                        else ""))
    if damaged and not fix:
        raise typer.Exit(1)


@store_app.command("gc")
def gc_cmd(results: Annotated[list[Path], typer.Argument(
    metavar="RESULTS_DIR...", help="results folders whose runs' entries are kept")],
           store: StoreOpt = None,
           dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would go; remove nothing")] = False,
           quarantine: Annotated[bool, typer.Option("--quarantine", help="also empty quarantine/")] = False) -> None:
    """Remove every entry no run under RESULTS uses (plus stale temp dirs; with --quarantine, quarantined ones)."""
    root = _open(store)
    try:
        plan = plan_gc(root, results, quarantine=quarantine)
    except StoreAdminError as exc:
        _fail(str(exc))
        raise  # unreachable
    for r in plan.removals:
        typer.echo(f"{'would remove' if dry_run else 'removing'} {r.what}: {r.path} ({human(r.size)})")
    if not dry_run:
        apply_gc(root, plan)
    verb = "would free" if dry_run else "freed"
    typer.echo(f"{len(plan.sources)} run file(s) read; {plan.kept} entries kept; {len(plan.removals)} item(s), "
               f"{verb} {human(plan.size)}")
