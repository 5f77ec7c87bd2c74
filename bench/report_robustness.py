"""The report's "Relearning robustness" section: the summary scores as a sortable table and the paired differences
of each method with its wrapped variant (esd vs esd+meta) as a forest plot.

Sortable without a script (the report stays script-free, so it can be mailed and opened anywhere): one radio button
per column and, per button, a CSS rule that sets each row's sort key; rows are CSS grid items whose `order` is
that key. A browser without CSS still shows the table in run order.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from unlearn_bench.robustness import AUC, STEPS

CSS = """
.rs>input{margin:0 2px 0 10px}.rs>label{font-size:12px;color:#404858;cursor:pointer}
.rs>input:checked+label{font-weight:700;color:#0b5cad}
.rg{display:grid;font-size:13px;margin:8px 0 14px;border-left:1px solid #dde1e8;border-top:1px solid #dde1e8;
width:max-content}.rg .rr{display:contents}
.rg .rh,.rg .rc{border-right:1px solid #dde1e8;border-bottom:1px solid #dde1e8;padding:4px 8px;text-align:right}
.rg .rh{order:0;background:#eef1f6;font-weight:600}.rg .rc{order:calc(var(--k) * 100 + var(--c) + 100)}
.rg .l{text-align:left}
"""


def pairs_of(methods: list[str]) -> list[tuple[str, str]]:
    """(base, base+wrapper...) for every wrapped method whose unwrapped method is in the run (esd, esd+meta)."""
    out = []
    for m in methods:
        if "+" in m and m.split("+")[0] in methods:
            out.append((m.split("+")[0], m))
    return out


def _rank(values: list[float | None], higher: bool) -> list[int]:
    """Sort position of each value, best first (missing last, ties in run order)."""
    key = [(v is None or not math.isfinite(v), -(v or 0.0) if higher else (v or 0.0), i) for i, v in
           enumerate(values)]
    order = sorted(range(len(values)), key=lambda i: key[i])
    ranks = [0] * len(values)
    for pos, i in enumerate(order):
        ranks[i] = pos
    return ranks


def sortable_table(rows: list[dict[str, Any]]) -> str:
    """The summary scores: a row per method, a column per (attack, score), sortable by any column (CSS only)."""
    from unlearn_bench.robustness_data import fmt_score

    methods = list(dict.fromkeys(r["method"] for r in rows))
    cols = list(dict.fromkeys((r["attack"], r["score"]) for r in rows))
    by = {(r["method"], r["attack"], r["score"]): r for r in rows}
    keys = [list(range(len(methods)))]
    for a, s in cols:
        cells = [by.get((m, a, s)) for m in methods]
        higher = str((next(c for c in cells if c) or {}).get("higher_is_better", "")).lower() in ("true", "1")
        vals = [None if c is None else (math.inf if c["score"] == STEPS and c["censored"] else float(c["value"]))
                for c in cells]
        keys.append(_rank(vals, higher))
    radios = "".join(f'<input type="radio" name="rs" id="rs-{i}"{" checked" if i == 0 else ""}><label '
                     f'for="rs-{i}">{html.escape("run order" if i == 0 else f"{cols[i - 1][0]} {cols[i - 1][1]}")}'
                     f"</label>" for i in range(len(cols) + 1))
    rules = "".join(f"#rs-{i}:checked~.rg .rr{{--k:var(--k{i})}}" for i in range(len(cols) + 1))
    head = ['<div class="rh l">method</div>'] + [f'<div class="rh">{html.escape(a)}<br>{html.escape(s)} '
                                                 f'{"↑" if s == STEPS else "↓" if s == AUC else ""}</div>'
                                                 for a, s in cols]
    body = []
    for j, m in enumerate(methods):
        style = ";".join(f"--k{i}:{k[j]}" for i, k in enumerate(keys))
        cells = [f'<div class="rc l" style="--c:0">{html.escape(m)}</div>']
        cells += [f'<div class="rc" style="--c:{c + 1}">'
                  f'{html.escape(fmt_score(by[(m, a, s)]) if (m, a, s) in by else "")}</div>'
                  for c, (a, s) in enumerate(cols)]
        body.append(f'<div class="rr" style="{style}">{"".join(cells)}</div>')
    return (f"<style>{CSS}{rules}</style><div class='rs'>sort by: {radios}<div class='rg' style='grid-template-"
            f"columns:repeat({len(cols) + 1},auto)'>{''.join(head)}{''.join(body)}</div></div>")


def forest_figure(diffs: list[dict[str, Any]]) -> bytes:
    """A panel per score, a row per (pair, attack): B - A with its interval, a line at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from unlearn_bench.report import _png

    quantities = list(dict.fromkeys(d["quantity"] for d in diffs))
    labels = list(dict.fromkeys(f"{d['method_b']} - {d['method_a']} · {d['attack']}" for d in diffs))
    fig, axes = plt.subplots(1, len(quantities), figsize=(3.3 * len(quantities) + 2.2, 0.42 * len(labels) + 1.2),
                             squeeze=False, sharey=True)
    for ax, q in zip(axes[0], quantities, strict=True):
        for d in diffs:
            if d["quantity"] != q:
                continue
            y = labels.index(f"{d['method_b']} - {d['method_a']} · {d['attack']}")
            colour = "#0b5cad" if d["favours"] == d["method_b"] else "#b5472b" if d["favours"] else "#6b7280"
            err = [[max(d["diff"] - d["lo"], 0)], [max(d["hi"] - d["diff"], 0)]] if math.isfinite(d["lo"]) else None
            ax.errorbar([d["diff"]], [y], xerr=err, fmt="o", ms=5, color=colour, capsize=3)
        ax.axvline(0, color="#1d2330", lw=0.8)
        better = "↑ B more robust" if q == STEPS else "↓ B less concept" if q == AUC else ""
        ax.set_title(f"{q} {better}", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=8)
    axes[0][0].invert_yaxis()
    fig.suptitle("paired differences B - A (95% interval; blue: B better, red: A better, grey: not resolved)",
                 fontsize=10)
    fig.tight_layout()
    return _png(fig)


def robustness_section(out_dir: Path, store_dir: Path | None = None) -> tuple[str, dict[str, bytes]]:
    """(HTML of the section, {file name: PNG}) for the report."""
    from unlearn_bench.report import _img
    from unlearn_bench.robustness import Settings
    from unlearn_bench.robustness_data import (
        SUMMARY_FILE,
        compare_rows,
        load_curves,
        read_summary,
        summary_for,
    )

    head = "<h2 id='robustness'>Relearning robustness</h2>"
    rows = read_summary(out_dir)
    notes: list[str] = []
    if rows is None:
        rows, notes = summary_for(out_dir, store_dir)
    if not rows:
        return head + f"<p class='sub'>No summary scores: {html.escape('; '.join(notes))}</p>", {}
    r0 = rows[0]
    rule = (f"{r0['concept_metric']} reaches {float(r0['fraction']):g} × the base model's value "
            f"({float(r0['base_value']):.3g}), i.e. {float(r0['threshold']):.3g}")
    parts = [head, f"<p class='sub'>Summary scores per method and attack (definitions and parameters: "
             f"{SUMMARY_FILE}; formulas: README). relearn-steps ↑: first step at which {html.escape(rule)}, "
             f"interpolated between checkpoints, '&gt; S' = not by the last step S; relearn-auc ↓: area under the "
             f"concept curve as a share of the base model's ({html.escape(str(r0['auc_x']))} step axis); "
             f"metric@relearn: that metric where the concept is back. Brackets: {int(float(r0['level']) * 100)}% "
             f"bootstrap interval over {html.escape(str(r0['resample']))} ({r0['n_seeds']} seeds).</p>",
             sortable_table(rows)]
    figures: dict[str, bytes] = {}
    try:
        curves = load_curves(out_dir, store_dir)
        pairs = pairs_of(curves.methods())
        settings = Settings(base_value=None if "none" in curves.methods() else float(r0["base_value"])
                            if math.isfinite(float(r0["base_value"])) else None)
        diffs = [d for a, b in pairs for d in compare_rows(curves, a, b, settings, steps=False)]
    except ValueError as exc:
        return "".join(parts) + f"<p class='sub'>No paired comparisons: {html.escape(str(exc))}</p>", figures
    if not diffs:
        return "".join(parts) + ("<p class='sub'>No paired comparisons: the run has no method with its wrapped "
                                 "variant (esd and esd+meta); `bench compare DIR A B` compares any two.</p>"), figures
    figures["report-forest.png"] = forest_figure(diffs)
    parts.append(f"<figure>{_img(figures['report-forest.png'], 'forest plot')}<figcaption>Paired differences "
                 f"(B - A over the same seeds, prompts and images; interval: paired bootstrap; a difference counts "
                 f"where it excludes 0 and the permutation p &lt; {1 - float(r0['level']):.2g}). Every step and "
                 f"p-value: "
                 f"<code>bench compare {html.escape(str(out_dir))} A B</code>. File: report-forest.png"
                 f"</figcaption></figure>")
    return "".join(parts), figures
