"""`bench report DIR`: one self-contained report.html (images inlined as base64 PNG) plus the figures as PNG files.

What a reader of an unlearning paper wants from a run, in one file they can mail or attach to a PR: the leaderboard
per metric (mean ± std over seeds, best per column in bold, direction stated), relearning curves (each metric against
attack step, one line per method, a band of ± one std over seeds, the unattacked model at step 0), image grids
(base / unlearned / attacked per method, straight from the store's generate entries, so what is shown is what was
scored), NudeNet's per-class counts when present, the evaluation settings of every metric, and the run's provenance.
Everything is derived from records.csv, run.json and the store; nothing is recomputed. What needs the store is also
saved beside records.csv, so a committed folder reports on a machine without the store (bench.report_sources says
which part came from where).
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px;background:#fff;min-height:100vh}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:34px 0 10px;border-bottom:2px solid #e3e6ec;
padding-bottom:4px}h3{font-size:16px;margin:20px 0 6px}.sub{color:#5b6475;margin:0 0 16px}
table{border-collapse:collapse;font-size:13px;margin:6px 0 14px}th,td{border:1px solid #dde1e8;padding:4px 8px;
text-align:right;vertical-align:top}th{background:#eef1f6}td.l,th.l{text-align:left}tr:nth-child(even) td{
background:#fafbfc}b{color:#0b5cad}.dir{font-weight:400;color:#5b6475;font-size:12px}
figure{margin:10px 0 22px}figure img{max-width:100%;border:1px solid #e3e6ec}figcaption{font-size:12px;color:#5b6475}
nav a{margin-right:14px;font-size:14px}
pre{background:#f3f5f8;padding:10px;font-size:12px;overflow:auto;max-height:420px}code{font-size:12px}
ol.prompts{font-size:12px;color:#404858;columns:2;max-width:760px;margin:4px 0}
"""


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def _table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """HTML table; cells are already-escaped HTML; the first `left` columns are left-aligned."""
    th = "".join(f'<th class="{"l" if i < left else ""}">{h}</th>' for i, h in enumerate(header))
    th = f"<tr>{th}</tr>" if any(header) else ""
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table>{th}{body}</table>"


def _columns(df: Any) -> list[tuple[str, int]]:
    """attack@step columns in run order: attacks as they appear, steps ascending."""
    attacks = list(dict.fromkeys(df["attack"]))
    return [(a, int(s)) for a in attacks for s in sorted(df.loc[df["attack"] == a, "attack_step"].unique())]


def leaderboard_html(df: Any) -> str:
    parts = []
    methods = list(dict.fromkeys(df["method"]))
    for metric, g in df.groupby("metric", sort=False):
        hib = bool(g["higher_is_better"].iloc[0])
        cols = _columns(g)
        stats = g.groupby(["method", "attack", "attack_step"])["value"].agg(["mean", "std", "count"])
        best = {}
        for c in cols:
            vals = [stats.loc[(m, *c), "mean"] for m in methods if (m, *c) in stats.index]
            vals = [v for v in vals if np.isfinite(v)]
            best[c] = (max if hib else min)(vals) if len(set(vals)) > 1 else None  # no winner among ties
        rows = []
        for m in methods:
            cells = [html.escape(m)]
            for c in cols:
                if (m, *c) not in stats.index:
                    cells.append("")
                    continue
                mean, std, n = stats.loc[(m, *c)]
                txt = f"{mean:.4g}" + (f" ± {std:.2g}" if n > 1 and np.isfinite(std) else "")
                cells.append(f"<b>{txt}</b>" if best[c] is not None and mean == best[c] else txt)
            rows.append(cells)
        arrow = "↑ higher is better" if hib else "↓ lower is better"
        seeds = int(g["seed"].nunique())
        parts.append(f'<h3>{html.escape(str(metric))} <span class="dir">{arrow} · mean ± std over {seeds} '
                     f'seed{"s" if seeds != 1 else ""}</span></h3>')
        parts.append(_table(["method", *[html.escape(f"{a}@{s}") for a, s in cols]], rows))
    return "".join(parts)


def curve_figures(df: Any, metrics_order: list[str]) -> dict[str, bytes]:
    """One figure per metric that has attack steps > 0: a panel per multi-step attack, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    from matplotlib.ticker import MaxNLocator

    methods = list(dict.fromkeys(df["method"]))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    out = {}
    for metric in metrics_order:
        g = df[df["metric"] == metric]
        attacks = [a for a in dict.fromkeys(g["attack"]) if (g.loc[g["attack"] == a, "attack_step"] > 0).any()]
        if not attacks:
            continue
        hib = bool(g["higher_is_better"].iloc[0])
        fig, axes = plt.subplots(1, len(attacks), figsize=(4.6 * len(attacks) + 0.6, 3.4), squeeze=False,
                                 sharey=True)
        for ax, attack in zip(axes[0], attacks, strict=True):
            for m in methods:
                own = g[(g["method"] == m) & (g["attack"] == attack)]
                base = g[(g["method"] == m) & (g["attack"] == "none")].assign(attack_step=0)
                pts = pd.concat([base, own]) if not base.empty else own
                if own.empty:
                    continue
                s = pts.groupby("attack_step")["value"].agg(["mean", "std"]).sort_index()
                x, y, sd = s.index.to_numpy(), s["mean"].to_numpy(), np.nan_to_num(s["std"].to_numpy())
                ax.plot(x, y, marker="o", ms=4, lw=1.8, color=colours[m], label=m)
                ax.fill_between(x, y - sd, y + sd, color=colours[m], alpha=0.15, lw=0)
            ax.set_title(attack, fontsize=10)
            ax.set_xlabel("attack step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(f"{metric} ({'↑' if hib else '↓'} better)")
        axes[0][-1].legend(fontsize=8, frameon=False, loc="best")
        fig.suptitle(f"{metric} during relearning (mean ± std over seeds)", fontsize=11)
        fig.tight_layout()
        out[metric] = _png(fig)
    return out


def _pick(prompts: list[str], k: int) -> list[int]:
    """Up to k image indices spread over the distinct prompts (round-robin), so a grid shows several prompts."""
    by: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by.setdefault(p, []).append(i)
    lists, out, j = list(by.values()), [], 0
    while len(out) < k and any(j < len(v) for v in lists):
        out += [v[j] for v in lists if j < len(v)][: k - len(out)]
        j += 1
    return out


def load_grid_images(store: Any, key: str) -> tuple[np.ndarray, list[str]] | None:
    """A generate entry's images and their prompts, or None when no store holds it."""
    from unlearn_bench.images import load_images

    entry = store.lookup("generate", key) if key else None
    if entry is None:
        return None
    info = json.loads(entry.file("images.json").read_text())
    return load_images(entry.file("images"), info["files"]), info["prompts"]


def grid_rows(df: Any, target_metrics: list[str]) -> tuple[int | None, dict[str, list[tuple[str, str]]]]:
    """(seed, method -> [(row label, generate key)]): per method, base / unlearned / each attack at its last step,
    from the first seed's target-scope images. What a grid shows, decided from records.csv alone."""
    pool = df[df["metric"].isin(target_metrics)] if target_metrics else df
    pool = pool[pool["images_key"].astype(str).str.len() > 4]
    if pool.empty:
        return None, {}
    seed = int(pool["seed"].min())
    pool = pool[pool["seed"] == seed]

    def key(method: str, attack: str, step: int | None = None) -> str:
        g = pool[(pool["method"] == method) & (pool["attack"] == attack)]
        if step is None and not g.empty:
            step = int(g["attack_step"].max())
        g = g[g["attack_step"] == step]
        return str(g["images_key"].iloc[0]) if not g.empty else ""

    attacks = [a for a in dict.fromkeys(pool["attack"]) if a != "none"]
    out: dict[str, list[tuple[str, str]]] = {}
    for method in dict.fromkeys(pool["method"]):
        rows = []
        if method != "none" and key("none", "none", 0):
            rows.append(("base", key("none", "none", 0)))
        rows.append(("base" if method == "none" else "unlearned", key(method, "none", 0)))
        for a in attacks:
            if key(method, a):
                last = int(pool[(pool["method"] == method) & (pool["attack"] == a)]["attack_step"].max())
                rows.append((f"{a}@{last}", key(method, a)))
        out[str(method)] = [(label, k) for label, k in rows if k]
    return seed, out


def draw_grid(method: str, seed: int | None, loaded: list[tuple[str, tuple[np.ndarray, list[str]]]], k: int = 8,
              cell: int = 96) -> tuple[bytes, list[str]]:
    """A grid PNG (a row per model state, k images of the same prompts and seeds per row) and its column prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    idx = _pick(loaded[0][1][1], k)
    fig, axes = plt.subplots(len(loaded), 1, figsize=(len(idx) * cell / 100 + 1.4, len(loaded) * cell / 100 + 0.5),
                             squeeze=False)
    for ax, (label, (imgs, _)) in zip(axes[:, 0], loaded, strict=True):
        tiles = [np.asarray(Image.fromarray(imgs[i]).resize(
            (cell, cell), Image.Resampling.NEAREST if imgs.shape[1] < cell else Image.Resampling.LANCZOS))
            for i in idx if i < len(imgs)]
        gap = np.full((cell, 3, 3), 255, np.uint8)
        ax.imshow(np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=1))
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=10)
    fig.suptitle(f"{method} (seed {seed})", fontsize=11)
    fig.tight_layout()
    return _png(fig), [loaded[0][1][1][i] for i in idx]


def class_count_rows(df: Any, store: Any) -> tuple[list[list[Any]], list[str]]:
    """NudeNet per-class counts (images with the class above threshold), summed over seeds, from score manifests:
    [metric, method, attack@step, n images, {class: count}] per state; and the score keys they came from."""
    rows, keys = [], []
    for (metric, method, attack, step), g in df.groupby(["metric", "method", "attack", "attack_step"], sort=False):
        counts: dict[str, int] = {}
        n = 0
        for key, n_img in zip(g["cell_hash"], g["n"], strict=True):
            entry = store.lookup("score", str(key))
            summary = entry.meta.get("summary", {}) if entry else {}
            if "class_counts" not in summary or "@" in str(metric):
                continue
            n += int(n_img)
            keys.append(str(key))
            for c, v in summary["class_counts"].items():
                counts[c] = counts.get(c, 0) + int(v)
        if counts:
            rows.append([str(metric), str(method), f"{attack}@{step}", n, counts])
    return rows, sorted(keys)


def class_counts_html(rows: list[list[Any]]) -> str:
    if not rows:
        return ""
    classes = list(dict.fromkeys(c for *_, counts in rows for c in counts))
    short = [c.replace("_EXPOSED", "").replace("_", " ").lower() for c in classes]
    body = [[html.escape(str(m)), html.escape(me), html.escape(a), str(n), *[str(c.get(k, 0)) for k in classes]]
            for m, me, a, n, c in rows]
    return ("<h2 id='classes'>NudeNet per-class counts</h2><p class='sub'>Images showing each class above the "
            "metric's threshold, summed over seeds (n = images scored).</p>"
            + _table(["metric", "method", "attack@step", "n", *map(html.escape, short)], body, left=3))


def rewrites(df: Any, store: Any) -> list[dict[str, Any]]:
    """Every stored prompt-attack rewrite of the run (UnlearnDiffAtk's prompts.json), one dict per prompt."""
    out: list[dict[str, Any]] = []
    cells = df[["method", "attack", "seed", "attack_key"]].dropna().drop_duplicates()
    for method, attack, seed, key in cells.itertuples(index=False):
        entry = store.lookup("attack", str(key)) if str(key) else None
        if entry is None or not entry.file("prompts.json").exists():
            continue
        for r in json.loads(entry.file("prompts.json").read_text())["info"]:
            out.append({"method": method, "attack": attack, "seed": int(seed), "prompt": r["prompt"],
                        "rewrite": r["rewrite"], "pre_success": r["pre_success"], "success": r["success"],
                        "timestep": r.get("timestep"), "truncated_tokens": r.get("truncated_tokens", 0)})
    return out


def rewrites_html(found: list[dict[str, Any]], per_cell: int = 6) -> str:
    """Attack success (before / after) per method, and a few rewrites that succeeded where the prompt alone did not."""
    if not found:
        return ""
    import pandas as pd

    rows, examples = [], []
    for (method, attack), g in pd.DataFrame(found).groupby(["method", "attack"], sort=False):
        rows.append([html.escape(method), html.escape(attack), str(len(g)), f"{g['pre_success'].mean():.2f}",
                     f"{g['success'].mean():.2f}"])
        won = g[g["success"] & ~g["pre_success"]].drop_duplicates("rewrite").head(per_cell)
        examples += [[html.escape(method), html.escape(r.prompt), f"<code>{html.escape(r.rewrite)}</code>",
                      str(r.timestep)] for r in won.itertuples()]
    return ("<h2 id='rewrites'>Prompt attacks</h2><p class='sub'>ASR = share of (prompt, seed) pairs judged to show "
            "the concept: before = the prompt alone, after = the prompt or its rewrite. All rewrites: "
            "report-rewrites.csv.</p>" + _table(["method", "attack", "n", "ASR before", "ASR after"], rows, left=2)
            + (_table(["method", "prompt", "successful rewrite", "block t"], examples, left=3) if examples else ""))


def settings_html(df: Any) -> str:
    cols = ["metric", "higher_is_better", "metric_version", "prompt_set", "sampler", "steps", "guidance",
            "images_per_prompt", "resolution", "metric_settings"]
    cols = [c for c in cols if c in df.columns]
    seen = df[cols].astype(object).fillna("").astype(str).drop_duplicates()  # pandas 3: astype(str) keeps NaN
    rows = []
    for r in seen.to_dict("records"):
        try:
            settings = json.dumps(json.loads(r.get("metric_settings") or "{}"), sort_keys=True)
        except json.JSONDecodeError:
            settings = r.get("metric_settings", "")
        rows.append([html.escape(r[c]) for c in cols[:-1]] + [f"<code>{html.escape(settings)}</code>"])
    return _table([c.replace("_", " ") for c in cols], rows, left=len(cols))


def build_report(out_dir: Path, store_dir: Path | None = None, images_per_row: int = 8, echo: bool = True) -> Path:
    """Write out_dir/report.html and the figures beside it (report-curve-*.png, report-grid-*.png, and what the
    grids show in report-figures.json). Parts that need the store come from the folder's saved figures when no
    store holds them (bench.report_sources); echo: say on stderr which parts came from where."""
    import sys

    import pandas as pd

    from unlearn_bench import report_sources as rs
    from unlearn_bench.store import write_text_atomic

    run = json.loads((out_dir / "run.json").read_text())
    df = pd.read_csv(out_dir / "records.csv", keep_default_na=True)
    df["higher_is_better"] = df["higher_is_better"].astype(str).str.lower().isin(("true", "1"))
    stores = rs.StoreSet(rs.store_roots(out_dir, run, store_dir))
    plan = run.get("plan", {})
    scope = {m["name"]: m.get("params", {}).get("scope", "target") for m in plan.get("metrics", [])}
    metrics = list(dict.fromkeys(df["metric"]))
    order = sorted(metrics, key=lambda m: (scope.get(m.split("@")[0], "z") != "target", metrics.index(m)))
    curves = curve_figures(df, order)
    targets = [m for m in metrics if scope.get(m) == "target"]
    saved = rs.load_figures(out_dir)
    grids, no_grids = rs.resolve_grids(df, stores, out_dir, targets, images_per_row, saved.get("grids") or {})
    changed = rs.record_grids(out_dir, df, targets, grids, saved)
    for name, data in curves.items():
        (out_dir / f"report-curve-{_slug(name)}.png").write_bytes(data)
    counts, counts_from, more = rs.resolve_class_counts(df, stores, saved)
    if changed or more:
        rs.save_figures(out_dir, saved)
    found, rewrites_from = rs.resolve_rewrites(rewrites(df, stores), out_dir, df)
    from unlearn_bench.report_robustness import robustness_section

    robust, robust_figures = robustness_section(out_dir, store_dir)
    for name, data in robust_figures.items():
        (out_dir / name).write_bytes(data)

    title = f"{plan.get('name', out_dir.name)}: {plan.get('concept', {}).get('name', '?')} on " \
            f"{plan.get('model', {}).get('name', '?')}"
    sub = (f"{len(dict.fromkeys(df['method']))} methods × {len(dict.fromkeys(df['attack']))} attacks × "
           f"{len(metrics)} metrics × {df['seed'].nunique()} seeds · git {run.get('git', {}).get('commit', '?')[:10]}")
    sources = [("leaderboard, relearning curves, evaluation settings", "folder (records.csv)"),
               ("provenance", "folder (run.json)")]
    sources += [(f"image grid {g.method}", g.note or f"store ({', '.join(sorted(stores.used))})") for g in grids]
    sources += [("image grids", no_grids)] if no_grids else []
    sources += [("prompt-attack rewrites", rewrites_from)] if rewrites_from else []
    sources += [("NudeNet class counts", counts_from)] if counts_from else []
    sources += [("stores looked in", stores.describe())]
    parts = [f"<h1>{html.escape(title)}</h1><p class='sub'>{html.escape(sub)}</p>",
             "<nav><a href='#robustness'>Robustness</a><a href='#board'>Leaderboard</a><a href='#curves'>"
             "Relearning curves</a><a href='#grids'>Image grids</a><a href='#settings'>Settings</a><a href='#sources'>"
             "Sources</a><a href='#provenance'>Provenance</a></nav>", robust, "<h2 id='board'>Leaderboard</h2>",
             leaderboard_html(df), "<h2 id='curves'>Relearning curves</h2>"]
    if curves:
        parts += [f"<figure>{_img(data, f'curve {m}')}<figcaption>{html.escape(m)} against attack step; step 0 is "
                  f"the released (unattacked) model; band: ± 1 std over seeds. File: report-curve-{_slug(m)}.png"
                  f"</figcaption></figure>" for m, data in curves.items()]
    else:
        parts.append("<p class='sub'>No multi-step attacks in this run.</p>")
    parts.append("<h2 id='grids'>Image grids</h2>")
    for g in grids:
        items = ("Columns (left to right):<ol class='prompts'>"
                 + "".join(f"<li>{html.escape(p[:90])}</li>" for p in g.prompts) + "</ol>") if g.prompts else ""
        note = f"<p class='sub'>{html.escape(g.note)}</p>" if g.note else ""
        parts.append(f"<h3>{html.escape(g.method)}</h3><figure>{_img(g.png, f'grid {g.method}')}<figcaption>"
                     f"{note}{items}</figcaption></figure>")
    if no_grids:
        parts.append(f"<p class='sub'>{html.escape(no_grids)}</p>")
    parts += [rewrites_html(found), class_counts_html(counts), "<h2 id='settings'>Evaluation settings</h2>",
              settings_html(df), rs.sources_html(sources), "<h2 id='provenance'>Provenance</h2>",
              rs.provenance_html(run)]
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><main>{''.join(parts)}</main></body></html>")
    path = out_dir / "report.html"
    write_text_atomic(path, page)
    if echo:
        lines = [f"  {part}: {src}" for part, src in sources[2:]]
        print("report sources (records.csv and run.json from the folder):\n" + "\n".join(lines), file=sys.stderr)
    return path
