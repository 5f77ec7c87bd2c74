"""YAML reading for registry files and `--set` values: one loader, duplicate keys refused, line numbers kept.

Why not plain yaml.safe_load: (1) YAML 1.1 reads `1e-5` as a string, a classic learning-rate trap, so the loader
adds a float resolver; (2) PyYAML silently keeps the last of two equal keys in a mapping, so a pasted second `lr:`
would win without a word - we compose the node tree first and refuse duplicates, naming both lines; (3) error
messages name the line of the offending entry, which needs the node marks that safe_load throws away.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from unlearn_bench.errors import RegistryError


class Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-5 as a float (YAML 1.1 would read it as a string: a classic lr trap)."""


class _FastLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """The same rules on libyaml's parser when PyYAML has it (registry files: ~10x faster than pure Python)."""


for _cls in (Loader, _FastLoader):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?$|^[-+]?\d+[eE][-+]?\d+$"),
        list("-+0123456789."),
    )

MERGE_TAG = "tag:yaml.org,2002:merge"
Lines = dict[tuple[str, ...], int]


def _walk(node: yaml.Node, path: tuple[str, ...], lines: Lines, dups: list[str], seen: set[int]) -> None:
    """Record the line of every mapping key path (where the key is written) and every duplicate key (anchors are
    walked once)."""
    if id(node) in seen:
        return
    seen.add(id(node))
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG:
                continue
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in first:
                where = ".".join(path) or "the top level"
                dups.append(f"line {line}: duplicate key '{key}' in {where} (first at line {first[key]}; YAML would "
                            "silently keep the last)")
            else:
                first[key] = line
            lines.setdefault((*path, key), line)  # the key's own line (a nested mapping's value starts below it)
            _walk(value_node, (*path, key), lines, dups, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*path, str(i)), lines, dups, seen)


def load_text(text: str, source: str, fast: bool = False) -> tuple[Any, Lines]:
    """Parse YAML text into Python data plus a map of key path -> line; duplicate keys raise RegistryError."""
    loader = _FastLoader(text) if fast else Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        lines: Lines = {}
        dups: list[str] = []
        _walk(node, (), lines, dups, set())
        if dups:
            raise RegistryError(f"{source}: {len(dups)} duplicate key(s): " + "; ".join(dups),
                                [f"{source}: {d}" for d in dups])
        return loader.construct_document(node), lines
    except yaml.YAMLError as exc:
        raise RegistryError(f"{source}: not valid YAML: {' '.join(str(exc).split())}") from exc
    finally:
        loader.dispose()


def load_file(path: Path) -> tuple[Any, Lines]:
    """A registry file's data and line map; a missing, unreadable or non-UTF-8 file is a RegistryError."""
    if not path.is_file():
        raise RegistryError(f"registry file not found: {path}" if not path.exists() else
                            f"registry file {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{path}: cannot read the registry file: {exc}") from exc
    return load_text(text, str(path), fast=True)


def parse_scalar(text: str) -> Any:
    """A `--set` value read as YAML with the registry's loader (1e-5 a float, [a, b] a list, null/~ None)."""
    try:
        value, _ = load_text(text, "value")
    except RegistryError as exc:
        raise RegistryError(f"'{text}' is not a valid YAML value ({str(exc).removeprefix('value: ')}); quote "
                            "strings that contain YAML syntax, e.g. '\"a: b\"'") from exc
    return value
