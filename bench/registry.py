"""The catalogue: registry.yaml loaded into frozen specs, with did-you-mean errors and schema-typed --set overrides.

The catalogue is the registry file merged with installed plug-ins' fragments and include files (bench.includes:
new names only, explicit `override:` for existing ones, relative paths beside the file that wrote them).

This module must stay light (yaml, difflib, dataclasses only): `bench ls` and `bench --help` import it, and they
must never import torch. Reading a file checks its structure (bench.catalogue); resolving an entry for a run checks
its values, names and paths against its schema (bench.schema) - all before any model loads.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from unlearn_bench.catalogue import COMPONENT_KINDS, REF_SECTIONS, entry_schema, merge, resolve
from unlearn_bench.errors import RegistryError as RegistryError
from unlearn_bench.errors import suggest as suggest
from unlearn_bench.errors import unknown as unknown
from unlearn_bench.includes import Source, Where, include_paths, load_layers, locate
from unlearn_bench.schema import Ctx, PerConcept, SchemaError, SchemaSyntaxError, Type, from_cli, parse_type
from unlearn_bench.specs import ComponentSpec, ConceptSpec, ModelSpec, PromptSetSpec, SuiteSpec, params, thaw
from unlearn_bench.yamlio import Lines
from unlearn_bench.yamlio import Loader as _Loader  # noqa: F401 - the loader --set values and registry files share

# The catalogue ships inside the package (bench/registry.yaml links to the top-level registry.yaml, and the wheel
# holds a copy), so an installed copy finds it; relative paths in it resolve against this folder first.
DEFAULT_REGISTRY = Path(__file__).resolve().parent / "registry.yaml"
SINGULAR = {"model": "models", "concept": "concepts", "method": "methods", "attack": "attacks", "metric": "metrics",
            "wrapper": "wrappers", "prompt_set": "prompt_sets"}
PROMPT_SET_OVERRIDABLE = ("file", "format", "limit")


def parse_value(text: str) -> Any:
    """A --set value without a schema to type it: YAML, with a plain comma string read as a list (50,100)."""
    from unlearn_bench.yamlio import parse_scalar

    value = parse_scalar(text.strip())
    if isinstance(value, str) and "," in value and text.strip()[:1] not in "'\"":
        return [parse_scalar(t.strip()) for t in text.split(",") if t.strip()]
    return value


@dataclass
class Registry:
    """registry.yaml parsed (merged with plug-in fragments and include files: bench.includes), with override
    application and spec resolution.

    data: section -> name -> entry as written (a plain dict-of-dicts; code may add entries at plan time).
    overrides: (section, name) -> {key or dotted key path: value already typed by the entry's schema}.
    sources/origins/where: the layers, which layer defined each entry, and the layer and line of each key path,
    so messages cite the file that wrote a value."""

    data: dict[str, dict[str, Any]]
    path: Path
    overrides: dict[tuple[str, str], dict[str, Any]]
    lines: Lines = field(default_factory=dict)
    sources: list[Source] = field(default_factory=list)
    origins: dict[tuple[str, str], Source] = field(default_factory=dict)
    overridden: dict[tuple[str, str], list[Source]] = field(default_factory=dict)
    where: Where = field(default_factory=dict)

    # --- loading ---------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Iterable[str] = (),
             includes: Iterable[str | Path] = (), *, env: bool = True) -> Registry:
        """Read the registry file, merge installed plug-ins' fragments and include files into it (bench.includes),
        check the structure of the result, then add (and type-check) each --set override.

        env: also honour $BENCH_REGISTRY (the file, when `path` is None), $BENCH_INCLUDE (include files before
        `includes`) and the `unlearn_bench.registry` entry points (unless $BENCH_NO_PLUGINS is set)."""
        path = Path(path or (os.environ.get("BENCH_REGISTRY") if env else None) or DEFAULT_REGISTRY)
        cat = load_layers(path, include_paths(includes, env), plugins=env)
        reg = cls(cat.data, path, {}, cat.sources[0].lines, cat.sources, cat.origins, cat.overridden, cat.where)
        for item in overrides:
            reg.add_override(item)
        return reg

    @property
    def includes(self) -> list[Source]:
        """The layers merged onto the registry file (plug-in fragments, then include files)."""
        return self.sources[1:]

    def origin(self, section: str, name: str) -> str:
        """Where an entry came from, for `bench ls`: '' for the registry file, else the include file or plug-in
        (plus the layers that overrode its fields)."""
        src = self.origins.get((section, name))
        own = src.short() if src is not None and src.kind != "registry" else ""
        over = [s.short() for s in self.overridden.get((section, name), [])]
        return ", ".join([own] * bool(own) + [f"override in {o}" for o in over])

    def ctx(self, check_paths: bool = True) -> Ctx:
        """What schema checks need: the registry's names, and whether paths must exist now (plan time)."""
        return Ctx({kind: tuple(self.data[section]) for kind, section in REF_SECTIONS.items()}, check_paths,
                   DEFAULT_REGISTRY.parent)

    def add_override(self, item: str) -> None:
        """`section.name.key=value` (section one of model, concept, method, attack, metric, wrapper, prompt_set),
        or `name.key=value` when the name is unambiguous across sections. The value is typed by the entry's
        schema now (YAML, then the schema's rules: bench.schema.from_cli), so a bad one fails before planning."""
        if "=" not in item:
            raise RegistryError(f"--set '{item}': expected section.name.key=value, e.g. method.esd.lr=1e-4")
        lhs, rhs = item.split("=", 1)
        parts = [p.strip() for p in lhs.strip().split(".")]
        if parts[0] in SINGULAR and len(parts) >= 3:
            section, name, key = SINGULAR[parts[0]], parts[1], ".".join(parts[2:])
        elif len(parts) == 2:
            hits = [s for s in ("models", "concepts", "methods", "wrappers", "attacks", "metrics")
                    if parts[0] in self.data[s]]
            if len(hits) != 1:
                where = f"in {hits}" if hits else "anywhere"
                raise RegistryError(f"--set '{item}': '{parts[0]}' is {'ambiguous' if hits else 'unknown'} "
                                    f"({where}); write section.name.key, e.g. method.{parts[0]}.{parts[1]}=...")
            section, name, key = hits[0], parts[0], parts[1]
        else:
            raise RegistryError(f"--set '{item}': expected section.name.key=value with section in "
                                f"{sorted(SINGULAR)}.{suggest(parts[0], SINGULAR)}")
        if name not in self.data[section]:
            raise unknown(section[:-1].replace("_", " "), name, self.data[section])
        if any(not p for p in key.split(".")):
            raise RegistryError(f"--set '{item}': empty key in '{key}'")
        label = f"--set {section[:-1]}.{name}.{key}"
        t = self._override_type(section, name, key, label)
        try:
            value = from_cli(t, rhs, self.ctx())
        except SchemaError as exc:
            raise RegistryError(exc.message(label)) from None
        self.overrides.setdefault((section, name), {})[key] = value
        # the entry with this override must still resolve (e.g. k.nudty=5 names no concept), even if this run
        # never uses the entry: a typo in --set must not pass silently
        if section in COMPONENT_KINDS:
            self.component(section, name)
        else:
            getattr(self, section[:-1])(name)  # model, concept or prompt_set

    def _override_type(self, section: str, name: str, key: str, label: str) -> Type:
        """The schema type at a (dotted) key of an entry; unknown keys name the allowed ones."""
        head, *rest = key.split(".")
        if section in COMPONENT_KINDS:
            table = self.param_schema(section, name)
            if head not in table:
                base = self.entry(section, name).get("params") or {}
                raise RegistryError(f"{label}: unknown parameter '{head}'.{suggest(head, base)} "
                                    f"Parameters of {name}: {', '.join(sorted(base)) or 'none'}")
            t: Type | None = table[head]
        elif section == "prompt_sets" and head not in PROMPT_SET_OVERRIDABLE:
            raise RegistryError(f"{label}: unknown key '{head}'.{suggest(head, PROMPT_SET_OVERRIDABLE)} "
                                f"Allowed: {', '.join(PROMPT_SET_OVERRIDABLE)}")
        else:
            t = entry_schema(section)
        path = [head, *rest] if section not in COMPONENT_KINDS else rest
        done: list[str] = [] if section not in COMPONENT_KINDS else [head]
        for part in path:
            child = t.child(part) if t is not None else None
            if child is None:
                fields = getattr(t, "fields", None)
                if fields:
                    raise RegistryError(f"{label}: unknown {getattr(t, 'what', 'field')} '{part}' in "
                                        f"{'.'.join(done) or section[:-1]}.{suggest(part, fields)} Allowed: "
                                        f"{', '.join(fields)}")
                raise RegistryError(f"{label}: '{'.'.join(done)}' is not a mapping; set it whole "
                                    f"(--set {section[:-1]}.{name}.{'.'.join(done)}=VALUE)")
            t = child
            done.append(part)
        return t  # type: ignore[return-value]

    # --- names -----------------------------------------------------------------------------------------------
    def names(self, section: str) -> list[str]:
        return sorted(self.data[section])

    def entry(self, section: str, name: str) -> dict[str, Any]:
        table = self.data[section]
        if name not in table:
            raise unknown(section.rstrip("s").replace("prompt_set", "prompt set"), name, table)
        return resolve(table, name, section)

    def default_suite(self) -> str:
        return str(self.data["defaults"].get("suite", next(iter(self.data["suites"]), "")))

    def param_schema(self, section: str, name: str) -> dict[str, Type]:
        """A component's `schema:` (merged through `extends`), parsed."""
        out = {}
        for key, text in (self.entry(section, name).get("schema") or {}).items():
            try:
                out[key] = parse_type(text)
            except SchemaSyntaxError as exc:
                raise RegistryError(f"{section}.{name}.schema.{key}: {exc}") from None
        return out

    def _checked(self, section: str, name: str, raw: Mapping[str, Any]) -> None:
        """Check an entry (with its overrides applied) against its fixed schema, names and paths included."""
        try:
            entry_schema(section).check(raw, self.ctx())  # type: ignore[union-attr]
        except SchemaError as exc:
            over = self.overrides.get((section, name), {})
            label = f"--set {section[:-1]}.{name}" if exc.path.lstrip(".").split(".")[0] in {
                k.split(".")[0] for k in over} else self._where(section, name)
            raise RegistryError(exc.message(label)) from None

    def _where(self, section: str, name: str, *keys: str) -> str:
        """'file:line: section.name' citing the layer that wrote the key (or the entry), or just 'section.name'."""
        at = locate(self.where, (section, name, *keys), 2)
        return f"{at}: {section}.{name}" if at else f"{section}.{name}"

    # --- specs -----------------------------------------------------------------------------------------------
    def model(self, name: str) -> ModelSpec:
        raw = self.entry("models", name) | self.overrides.get(("models", name), {})
        self._checked("models", name, raw)
        spec = ModelSpec(name=name, **raw)
        env_path = os.environ.get(f"BENCH_MODEL_{name.upper()}_PATH")
        return replace(spec, path=env_path) if env_path and not spec.path else spec

    def prompt_set(self, name: str) -> PromptSetSpec:
        raw = self.entry("prompt_sets", name) | self.overrides.get(("prompt_sets", name), {})
        self._checked("prompt_sets", name, raw)
        return PromptSetSpec(name=name, prompts=tuple(raw.get("prompts", ())), file=raw.get("file"),
                             description=raw.get("description", ""))

    def concept(self, name: str) -> ConceptSpec:
        raw = self.entry("concepts", name)
        for key, value in self.overrides.get(("concepts", name), {}).items():
            raw = merge(raw, _nested(key, value))
        self._checked("concepts", name, raw)
        return ConceptSpec(name=name, target=raw["target"], eval_prompts=raw["eval_prompts"],
                           attack_prompts=tuple(raw["attack_prompts"]), related=tuple(raw.get("related", ())),
                           unrelated=tuple(raw.get("unrelated", ())), forget=tuple(raw.get("forget", ())),
                           data_dirs=params(raw.get("data_dirs", {})), metrics=tuple(raw.get("metrics", ())),
                           params=params(raw.get("params", {})), description=raw.get("description", ""))

    def component(self, section: str, name: str, model: ModelSpec | None = None,
                  layers: tuple[tuple[str, bool, Mapping[str, Any]], ...] = ()) -> ComponentSpec:
        """Resolve params: the entry's (SD/paper) defaults <- scaled[model.defaults] <- --set overrides, each
        value checked against the entry's schema (every param has one; every schema key is a param). `layers`
        (label, scaled?, values) add a wrapper's settings: SD ones right after params, scaled ones after scaled."""
        raw = self.entry(section, name)
        base = dict(raw.get("params") or {})
        types = self.param_schema(section, name)
        missing, extra = sorted(set(base) - set(types)), sorted(set(types) - set(base))
        if missing or extra:
            raise RegistryError(f"{self._where(section, name)}: params and schema must name the same keys"
                                + (f"; params without a schema entry: {missing}" if missing else "")
                                + (f"; schema entries without a param: {extra}" if extra else ""))
        ctx = self.ctx()
        self._check_params(types, base, f"{self._where(section, name, 'params')}.params", ctx)
        origin = dict.fromkeys(base, f"{self._where(section, name, 'params')}.params")
        base = self._layered(section, name, base, origin, [(w, v) for w, late, v in layers if not late])
        scaled = raw.get("scaled") or {}
        if model is not None and model.defaults in scaled:
            group = scaled[model.defaults] or {}
            extra = sorted(set(group) - set(base))
            if extra:
                raise RegistryError(f"{section}.{name}.scaled.{model.defaults}: keys {extra} have no default "
                                    f"in params.{suggest(extra[0], base)} Allowed: {sorted(base)}")
            where = f"{self._where(section, name, 'scaled')}.scaled.{model.defaults}"
            self._check_params(types, group, where, ctx)
            base = merge(base, group)
            origin |= dict.fromkeys(group, where)
        base = self._layered(section, name, base, origin, [(w, v) for w, late, v in layers if late])
        for key, value in self.overrides.get((section, name), {}).items():
            head = key.split(".")[0]
            base[head] = _set_path(base.get(head), key.split(".")[1:], value)
            origin[head] = f"--set {section[:-1]}.{name}"
        self._check_params(types, base, origin, ctx)
        hib = raw.get("higher_is_better")
        return ComponentSpec(kind=COMPONENT_KINDS[section], name=name, module=raw["module"], params=params(base),
                             version=str(raw.get("version", "1")), description=raw.get("description", ""),
                             paper=raw.get("paper", ""), higher_is_better=hib)

    def _layered(self, section: str, name: str, base: dict[str, Any], origin: dict[str, str],
                 layers: list[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
        """`base` with each (label, values) layer merged in after checking its keys and values (origin updated)."""
        types = self.param_schema(section, name)
        for where, values in layers:
            extra = sorted(set(values) - set(base))
            if extra:
                raise RegistryError(f"{where}: keys {extra} are not params of {section}.{name}."
                                    f"{suggest(extra[0], base)} Allowed: {sorted(base)}")
            self._check_params(types, values, where, self.ctx())
            base = merge(base, values)
            origin |= dict.fromkeys(values, where)
        return base

    @staticmethod
    def _check_params(types: Mapping[str, Type], values: Mapping[str, Any], where: str | Mapping[str, str],
                      ctx: Ctx) -> None:
        """Each value against its type; `where` labels the layer (params, scaled.<group>, --set) per key."""
        for key, value in values.items():
            try:
                types[key].check(value, ctx)
            except SchemaError as exc:
                label = where if isinstance(where, str) else where[key]
                raise RegistryError(exc.at(f".{key}").message(label)) from None

    def method(self, name: str, model: ModelSpec | None = None) -> ComponentSpec:
        """`base[+wrapper...]`: the base method spec carrying its wrapper specs (composition, not a copy)."""
        base, *wraps = [w.strip() for w in name.split("+")]
        wrappers = tuple(self.component("wrappers", w, model) for w in wraps)
        layers = tuple(layer for w in wraps for layer in self._inner_layers(w, base, model))
        spec = self.component("methods", base, model, layers)
        return replace(spec, name=name, wrappers=wrappers)

    def _inner_layers(self, wrapper: str, base: str,
                      model: ModelSpec | None) -> list[tuple[str, bool, dict[str, Any]]]:
        """A wrapper's own settings for one inner method (`inner.<base>.params`, then `.scaled.<group>`), applied
        over the method's defaults when that method is wrapped: e.g. esd+meta trains ESD as the official meta
        script does. Only the exact entry name matches (esd-u-1+meta keeps esd-u-1's settings)."""
        table = self.entry("wrappers", wrapper).get("inner") or {}
        where = self._where("wrappers", wrapper, "inner")
        if not isinstance(table, Mapping):
            raise RegistryError(f"{where}.inner must map method names to {{params, scaled}}, got {table!r}")
        spec = table.get(base)
        if spec is None:
            return []
        bad = sorted(set(spec) - {"params", "scaled"}) if isinstance(spec, Mapping) else ["(not a mapping)"]
        if bad:
            raise RegistryError(f"{where}.inner.{base}: unknown keys {bad}; allowed: params, scaled")
        layers = [(f"{where}.inner.{base}.params", False, dict(spec.get("params") or {}))]
        group = (spec.get("scaled") or {}).get(model.defaults) if model is not None else None
        if group:
            layers.append((f"{where}.inner.{base}.scaled.{model.defaults}", True, dict(group)))
        return layers

    def attack(self, name: str, model: ModelSpec | None = None) -> ComponentSpec:
        return self.component("attacks", name, model)

    def metric(self, name: str, model: ModelSpec | None = None) -> ComponentSpec:
        spec = self.component("metrics", name, model)
        if spec.higher_is_better is None:
            raise RegistryError(f"metric '{name}' must declare higher_is_better in the registry")
        return spec

    def suite(self, name: str) -> SuiteSpec:
        raw = self.entry("suites", name)
        self._checked("suites", name, raw)
        return SuiteSpec(name=name, model=raw["model"], concept=raw["concept"], methods=tuple(raw["methods"]),
                         attacks=tuple(raw["attacks"]), metrics=tuple(raw["metrics"]),
                         seeds=tuple(raw["seeds"]), description=raw.get("description", ""))

    def per_concept_problems(self, spec: ComponentSpec, section: str, concept: str) -> list[str]:
        """Per-concept params (`k: {default: 3, nudity: 5}`) that hold no value for `concept`."""
        out = []
        for key, t in self.param_schema(section, spec.name.split("+")[0]).items():
            value = spec.params.get(key)
            if isinstance(t, PerConcept) and isinstance(value, Mapping) and concept not in value \
                    and "default" not in value:
                out.append(f"{spec.kind} {spec.name}: {key} has no value for concept '{concept}' and no default "
                           f"(has {', '.join(value)}); add one, e.g. --set {spec.kind}.{spec.name}.{key}.{concept}=...")
        return out

    # --- validation ------------------------------------------------------------------------------------------
    def validate(self, import_modules: bool = False) -> list[str]:
        """Every problem of the registry (bench.registry_check): empty = valid."""
        from unlearn_bench.registry_check import validate

        return validate(self, import_modules)

    def describe(self, section: str) -> list[tuple[str, str, str]]:
        rows = []
        for n in self.names(section):
            raw = self.entry(section, n)
            extra = raw.get("paper", "") or raw.get("hub_id", "") or raw.get("target", "")
            rows.append((n, str(raw.get("description", "")).strip(), str(extra)))
        return rows


def _nested(key: str, value: Any) -> dict[str, Any]:
    """a.b.c=v -> {a: {b: {c: v}}}, to merge a dotted --set key into an entry."""
    head, *rest = key.split(".")
    return {head: _nested(".".join(rest), value) if rest else value}


def _set_path(current: Any, keys: list[str], value: Any) -> Any:
    """Set value at keys inside current (a per-concept scalar becomes {default: scalar, key: value})."""
    if not keys:
        return value
    out = dict(current) if isinstance(current, Mapping) else ({} if current is None else {"default": current})
    out[keys[0]] = _set_path(out.get(keys[0]), keys[1:], value)
    return out


def as_dict(value: Any) -> Any:
    return thaw(value)
