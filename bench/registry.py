"""The catalogue: registry.yaml loaded into frozen specs, with did-you-mean errors and typed --set overrides.

This module must stay light (yaml, difflib, dataclasses only): `bench ls` and `bench --help` import it, and they
must never import torch.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from bench.specs import ComponentSpec, ConceptSpec, ModelSpec, PromptSetSpec, SuiteSpec, params, thaw

SECTIONS = ("models", "concepts", "prompt_sets", "methods", "wrappers", "attacks", "metrics", "suites")
COMPONENT_KINDS = {"methods": "method", "wrappers": "wrapper", "attacks": "attack", "metrics": "metric"}
DEFAULT_REGISTRY = Path(__file__).resolve().parent.parent / "registry.yaml"


class RegistryError(ValueError):
    """Bad user input about names or parameters: the CLI turns it into exit status 2 before any heavy work."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-5 as a float (YAML 1.1 would read it as a string: a classic lr trap)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?$|^[-+]?\d+[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _int_or_float(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse_value(text: str) -> Any:
    """Parse a --set value: comma lists, ints, floats (1e-5 too), booleans, null, else the string itself."""
    if "," in text:
        return [parse_value(t.strip()) for t in text.split(",") if t.strip()]
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none", "~"):
        return None
    try:
        return _int_or_float(text.strip())
    except ValueError:
        return text.strip()


def suggest(word: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(known), n=3, cutoff=0.5)
    if not close:
        return ""
    more = f" (also close: {', '.join(close[1:])})" if len(close) > 1 else ""
    return f" did you mean {close[0]}?{more}"


def unknown(kind: str, word: str, known: Iterable[str]) -> RegistryError:
    known = sorted(known)
    return RegistryError(f"unknown {kind} '{word}'.{suggest(word, known)} Known {kind}s: {', '.join(known)}")


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _check_type(where: str, key: str, default: Any, value: Any) -> Any:
    """Overrides must keep the type of the registry default (an int may stand for a float; a scalar for a list)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise RegistryError(f"{where}: {key}={value!r} must be true or false")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, list | tuple) and not isinstance(value, list | tuple):
        value = [value]
    if isinstance(default, list | tuple):
        if default and value:
            return [_check_type(where, key, default[0], v) for v in value]
        return value
    if isinstance(default, int | float) and not isinstance(value, int | float):
        raise RegistryError(f"{where}: {key}={value!r} must be a number (default {default!r})")
    if isinstance(default, str) and not isinstance(value, str):
        return str(value)
    return value


@dataclass
class Registry:
    """registry.yaml parsed, with override application and spec resolution."""

    data: dict[str, dict[str, Any]]
    path: Path
    overrides: dict[tuple[str, str], dict[str, Any]]

    # --- loading ---------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Iterable[str] = ()) -> Registry:
        path = Path(path or os.environ.get("BENCH_REGISTRY") or DEFAULT_REGISTRY)
        if not path.exists():
            raise RegistryError(f"registry file not found: {path}")
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
        except yaml.YAMLError as exc:
            raise RegistryError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise RegistryError(f"{path}: top level must be a mapping of sections {SECTIONS}")
        bad = sorted(set(data) - set(SECTIONS) - {"version", "defaults"})
        if bad:
            raise RegistryError(f"{path}: unknown section(s) {bad}.{suggest(bad[0], SECTIONS)} Allowed: {SECTIONS}")
        reg = cls({s: dict(data.get(s) or {}) for s in SECTIONS} | {"defaults": dict(data.get("defaults") or {})},
                  path, {})
        for item in overrides:
            reg.add_override(item)
        return reg

    def add_override(self, item: str) -> None:
        """`section.name.key=value` (section one of model, concept, method, attack, metric), or `name.key=value`
        when the name is unambiguous across sections."""
        if "=" not in item:
            raise RegistryError(f"--set '{item}': expected section.name.key=value, e.g. method.esd.lr=1e-4")
        lhs, rhs = item.split("=", 1)
        parts = lhs.strip().split(".")
        singular = {"model": "models", "concept": "concepts", "method": "methods", "attack": "attacks",
                    "metric": "metrics", "wrapper": "wrappers", "prompt_set": "prompt_sets"}
        if parts[0] in singular and len(parts) >= 3:
            section, name, key = singular[parts[0]], parts[1], ".".join(parts[2:])
        elif len(parts) == 2:
            hits = [s for s in ("models", "concepts", "methods", "wrappers", "attacks", "metrics")
                    if parts[0] in self.data[s]]
            if len(hits) != 1:
                where = f"in {hits}" if hits else "anywhere"
                raise RegistryError(f"--set '{item}': '{parts[0]}' is {'ambiguous' if hits else 'unknown'} "
                                    f"({where}); write section.name.key, e.g. method.{parts[0]}.{parts[1]}=...")
            section, name, key = hits[0], parts[0], parts[1]
        else:
            raise RegistryError(f"--set '{item}': expected section.name.key=value with section in {sorted(singular)}")
        if name not in self.data[section]:
            raise unknown(section.rstrip("s"), name, self.data[section])
        self.overrides.setdefault((section, name), {})[key] = parse_value(rhs)

    # --- names -----------------------------------------------------------------------------------------------
    def names(self, section: str) -> list[str]:
        return sorted(self.data[section])

    def entry(self, section: str, name: str) -> dict[str, Any]:
        table = self.data[section]
        if name not in table:
            raise unknown(section.rstrip("s").replace("prompt_set", "prompt set"), name, table)
        raw = dict(table[name] or {})
        if "extends" in raw:
            parent = self.entry(section, raw.pop("extends"))
            raw = _merge({k: v for k, v in parent.items() if k not in ("description",)}, raw)
        return raw

    def default_suite(self) -> str:
        return str(self.data["defaults"].get("suite", next(iter(self.data["suites"]), "")))

    # --- specs -----------------------------------------------------------------------------------------------
    def model(self, name: str) -> ModelSpec:
        raw = self.entry("models", name) | self.overrides.get(("models", name), {})
        allowed = {f.name for f in fields(ModelSpec)} - {"name"}
        bad = sorted(set(raw) - allowed)
        if bad:
            raise RegistryError(f"model '{name}': unknown field(s) {bad}.{suggest(bad[0], allowed)} "
                                f"Allowed: {sorted(allowed)}")
        spec = ModelSpec(name=name, **raw)
        env_path = os.environ.get(f"BENCH_MODEL_{name.upper()}_PATH")
        return replace(spec, path=env_path) if env_path and not spec.path else spec

    def prompt_set(self, name: str) -> PromptSetSpec:
        raw = self.entry("prompt_sets", name)
        return PromptSetSpec(name=name, prompts=tuple(raw.get("prompts", ())), file=raw.get("file"),
                             description=raw.get("description", ""))

    def concept(self, name: str) -> ConceptSpec:
        raw = _merge(self.entry("concepts", name), self.overrides.get(("concepts", name), {}))
        for key in ("target", "eval_prompts", "attack_prompts"):
            if key not in raw:
                raise RegistryError(f"concept '{name}' lacks required field '{key}'")
        self.prompt_set(raw["eval_prompts"])
        for m in raw.get("metrics", ()):
            self.entry("metrics", m)
        return ConceptSpec(name=name, target=raw["target"], eval_prompts=raw["eval_prompts"],
                           attack_prompts=tuple(raw["attack_prompts"]), related=tuple(raw.get("related", ())),
                           unrelated=tuple(raw.get("unrelated", ())), forget=tuple(raw.get("forget", ())),
                           data_dirs=params(raw.get("data_dirs", {})), metrics=tuple(raw.get("metrics", ())),
                           params=params(raw.get("params", {})), description=raw.get("description", ""))

    def component(self, section: str, name: str, model: ModelSpec | None = None) -> ComponentSpec:
        """Resolve params: the entry's (SD/paper) defaults <- scaled[model.defaults] <- --set overrides."""
        raw = self.entry(section, name)
        base = dict(raw.get("params") or {})
        scaled = raw.get("scaled") or {}
        if model is not None and model.defaults in scaled:
            extra = sorted(set(scaled[model.defaults]) - set(base))
            if extra:
                raise RegistryError(f"{section}.{name}.scaled.{model.defaults}: keys {extra} have no default "
                                    f"in params; allowed: {sorted(base)}")
            base = _merge(base, scaled[model.defaults])
        for key, value in self.overrides.get((section, name), {}).items():
            if key not in base:
                raise RegistryError(f"--set {section.rstrip('s')}.{name}.{key}: unknown parameter '{key}'."
                                    f"{suggest(key, base)} Parameters of {name}: {', '.join(sorted(base)) or 'none'}")
            base[key] = _check_type(f"--set {section.rstrip('s')}.{name}", key, base[key], value)
        if "module" not in raw:
            raise RegistryError(f"{section}.{name} has no 'module' (package.module:Class)")
        hib = raw.get("higher_is_better")
        return ComponentSpec(kind=COMPONENT_KINDS[section], name=name, module=raw["module"], params=params(base),
                             version=str(raw.get("version", "1")), description=raw.get("description", ""),
                             paper=raw.get("paper", ""), higher_is_better=hib)

    def method(self, name: str, model: ModelSpec | None = None) -> ComponentSpec:
        """`base[+wrapper...]`: the base method spec carrying its wrapper specs (composition, not a copy)."""
        base, *wraps = [w.strip() for w in name.split("+")]
        spec = self.component("methods", base, model)
        wrappers = tuple(self.component("wrappers", w, model) for w in wraps)
        return replace(spec, name=name, wrappers=wrappers)

    def attack(self, name: str, model: ModelSpec | None = None) -> ComponentSpec:
        return self.component("attacks", name, model)

    def metric(self, name: str, model: ModelSpec | None = None) -> ComponentSpec:
        spec = self.component("metrics", name, model)
        if spec.higher_is_better is None:
            raise RegistryError(f"metric '{name}' must declare higher_is_better in the registry")
        return spec

    def suite(self, name: str) -> SuiteSpec:
        raw = self.entry("suites", name)
        need = ("model", "concept", "methods", "attacks", "metrics", "seeds")
        missing = [k for k in need if k not in raw]
        if missing:
            raise RegistryError(f"suite '{name}' lacks {missing}")
        return SuiteSpec(name=name, model=raw["model"], concept=raw["concept"], methods=tuple(raw["methods"]),
                         attacks=tuple(raw["attacks"]), metrics=tuple(raw["metrics"]),
                         seeds=tuple(int(s) for s in raw["seeds"]), description=raw.get("description", ""))

    # --- validation ------------------------------------------------------------------------------------------
    def validate(self) -> list[str]:
        """Resolve every entry against every model's defaults group; return a list of problems (empty = valid)."""
        problems: list[str] = []

        def attempt(what: str, fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except (RegistryError, TypeError, KeyError) as exc:
                problems.append(f"{what}: {exc}")

        models = []
        for m in self.names("models"):
            try:
                models.append(self.model(m))
            except (RegistryError, TypeError) as exc:
                problems.append(f"model {m}: {exc}")
        for c in self.names("concepts"):
            attempt(f"concept {c}", self.concept, c)
        for p in self.names("prompt_sets"):
            attempt(f"prompt set {p}", self.prompt_set, p)
        for section in ("methods", "wrappers", "attacks", "metrics"):
            for n in self.names(section):
                for m in models or [None]:
                    attempt(f"{section[:-1]} {n}", self.component, section, n, m)
                if section == "metrics":
                    attempt(f"metric {n}", self.metric, n)
        for s in self.names("suites"):
            try:
                suite = self.suite(s)
                self.model(suite.model)
                self.concept(suite.concept)
                for n in suite.methods:
                    self.method(n)
                for n in suite.attacks:
                    self.attack(n)
                for n in suite.metrics:
                    self.metric(n)
            except RegistryError as exc:
                problems.append(f"suite {s}: {exc}")
        return problems

    def describe(self, section: str) -> list[tuple[str, str, str]]:
        rows = []
        for n in self.names(section):
            raw = self.entry(section, n)
            extra = raw.get("paper", "") or raw.get("hub_id", "") or raw.get("target", "")
            rows.append((n, str(raw.get("description", "")).strip(), str(extra)))
        return rows


def as_dict(value: Any) -> Any:
    return thaw(value)
