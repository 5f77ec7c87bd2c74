"""The end of `bench run`: a compact, plain-text summary that fits 80 columns, printed on stdout.

Why this shape: the full leaderboard has one column per attack@step x metric (twenty and more), which no terminal
shows and which a log or `bench run > out.txt` cannot hold readably. The summary keeps the headline of each method
on one line and says where the rest is:

- unattacked columns (attack `none`): the concept metric first, then the other metrics (utility: image quality,
  prompt alignment), each named after its metric;
- one `attack@step` column per attack: the concept metric after that attack's LAST step (the end of its relearning
  curve; a prompt attack's only state);
- mean over seeds, with `± std` (sample std, as leaderboard.csv) when a cell has more than one seed.

Method diagnostics (`meta-*`) and metric variants (`nudenet@0.5`) stay in records.csv. Columns that do not fit the
width continue in a further block that repeats the method column, so nothing is cut off; long method names are
shortened in the middle (`very-long-…+meta`), keeping the wrapper suffix that tells esd from esd+meta.

Everything here is a pure function of the records (dicts as records.csv holds them, or a DataFrame of them), so it
is tested without a run.
"""

from __future__ import annotations

import math
import shlex
import textwrap
from pathlib import Path
from typing import Any

WIDTH = 80  # the summary never needs more; a wider terminal just has room to spare
METHOD_MAX = 20  # widest method column; longer names are shortened in the middle
COLUMN_MAX = 16  # widest value column (headers longer than this are shortened in the middle)
GAP = "  "


def _rows(records: Any) -> list[dict[str, Any]]:
    """Records as a list of dicts, from a DataFrame or any iterable of mappings."""
    if hasattr(records, "to_dict"):
        return list(records.to_dict("records"))
    return [dict(r) for r in records]


def _is_headline(metric: str) -> bool:
    """Scores, not diagnostics (meta-grad-dot-*) or variants of another metric's detections (nudenet@0.5)."""
    return not metric.startswith("meta-") and "@" not in metric


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def shorten(text: str, width: int) -> str:
    """`text` in at most `width` characters, cut in the middle with '…' so both ends (the base method and its
    +wrapper, or an attack's @step) stay readable."""
    if len(text) <= width:
        return text
    if width <= 1:
        return text[:width]
    tail = (width - 1) // 2
    head = width - 1 - tail
    return text[:head] + "…" + (text[-tail:] if tail else "")


def fmt_number(value: float, std: float | None = None) -> str:
    """A value (and its std) with as many decimals as fit about five significant characters: 0.875, 12.35, 123.4;
    two decimals fewer when a std follows, so `0.88±0.05` stays narrow."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    mag = abs(value)
    if mag >= 1e5:
        text = f"{value:.2e}"
        return text if std is None else f"{text}±{std:.1e}"
    decimals = 3 if mag < 10 else 2 if mag < 100 else 1 if mag < 1000 else 0
    if std is not None:
        decimals = max(0, decimals - 1)
        return f"{value:.{decimals}f}±{std:.{decimals}f}"
    return f"{value:.{decimals}f}"


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (ddof=1, as leaderboard.csv), std None for a single value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def pick_concept_metric(rows: list[dict[str, Any]], concept_metric: str | None = None) -> str | None:
    """The concept metric: the one asked for if the records have it (the concept's judge), else the first headline
    metric of the records (None when there is none)."""
    metrics = list(dict.fromkeys(str(r["metric"]) for r in rows if _is_headline(str(r["metric"]))))
    if concept_metric in metrics:
        return concept_metric
    return metrics[0] if metrics else None


def summary_columns(records: Any, concept_metric: str | None = None
                    ) -> tuple[list[str], list[tuple[str, dict[str, str]]], dict[str, Any]]:
    """(methods, columns, facts): methods in run order; columns as (header, {method: cell text}); facts for the
    legend (concept metric, directions, seeds)."""
    rows = [r for r in _rows(records) if _is_headline(str(r["metric"]))]
    concept = pick_concept_metric(rows, concept_metric)
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    values: dict[tuple[str, str, int, str], list[float]] = {}
    higher: dict[str, bool] = {}
    for r in rows:
        key = (str(r["method"]), str(r["attack"]), int(r["attack_step"]), str(r["metric"]))
        values.setdefault(key, []).append(float(r["value"]))
        higher.setdefault(str(r["metric"]), _truthy(r.get("higher_is_better", False)))

    def cells(attack: str, step: int, metric: str) -> dict[str, str]:
        out = {}
        for m in methods:
            vals = values.get((m, attack, step, metric))
            out[m] = fmt_number(*_mean_std(vals)) if vals else "-"
        return out

    columns: list[tuple[str, dict[str, str]]] = []
    unattacked = [str(r["metric"]) for r in rows if str(r["attack"]) == "none"]
    if unattacked:
        ordered = list(dict.fromkeys(unattacked))
        ordered.sort(key=lambda m: m != concept)  # the concept metric first, the rest in run order
        columns += [(metric, cells("none", 0, metric)) for metric in ordered]
    attacks = list(dict.fromkeys(str(r["attack"]) for r in rows if str(r["attack"]) != "none"))
    for attack in attacks:
        steps = [int(r["attack_step"]) for r in rows if str(r["attack"]) == attack and str(r["metric"]) == concept]
        if steps:
            columns.append((f"{attack}@{max(steps)}", cells(attack, max(steps), concept or "")))
    seeds = sorted({int(r["seed"]) for r in rows}) if rows else []
    facts = {"concept": concept, "higher": higher, "seeds": seeds, "attacks": attacks,
             "unattacked": bool(unattacked)}
    return methods, columns, facts


def table_lines(methods: list[str], columns: list[tuple[str, dict[str, str]]], width: int = WIDTH,
                column_max: int = COLUMN_MAX) -> list[str]:
    """The columns as plain-text blocks of at most `width` characters, each starting with the method column;
    blocks after the first follow a blank line."""
    names = {m: shorten(m, METHOD_MAX) for m in methods}
    mwidth = max([len("method"), *(len(n) for n in names.values())])
    prepared = []
    for header, col in columns:
        cwidth = min(column_max, max([len(header), *(len(c) for c in col.values())]))
        prepared.append((shorten(header, cwidth), col, cwidth))
    blocks: list[list[tuple[str, dict[str, str], int]]] = []
    used = width  # forces a first block
    for item in prepared:
        need = len(GAP) + item[2]
        if not blocks or used + need > width:
            blocks.append([])
            used = mwidth
        blocks[-1].append(item)
        used += need
    lines: list[str] = []
    for i, block in enumerate(blocks or [[]]):
        if i:
            lines.append("")
        lines.append("method".ljust(mwidth) + "".join(GAP + h.rjust(w) for h, _, w in block).rstrip())
        for m in methods:
            lines.append((names[m].ljust(mwidth) + "".join(GAP + shorten(c[m], w).rjust(w) for _, c, w in block))
                         .rstrip())
    return lines


def legend_lines(facts: dict[str, Any], width: int = WIDTH) -> list[str]:
    """What the columns mean: which metric is the concept's, each metric's direction, and the seeds."""
    concept = facts["concept"]
    if concept is None:
        return []
    parts = [f"Concept metric: {concept}."]
    if facts["unattacked"]:
        parts.append("Metric columns: the unattacked model (attack none).")
    if facts["attacks"]:
        parts.append(f"attack@step: {concept} after that attack's last step.")
    lower = sorted(m for m, h in facts["higher"].items() if not h)
    upper = sorted(m for m, h in facts["higher"].items() if h)
    parts += [f"Lower is better: {', '.join(lower)}." if lower else "",
              f"Higher is better: {', '.join(upper)}." if upper else ""]
    n = len(facts["seeds"])
    parts.append(f"Mean ± std over {n} seeds." if n > 1 else "One seed (no std).")
    return textwrap.wrap(" ".join(p for p in parts if p), width=width, break_on_hyphens=False)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def title_line(records: Any, width: int = WIDTH) -> str:
    """`Results: <suite> (<model>, concept <concept>): M methods x A attacks x S seeds`, shortened to `width`."""
    rows = _rows(records)
    if not rows:
        return "Results: none"

    def first(col: str) -> str:
        return str(rows[0].get(col, "")) if rows[0].get(col) not in (None, "") else "?"

    counts = [_plural(len({str(r[k]) for r in rows}), k) for k in ("method", "attack", "seed")]
    text = f"Results: {first('suite')} ({first('model')}, concept {first('concept')}): {' x '.join(counts)}"
    return shorten(text, width)


def results_lines(records: Any, concept_metric: str | None = None, width: int = WIDTH) -> list[str]:
    """Title, table and legend of the records (the part of the summary that is the result)."""
    rows = _rows(records)
    methods, columns, facts = summary_columns(rows, concept_metric)
    if not methods:
        return [title_line(rows, width), "No results: no cell finished (see the failures below)."]
    return [title_line(rows, width), "", *table_lines(methods, columns, width), "", *legend_lines(facts, width)]


def robustness_lines(rows: list[dict[str, Any]] | None, width: int = WIDTH) -> list[str]:
    """The headline robustness score, `relearn-steps` with its 95% interval, one column per attack (rows as
    robustness.csv holds them); nothing when the run has no scores (no base model or no relearning attack)."""
    from unlearn_bench.robustness_data import fmt_score

    steps = [r for r in rows or [] if r.get("score") == "relearn-steps"]
    if not steps:
        return []
    methods = list(dict.fromkeys(str(r["method"]) for r in steps))
    attacks = list(dict.fromkeys(str(r["attack"]) for r in steps))
    cell = {(str(r["method"]), str(r["attack"])): fmt_score(r, 1) for r in steps}
    columns = [(a, {m: cell.get((m, a), "-") for m in methods}) for a in attacks]
    first = steps[0]
    frac = first.get("fraction")
    what = (f"{float(frac):.0%} of the base model's" if frac not in (None, "") and math.isfinite(float(frac))
            else f"the threshold {float(first['threshold']):.3g} of")
    legend = (f"relearn-steps: attack steps until {first['concept_metric']} is back at {what} value (interpolated; "
              f"'> T' = never within the T steps run; [95% interval]). More: robustness.csv, bench compare.")
    # a score with its interval ("12.5 [11.0, 14.2]") is wider than a mean ± std
    return ["", *table_lines(methods, columns, width, column_max=24), "", *textwrap.wrap(legend, width=width)]


def where_lines(out_dir: Path | str, failures: int = 0, cells: int | None = None, width: int = WIDTH) -> list[str]:
    """Where the full results are and how to open the report; the failure count when cells failed."""
    folder = str(out_dir)
    lines = [f"Full results in {folder}{'' if folder.endswith('/') else '/'}:",
             "  records.csv      every value: one row per cell, attack step, metric, seed",
             "  leaderboard.csv  mean and std over seeds for every attack@step/metric",
             "  robustness.csv   relearning scores with intervals (when the run has them)",
             "  run.json         provenance, resolved settings, stage keys, failures",
             f"Report: bench report {shlex.quote(folder)}  (writes report.html there)"]
    if failures:
        of = f" of {cells}" if cells else ""
        lines += textwrap.wrap(f"FAILED: {failures}{of} cells (no rows for them; listed above and in run.json "
                               f"'failures'; re-running the same command retries only those).", width=width)
    return lines


def render_summary(records: Any, out_dir: Path | str, concept_metric: str | None = None, failures: int = 0,
                   cells: int | None = None, width: int = WIDTH, robustness: list[dict[str, Any]] | None = None) -> str:
    """The whole end-of-run summary as one string (no trailing newline); `robustness`: robustness.csv's rows."""
    return "\n".join([*results_lines(records, concept_metric, width), *robustness_lines(robustness, width), "",
                      *where_lines(out_dir, failures, cells, width)])


__all__ = ["WIDTH", "fmt_number", "legend_lines", "pick_concept_metric", "render_summary", "results_lines",
           "robustness_lines",
           "shorten", "summary_columns", "table_lines", "title_line", "where_lines"]
