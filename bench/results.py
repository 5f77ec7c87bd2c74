"""Results files in the --out directory: records.csv (source of truth), leaderboard.csv (derived), run.json.

records.csv is tidy long format, one row per (model, concept, method, attack, attack_step, metric, seed), carrying
the evaluation settings the literature disagrees on. The leaderboard is always derived from it, never edited.
"""

from __future__ import annotations

import csv
import io
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from unlearn_bench.store import write_json_atomic, write_text_atomic

RECORD_COLUMNS = [
    "suite", "model", "concept", "method", "attack", "attack_step", "metric", "seed", "value", "stderr", "n",
    "higher_is_better", "metric_version", "cell_hash", "prompt_set", "sampler", "steps", "guidance",
    "images_per_prompt", "resolution", "metric_settings", "unlearn_key", "attack_key", "images_key",
]
PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "nudenet", "open_clip_torch",
            "torchmetrics", "numpy", "unlearn-bench")


def write_records(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RECORD_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
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
