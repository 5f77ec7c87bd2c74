"""A tiny typed language for registry parameters, checked at plan time without importing torch.

Why: a bad value (`lr=nan`, `steps=-1`, `optimizer=rmsprop`) used to surface only after the model loaded - minutes
in, as a traceback. Every method/wrapper/attack/metric entry now declares `schema: {param: TYPE}` and every value
(registry default, `scaled.<group>` value, `--set` override) is checked against it before any model loads.

    TYPE     := ALT ('|' ALT)*                   a union, tried left to right; `|null` makes a type nullable
    ALT      := null | bool | str LEN? | regex | dir | file | data-dir     str{1,}: a non-empty string
              | int BOUND? | float BOUND?         BOUND: >x  >=x  <x  <=x  [a,b]  (a,b)  [a,b)  (a,b]
              | choice(a|b|...)                  items read as YAML scalars: choice(1|2) holds integers
              | list[TYPE] LEN?                  LEN: {n} exactly n items (characters), {n,} at least n, {n,m}
              | per-concept[TYPE]                TYPE, or a mapping {default: v, <concept>: v, ...} of TYPE values
              | prompt-set | metric | model | concept | method | attack | wrapper     a known registry name

Numbers must be finite (nan and inf are refused); a float accepts an integer. `dir`/`file` must exist when planned
(relative paths from the working directory); `data-dir` resolves relative paths under $BENCH_DATA, else the project
root, as fid's `reference` is read. `regex` must compile.

`--set` values (from_cli): read as YAML with the registry's loader, then typed by the schema: a list type splits a
plain string on commas (`steps=50,100`); a string type keeps the text as written (`prompt=nude body, photograph`
is one string, `anchor=none` the string "none"); `null`/`~` are None; an empty value is "" or [] where the type
admits one, else null.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from functools import lru_cache
from typing import Any

from unlearn_bench.errors import RegistryError, suggest
from unlearn_bench.schema_types import (
    REF_KINDS,
    Bool,
    Choice,
    Ctx,
    Null,
    Num,
    PathType,
    Ref,
    Regex,
    SchemaError,
    SchemaSyntaxError,
    Str,
    Type,
    is_flow,
    is_quoted,
    length_words,
    resolve_data_path,
    show,
)

__all__ = ["REF_KINDS", "Choice", "Ctx", "ListType", "PerConcept", "SchemaError", "SchemaSyntaxError", "Struct",
           "Type", "Union", "from_cli", "parse_type", "resolve_data_path", "show"]
TYPE_NAMES = ("null", "bool", "str", "regex", "dir", "file", "data-dir", *REF_KINDS, "int", "float", "choice(...)",
              "list[...]", "per-concept[...]")


class ListType(Type):
    def __init__(self, elem: Type, lo: int = 0, hi: int | None = None) -> None:
        self.elem, self.lo, self.hi = elem, lo, hi

    def describe(self) -> str:
        return f"a list{length_words(self.lo, self.hi, 'item')} (each {self.elem.describe()})"

    def check(self, value: Any, ctx: Ctx, coerce: bool = False, text: str | None = None) -> Any:
        from unlearn_bench.yamlio import parse_scalar

        if isinstance(value, list | tuple):
            items: list[tuple[Any, str | None]] = [(v, None) for v in value]
        elif coerce and text is not None and is_quoted(text):
            items = [(value, text)]
        elif coerce and text is not None and not is_flow(text):
            items = []
            for part in (p.strip() for p in text.split(",")):
                if part:
                    try:
                        items.append((parse_scalar(part), part))
                    except RegistryError:
                        items.append((part, part))
        else:
            raise self.fail(value)
        out = []
        for i, (v, t) in enumerate(items):
            try:
                out.append(self.elem.check(v, ctx, coerce, t))
            except SchemaError as exc:
                raise exc.at(f"[{i}]") from None
        if len(out) < self.lo or (self.hi is not None and len(out) > self.hi):
            raise self.fail(out if coerce else value, f" (got {len(out)})")
        return out if coerce else value

    def admits(self, kind: str) -> bool:
        return kind == "list"


class PerConcept(Type):
    def __init__(self, inner: Type) -> None:
        self.inner = inner

    def describe(self) -> str:
        return f"{self.inner.describe()}, or a mapping of concept name (or default) to one"

    def check(self, value: Any, ctx: Ctx, coerce: bool = False, text: str | None = None) -> Any:
        if not isinstance(value, Mapping) or (text is not None and not text.startswith("{")):
            return self.inner.check(value, ctx, coerce, text)
        known = ctx.names.get("concept")
        out = {}
        for key, item in value.items():
            if not isinstance(key, str) or (key != "default" and known is not None and key not in known):
                names = sorted(known or ())
                raise SchemaError(key, "", f".{key}", key_error=f"unknown concept '{key}'.{suggest(str(key), names)}"
                                  f" Keys are 'default' or a concept: {', '.join(names)}")
            try:
                out[key] = self.inner.check(item, ctx, coerce)
            except SchemaError as exc:
                raise exc.at(f".{key}") from None
        return out if coerce else value

    def child(self, key: str) -> Type | None:
        return self.inner

    def for_concept(self, value: Any, concept: str) -> Any:
        """The value a concept gets (its own key, else `default`); a KeyError when neither is there."""
        if not isinstance(value, Mapping):
            return value
        if concept in value:
            return value[concept]
        return value["default"]

    def admits(self, kind: str) -> bool:
        return self.inner.admits(kind)


class Union(Type):
    def __init__(self, alts: list[Type]) -> None:
        self.alts = alts

    def describe(self) -> str:
        return " or ".join(a.describe() for a in self.alts)

    def check(self, value: Any, ctx: Ctx, coerce: bool = False, text: str | None = None) -> Any:
        errors = []
        for alt in self.alts:
            try:
                return alt.check(value, ctx, coerce, text)
            except SchemaError as exc:
                errors.append(exc)
        deep = [e for e in errors if e.path]
        if deep:
            raise deep[0]
        notes = [e.note for e in errors if e.note]
        raise self.fail(value, notes[0] if notes else "")

    def child(self, key: str) -> Type | None:
        return next((c for c in (a.child(key) for a in self.alts) if c is not None), None)

    def admits(self, kind: str) -> bool:
        return any(a.admits(kind) for a in self.alts)


class Struct(Type):
    """A mapping with named fields (the fixed schemas of models, concepts and suites; not in the text language)."""

    def __init__(self, fields: Mapping[str, Type], required: Collection[str] = (), what: str = "field") -> None:
        self.fields, self.required, self.what = dict(fields), tuple(required), what

    def describe(self) -> str:
        return f"a mapping with {self.what}s {', '.join(self.fields)}"

    def errors(self, value: Any, ctx: Ctx, coerce: bool = False) -> tuple[dict[str, Any], list[SchemaError]]:
        """The checked mapping and every problem in it (one per field), so a file's report lists them all."""
        if not isinstance(value, Mapping):
            return {}, [self.fail(value)]
        out, errors = {}, []
        for key, item in value.items():
            if key not in self.fields:
                errors.append(SchemaError(key, "", f".{key}", key_error=f"unknown {self.what} '{key}'."
                                          f"{suggest(str(key), self.fields)} Allowed: {', '.join(self.fields)}"))
                continue
            try:
                out[key] = self.fields[key].check(item, ctx, coerce)
            except SchemaError as exc:
                errors.append(exc.at(f".{key}"))
        errors += [SchemaError(value, "", "", key_error=f"missing required {self.what} '{k}'")
                   for k in self.required if k not in value]
        return out, errors

    def check(self, value: Any, ctx: Ctx, coerce: bool = False, text: str | None = None) -> Any:
        out, errors = self.errors(value, ctx, coerce)
        if errors:
            raise errors[0]
        return out if coerce else value

    def child(self, key: str) -> Type | None:
        return self.fields.get(key)


def from_cli(t: Type, text: str, ctx: Ctx) -> Any:
    """Type a --set value (see the module docstring for the rules)."""
    from unlearn_bench.yamlio import parse_scalar

    s = text.strip()
    if not s:
        for kind, empty in (("str", ""), ("list", []), ("null", None)):
            if t.admits(kind):
                try:
                    return t.check(empty, ctx, True)
                except SchemaError as exc:
                    raise SchemaError(exc.value, exc.expected, exc.path, " (got an empty value)") from None
        raise t.fail("", " (got an empty value)")
    try:
        value = parse_scalar(s)
    except RegistryError:
        value = s  # not YAML (e.g. "a: [b"): a string type still takes the text as written
    return t.check(value, ctx, True, s)


# --- parsing --------------------------------------------------------------------------------------------------
def _split_top(text: str, sep: str) -> list[str]:
    """Split on `sep` outside brackets and parentheses (bounds like [0,1) close with another bracket)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


_NUM = r"([-+]?[\d.eE+-]+)"
_BOUND = re.compile(rf"^(?:(>=|<=|>|<)\s*{_NUM}|([\[(])\s*{_NUM}\s*,\s*{_NUM}\s*([\])]))$")


def _number(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SchemaSyntaxError(f"'{spec}': bad bound {text!r}") from None
    if not math.isfinite(value):
        raise SchemaSyntaxError(f"'{spec}': bounds must be finite")
    return value


def _num(kind: str, rest: str, spec: str) -> Num:
    rest = rest.strip()
    if not rest:
        return Num(kind, "", None, False, None, False)
    m = _BOUND.match(rest)
    if not m:
        raise SchemaSyntaxError(f"'{spec}': bad bound {rest!r} (write e.g. {kind}>0, {kind}>=1, {kind}[0,1])")
    if m.group(1):
        op, x = m.group(1), _number(m.group(2), spec)
        bound = f"{op} {m.group(2)}"
        if op[0] == ">":
            return Num(kind, bound, x, op == ">", None, False)
        return Num(kind, bound, None, False, x, op == "<")
    lo, hi = _number(m.group(4), spec), _number(m.group(5), spec)
    if lo > hi:
        raise SchemaSyntaxError(f"'{spec}': empty interval")
    return Num(kind, f"in {m.group(3)}{m.group(4)}, {m.group(5)}{m.group(6)}", lo, m.group(3) == "(", hi,
               m.group(6) == ")")


def _length(rest: str, spec: str) -> tuple[int, int | None]:
    """A length suffix: '' (any), {n} (exactly n), {n,} (at least n), {n,m}."""
    m = re.fullmatch(r"(?:\{\s*(\d+)\s*(,)?\s*(\d*)\s*\})?", rest.strip())
    if not m:
        raise SchemaSyntaxError(f"'{spec}': bad length {rest.strip()!r} (write {{2}}, {{1,}} or {{1,3}})")
    lo = int(m.group(1) or 0)
    hi = (int(m.group(3)) if m.group(3) else None) if m.group(2) else (lo if m.group(1) else None)
    return lo, hi


def _closing(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        depth += text[i] in "([{"
        depth -= text[i] in ")]}"
        if depth == 0:
            return i
    raise SchemaSyntaxError(f"'{text}': unbalanced brackets")


def parse_type(spec: Any) -> Type:
    """Parse a schema string; SchemaSyntaxError names what is wrong."""
    if not isinstance(spec, str) or not spec.strip():
        raise SchemaSyntaxError(f"a schema must be a non-empty type string, got {show(spec)}")
    return _parse(spec.strip())


@lru_cache(maxsize=512)
def _parse(spec: str) -> Type:
    from unlearn_bench.yamlio import parse_scalar

    s = spec
    alts = _split_top(s, "|")
    if len(alts) > 1:
        t: Type = Union([parse_type(a) for a in alts])
    elif s in ("null", "bool", "regex"):
        t = {"null": Null, "bool": Bool, "regex": Regex}[s]()
    elif re.match(r"^str(?![\w-])", s):
        t = Str(*_length(s[3:], spec))
    elif s in ("dir", "file", "data-dir"):
        t = PathType(s)
    elif s in REF_KINDS:
        t = Ref(s)
    elif re.match(r"^(int|float)(?![\w-])", s):
        kind = "int" if s.startswith("int") else "float"
        t = _num(kind, s[len(kind):], spec)
    elif s.startswith("choice(") and s.endswith(")"):
        items = [parse_scalar(i) if i else None for i in _split_top(s[7:-1], "|")]
        if not items or any(i is None or isinstance(i, list | dict) for i in items):
            raise SchemaSyntaxError(f"'{spec}': choice needs scalar items, e.g. choice(a|b)")
        t = Choice(items)
    elif s.startswith(("list[", "per-concept[")):
        open_at = s.index("[")
        end = _closing(s, open_at)
        inner = parse_type(s[open_at + 1:end])
        rest = s[end + 1:].strip()
        if s.startswith("per-concept["):
            if rest:
                raise SchemaSyntaxError(f"'{spec}': unexpected {rest!r} after per-concept[...]")
            t = PerConcept(inner)
        else:
            t = ListType(inner, *_length(rest, spec))
    else:
        word = re.split(r"[^\w-]", s)[0] or s
        raise SchemaSyntaxError(f"unknown type '{s}'.{suggest(word, TYPE_NAMES)} Types: {', '.join(TYPE_NAMES)}")
    t.text = s
    return t
