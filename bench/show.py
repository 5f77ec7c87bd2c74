"""`bench show KIND NAME`: one registry entry in full - every parameter with its schema type, its resolved value per
model group, and the file and line (or --set) each value comes from.

Why: a method's value on the toy model is the `params` default, then `scaled.<group>` (the model's `defaults`), then
--set, possibly inherited through `extends` and changed by an include's `override:`. Reading that off registry.yaml
by hand is error-prone; this resolves every value with the same Registry.component a run uses (so what is shown is
what runs) and locates each one in the catalogue's per-key line map (bench.includes) to say where it was written.

Light on purpose: `bench show` must not import torch (yaml, rich and the registry modules only).
"""

from __future__ import annotations

import json
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from unlearn_bench.catalogue import COMPONENT_KINDS, MODEL_TYPES, PROMPT_SET_TYPES, SUITE_TYPES, entry_schema
from unlearn_bench.errors import RegistryError, suggest, unknown
from unlearn_bench.registry import DEFAULT_REGISTRY, Registry
from unlearn_bench.specs import ModelSpec, thaw

KINDS = {"method": "methods", "attack": "attacks", "metric": "metrics", "wrapper": "wrappers", "model": "models",
         "concept": "concepts", "suite": "suites", "prompt-set": "prompt_sets"}
ALIASES = {**{v: v for v in KINDS.values()}, **KINDS, "prompt_set": "prompt_sets", "prompt-sets": "prompt_sets"}
TYPE_TEXT = {"models": MODEL_TYPES, "suites": SUITE_TYPES, "prompt_sets": PROMPT_SET_TYPES}  # concepts: describe()
HEADER_FIELDS = ("description", "paper", "obtain")  # prose: printed above the table, not in a cell
TYPE_WIDTH = 66  # longer schema types are cut in the table (--json prints them whole)
PARAMS = "params"  # the group name of the SD/paper defaults (and of every model group without a scaled entry)


def section_of(kind: str) -> str:
    """The registry section a KIND names (singular, plural, prompt-set or prompt_set), or exit-2 input error."""
    section = ALIASES.get(kind.strip().lower())
    if section is None:
        raise RegistryError(f"unknown kind '{kind}'.{suggest(kind, KINDS)} Choose from: {', '.join(KINDS)}")
    return section


def _singular(section: str) -> str:
    return next(k for k, v in KINDS.items() if v == section)


def _unknown(reg: Registry, section: str, name: str) -> RegistryError:
    """unlearn_bench.errors.unknown, plus where the name does exist when it is in another section (meta: a wrapper)."""
    err = unknown(_singular(section).replace("-", " "), name, reg.data[section])
    elsewhere = [s for s in KINDS.values() if s != section and name in reg.data[s]]
    if elsewhere:
        kind = _singular(elsewhere[0])
        err = RegistryError(f"{err} ('{name}' is a {kind}: bench show {kind} {name})")
    return err


def _chain(reg: Registry, section: str, name: str) -> list[str]:
    """The entry and its `extends` ancestors, nearest first (the order in which a key's writer is looked up)."""
    out = [name]
    while isinstance(reg.data[section].get(out[-1]), dict) and "extends" in reg.data[section][out[-1]]:
        parent = reg.data[section][out[-1]]["extends"]
        if parent in out or parent not in reg.data[section]:
            break
        out.append(parent)
    return out


def _at(reg: Registry, keys: tuple[str, ...]) -> str | None:
    """'file:line' of the layer that wrote exactly this key path (the bundled catalogue shows as registry.yaml)."""
    hit = reg.where.get(keys)
    if hit is None:
        return None
    source, line = hit
    name = "registry.yaml" if Path(source.name) == DEFAULT_REGISTRY else source.short()
    return f"{name}:{line}" if line else name


def _written(reg: Registry, section: str, name: str, path: tuple[str, ...]) -> dict[str, Any] | None:
    """Where the nearest entry of the extends chain wrote `path` (e.g. ('scaled', 'toy', 'lr')): at, via."""
    for owner in _chain(reg, section, name):
        node: Any = reg.data[section].get(owner)
        for part in path:
            if not isinstance(node, dict) or part not in node:  # a written null is still written
                break
            node = node[part]
        else:
            at = _at(reg, (section, owner, *path))
            origin = reg.origins.get((section, owner))
            layer = reg.where.get((section, owner, *path), (None,))[0]
            via = [f"from {owner}"] if owner != name else []
            if layer is not None and origin is not None and layer is not origin:
                via.append("override")
            return {"at": at, "via": ", ".join(via) or None}
    return None


def _set_keys(reg: Registry, section: str, name: str, key: str) -> list[str]:
    return [f"--set {_singular(section)}.{name}.{k}" for k in reg.overrides.get((section, name), {})
            if k.split(".")[0] == key]


def _source(reg: Registry, section: str, name: str, key: str, group: str, scaled: bool) -> dict[str, Any]:
    """Where a component parameter's resolved value for `group` comes from: --set, scaled.<group>, or params."""
    sets = _set_keys(reg, section, name, key)
    if sets:
        return {"source": "--set", "at": ", ".join(sets), "via": None}
    if scaled:
        hit = _written(reg, section, name, ("scaled", group, key))
        if hit:
            return {"source": f"scaled.{group}", **hit}
    hit = _written(reg, section, name, (PARAMS, key)) or {"at": None, "via": None}
    return {"source": PARAMS, **hit}


def model_groups(reg: Registry) -> dict[str, list[str]]:
    """Parameter group (a model's `defaults`) -> the registry's models in it."""
    out: dict[str, list[str]] = {}
    for m in reg.names("models"):
        group = reg.entry("models", m).get("defaults")
        if isinstance(group, str):
            out.setdefault(group, []).append(m)
    return out


def _group_spec(group: str) -> ModelSpec:
    """A stand-in model of a group: Registry.component reads only `defaults` from it."""
    return ModelSpec(name=f"<{group}>", kind="tiny", defaults=group, family=group)


def component_view(reg: Registry, section: str, name: str, model: str | None = None) -> dict[str, Any]:
    """A method/wrapper/attack/metric: header, model groups, and per parameter its type and per-group values."""
    if name not in reg.data[section]:
        raise _unknown(reg, section, name)
    raw = reg.entry(section, name)
    scaled = {g: set(v or {}) for g, v in (raw.get("scaled") or {}).items()}
    groups = model_groups(reg)
    if model is not None:
        mspec = reg.model(model)
        columns = {mspec.defaults: reg.component(section, name, mspec)}
    else:
        names = [PARAMS, *sorted(set(scaled) | set(groups))]
        columns = {g: reg.component(section, name, None if g == PARAMS else _group_spec(g)) for g in names}
    base = next(iter(columns.values()))
    schema = raw.get("schema") or {}
    params = []
    for key in sorted(base.params):
        values = {g: {"value": thaw(spec.params[key]), **_source(reg, section, name, key, g, key in scaled.get(g, ()))}
                  for g, spec in columns.items()}
        params.append({"name": key, "type": str(schema.get(key, "")), "values": values})
    out = {"kind": COMPONENT_KINDS[section], "name": name, "module": base.module, "version": base.version,
           "paper": base.paper, "description": base.description, "defined_at": _at(reg, (section, name)),
           "from": reg.origin(section, name) or None, "extends": _chain(reg, section, name)[1:],
           "groups": {g: groups.get(g, []) for g in columns if g != PARAMS},
           "params": params}
    if section == "metrics":
        out["higher_is_better"] = base.higher_is_better
    if model is not None:
        out["model"] = model
    return out


def entry_view(reg: Registry, section: str, name: str) -> dict[str, Any]:
    """A model, concept, suite or prompt set: each field of its fixed schema, resolved, with where it was written."""
    if name not in reg.data[section]:
        raise _unknown(reg, section, name)
    spec = getattr(reg, section[:-1])(name)  # checks the entry (with --set) exactly as a run would
    raw = reg.entry(section, name)
    schema = entry_schema(section)
    defaults = {f.name: f.default for f in fields(ModelSpec) if f.default is not MISSING} if section == "models" else {}
    rows = []
    for key, t in schema.fields.items():  # type: ignore[union-attr]
        sets = _set_keys(reg, section, name, key)
        if section in ("models", "concepts", "suites") and hasattr(spec, key):
            value = thaw(getattr(spec, key))
        else:
            value = thaw(raw[key]) if key in raw else None
            over = reg.overrides.get((section, name), {})
            value = over.get(key, value)
        hit = _written(reg, section, name, (key,))
        if sets:
            src = {"source": "--set", "at": ", ".join(sets), "via": None}
        elif section == "models" and key == "path" and value and not raw.get("path"):
            src = {"source": "environment", "at": f"$BENCH_MODEL_{name.upper()}_PATH", "via": None}
        elif hit:
            src = {"source": "file", **hit}
        elif key in defaults:
            src = {"source": "default", "at": "ModelSpec", "via": None}
        else:
            continue  # not set, no default: nothing to show
        text = TYPE_TEXT.get(section, {}).get(key) or t.describe()
        rows.append({"name": key, "type": text, "value": value, **src})
    out = {"kind": _singular(section), "name": name, "defined_at": _at(reg, (section, name)),
           "from": reg.origin(section, name) or None, "extends": _chain(reg, section, name)[1:], "fields": rows}
    if section == "prompt_sets" and getattr(spec, "file", None):
        from unlearn_bench.schema_types import resolve_data_path

        path = resolve_data_path(spec.file, DEFAULT_REGISTRY.parent)
        out["file"] = {"path": str(path), "exists": path.is_file()}
    if section == "models":
        out["group"] = spec.defaults
    return out


def _with_inner_settings(reg: Registry, view: dict[str, Any], composed: str, model: str | None) -> None:
    """A composed method's parameter values as the composition resolves them: a wrapper's `inner` settings for this
    base method (esd+meta on SD trains ESD as the meta script does) replace the base's, cited at the wrapper."""
    base, *wraps = [w.strip() for w in composed.split("+")]
    for row in view["params"]:
        for group, cell in row["values"].items():
            mspec = reg.model(model) if model is not None else None if group == PARAMS else _group_spec(group)
            layers = [lay for w in wraps for lay in reg._inner_layers(w, base, mspec)]
            hits = [where for where, late, values in layers if row["name"] in values]
            if hits and cell["source"] != "--set" and (cell["source"] == PARAMS or hits[-1].endswith(group)):
                cell.update(value=thaw(reg.method(composed, mspec).params[row["name"]]), source="wrapper",
                            at=hits[-1].split(": ")[-1], via=None)


def show_data(reg: Registry, kind: str, name: str, model: str | None = None) -> dict[str, Any]:
    """What `bench show` prints, as plain data (its --json output). `method esd+meta` gives the base method with
    its wrappers under `wrappers`."""
    section = section_of(kind)
    if model is not None and section not in COMPONENT_KINDS:
        raise RegistryError(f"--model {model}: only methods, wrappers, attacks and metrics have per-model "
                            f"parameters (got {kind} {name})")
    if model is not None and model not in reg.data["models"]:
        raise unknown("model", model, reg.data["models"])
    if section not in COMPONENT_KINDS:
        return entry_view(reg, section, name)
    if section == "methods" and "+" in name:
        base, *wraps = [w.strip() for w in name.split("+")]
        out = component_view(reg, section, base, model)
        _with_inner_settings(reg, out, name, model)
        out["wrappers"] = [component_view(reg, "wrappers", w, model) for w in wraps]
        out["composed"] = name
        return out
    return component_view(reg, section, name, model)


def _fmt(value: Any, inner: bool = False) -> str:
    """A value as the registry would write it (YAML flow style): [a, b], {k: v}, null, "" for the empty string."""
    if isinstance(value, str):
        plain = value and not (inner and any(c in value for c in ",:[]{}#")) and value.strip() == value
        return value if plain else json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_fmt(v, True) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v, True)}" for k, v in value.items()) + "}"
    return json.dumps(value, ensure_ascii=False)


def _where(row: dict[str, Any], group: str | None = None) -> str:
    """The source cell: 'scaled.toy registry.yaml:197', or just the file:line when the group column already says
    which layer it is; '(from esd, override)' when inherited through extends or changed by an include."""
    implied = row["source"] in ("file", "--set") or (group is not None and row["source"] in (
        PARAMS if group == PARAMS else "", f"scaled.{group}"))
    text = " ".join(p for p in ("" if implied else row["source"], row.get("at") or "") if p)
    return f"{text} ({row['via']})" if row.get("via") else text


def _cut(text: str) -> str:
    return text if len(text) <= TYPE_WIDTH else text[:TYPE_WIDTH - 3] + "..."


def _header(data: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [(k, str(data[k])) for k in ("module", "version", "paper", "description") if data.get(k)]
    rows += [(r["name"], _fmt(r["value"])) for r in data.get("fields", ()) if r["name"] in HEADER_FIELDS]
    if "higher_is_better" in data:
        rows.append(("higher is better", str(data["higher_is_better"]).lower()))
    if data.get("extends"):
        rows.append(("extends", " -> ".join(data["extends"])))
    rows.append(("defined at", data.get("defined_at") or "-"))
    if data.get("from"):
        rows.append(("from", data["from"]))
    return rows


def _columns(table: Any, first: str, group: str | None = None) -> None:
    """Names and groups never wrap; a source keeps 'registry.yaml:NNN' on one line; types and values fold."""
    table.add_column(first, overflow="fold")
    table.add_column("type", overflow="fold", max_width=24)
    if group:
        table.add_column(group, overflow="fold")
    table.add_column("value", overflow="fold")
    table.add_column("source", overflow="fold", min_width=17)


def _table(caption: str | None = None) -> Any:
    """Column rules and no side borders: at 80 columns the cells get the width, not the frame."""
    from rich import box
    from rich.table import Table

    return Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), caption=caption, caption_justify="left")


def render(data: dict[str, Any]) -> Any:
    """Rich renderables for the data of show_data (tables fold long cells, so 80 columns stay readable)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    title = f"{data['kind']} {data.get('composed', data['name'])}"
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold", no_wrap=True)
    head.add_column(overflow="fold")
    for k, v in _header(data):
        head.add_row(k, Text(v))  # Text: no rich markup, so [int>=1] or a paper's [1] print as written
    parts: list[Any] = [Text(title, style="bold underline"), head]
    if "params" in data and not data["params"]:
        parts.append(Text("no parameters"))
    elif "params" in data:
        groups = data["groups"]
        if "model" in data:
            caption = f"model {data['model']} uses the parameter group {next(iter(groups))}"
        else:
            note = "; ".join(f"{g}: {', '.join(ms) or '-'}" for g, ms in groups.items() if g != PARAMS)
            caption = (f"params: the SD/paper defaults. A group's row appears only where scaled.<group> changes a "
                       f"value. Groups -> models: {note}")
        one = "model" in data  # one group: no group column, the caption names it
        table = _table(caption)
        _columns(table, "parameter", *(() if one else ("group",)))
        for p in data["params"]:
            first = True
            base = next(iter(p["values"].values()))
            for g, v in p["values"].items():
                if not first and (v["source"], v.get("at")) == (base["source"], base.get("at")):
                    continue  # same value from the same place as the params row
                table.add_row(*map(Text, (p["name"] if first else "", _cut(p["type"]) if first else "",
                                          *(() if one else (g,)), _fmt(v["value"]), _where(v, None if one else g))))
                first = False
        parts.append(table)
    else:
        table = _table()
        _columns(table, "field")
        for r in data["fields"]:
            if r["name"] not in HEADER_FIELDS:
                table.add_row(*map(Text, (r["name"], _cut(r["type"]), _fmt(r["value"]), _where(r))))
        parts.append(table)
        if "file" in data:
            f = data["file"]
            parts.append(Text(f"prompt file: {f['path']} ({'found' if f['exists'] else 'missing'})"))
        if "group" in data:
            parts.append(Text(f"parameter group: {data['group']} (bench show method NAME --model "
                              f"{data['name']} shows its values)"))
    out = Group(*parts)
    if data.get("wrappers"):
        out = Group(out, *(Group(Text(""), render(w)) for w in data["wrappers"]))
    return out
