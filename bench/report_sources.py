"""Where each part of `bench report` comes from: the artifact store(s), the results folder, the run's provenance.

Why: a results folder is committed and read on other machines, where the store that made it (often a temporary
directory of the machine that ran it) does not exist. The leaderboard, curves and settings derive from records.csv
and run.json, which the folder always has; the image grids, prompt-attack rewrites and NudeNet class counts need
the store. So every time the store is there, `bench report` saves what it drew from it beside records.csv
(report-grid-<method>.png, report-rewrites.csv, and report-figures.json saying which images each grid shows and the
class counts), and a later report without the store uses those files, says so, and checks the saved grids against
the image keys records.csv names now. With neither, the report says where it looked, instead of failing.
"""

from __future__ import annotations

import html
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearn_bench.report import _slug, _table, draw_grid, grid_rows, load_grid_images

FIGURES = "report-figures.json"  # what the saved figures show (image keys, grid columns), beside records.csv
REWRITES = "report-rewrites.csv"


@dataclass
class StoreSet:
    """Several candidate stores looked up in order (the first that holds an entry answers): the --store given, or
    every store run.json names, $BENCH_CACHE and the `bench run` default beside the results folder."""

    roots: list[Path]
    used: set[str] = field(default_factory=set)  # roots that answered at least one lookup

    def __post_init__(self) -> None:
        from unlearn_bench.store import Store

        self._stores = [Store(r) for r in self.roots]

    def lookup(self, stage: str, key: str) -> Any:
        for store in self._stores:
            if not store.root.is_dir():
                continue
            entry = store.lookup(stage, key)
            if entry is not None:
                self.used.add(str(store.root))
                return entry
        return None

    def describe(self) -> str:
        return ", ".join(str(r) for r in self.roots) or "(none)"


def store_roots(out_dir: Path, run: dict[str, Any], store_dir: Path | None) -> list[Path]:
    """--store alone when given; else the stores run.json names (the computing run's first), $BENCH_CACHE, and
    the `bench run` default beside the results folder."""
    if store_dir is not None:
        return [Path(store_dir)]
    from unlearn_bench.results import run_stores

    roots = [Path(s) for s in run_stores(run)]
    if os.environ.get("BENCH_CACHE"):
        roots.append(Path(os.environ["BENCH_CACHE"]))
    roots.append(out_dir.resolve().parent / ".store")
    return list(dict.fromkeys(roots))


def load_figures(out_dir: Path) -> dict[str, Any]:
    """report-figures.json, or an empty record when absent or unreadable (figures saved before it existed)."""
    try:
        doc = json.loads((out_dir / FIGURES).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def save_figures(out_dir: Path, doc: dict[str, Any]) -> None:
    from unlearn_bench.store import write_json_atomic

    doc = doc | {"about": "What the report figures beside it show, so `bench report` can use them without the "
                          "store: grids (image keys per row, prompts per column) and NudeNet class counts.",
                 "updated_at": _now()}
    write_json_atomic(out_dir / FIGURES, doc)


@dataclass
class Grid:
    """One method's image grid: the PNG, the prompts of its columns (None when unknown), and where it came from."""

    method: str
    png: bytes
    prompts: list[str] | None
    source: str  # "store" or "folder"
    note: str = ""


def resolve_grids(df: Any, stores: StoreSet, out_dir: Path, targets: list[str], k: int,
                  saved: dict[str, Any]) -> tuple[list[Grid], str]:
    """Each method's grid drawn from the store when it holds every image set of that grid, else the grid saved in
    the folder, else drawn from whatever part the store holds; and a message when there is no grid at all."""
    seed, plan = grid_rows(df, targets)
    if not plan:
        return [], "No image grids: records.csv names no generated images for the target prompts."
    out: list[Grid] = []
    for method, rows in plan.items():
        loaded = [(label, x) for label, key in rows if (x := load_grid_images(stores, key)) is not None]
        file = out_dir / f"report-grid-{_slug(method)}.png"
        if len(loaded) == len(rows):
            png, prompts = draw_grid(method, seed, loaded, k)
            out.append(Grid(method, png, prompts, "store"))
        elif file.is_file():
            rec = saved.get(method) if isinstance(saved.get(method), dict) else None
            if rec is None:
                note = (f"saved in the folder ({file.name}) before {FIGURES} recorded what a grid shows: it cannot "
                        "be checked against records.csv")
            elif [list(r) for r in rec.get("rows", [])] == [list(r) for r in rows]:
                note = (f"saved in the folder ({file.name}, {rec.get('saved_at', '?')}); shows the images "
                        "records.csv names")
            else:
                note = (f"saved in the folder ({file.name}, {rec.get('saved_at', '?')}), but for other images than "
                        "records.csv names now: it may be out of date")
            out.append(Grid(method, file.read_bytes(), rec.get("columns") if rec else None, "folder", note))
        elif loaded:
            png, prompts = draw_grid(method, seed, loaded, k)
            missing = [label for label, key in rows if label not in {lb for lb, _ in loaded}]
            out.append(Grid(method, png, prompts, "store", f"store, without the rows it lacks: {', '.join(missing)}"))
    if out:
        return out, ""
    return [], (f"No image grids: none of the image sets records.csv names is in the store (looked in: "
                f"{stores.describe()}), and {out_dir} holds no saved grid (report-grid-*.png, which `bench report` "
                "writes whenever the store is there). Pass `--store DIR` naming a store that holds them.")


def record_grids(out_dir: Path, df: Any, targets: list[str], grids: list[Grid], doc: dict[str, Any]) -> bool:
    """Write the PNG of every grid drawn from the store in full and note in `doc` what it shows (its saved_at kept
    while that does not change, so re-reporting does not churn a committed folder); True if `doc` changed."""
    _, plan = grid_rows(df, targets)
    changed = False
    for g in grids:
        if g.source != "store" or g.note:  # from the folder, or partial: keep what the folder has
            continue
        name = f"report-grid-{_slug(g.method)}.png"
        (out_dir / name).write_bytes(g.png)
        entry = {"file": name, "rows": [list(r) for r in plan[g.method]], "columns": g.prompts}
        old = (doc.get("grids") or {}).get(g.method) or {}
        if {k: v for k, v in old.items() if k != "saved_at"} != entry:
            doc.setdefault("grids", {})[g.method] = entry | {"saved_at": _now()}
            changed = True
    return changed


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def resolve_class_counts(df: Any, stores: StoreSet, doc: dict[str, Any]) -> tuple[list[list[Any]], str, bool]:
    """NudeNet class counts from the score entries when a store holds them (noted in `doc`), else the ones noted
    in the folder when they were summed from score keys records.csv still names; (rows, where from, doc changed)."""
    from unlearn_bench.report import class_count_rows

    rows, keys = class_count_rows(df, stores)
    saved = doc.get("class_counts") if isinstance(doc.get("class_counts"), dict) else {}
    if rows:
        entry = {"rows": rows, "score_keys": keys}
        if saved != entry:
            doc["class_counts"] = entry
            return rows, "store", True
        return rows, "store", False
    if saved.get("rows") and set(saved.get("score_keys", [])) <= set(df["cell_hash"].astype(str)):
        return saved["rows"], f"folder ({FIGURES})", False
    return [], "", False


def resolve_rewrites(found: list[dict[str, Any]], out_dir: Path, df: Any) -> tuple[list[dict[str, Any]], str]:
    """The prompt-attack rewrites from the store when it has them (saved to report-rewrites.csv), else the ones
    saved in the folder when records.csv has every (method, attack, seed) they name; and where they came from."""
    import pandas as pd

    from unlearn_bench.store import write_text_atomic

    path = out_dir / REWRITES
    if found:
        write_text_atomic(path, pd.DataFrame(found).to_csv(index=False))
        return found, "store"
    if not path.is_file():
        return [], ""
    table = pd.read_csv(path)
    cells = set(zip(df["method"].astype(str), df["attack"].astype(str), df["seed"].astype(int), strict=True))
    theirs = set(zip(table["method"].astype(str), table["attack"].astype(str), table["seed"].astype(int),
                     strict=True))
    if not theirs <= cells:
        return [], f"none: {REWRITES} in the folder names cells records.csv does not have (left out as stale)"
    for col in ("pre_success", "success"):
        table[col] = table[col].astype(str).str.lower().isin(("true", "1"))
    return table.to_dict("records"), f"folder ({REWRITES})"


def provenance_html(run: dict[str, Any]) -> str:
    """The run the top level describes (run.json's provenance_of), every run of the folder's history, the plan."""
    git = run.get("git", {})
    shown = run.get("provenance_of") or {}
    who = (f"{shown.get('run_id', '?')}: {shown.get('why', '')}" if shown else
           "run.json predates run histories: it records the last run into this folder, which may be a cached re-run "
           "rather than the run that computed the results")
    facts = [("run shown", who),
             ("git commit", f"{git.get('commit', '?')}{' (dirty)' if git.get('dirty') else ''}"),
             ("prompts+seeds hash", run.get("prompts_seeds_hash", "")), ("store", run.get("store", "")),
             ("stages", json.dumps(run.get("stages", {}))), ("seconds", str(run.get("seconds", ""))),
             ("device", json.dumps(run.get("device", {}))), ("command", " ".join(map(str, run.get("argv", []))))]
    for r in run.get("rescored", []):
        facts.append(("re-scored", f"{r.get('at')}: {', '.join(r.get('metrics', []))}"))
    reset = run.get("history_reset")
    if reset:
        facts.append(("history reset", f"{reset.get('at')}: {reset.get('reason')}"))
    for scope, src in (run.get("plan", {}).get("prompt_sources") or {}).items():
        facts.append((f"prompts ({scope})", f"{src.get('name')} {src.get('format')} {src.get('source')} "
                                            f"sha256:{src.get('sha256')}"))
    pk = ", ".join(f"{k} {v}" for k, v in (run.get("packages") or {}).items() if v)
    facts.append(("packages", pk))
    table = _table(["", ""], [[html.escape(k), html.escape(str(v))] for k, v in facts], left=2)
    runs = [[html.escape(str(r.get(k, ""))) for k in ("run_id", "started_at", "status", "seconds")]
            + [html.escape(f"{r.get('stages', {}).get('cached', '?')} / {r.get('stages', {}).get('computed', '?')}"),
               html.escape(str(r.get("git", {}).get("commit", "?"))[:10]),
               html.escape(str(r.get("device", {}).get("cuda") or r.get("device", {}).get("requested", ""))),
               html.escape(" ".join(map(str, r.get("argv", []))))] for r in run.get("runs", [])]
    if runs:
        table += "<h3>Runs of this plan into this folder (oldest first)</h3>" + _table(
            ["run", "started", "status", "seconds", "cached / computed", "git", "device", "command"], runs, left=3)
    plan = html.escape(json.dumps(run.get("plan", {}), indent=1, default=str))
    return f"{table}<details><summary>resolved plan (run.json)</summary><pre>{plan}</pre></details>"


def sources_html(parts: list[tuple[str, str]]) -> str:
    """The "where from" table of the report."""
    return ("<h2 id='sources'>Sources</h2><p class='sub'>Which parts of this report were read from the results "
            "folder and which from the artifact store.</p>"
            + _table(["part", "from"], [[html.escape(a), html.escape(b)] for a, b in parts], left=2))
