"""Results files in the --out directory: records.csv (source of truth), leaderboard.csv (derived), run.json.

records.csv is tidy long format, one row per (model, concept, method, attack, attack_step, metric, seed), carrying
the evaluation settings the literature disagrees on. The leaderboard is always derived from it, never edited.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import sys
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
    import pandas as pd

    records = pd.read_csv(out_dir / "records.csv")
    board = leaderboard(records)
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


def provenance(device: str) -> dict[str, Any]:
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
    return {"git": code_version(), "packages": versions, "device": dev, "argv": sys.argv}


def write_run_json(out_dir: Path, info: dict[str, Any]) -> None:
    write_json_atomic(out_dir / "run.json", info)


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
    if long:
        return long_table(records, digits)
    board = leaderboard(records)
    cols = [c for c in board.columns if not c.endswith(" std") and c != "n_seeds"]
    lines = ["| method | " + " | ".join(cols) + " | seeds |", "|---" * (len(cols) + 2) + "|"]
    for method, row in board.iterrows():
        cells = [f"{row[c]:.{digits}f} ± {row[c + ' std']:.{digits}f}" for c in cols]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {int(row['n_seeds'])} |")
    return "\n".join(lines)


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
