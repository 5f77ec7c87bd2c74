"""The scalar types of the schema language (bench.schema), its error type and the checking context.

Split from unlearn_bench.schema only to keep files short; bench.schema is the entry point (parse_type, from_cli).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearn_bench.errors import suggest

REF_KINDS = {"prompt-set": "prompt set", "metric": "metric", "model": "model", "concept": "concept",
             "method": "method", "attack": "attack", "wrapper": "wrapper"}


class SchemaSyntaxError(ValueError):
    """A schema string that is not in the language (a registry authoring error)."""


class SchemaError(ValueError):
    """A value that does not match its type. `path` locates it inside the value ("[1]", ".nudity")."""

    def __init__(self, value: Any, expected: str, path: str = "", note: str = "", key_error: str = "") -> None:
        self.value, self.expected, self.path, self.note, self.key_error = value, expected, path, note, key_error
        super().__init__(self.message(""))

    def at(self, prefix: str) -> SchemaError:
        return SchemaError(self.value, self.expected, prefix + self.path, self.note, self.key_error)

    def message(self, where: str) -> str:
        """'<where><path>=<value> must be <expected>' (or '<where><path>: unknown field ...')."""
        if self.key_error:
            return f"{where}{self.path}: {self.key_error}"
        return f"{where}{self.path}={show(self.value)} must be {self.expected}{self.note}"


def show(value: Any) -> str:
    """A value as the user wrote it (YAML-ish): strings quoted, null/true/false, lists and mappings inline."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return repr(value)


@dataclass(frozen=True)
class Ctx:
    """What checks need beyond the value: known registry names per ref kind, and whether to check paths now
    (plan time) or not (reading the file, so `bench ls` works where a data folder is absent)."""

    names: Mapping[str, Collection[str]] = field(default_factory=dict)
    check_paths: bool = True
    data_root: Path | None = None


def resolve_data_path(text: str, root: Path) -> Path:
    """Absolute paths as given. A relative one names a file shipped beside the registry file (`root`: the bundled
    prompt sets inside the installed package) when one is there; otherwise user data under $BENCH_DATA when set,
    else under the current directory (so `data/prompts/x.csv` means the same from a clone and from a wheel)."""
    p = Path(os.path.expanduser(text))
    if p.is_absolute():
        return p
    if (root / p).exists():
        return (root / p).resolve()
    base = Path(os.environ["BENCH_DATA"]).expanduser() if os.environ.get("BENCH_DATA") else Path.cwd()
    return (base / p).resolve()


def is_quoted(text: str | None) -> bool:
    return bool(text) and text[0] in "'\""


def is_flow(text: str | None) -> bool:
    return bool(text) and text[0] in "[{"


class Type:
    text = ""

    def describe(self) -> str:
        raise NotImplementedError

    def check(self, value: Any, ctx: Ctx, coerce: bool = False, text: str | None = None) -> Any:
        """Return the value (converted only when `coerce`: a --set value) or raise SchemaError."""
        raise NotImplementedError

    def child(self, key: str) -> Type | None:
        """The type of `value[key]` for dotted --set keys (a.b=...), or None when the value is not a mapping."""
        return None

    def admits(self, kind: str) -> bool:
        return False

    def fail(self, value: Any, note: str = "") -> SchemaError:
        return SchemaError(value, self.describe(), note=note)


class Null(Type):
    def describe(self) -> str:
        return "null"

    def check(self, value: Any, ctx: Ctx, coerce: bool = False, text: str | None = None) -> Any:
        if value is not None:
            raise self.fail(value)
        return None

    def admits(self, kind: str) -> bool:
        return kind == "null"


class Bool(Type):
    def describe(self) -> str:
        return "true or false"

    def check(self, value: Any, ctx: Ctx, coerce: bool = False, text: str | None = None) -> Any:
        if not isinstance(value, bool):
            raise self.fail(value)
        return value


class Num(Type):
    def __init__(self, kind: str, bound: str, lo: float | None, lo_open: bool, hi: float | None,
                 hi_open: bool) -> None:
        self.kind, self.bound, self.lo, self.lo_open, self.hi, self.hi_open = kind, bound, lo, lo_open, hi, hi_open

    def describe(self) -> str:
        base = "an integer" if self.kind == "int" else "a number"
        return f"{base} {self.bound}" if self.bound else base

    def check(self, value: Any, ctx: Ctx, coerce: bool = False, text: str | None = None) -> Any:
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise self.fail(value) from None
            raise self.fail(value, "" if math.isfinite(number) else " (nan and inf are not allowed)")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(value, " (nan and inf are not allowed)")
        if self.kind == "int" and isinstance(value, float) and not (coerce and value.is_integer()):
            raise self.fail(value)
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            raise self.fail(value)
        if self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)):
            raise self.fail(value)
        if coerce:  # a --set value takes the declared type: 1e3 -> 1000 for an int, 3 -> 3.0 for a float
            return int(value) if self.kind == "int" else float(value)
        return value


def length_words(lo: int, hi: int | None, unit: str) -> str:
    """' of exactly 2 items', ' of at least 1 character', ... ('' when unconstrained)."""
    plural = f"{unit}s"
    if hi is not None and hi == lo:
        return f" of exactly {lo} {unit if lo == 1 else plural}"
    if lo:
        return f" of at least {lo} {unit if lo == 1 else plural}" + (f" and at most {hi}" if hi else "")
    return f" of at most {hi} {plural}" if hi is not None else ""


class Str(Type):
    def __init__(self, lo: int = 0, hi: int | None = None) -> None:
        self.lo, self.hi = lo, hi

    def describe(self) -> str:
        return "a string" + length_words(self.lo, self.hi, "character")

    def string(self, value: Any, coerce: bool, text: str | None) -> str:
        """The string a value stands for: a --set value's own text unless it was quoted (then YAML's reading)."""
        if coerce and text is not None and not is_quoted(text) and not is_flow(text) and value is not None:
            return text
        if not isinstance(value, str):
            raise self.fail(value)
        return value

    def check(self, value: Any, ctx: Ctx, coerce: bool = False, text: str | None = None) -> Any:
        out = self.string(value, coerce, text)
        if len(out) < self.lo or (self.hi is not None and len(out) > self.hi):
            raise self.fail(out)
        return out

    def admits(self, kind: str) -> bool:
        return kind == "str"


class Regex(Str):
    def describe(self) -> str:
        return "a regular expression"

    def check(self, value: Any, ctx: Ctx, coerce: bool = False, text: str | None = None) -> Any:
        out = self.string(value, coerce, text)
        try:
            re.compile(out)
        except re.error as exc:
            raise self.fail(out, f" ({exc})") from None
        return out


class PathType(Str):
    def __init__(self, kind: str) -> None:
        self.kind = kind

    def describe(self) -> str:
        return f"an existing {'file' if self.kind == 'file' else 'directory'}"

    def check(self, value: Any, ctx: Ctx, coerce: bool = False, text: str | None = None) -> Any:
        out = self.string(value, coerce, text)
        if not out:
            raise self.fail(out)
        if ctx.check_paths:
            if self.kind == "data-dir":
                path = resolve_data_path(out, ctx.data_root or Path.cwd())
            else:
                path = Path(os.path.expanduser(out)).absolute()
            ok = path.is_file() if self.kind == "file" else path.is_dir()
            if not ok:
                raise self.fail(out, f" ({path} {'is not one' if path.exists() else 'does not exist'})")
        return out


class Ref(Str):
    """A registry name of another section (methods also take the base+wrapper grammar)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def describe(self) -> str:
        return f"a known {REF_KINDS[self.kind]} name"

    def check(self, value: Any, ctx: Ctx, coerce: bool = False, text: str | None = None) -> Any:
        out = self.string(value, coerce, text)
        if self.kind == "method":  # base[+wrapper...]
            base, *wraps = (w.strip() for w in out.split("+"))
            words = [("method", base)] + [("wrapper", w) for w in wraps]
        else:
            words = [(self.kind, out)]
        for kind, word in words:
            known = ctx.names.get(kind)
            if known is not None and word not in known:
                names = sorted(known)
                raise SchemaError(out, self.describe(), note=f": unknown {REF_KINDS[kind]} '{word}'."
                                  f"{suggest(word, names)} Known: {', '.join(names)}")
        return out


class Choice(Type):
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def describe(self) -> str:
        return "one of " + ", ".join(show(i) if not isinstance(i, str) else i for i in self.items)

    def check(self, value: Any, ctx: Ctx, coerce: bool = False, text: str | None = None) -> Any:
        for item in self.items:
            if type(item) is type(value) and item == value:
                return value
        if coerce and text is not None and not is_quoted(text):
            for item in self.items:
                if str(item) == text:
                    return item
        raise self.fail(value, "." + suggest(str(value), [str(i) for i in self.items]) if isinstance(value, str)
                        else "")
