"""The catalogue as layers: the registry file, then installed plug-ins' fragments, then include files, merged into
one plain dict-of-dicts with the file and line of every key kept for messages.

Rules (README "Add your own method / attack / metric / concept"):
- Each layer has registry.yaml's sections (and `version`, `defaults`). A name is defined once across all layers:
  a second definition is a collision error naming both places, never a silent replacement. `extends` may name an
  entry of any layer.
- An include (or plug-in fragment) changes an entry defined elsewhere only under a top-level `override:` section,
  `override: {section: {name: {fields}}}`, deep-merged into that entry (mappings key by key, anything else
  replaced). Overriding a name that does not exist is an error; two layers overriding the same field collide.
  `defaults.suite` counts as a name: set it in an include under `override: {defaults: {suite: ...}}`.
- Relative paths written in an include resolve against the include file's folder (a plug-in dict fragment: the
  folder of the module that declares it): `module: my_method.py:Class`, prompt_sets `file`, models `path`,
  concepts `data_dirs`, and params typed dir / file / data-dir. They are stored absolute, so nothing downstream
  (prompt loading, data folders, spawned workers) needs to know which layer an entry came from. Relative paths in
  the registry file itself keep their old meaning (bench.schema_types.resolve_data_path), except `module:` files,
  which resolve beside it.
- The merged catalogue goes through exactly the structural check a single file does (bench.catalogue), each
  problem cited at the file and line that wrote it.

Why absolute paths rather than a per-entry base carried to every consumer: an inherited field keeps the base of
the file that wrote it (an include's `extends: i2p-nudity-142` still finds the bundled CSV), and the plan, its
hashes and its workers see ordinary paths.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearn_bench.catalogue import (
    COMPONENT_KINDS,
    OVERRIDE,
    SECTIONS,
    check_structure,
    entry_schema,
    merge,
    top_problems,
)
from unlearn_bench.catalogue import resolve as resolve_entry
from unlearn_bench.errors import RegistryError, suggest
from unlearn_bench.plugins import ENTRY_POINT_GROUP, absolute_ref, distribution, entry_points
from unlearn_bench.yamlio import Lines, load_file

INCLUDE_ENV = "BENCH_INCLUDE"
PATH_FIELDS = {"prompt_sets": ("file",), "models": ("path",)}  # typed plain str, but paths


@dataclass(eq=False)
class Source:
    """One layer: the registry file, an include file, or a plug-in's fragment (a YAML file or a dict)."""

    name: str  # the file, or "entry point NAME = VALUE" for a dict fragment
    base: Path  # the folder relative paths in this layer resolve against
    kind: str = "include"  # registry | include | plugin
    lines: Lines = field(default_factory=dict)
    dist: str = ""  # the distribution of a plug-in fragment

    def at(self, line: int | None = None) -> str:
        where = f"{self.name}:{line}" if line else self.name
        return f"{where} (plug-in {self.dist})" if self.dist else where

    def locate(self, keys: tuple[str, ...]) -> str:
        """'file:line' of the deepest written prefix of a key path."""
        return self.at(next((self.lines[keys[:i]] for i in range(len(keys), 0, -1) if keys[:i] in self.lines), None))

    def short(self) -> str:
        """How `bench ls` names the layer: the file relative to the working directory, or the distribution."""
        if self.dist:
            return f"plug-in {self.dist}"
        try:
            return str(Path(self.name).resolve().relative_to(Path.cwd()))
        except ValueError:
            return self.name


Where = dict[tuple[str, ...], tuple[Source, int | None]]


@dataclass
class Catalogue:
    data: dict[str, dict[str, Any]]
    sources: list[Source]
    origins: dict[tuple[str, str], Source]  # (section, name) -> the layer that defined it
    overridden: dict[tuple[str, str], list[Source]]  # (section, name) -> layers that overrode its fields
    where: Where  # key path -> (layer, line) of the layer that wrote it last


def include_paths(cli: Iterable[str | Path] = (), env: bool = True) -> list[tuple[Path, str]]:
    """$BENCH_INCLUDE's files (os.pathsep-separated) then the --include ones, each once, with where it was named."""
    named = [(Path(p), f"${INCLUDE_ENV}") for p in (os.environ.get(INCLUDE_ENV, "") if env else "").split(os.pathsep)
             if p.strip()]
    named += [(Path(p), "--include") for p in cli]
    out, seen = [], set()
    for path, how in named:
        key = path.expanduser().resolve()
        if key not in seen:
            seen.add(key)
            out.append((path.expanduser(), how))
    return out


def read_include(path: Path, how: str) -> tuple[Source, Any]:
    if not path.is_file():
        raise RegistryError(f"{how} {path}: include file not found" if not path.exists() else
                            f"{how} {path}: not a file")
    data, lines = load_file(path)
    return Source(str(path), path.resolve().parent, "include", lines), data


def plugin_layers() -> list[tuple[Source, Any]]:
    """The fragments installed distributions declare in the entry-point group `unlearn_bench.registry`: each
    entry point loads to a YAML file path, a dict, or a callable returning either."""
    out = []
    for ep in entry_points():
        dist = distribution(ep)
        what = f"entry point {ep.name} = {ep.value}"
        hint = f" (group {ENTRY_POINT_GROUP}; set BENCH_NO_PLUGINS=1 to run without plug-ins)"
        try:
            value = ep.load()
            if callable(value):
                value = value()
        except Exception as exc:  # noqa: BLE001 - a broken plug-in is a user-facing error naming it
            raise RegistryError(f"plug-in {dist}: {what} failed to load: {type(exc).__name__}: {exc}{hint}") from exc
        module_file = getattr(sys.modules.get(ep.module), "__file__", None)
        base = Path(module_file).resolve().parent if module_file else Path.cwd()
        if isinstance(value, str | os.PathLike):
            path = Path(value).expanduser()
            path = path if path.is_absolute() else base / path
            if not path.is_file():
                raise RegistryError(f"plug-in {dist}: {what} names {path}, which is not a file{hint}")
            data, lines = load_file(path)
            out.append((Source(str(path), path.resolve().parent, "plugin", lines, dist), data))
        elif isinstance(value, Mapping):
            out.append((Source(what, base, "plugin", {}, dist), dict(value)))
        else:
            raise RegistryError(f"plug-in {dist}: {what} gave {type(value).__name__}; expected a YAML file path, "
                                f"a dict, or a callable returning one{hint}")
    return out


def build(base: Source, base_data: Any, layers: list[tuple[Source, Any]]) -> Catalogue:
    """Merge the layers onto the registry file (see the module docstring); raise every problem at once."""
    problems = top_problems(base_data, base.locate, include=False)
    for source, data in layers:
        problems += top_problems(data, source.locate, include=True)
    if problems:
        raise _error(problems, base, layers)
    base_data = base_data or {}
    cat = Catalogue({s: dict(base_data.get(s) or {}) for s in SECTIONS}
                    | {"defaults": dict(base_data.get("defaults") or {})}, [base] + [s for s, _ in layers], {}, {},
                    {})
    _record(cat.where, base, (), ())
    for section in (*SECTIONS, "defaults"):
        for name in cat.data[section]:
            cat.origins[(section, str(name))] = base
        for name, raw in cat.data[section].items():
            if section in COMPONENT_KINDS and isinstance(raw, Mapping) and isinstance(raw.get("module"), str) \
                    and absolute_ref(raw["module"], base.base) != raw["module"]:
                cat.data[section][name] = dict(raw) | {"module": absolute_ref(raw["module"], base.base)}
    for source, data in layers:
        problems += _add_entries(cat, source, data or {})
    for source, _ in layers:
        _localize_added(cat, source)
    touched: dict[tuple[str, ...], Source] = {}
    for source, data in layers:
        problems += _apply_overrides(cat, source, (data or {}).get(OVERRIDE) or {}, touched)
    problems += check_structure(cat.data, lambda keys: locate(cat.where, keys, 1) or base.name)
    if problems:
        raise _error(problems, base, layers)
    return cat


def locate(where: Where, keys: tuple[str, ...], depth: int = 2) -> str:
    """'file:line' of the layer that wrote the deepest prefix (at least `depth` keys long) of a key path."""
    for i in range(len(keys), depth - 1, -1):
        hit = where.get(keys[:i])
        if hit is not None:
            return hit[0].at(hit[1])
    return ""


def _error(problems: list[str], base: Source, layers: list[tuple[Source, Any]]) -> RegistryError:
    if len(problems) == 1:
        return RegistryError(problems[0], problems)
    what = base.name + (f" and {len(layers)} include(s)/plug-in(s)" if layers else "")
    return RegistryError(f"{what}: {len(problems)} problems:\n  - " + "\n  - ".join(problems), problems)


def _record(where: Where, source: Source, prefix: tuple[str, ...], target: tuple[str, ...]) -> None:
    """Note the source's lines under `prefix` as the location of the same keys under `target`."""
    n = len(prefix)
    for keys, line in source.lines.items():
        if keys[:n] == prefix and len(keys) > n:
            where[target + keys[n:]] = (source, line)


def _add_entries(cat: Catalogue, source: Source, data: Mapping[str, Any]) -> list[str]:
    problems = []
    for section in (*SECTIONS, "defaults"):
        for name, raw in (data.get(section) or {}).items():
            keys = (section, str(name))
            if name in cat.data[section]:
                first = cat.origins.get(keys)
                where = locate(cat.where, keys, 2) or (first.at() if first else "elsewhere")
                what = "defaults.suite" if section == "defaults" else f"{section}.{name}"
                how = (f"to change it, write override: {{defaults: {{{name}: ...}}}}" if section == "defaults" else
                       f"to change its fields, write override: {{{section}: {{{name}: {{...}}}}}}; to add a variant, "
                       f"give it a new name with `extends: {name}`")
                problems.append(f"{source.locate(keys)}: {what} is already defined at {where}; a name is defined "
                                f"once - {how}")
                continue
            cat.data[section][name] = raw
            cat.origins[keys] = source
            _record(cat.where, source, keys, keys)
            cat.where[keys] = (source, source.lines.get(keys))
    return problems


def _localize_added(cat: Catalogue, source: Source) -> None:
    """Make the relative paths of the entries this layer defined absolute (after every layer is in, so a component's
    schema may come through `extends` from any layer)."""
    for (section, name), origin in list(cat.origins.items()):
        if origin is source and section != "defaults" and isinstance(cat.data[section].get(name), Mapping):
            cat.data[section][name] = localize(section, cat.data[section], name, cat.data[section][name], source.base)


def _apply_overrides(cat: Catalogue, source: Source, over: Mapping[str, Any],
                     touched: dict[tuple[str, ...], Source]) -> list[str]:
    problems = []
    for section, table in over.items():
        for name, fields in table.items():
            keys = (OVERRIDE, section, str(name))
            if section == "defaults":
                fields, name = {name: fields}, ""
            elif name not in cat.data[section]:
                known = cat.data[section]
                problems.append(f"{source.locate(keys)}: override.{section}.{name}: no {section[:-1]} '{name}' to "
                                f"override.{suggest(str(name), known)} (to add a new entry, define it under "
                                f"`{section}:`)")
                continue
            clash = _clash(touched, source, (section, str(name)) if name else (section,), fields)
            if clash:
                problems.append(f"{source.locate(keys)}: {clash}")
                continue
            if section == "defaults":
                cat.data["defaults"] |= fields
                _record(cat.where, source, (OVERRIDE, "defaults"), ("defaults",))
                continue
            table_now = cat.data[section]
            local = localize(section, table_now | {name: merge(table_now[name], fields)}, name, fields, source.base)
            cat.data[section][name] = merge(table_now[name], local)
            cat.overridden.setdefault((section, str(name)), []).append(source)
            _record(cat.where, source, keys, (section, str(name)))
    return problems


def _leaves(value: Any, prefix: tuple[str, ...]) -> list[tuple[str, ...]]:
    if isinstance(value, Mapping) and value:
        return [leaf for k, v in value.items() for leaf in _leaves(v, (*prefix, str(k)))]
    return [prefix]


def _clash(touched: dict[tuple[str, ...], Source], source: Source, keys: tuple[str, ...],
           fields: Mapping[str, Any]) -> str:
    """Two layers overriding the same field (or one a part of the other) of the same entry collide."""
    for leaf in _leaves(fields, keys):
        for other_keys, other in touched.items():
            n = min(len(leaf), len(other_keys))
            if other is not source and leaf[:n] == other_keys[:n]:
                return (f"override of {'.'.join(leaf)} collides with the override of {'.'.join(other_keys)} at "
                        f"{other.locate((OVERRIDE, *other_keys))}; override a field in one place only")
    for leaf in _leaves(fields, keys):
        touched[leaf] = source
    return ""


def localize(section: str, table: Mapping[str, Any], name: str, fields: Mapping[str, Any], base: Path) -> dict:
    """`fields` (written in one layer for entry `name`) with relative paths made absolute against `base`: file
    modules, prompt files, model paths, concept data_dirs and component params whose schema type is a path."""
    out = dict(fields)
    if isinstance(out.get("module"), str):
        out["module"] = absolute_ref(out["module"], base)
    for key in PATH_FIELDS.get(section, ()):
        if isinstance(out.get(key), str):
            out[key] = _absolute(out[key], base)
    if section in COMPONENT_KINDS:
        types = _param_types(table, name, section)
        if isinstance(out.get("params"), Mapping):
            out["params"] = {k: _local(types.get(k), v, base) for k, v in out["params"].items()}
        if isinstance(out.get("scaled"), Mapping):
            out["scaled"] = {g: {k: _local(types.get(k), v, base) for k, v in vals.items()}
                             if isinstance(vals, Mapping) else vals for g, vals in out["scaled"].items()}
    elif section in ("concepts", "models", "prompt_sets", "suites"):
        schema = entry_schema(section)
        out = {k: _local(schema.fields.get(k), v, base) if schema else v for k, v in out.items()}
    return out


def _param_types(table: Mapping[str, Any], name: str, section: str) -> dict[str, Any]:
    """The entry's parsed param schema (through `extends`); keys whose type does not parse are left out (the
    structural check reports them)."""
    from unlearn_bench.schema import SchemaSyntaxError, parse_type

    try:
        schema = resolve_entry(table, name, section).get("schema")
    except RegistryError:
        return {}
    out = {}
    for key, text in (schema.items() if isinstance(schema, Mapping) else ()):
        try:
            out[key] = parse_type(text)
        except (SchemaSyntaxError, TypeError, AttributeError):
            continue
    return out


def _absolute(text: str, base: Path) -> str:
    p = Path(os.path.expanduser(text))
    return text if not text or p.is_absolute() else str((base / p).resolve())


def _local(t: Any, value: Any, base: Path) -> Any:
    """A value with the relative paths its type marks made absolute (a path type, or one inside a union, a list,
    a per-concept mapping or a fixed-field mapping)."""
    from unlearn_bench.schema import ListType, PerConcept, Struct, Union
    from unlearn_bench.schema_types import PathType

    if t is None:
        return value
    if isinstance(t, PathType):
        return _absolute(value, base) if isinstance(value, str) else value
    if isinstance(t, Union):  # the alternative that accepts the value decides (str|file: a string is no path)
        from unlearn_bench.schema import Ctx, SchemaError

        for alt in t.alts:
            try:
                alt.check(value, Ctx(check_paths=False))
            except SchemaError:
                continue
            return _local(alt, value, base)
        return value
    if isinstance(t, ListType):
        return [_local(t.elem, v, base) for v in value] if isinstance(value, list) else value
    if isinstance(t, PerConcept):
        return {k: _local(t.inner, v, base) for k, v in value.items()} if isinstance(value, Mapping) else \
            _local(t.inner, value, base)
    if isinstance(t, Struct):
        return {k: _local(t.fields.get(k), v, base) for k, v in value.items()} if isinstance(value, Mapping) \
            else value
    return value


def load_layers(path: Path, includes: list[tuple[Path, str]], plugins: bool) -> Catalogue:
    """The registry file at `path`, plug-in fragments (when `plugins`), then the include files, merged."""
    data, lines = load_file(path)
    base = Source(str(path), path.resolve().parent, "registry", lines)
    for p, how in includes:
        if p.is_file() and p.resolve() == path.resolve():
            raise RegistryError(f"{how} {p}: this is the registry file itself; an include holds only additions "
                                "(new entries, and `override:` for existing ones)")
    layers = plugin_layers() if plugins else []
    layers += [read_include(p, how) for p, how in includes]
    return build(base, data, layers)


