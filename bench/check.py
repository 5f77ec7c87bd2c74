"""`bench check DIR --baseline FILE`: the regression verdict CI acts on.

Every (model, concept, method, attack, attack_step, metric) cell of the run is compared with the baseline's, each on
the mean over seeds, in the metric's own direction (higher_is_better from the records, never guessed from its name).
A cell regresses when it moved in its bad direction by more than the allowed margin, improves when it moved the good
way by more; a baseline cell the run lacks is a failure too (a metric silently dropped is how regressions hide).

Margins (`--tolerance`, repeatable, `[METRIC=]VALUE`): a number is absolute ("0.02"), "<k>se" is k standard errors
of the difference ("2se"); several for one metric combine as the larger margin. The standard error of a cell mean
is the larger of the within-seed one (the metric's own stderr, combined over seeds) and the between-seed one
(std over seeds / sqrt(seeds)); the difference's is the root sum of squares of both sides. Default: 2se.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KEY = ("model", "concept", "method", "attack", "attack_step", "metric")
BASELINE_COLUMNS = (*KEY, "seed", "value", "stderr", "n", "higher_is_better", "metric_version")


@dataclass(frozen=True)
class Tolerance:
    absolute: float = 0.0
    k_se: float = 0.0

    def margin(self, se: float) -> float:
        return max(self.absolute, self.k_se * se if math.isfinite(se) else 0.0)

    def describe(self) -> str:
        parts = ([f"{self.absolute:g}"] if self.absolute else []) + ([f"{self.k_se:g}se"] if self.k_se else [])
        return " or ".join(parts) or "0"


def parse_tolerances(specs: list[str] | None) -> dict[str | None, Tolerance]:
    """["2se", "fid=1.5", "concept-rate=0.05", "concept-rate=3se"] -> {None: 2se, "fid": 1.5, "concept-rate": ...}."""
    out: dict[str | None, Tolerance] = {}
    for spec in specs or ["2se"]:
        metric, _, value = spec.rpartition("=")
        value = value.strip().lower()
        try:
            tol = Tolerance(k_se=float(value[:-2])) if value.endswith("se") else Tolerance(absolute=float(value))
        except ValueError as exc:
            raise ValueError(f"--tolerance {spec!r}: expected [METRIC=]NUMBER or [METRIC=]<k>se, e.g. 0.02, "
                             f"2se, fid=1.5") from exc
        if tol.absolute < 0 or tol.k_se < 0:
            raise ValueError(f"--tolerance {spec!r}: must be >= 0")
        key = metric.strip() or None
        old = out.get(key, Tolerance())
        out[key] = Tolerance(max(old.absolute, tol.absolute), max(old.k_se, tol.k_se))
    return out


def read_table(path: Path) -> Any:
    """records.csv of a results directory, or a baseline file in the same long format."""
    import pandas as pd

    path = path / "records.csv" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    df = pd.read_csv(path)
    missing = [c for c in ("method", "attack", "attack_step", "metric", "value", "higher_is_better")
               if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: not a records file (missing columns {missing})")
    for c in KEY:
        if c not in df.columns:
            df[c] = ""
    if "stderr" not in df.columns:
        df["stderr"] = float("nan")
    if "seed" not in df.columns:
        df["seed"] = 0
    df["higher_is_better"] = df["higher_is_better"].astype(str).str.lower().isin(("true", "1"))
    df["attack_step"] = df["attack_step"].astype(int)
    return df


def summarise(df: Any) -> Any:
    """One row per cell: mean over seeds, its standard error, the seed count and the direction."""
    import numpy as np
    import pandas as pd

    rows = []
    for key, g in df.groupby(list(KEY), sort=False, dropna=False):
        vals = g["value"].astype(float).to_numpy()
        se = g["stderr"].astype(float).to_numpy()
        s = len(vals)
        within = float(np.sqrt(np.nansum(se**2)) / s) if np.isfinite(se).any() else float("nan")
        between = float(np.std(vals, ddof=1) / np.sqrt(s)) if s > 1 else float("nan")
        both = [x for x in (within, between) if math.isfinite(x)]
        rows.append(dict(zip(KEY, key, strict=True)) | {
            "mean": float(np.mean(vals)), "se": max(both) if both else float("nan"), "seeds": s,
            "higher_is_better": bool(g["higher_is_better"].iloc[0]),
            "version": str(g["metric_version"].iloc[0]) if "metric_version" in g else ""})
    return pd.DataFrame(rows)


def compare(current: Any, baseline: Any, tolerances: dict[str | None, Tolerance]) -> list[dict[str, Any]]:
    """Verdict per cell: regression | improvement | ok | missing (in baseline, not in run) | new | incomparable."""
    cur, base = summarise(current), summarise(baseline)
    cur_idx = {tuple(str(r[k]) for k in KEY): r for r in cur.to_dict("records")}
    base_idx = {tuple(str(r[k]) for k in KEY): r for r in base.to_dict("records")}
    out = []
    for key, b in base_idx.items():
        c = cur_idx.get(key)
        tol = tolerances.get(b["metric"], tolerances.get(None, Tolerance()))
        row = dict(zip(KEY, key, strict=True)) | {"baseline": b["mean"], "current": float("nan"), "delta": float("nan"),
                                                  "allowed": float("nan"), "tolerance": tol.describe()}
        if c is None:
            out.append(row | {"verdict": "missing"})
            continue
        hib = bool(c["higher_is_better"])
        se = math.sqrt(sum(x**2 for x in (c["se"], b["se"]) if math.isfinite(x))) if any(
            math.isfinite(x) for x in (c["se"], b["se"])) else float("nan")
        delta = c["mean"] - b["mean"]
        allowed = tol.margin(se)
        row |= {"current": c["mean"], "delta": delta, "allowed": allowed}
        if c["version"] != b["version"] and b["version"] not in ("", "nan"):
            verdict = "incomparable"  # a new metric version measures something else
        elif not math.isfinite(c["mean"]) and math.isfinite(b["mean"]):
            verdict = "regression"
        elif not (math.isfinite(c["mean"]) and math.isfinite(b["mean"])):
            verdict = "ok"
        else:
            worse = -delta if hib else delta
            verdict = "regression" if worse > allowed else "improvement" if -worse > allowed else "ok"
        out.append(row | {"verdict": verdict})
    for key, c in cur_idx.items():
        if key not in base_idx:
            out.append(dict(zip(KEY, key, strict=True)) | {"baseline": float("nan"), "current": c["mean"],
                                                           "delta": float("nan"), "allowed": float("nan"),
                                                           "tolerance": "", "verdict": "new"})
    return out


def failed(results: list[dict[str, Any]], allow_missing: bool = False) -> bool:
    bad = {"regression"} | (set() if allow_missing else {"missing"})
    return any(r["verdict"] in bad for r in results)


def write_baseline(current: Any, path: Path) -> None:
    """The run's records, reduced to what a verdict needs, as the new committed baseline."""
    from unlearn_bench.store import write_text_atomic

    cols = [c for c in BASELINE_COLUMNS if c in current.columns]
    write_text_atomic(path, current[cols].to_csv(index=False, float_format="%.6g"))


def render(results: list[dict[str, Any]], show_all: bool = False) -> tuple[Any, str]:
    """A rich table of the verdicts worth reading (all with show_all) and a one-line summary."""
    from rich.table import Table

    counts = {v: sum(r["verdict"] == v for r in results) for v in
              ("regression", "missing", "improvement", "incomparable", "new", "ok")}
    shown = [r for r in results if show_all or r["verdict"] not in ("ok", "new")]
    order = {"regression": 0, "missing": 1, "incomparable": 2, "improvement": 3, "new": 4, "ok": 5}
    shown.sort(key=lambda r: order[r["verdict"]])
    style = {"regression": "bold red", "missing": "red", "improvement": "green", "incomparable": "yellow"}
    table = Table(title="bench check")
    for col in ("verdict", "metric", "method", "attack@step", "baseline", "current", "delta", "allowed",
                "tolerance"):
        table.add_column(col, justify="right" if col in ("baseline", "current", "delta", "allowed") else "left")

    def f(x: float) -> str:
        return "-" if not math.isfinite(x) else f"{x:.4g}"

    for r in shown:
        table.add_row(f"[{style.get(r['verdict'], '')}]{r['verdict']}[/]" if r["verdict"] in style else r["verdict"],
                      r["metric"], r["method"], f"{r['attack']}@{r['attack_step']}", f(r["baseline"]),
                      f(r["current"]), f(r["delta"]), f(r["allowed"]), r["tolerance"])
    summary = ", ".join(f"{n} {v}" for v, n in counts.items() if n or v in ("regression", "improvement"))
    return table, summary
