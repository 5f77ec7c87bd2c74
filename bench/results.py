"""Results files in the --out directory: records.csv (source of truth), leaderboard.csv (derived), run.json.

records.csv is tidy long format, one row per (model, concept, method, attack, attack_step, metric, seed), carrying
the evaluation settings the literature disagrees on. The leaderboard is always derived from it, never edited.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, fields, replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from unlearn_bench.store import write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from unlearn_bench.plan import Plan
    from unlearn_bench.runner import State
    from unlearn_bench.specs import ComponentSpec
    from unlearn_bench.store import Entry


@dataclass(frozen=True)
class ResultRow:
    """One records.csv row: a (model, concept, method, attack, attack_step, metric, seed) result with the evaluation
    settings the literature disagrees on and the store keys it came from. The field order IS the column order
    (RECORD_COLUMNS), which committed results and CI baselines compare against: append, never reorder."""

    suite: str
    model: str
    concept: str
    method: str
    attack: str
    attack_step: int
    metric: str
    seed: int
    value: float
    stderr: float
    n: int
    higher_is_better: bool
    metric_version: str
    cell_hash: str  # the score stage's key (the unlearn stage's for method diagnostics)
    prompt_set: str
    sampler: str
    steps: int
    guidance: float | str  # the model's guidance, or "per-prompt" when the prompt file gives one per row
    images_per_prompt: int
    resolution: int
    metric_settings: str  # JSON, keys sorted
    unlearn_key: str
    attack_key: str
    images_key: str

    def as_record(self) -> dict[str, Any]:
        """The row as records.csv holds it (column -> value), in column order."""
        return {name: getattr(self, name) for name in RECORD_COLUMNS}


RECORD_COLUMNS = [f.name for f in fields(ResultRow)]
PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "nudenet", "open_clip_torch",
            "torchmetrics", "numpy", "unlearn-bench")
Row = TypeVar("Row", ResultRow, dict[str, Any])


def settings_json(settings: dict[str, Any]) -> str:
    """The metric_settings column: the metric's settings as sorted JSON."""
    return json.dumps(settings, sort_keys=True)


def variant_rows(row: Row, meta: dict[str, Any]) -> list[Row]:
    """The metric's row plus one per named variant it computed from the same images (nudenet@0.5 for each extra
    NudeNet threshold): one detection pass, one row per setting, each with its own settings column. Works on a
    ResultRow or on a records.csv row read back as a dict (`bench score`)."""
    rows = [row]
    for label, v in meta.get("variants", {}).items():
        changes = {"metric": label, "value": v["value"], "stderr": v["stderr"], "n": v["n"],
                   "metric_settings": settings_json(v.get("settings", {}))}
        rows.append(replace(row, **changes) if isinstance(row, ResultRow) else row | changes)
    return rows


def score_row(plan: Plan, state: State, metric: ComponentSpec, scored: Entry, images: Entry, seed: int,
              scope: str) -> ResultRow:
    """The row of one score stage: a metric on the images of one model state and prompt scope."""
    m, meta = plan.model, scored.meta
    return ResultRow(
        suite=plan.name, model=m.name, concept=plan.concept.name, method=state.method, attack=state.attack,
        attack_step=state.step, metric=metric.name, seed=seed, value=meta["value"], stderr=meta["stderr"],
        n=meta["n"], higher_is_better=bool(metric.higher_is_better), metric_version=metric.version,
        cell_hash=scored.key, prompt_set=plan.prompt_sets[scope], sampler=m.sampler, steps=m.steps,
        guidance="per-prompt" if plan.eval_guidance(scope) else m.guidance, images_per_prompt=m.images_per_prompt,
        resolution=m.resolution, metric_settings=settings_json(meta.get("settings", {})),
        unlearn_key=state.unlearn_key or "", attack_key=state.attack_key or "", images_key=images.key)


def diagnostic_rows(plan: Plan, method: str, unlearned: Entry | None, seed: int) -> list[ResultRow]:
    """Method diagnostics as their own metric rows (+meta's gradient alignment at start and end: meta-grad-dot-*),
    taken from the unlearn stage's manifest."""
    if unlearned is None:
        return []
    m = plan.model
    return [ResultRow(
        suite=plan.name, model=m.name, concept=plan.concept.name, method=method, attack="none", attack_step=0,
        metric="meta-" + key.replace("_", "-"), seed=seed, value=unlearned.meta[key], stderr=float("nan"), n=1,
        higher_is_better=False, metric_version="1", cell_hash=unlearned.key, prompt_set="", sampler=m.sampler,
        steps=m.steps, guidance=m.guidance, images_per_prompt=m.images_per_prompt, resolution=m.resolution,
        metric_settings="{}", unlearn_key=unlearned.key, attack_key="", images_key="")
        for key in ("grad_dot_start", "grad_dot_end") if unlearned.meta.get(key) is not None]


def write_records(path: Path, rows: list[dict[str, Any]] | list[ResultRow]) -> None:
    """records.csv from ResultRows or their dict form (floats as repr, so values round-trip exactly)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RECORD_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        record = r.as_record() if isinstance(r, ResultRow) else r
        w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in record.items()})
    write_text_atomic(path, buf.getvalue())


def leaderboard(records: Any) -> Any:
    """Pivot: one row per method; a column per attack@step / metric with the mean over seeds, and its std."""
    import pandas as pd

    df = records.copy()
    df["column"] = df["attack"] + "@" + df["attack_step"].astype(str) + "/" + df["metric"]
    g = df.groupby(["method", "column"], sort=False)["value"]
    mean = g.mean().unstack("column")
    std = g.std(ddof=1).unstack("column").fillna(0.0) if df["seed"].nunique() > 1 else mean * 0.0
    order = list(dict.fromkeys(df["column"]))
    methods = list(dict.fromkeys(df["method"]))
    out = pd.DataFrame(index=methods)
    out.index.name = "method"
    for col in order:
        out[col] = mean[col].reindex(methods)
        out[col + " std"] = std[col].reindex(methods)
    out["n_seeds"] = df.groupby("method")["seed"].nunique().reindex(methods)
    return out


def write_leaderboard(out_dir: Path) -> Any:
    """leaderboard.csv: the relearning-robustness scores first (also written in full, with their definitions, to
    robustness.csv; bench.robustness_data), then the per-step pivot."""
    import pandas as pd

    from unlearn_bench.robustness_data import SUMMARY_FILE, summary_for, summary_frame, write_summary

    records = pd.read_csv(out_dir / "records.csv")
    board = leaderboard(records)
    rows, _ = summary_for(out_dir)
    if rows:
        write_summary(out_dir, rows)
        board = pd.concat([summary_frame(rows).reindex(board.index), board], axis=1)
    else:
        (out_dir / SUMMARY_FILE).unlink(missing_ok=True)  # never a stale summary beside new records
    write_text_atomic(out_dir / "leaderboard.csv", board.to_csv(float_format="%.4f"))
    return board


def _git(args: list[str], cwd: Path) -> str:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def code_version() -> dict[str, Any]:
    repo = Path(__file__).resolve().parent.parent
    commit = _git(["rev-parse", "HEAD"], repo)
    dirty = bool(_git(["status", "--porcelain", "--untracked-files=no"], repo)) if commit else None
    return {"commit": commit or "unknown", "dirty": dirty}


def provenance(device: str, git: dict[str, Any] | None = None) -> dict[str, Any]:
    """What produced a run. `git` is the code version read at the run's start: read again later, it would count
    the run's own rewritten outputs (results/toy is tracked) as local changes."""
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    dev: dict[str, Any] = {"requested": device, "platform": platform.platform(), "python": sys.version.split()[0],
                           "cpu_count": os.cpu_count()}
    if "torch" in sys.modules:
        import torch

        dev["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            dev["cuda"] = torch.cuda.get_device_name(0)
    return {"git": git if git is not None else code_version(), "packages": versions, "device": dev, "argv": sys.argv}


# run.json keeps a history: the first `bench run` into a folder computes the results, a later re-run of the same
# plan usually finds every stage in the store and only re-reads them. Overwriting run.json with that re-run (2 s,
# every stage cached) would lose which machine, commit and packages actually computed the numbers.
SHARED_FIELDS = ("plan", "prompts_seeds_hash")  # the same for every run of one history
DOC_FIELDS = ("runs", "provenance_of", "history", "history_reset", "rescored", "plan_digest")  # about the file
RUN_ONLY = ("store_keys", "failures")  # kept at the top level only (large), for the run the top level describes
UNRECORDED = "unrecorded"  # run_id of a run written before run.json had run ids
HISTORY_NOTE = ("`runs` lists every `bench run` of this plan into this folder, oldest first; the last one wrote "
                "records.csv. The top-level fields (git, device, packages, argv, stages, seconds, store, store_keys, "
                "status, failures) describe the run named in `provenance_of`. A run with another plan (plan_digest "
                "or prompts_seeds_hash differ) starts the history afresh and says so in `history_reset`.")


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def plan_digest(plan: dict[str, Any]) -> str:
    """What makes two runs "the same run" for run.json's history: the resolved plan, minus where its parts were
    read from (the catalogue's layer paths, prompt files' paths; their content is in the specs and sha256), so the
    same plan run from another checkout or machine continues the history."""
    p = {k: v for k, v in plan.items() if k != "catalogue"}
    p["prompt_sources"] = {scope: {k: v for k, v in src.items() if k != "source"} if isinstance(src, dict) else src
                           for scope, src in (plan.get("prompt_sources") or {}).items()}
    return hashlib.sha256(json.dumps(p, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _run_id(d: dict[str, Any]) -> str:
    return str(d.get("run_id") or UNRECORDED)


def run_record(info: dict[str, Any], previous: dict[str, Any] | None = None, now: str = "") -> dict[str, Any]:
    """One `runs` entry: a run's own facts (ids, times, git, device, packages, argv, store, stages, seconds,
    status, the number of failed cells), without the plan (shared) and the key lists (top level only)."""
    now = now or _utc_now()
    rec = {k: v for k, v in info.items() if k not in SHARED_FIELDS + DOC_FIELDS + RUN_ONLY}
    rec["run_id"] = _run_id(info)
    rec["started_at"] = (previous or {}).get("started_at") or info.get("started_at") or now
    if "failures" in info:
        rec["failed_cells"] = len(info["failures"] or [])
    if info.get("status", "complete") != "running" and "stages" in info:
        rec.setdefault("finished_at", now)
    return rec


def _legacy_runs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The history of a run.json written before `runs` existed: its one run, flagged as possibly a re-run."""
    if isinstance(doc.get("runs"), list):
        return [dict(r) for r in doc["runs"] if isinstance(r, dict)]
    rec = run_record(doc, now="unknown")
    rec["note"] = ("recorded before run.json kept a history: this may be a cached re-run rather than the run that "
                   "computed the results")
    return [rec]


def _top(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """The run the top level describes, and why: the latest run that computed stages; else the first that ended
    (every stage was already in the store when the history began); else the latest (still running, or killed)."""
    ended = [r for r in runs if isinstance(r.get("stages"), dict)]
    computing = [r for r in ended if int(r["stages"].get("computed", 0) or 0) > 0]
    if computing:
        return computing[-1], "the latest run in `runs` that computed stages; later runs only read them from the store"
    if ended:
        return ended[0], "no run in `runs` computed a stage (the store already held them all): the first that ended"
    return runs[-1], "no run in `runs` has ended yet (running, or killed): the latest"


def merge_run_json(existing: dict[str, Any] | None, info: dict[str, Any], now: str = "") -> dict[str, Any]:
    """The run.json document after `info` (one run's record, as `bench run` writes it at its start and again at its
    end) is written over `existing` (the file's content, or None). Same plan: the run is added to (or, same run_id,
    updated in) `runs`, and the top level keeps describing the run that computed the results. Another plan, or
    no readable file: a fresh history (with `history_reset` saying what was replaced)."""
    now = now or _utc_now()
    digest = plan_digest(info.get("plan") or {})
    same = (isinstance(existing, dict) and isinstance(existing.get("plan"), dict)
            and plan_digest(existing["plan"]) == digest
            and existing.get("prompts_seeds_hash") == info.get("prompts_seeds_hash"))
    runs = _legacy_runs(existing) if same and existing is not None else []
    mine = _run_id(info)
    at = next((i for i, r in enumerate(runs) if _run_id(r) == mine), None)
    rec = run_record(info, runs[at] if at is not None else None, now)
    if at is None:
        for r in runs:
            if r.get("status") == "running":
                r["status"] = "did not finish (no end record)"
        runs.append(rec)
    else:
        runs[at] = rec
    top, why = _top(runs)
    if top is rec:
        fields_ = {k: v for k, v in info.items() if k not in SHARED_FIELDS + DOC_FIELDS}
    elif same and existing is not None and _run_id(existing) == _run_id(top):
        fields_ = {k: v for k, v in existing.items() if k not in SHARED_FIELDS + DOC_FIELDS}
    else:
        fields_ = {k: v for k, v in top.items() if k not in ("started_at", "finished_at", "note", "failed_cells")}
    doc = fields_ | {k: info[k] for k in SHARED_FIELDS if k in info}
    doc |= {"plan_digest": digest, "runs": runs, "provenance_of": {"run_id": _run_id(top), "why": why},
            "history": HISTORY_NOTE}
    if same and existing is not None:
        doc |= {k: existing[k] for k in ("rescored", "history_reset") if k in existing}
    elif existing is not None:
        old = existing if isinstance(existing, dict) else {}
        doc["history_reset"] = {
            "at": now, "reason": "the plan changed (plan_digest or prompts_seeds_hash differ): the results are new"
            if isinstance(old.get("plan"), dict) else "the previous run.json could not be read as a run document",
            "previous_plan_digest": plan_digest(old["plan"]) if isinstance(old.get("plan"), dict) else None,
            "previous_prompts_seeds_hash": old.get("prompts_seeds_hash"),
            "previous_runs": [_run_id(r) for r in _legacy_runs(old)] if old else []}
    return doc


def read_run_json(path: Path) -> dict[str, Any] | None:
    """run.json as a dict; None when absent, unreadable or not a JSON object (then a new history starts)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def write_run_json(out_dir: Path, info: dict[str, Any]) -> None:
    """Record one run (its start, then its end) in out_dir/run.json, merged into the history there
    (merge_run_json). A whole document (one with `runs`, e.g. read back and edited) is written as it is."""
    path = out_dir / "run.json"
    if "runs" in info:
        replace_run_json(out_dir, info)
        return
    existing = read_run_json(path) if path.exists() else None
    if path.exists() and existing is None:
        existing = {}  # present but unreadable: a fresh history that says so
    write_json_atomic(path, merge_run_json(existing, info))


def replace_run_json(out_dir: Path, doc: dict[str, Any]) -> None:
    """Write a run.json document as it is (a command that edits an existing one, e.g. `bench score`), with its
    plan_digest brought up to date when it has a history, since editing the plan changes what a re-run matches."""
    if "runs" in doc and isinstance(doc.get("plan"), dict):
        doc = doc | {"plan_digest": plan_digest(doc["plan"])}
    write_json_atomic(out_dir / "run.json", doc)


def run_stores(run: dict[str, Any]) -> list[str]:
    """Every store a run.json names: the top-level run's, then the other runs' (newest first), each once."""
    names = [run.get("store")] + [r.get("store") for r in reversed(run.get("runs") or []) if isinstance(r, dict)]
    return list(dict.fromkeys(str(n) for n in names if n))


def read_records(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def markdown_table(out_dir: Path, digits: int = 2, long: bool = False, metrics: tuple[str, ...] | None = None) -> str:
    """The leaderboard of a results directory as a Markdown table (mean ± std over seeds), for README/notes.
    long=True: one row per (method, attack@step) and a column per metric - readable when attacks have curves.
    metrics: keep only these (unknown names are an error, so a typo cannot print an empty table)."""
    import pandas as pd

    records = pd.read_csv(out_dir / "records.csv")
    if metrics:
        unknown = sorted(set(metrics) - set(records["metric"]))
        if unknown:
            have = sorted(set(records["metric"]))
            raise ValueError(f"metrics {unknown} are not in {out_dir}/records.csv; it has {have}")
        records = records[records["metric"].isin(metrics)]
    from unlearn_bench.robustness_data import read_summary, summary_for, summary_markdown

    robust = read_summary(out_dir)
    robust = summary_markdown(robust if robust is not None else summary_for(out_dir)[0], metrics, digits)
    head = f"{robust}\n\n" if robust and (not metrics or set(metrics) & set(records["metric"])) else ""
    if long:
        return head + long_table(records, digits)
    board = leaderboard(records)
    cols = [c for c in board.columns if not c.endswith(" std") and c != "n_seeds"]
    lines = ["| method | " + " | ".join(cols) + " | seeds |", "|---" * (len(cols) + 2) + "|"]
    for method, row in board.iterrows():
        cells = [f"{row[c]:.{digits}f} ± {row[c + ' std']:.{digits}f}" for c in cols]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {int(row['n_seeds'])} |")
    return head + "\n".join(lines)


def long_table(records: Any, digits: int = 2) -> str:
    """Rows (method, attack@step) in run order, columns the metrics (mean ± std over seeds, '-' where absent)."""
    df = records[~records["metric"].astype(str).str.startswith("meta-")].copy()  # diagnostics are not scores
    df["state"] = df["attack"] + "@" + df["attack_step"].astype(str)
    metrics = list(dict.fromkeys(df["metric"]))
    g = df.groupby(["method", "state", "metric"], sort=False)["value"]
    mean, std, seeds = g.mean(), g.std(ddof=1).fillna(0.0), g.count()
    lines = ["| method | attack@step | " + " | ".join(metrics) + " | seeds |", "|---" * (len(metrics) + 3) + "|"]
    for method, state in dict.fromkeys(zip(df["method"], df["state"], strict=True)):
        cells = [f"{mean[(method, state, m)]:.{digits}f} ± {std[(method, state, m)]:.{digits}f}"
                 if (method, state, m) in mean.index else "-" for m in metrics]
        n = max(int(seeds[(method, state, m)]) for m in metrics if (method, state, m) in seeds.index)
        lines.append(f"| {method} | {state} | " + " | ".join(cells) + f" | {n} |")
    return "\n".join(lines)
