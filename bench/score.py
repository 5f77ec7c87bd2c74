"""`bench score DIR`: re-score the images a run already generated, with new or changed metrics.

Why: generation is the expensive stage (hours of SD sampling); judging is cheap and the part people change (another
NudeNet threshold, CLIP ViT-B/32 instead of L/14, FID against another reference). The run's records.csv names every
generate entry it scored (images_key) and run.json the store and the resolved specs, so re-scoring needs no model:
it goes through the same memoised score stage as `bench run`, so an unchanged metric is a cache hit and a changed
one (new params, version or reference) is scored anew. records.csv, leaderboard.csv and run.json are rewritten
in place (or into --out): rows of the re-scored metrics are replaced where they stood, new metrics are appended to
each cell, everything else is kept byte for byte.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from unlearn_bench.registry import Registry, RegistryError
from unlearn_bench.specs import ConceptSpec, ModelSpec, params, thaw

CELL = ("seed", "method", "attack", "attack_step")


def model_from(d: dict[str, Any]) -> ModelSpec:
    names = {f.name for f in fields(ModelSpec)}
    return ModelSpec(**{k: v for k, v in d.items() if k in names})


def concept_from(d: dict[str, Any]) -> ConceptSpec:
    """The run's concept exactly as it was resolved then (not as the registry says now)."""
    out: dict[str, Any] = {}
    for f in fields(ConceptSpec):
        if f.name not in d:
            continue
        v = d[f.name]
        out[f.name] = params(v) if isinstance(v, dict) else tuple(v) if isinstance(v, list) else v
    return ConceptSpec(**out)


def _base(metric: str, names: set[str]) -> str | None:
    """The re-scored metric a records row belongs to (variants such as nudenet@0.5 belong to nudenet)."""
    if metric in names:
        return metric
    head = metric.split("@", 1)[0]
    return head if "@" in metric and head in names else None


def load_run(out_dir: Path) -> tuple[dict[str, Any], list[dict[str, str]]]:
    from unlearn_bench.results import read_records

    for name in ("run.json", "records.csv"):
        if not (out_dir / name).exists():
            raise RegistryError(f"{out_dir}/{name} not found: `bench score` re-scores a finished `bench run --out`")
    return json.loads((out_dir / "run.json").read_text()), read_records(out_dir / "records.csv")


def rescore(out_dir: Path, reg: Registry, metric_names: tuple[str, ...] = (), store_dir: Path | None = None,
            device: str = "cpu", progress: Any = None, dest: Path | None = None) -> list[dict[str, Any]]:
    """Score the stored images of `out_dir` with `metric_names` (default: the run's own metrics); returns all rows."""
    from unlearn_bench.plan import Plan, preflight_metrics
    from unlearn_bench.results import replace_run_json, write_leaderboard, write_records
    from unlearn_bench.runner import Runner, variant_rows
    from unlearn_bench.store import Store

    run, records = load_run(out_dir)
    plan_d = run["plan"]
    model, concept = model_from(plan_d["model"]), concept_from(plan_d["concept"])
    names = list(metric_names) or [m["name"] for m in plan_d["metrics"]]
    specs = [reg.metric(n, model) for n in names]
    preflight_metrics(specs)
    scope_of = {m["name"]: m.get("params", {}).get("scope", "target") for m in plan_d["metrics"]}
    images: dict[tuple[str, ...], dict[str, str]] = {}  # (cell..., scope) -> a row that scored those images
    for r in records:
        if r.get("images_key") and r["metric"] in scope_of:
            images.setdefault((*(r[c] for c in CELL), scope_of[r["metric"]]), r)
    store = Store(Path(store_dir or run["store"]))
    runner = Runner(Plan(plan_d["name"], model, concept, [], [], specs, list(plan_d["seeds"])), store,
                    device=device, progress=progress)
    new: dict[tuple[str, ...], dict[str, list[dict[str, Any]]]] = {}
    for spec in specs:
        scope = spec.params.get("scope", "target")
        cells = [(k, r) for k, r in images.items() if k[-1] == scope]
        if not cells:
            have = sorted({k[-1] for k in images})
            raise RegistryError(f"metric {spec.name} scores the '{scope}' images, but {out_dir} generated only "
                                f"{have}: run `bench run` with this metric to generate them")
        for key, r in cells:
            entry = store.lookup("generate", r["images_key"])
            if entry is None:
                raise RegistryError(f"generate entry {r['images_key']} is not in the store {store.root} "
                                    f"(pass --store, or re-run `bench run` to regenerate)")
            scored = runner.score(entry, spec)
            meta = scored.meta
            row = dict(r) | {"metric": spec.name, "value": meta["value"], "stderr": meta["stderr"], "n": meta["n"],
                             "higher_is_better": bool(spec.higher_is_better), "metric_version": spec.version,
                             "cell_hash": scored.key,
                             "metric_settings": json.dumps(meta.get("settings", {}), sort_keys=True)}
            new.setdefault(key[:-1], {})[spec.name] = variant_rows(row, meta)
    rows = merge(records, new, set(names), names)
    dest = dest or out_dir
    if dest != out_dir:
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out_dir / "run.json", dest / "run.json")
    write_records(dest / "records.csv", rows)
    write_leaderboard(dest)
    kept = [m for m in plan_d["metrics"] if m["name"] not in names]
    run["plan"]["metrics"] = kept + [thaw(s.__dict__) for s in specs]
    run.setdefault("rescored", []).append({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                           "metrics": names, "argv": sys.argv, "stages": dict(store.counts)})
    replace_run_json(dest, run)  # an edit of the run's document, not a new run of its history
    return rows


def merge(records: list[dict[str, str]], new: dict[tuple[str, ...], dict[str, list[dict[str, Any]]]],
          names: set[str], order: list[str]) -> list[dict[str, Any]]:
    """Old rows in their order, each re-scored metric's rows in place of its old ones, new metrics at the end of
    their cell (cells in their first-seen order)."""
    cells: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in records:
        cells.setdefault(tuple(str(r[c]) for c in CELL), []).append(r)
    for key in new:
        cells.setdefault(key, [])
    out: list[dict[str, Any]] = []
    for key, old in cells.items():
        fresh, done = new.get(key, {}), set()
        for r in old:
            base = _base(r["metric"], names)
            if base is None:
                out.append(r)
            elif base not in done and base in fresh:
                out += fresh[base]
                done.add(base)
        out += [row for name in order if name in fresh and name not in done for row in fresh[name]]
    return out
