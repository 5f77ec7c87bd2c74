"""The shape of registry.yaml: which fields each section's entries take, their fixed schemas, `extends`, and a
structural check that reports every malformed part of a file at once (file, line, entry, field).

Why separate from bench.registry: these are rules about the file, checked once when it is read (so no command ever
meets a list where a mapping belongs and dies in a traceback), while bench.registry resolves entries for a run.
Model and concept fields are fixed by the code (bench.specs), so their schemas live here rather than in the file;
method/attack/metric parameters are open-ended, so those entries declare their own `schema:`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, fields
from typing import Any

from unlearn_bench.errors import RegistryError, suggest
from unlearn_bench.plugins import is_file_ref, split_ref
from unlearn_bench.schema import Ctx, SchemaSyntaxError, Struct, Type, parse_type, show
from unlearn_bench.specs import ModelSpec

SECTIONS = ("models", "concepts", "prompt_sets", "methods", "wrappers", "attacks", "metrics", "suites")
COMPONENT_KINDS = {"methods": "method", "wrappers": "wrapper", "attacks": "attack", "metrics": "metric"}
REF_SECTIONS = {"prompt-set": "prompt_sets", "metric": "metrics", "model": "models", "concept": "concepts",
                "method": "methods", "wrapper": "wrappers", "attack": "attacks"}
# `version` is part of every stage key of the component (bench.runner component_identity): bump it when the code
# changes results - the store's keys do not see code, which matters most for plug-ins outside this repository
COMPONENT_FIELDS = ("module", "description", "paper", "params", "scaled", "schema", "version")
METRIC_FIELDS = (*COMPONENT_FIELDS, "higher_is_better")
# wrappers: `inner.<method>.params` / `inner.<method>.scaled.<group>` - the settings the wrapper's own paper uses for
# that inner method (esd+meta: the official meta script trains ESD differently from its baseline script)
WRAPPER_FIELDS = (*COMPONENT_FIELDS, "inner")
DATA_ROLES = ("forget", "related", "unrelated", "retain", "attack")  # ConceptSpec.role_prompts
SCOPES = ("target", "benign", "related")  # metric scopes (bench.plan)
PROMPT_FORMATS = ("auto", "i2p", "coco", "plain")  # bench.prompts.FORMATS
# bench.toy.world's COLOURS and SHAPES, copied so that reading the registry does not import numpy (a test compares)
TOY_COLOURS = ("red", "orange", "yellow", "green", "blue")
TOY_SHAPES = ("circle", "square", "triangle")

# Model fields (bench.specs.ModelSpec); a field added there without an entry here gets a type from its annotation.
MODEL_TYPES = {
    "kind": "choice(tiny|toy|sd|sdxl)", "defaults": "str{1,}", "family": "str{1,}", "hub_id": "str|null",
    "path": "str|null", "revision": "str|null", "allow_download": "bool", "allow_pickle": "bool",
    "resolution": "int>=8",
    "sampler": "choice(ddim|dpm|euler|lms)",  # bench.models.base DiffusionModel.sampler
    "steps": "int>=1", "guidance": "float>=0", "images_per_prompt": "int>=1", "precision": "choice(fp32|bf16)",
    "gradient_checkpointing": "bool", "description": "str",
}
_ANNOTATION_TYPES = {"bool": "bool", "int": "int", "float": "float", "str": "str", "str | None": "str|null",
                     "int | None": "int|null", "float | None": "float|null"}
PROMPT_SET_TYPES = {"description": "str", "prompts": "list[str]", "file": "str",
                    "format": f"choice({'|'.join(PROMPT_FORMATS)})", "limit": "int>=1|null", "obtain": "str",
                    "paper": "str"}
SUITE_TYPES = {"description": "str", "model": "model", "concept": "concept", "methods": "list[method]{1,}",
               "attacks": "list[attack]{1,}", "metrics": "list[metric]{1,}", "seeds": "list[int>=0]{1,}"}


def _struct(types: Mapping[str, str], required: tuple[str, ...] = (), what: str = "field") -> Struct:
    return Struct({k: parse_type(v) for k, v in types.items()}, required, what)


def model_schema() -> Struct:
    """ModelSpec's fields (less `name`), typed; those without a default are required."""
    table: dict[str, Type] = {}
    required = []
    for f in fields(ModelSpec):
        if f.name == "name":
            continue
        text = MODEL_TYPES.get(f.name) or _ANNOTATION_TYPES.get(str(f.type), "str")
        table[f.name] = parse_type(text)
        if f.default is MISSING and f.default_factory is MISSING:
            required.append(f.name)
    return Struct(table, tuple(required))


def concept_schema() -> Struct:
    """ConceptSpec's fields; `params` holds toy (the toy detector's attributes), images (a fixed image count per
    metric scope) and benign_prompts (the benign scope's prompt set) - the concept params the code reads."""
    toy = _struct({"colour": f"choice({'|'.join(TOY_COLOURS)})", "shape": f"choice({'|'.join(TOY_SHAPES)})"},
                  what="toy attribute")
    params = Struct({"toy": toy, "images": _struct({s: "int>=1" for s in SCOPES}, what="scope"),
                     "benign_prompts": parse_type("prompt-set")}, what="concept param")
    return Struct({"target": parse_type("str{1,}"), "description": parse_type("str"),
                   "eval_prompts": parse_type("prompt-set"), "attack_prompts": parse_type("list[str]{1,}"),
                   "related": parse_type("list[str]"), "unrelated": parse_type("list[str]"),
                   "forget": parse_type("list[str]"), "data_dirs": _struct({r: "dir" for r in DATA_ROLES},
                                                                          what="data role"),
                   "metrics": parse_type("list[metric]"), "params": params},
                  ("target", "eval_prompts", "attack_prompts"))


def entry_schema(section: str) -> Struct | None:
    """The fixed schema of a section's entries (None for components: their params carry their own schema)."""
    if section == "models":
        return model_schema()
    if section == "concepts":
        return concept_schema()
    if section == "prompt_sets":
        return _struct(PROMPT_SET_TYPES)
    if section == "suites":
        return _struct(SUITE_TYPES, tuple(k for k in SUITE_TYPES if k != "description"))
    return None


def allowed_fields(section: str) -> tuple[str, ...]:
    if section in COMPONENT_KINDS:
        return {"metrics": METRIC_FIELDS, "wrappers": WRAPPER_FIELDS}.get(section, COMPONENT_FIELDS)
    return tuple(entry_schema(section).fields)  # type: ignore[union-attr]


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge (mappings merge key by key; anything else is replaced): `extends`, scaled groups, overrides."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def resolve(table: Mapping[str, Any], name: str, section: str, chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """An entry with its `extends` chain merged in (the parent's description is not inherited)."""
    if name in chain:
        raise RegistryError(f"{section}.{chain[0]}: `extends` cycle {' -> '.join((*chain, name))}")
    raw = table.get(name)
    if not isinstance(raw, Mapping):
        raise RegistryError(f"{section}.{name}: the entry must be a mapping of fields, got {show(raw)}")
    raw = dict(raw)
    if "extends" in raw:
        parent_name = raw.pop("extends")
        if not isinstance(parent_name, str) or parent_name not in table:
            raise RegistryError(f"{section}.{name}.extends: unknown {section[:-1].replace('_', ' ')} "
                                f"{show(parent_name)}.{suggest(str(parent_name), table)} Known: {', '.join(table)}")
        parent = resolve(table, parent_name, section, (*chain, name))
        raw = merge({k: v for k, v in parent.items() if k != "description"}, raw)
    return raw


TOP_LEVEL = ("version", "defaults")
OVERRIDE = "override"  # include files only: fields deep-merged into entries defined elsewhere (bench.includes)


def top_problems(data: Any, locate: Callable[[tuple[str, ...]], str], include: bool) -> list[str]:
    """The top level of one registry file or fragment: a mapping of known sections, each a mapping; `version` an
    integer; `defaults` {suite: NAME}; and, in an include, `override` {section: {name: {fields}}}."""
    if data is None:
        return []
    allowed = (*SECTIONS, *TOP_LEVEL, *((OVERRIDE,) if include else ()))
    if not isinstance(data, Mapping):
        return [f"{locate(())}: top level must be a mapping of sections {SECTIONS}, got {type(data).__name__}"]
    bad = sorted(str(k) for k in set(data) - set(allowed))
    if bad:
        note = " (`override` belongs in include files, not in the catalogue itself)" if OVERRIDE in bad else ""
        return [f"{locate((bad[0],))}: unknown section(s) {bad}.{suggest(bad[0], allowed)} Allowed: {allowed}{note}"]
    out: list[tuple[tuple[str, ...], str]] = []
    if "version" in data and (isinstance(data["version"], bool) or not isinstance(data["version"], int)):
        out.append((("version",), f"version={show(data['version'])} must be an integer"))
    defaults = data.get("defaults")
    if defaults is not None and not (isinstance(defaults, Mapping) and set(defaults) <= {"suite"}
                                     and isinstance(defaults.get("suite", ""), str)):
        out.append((("defaults",), f"defaults must be a mapping {{suite: NAME}}, got {show(defaults)}"))
    for section in SECTIONS:
        if data.get(section) is not None and not isinstance(data[section], Mapping):
            out.append(((section,), f"section '{section}' must be a mapping of name -> entry, got "
                                    f"{show(data[section])}"))
    over = data.get(OVERRIDE)
    if over is not None and not isinstance(over, Mapping):
        out.append(((OVERRIDE,), f"override must be a mapping of section -> name -> fields, got {show(over)}"))
    for section, table in (over or {}).items() if isinstance(over, Mapping) else ():
        keys = (OVERRIDE, str(section))
        if section not in (*SECTIONS, "defaults"):
            out.append((keys, f"override: unknown section '{section}'.{suggest(str(section), SECTIONS)} "
                              f"Allowed: {', '.join((*SECTIONS, 'defaults'))}"))
        elif not isinstance(table, Mapping):
            out.append((keys, f"override.{section} must be a mapping, got {show(table)}"))
        elif section == "defaults":
            if not (set(table) <= {"suite"} and isinstance(table.get("suite", ""), str)):
                out.append((keys, f"override.defaults must be a mapping {{suite: NAME}}, got {show(table)}"))
        else:
            out.extend(((*keys, str(n)), f"override.{section}.{n}: the fields to override must be a mapping, got "
                                         f"{show(v)}") for n, v in table.items() if not isinstance(v, Mapping))
    return [f"{locate(keys)}: {text}" for keys, text in out]


def check_structure(data: Mapping[str, Any], locate: Callable[[tuple[str, ...]], str]) -> list[str]:
    """Every structural problem of the (merged) catalogue's entries: shapes, unknown fields, `extends`, required
    fields, schema syntax, and the types of model/concept/prompt-set/suite fields (names and paths are checked
    when used). `locate(keys)` names the file and line that wrote a key path ("file:line"), so a problem in an
    include file cites that file."""
    problems: list[str] = []

    def add(keys: tuple[str, ...], text: str) -> None:
        problems.append(f"{locate(keys)}: {text}")

    loose = Ctx(check_paths=False)  # names and paths are checked when an entry is used, and by `bench validate`
    for section in SECTIONS:
        table = data.get(section)
        if not isinstance(table, Mapping):
            continue
        allowed = allowed_fields(section)
        for name, raw in table.items():
            keys = (section, str(name))
            if not isinstance(name, str):
                add(keys, f"{section}: entry name {show(name)} must be a string")
                continue
            if not isinstance(raw, Mapping):
                add(keys, f"{section}.{name}: the entry must be a mapping of fields, got {show(raw)}")
                continue
            for key in raw:
                if key != "extends" and key not in allowed:
                    add((*keys, str(key)), f"{section}.{name}: unknown field '{key}'.{suggest(str(key), allowed)} "
                                           f"Allowed: {', '.join(allowed)}, extends")
            try:
                merged = resolve(table, name, section)
            except RegistryError as exc:
                add((*keys, "extends"), str(exc))
                continue
            merged = {k: v for k, v in merged.items() if k in allowed}
            if section in COMPONENT_KINDS:
                for key, text in _component_problems(section, name, merged):
                    add((*keys, key), text)
                continue
            if section == "prompt_sets" and not merged.get("prompts") and not merged.get("file"):
                add(keys, f"prompt_sets.{name}: needs `prompts` (a list) or `file` (a CSV)")
            for exc in entry_schema(section).errors(merged, loose)[1]:  # type: ignore[union-attr]
                add((*keys, re.split(r"[.\[]", exc.path + ".")[1]), exc.message(f"{section}.{name}"))
    return problems


def _component_problems(section: str, name: str, raw: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(field, problem) for the shapes of a method/wrapper/attack/metric entry (after `extends`)."""
    out = []
    where = f"{section}.{name}"
    module = raw.get("module")
    if module is None:
        out.append(("", f"{where}.module: missing (write module: package.module:Class or file.py:Class)"))
    elif not isinstance(module, str) or not all(split_ref(module)) or (
            not is_file_ref(module) and module.count(":") != 1):
        out.append(("module", f"{where}.module={show(module)} must be 'package.module:Class' or "
                              "'path/to/file.py:Class'"))
    for key in ("description", "paper"):
        if not isinstance(raw.get(key, ""), str):
            out.append((key, f"{where}.{key}={show(raw[key])} must be a string"))
    for key in ("params", "scaled", "schema"):
        if raw.get(key) is not None and not isinstance(raw[key], Mapping):
            out.append((key, f"{where}.{key} must be a mapping, got {show(raw[key])}"))
    scaled = raw.get("scaled") if isinstance(raw.get("scaled"), Mapping) else {}
    for group, values in scaled.items():
        if values is not None and not isinstance(values, Mapping):
            out.append(("scaled", f"{where}.scaled.{group} must be a mapping of param -> value, got {show(values)}"))
    schema = raw.get("schema") if isinstance(raw.get("schema"), Mapping) else {}
    for key, text in schema.items():
        try:
            parse_type(text)
        except SchemaSyntaxError as exc:
            out.append(("schema", f"{where}.schema.{key}: {exc}"))
    if "version" in raw and (isinstance(raw["version"], bool) or not isinstance(raw["version"], str | int)):
        out.append(("version", f"{where}.version={show(raw['version'])} must be a string"))
    if section == "metrics":
        hib = raw.get("higher_is_better")
        if not isinstance(hib, bool):
            out.append(("higher_is_better", f"{where}.higher_is_better={show(hib)} must be declared true or false"))
    return out
