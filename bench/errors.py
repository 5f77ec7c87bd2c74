"""The user-input error type and the did-you-mean helper, shared by the registry, the schema language and the CLI.

Why a module of its own: bench.schema and bench.yamlio must raise the same RegistryError that the CLI turns into
exit status 2, and bench.registry imports both of them; keeping the error here avoids an import cycle. It imports
nothing heavy (`bench --help` and `bench ls` load it).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class RegistryError(ValueError):
    """Bad user input about names or parameters: the CLI turns it into exit status 2 before any heavy work.

    `problems` lists every problem when several were found at once (a malformed registry file), so `bench validate`
    can print them one per line; str() joins them."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [])


def suggest(word: str, known: Iterable[str]) -> str:
    """' did you mean X? (also close: Y, Z)' for the nearest known words, or '' when none is close."""
    close = difflib.get_close_matches(str(word), [str(k) for k in known], n=3, cutoff=0.5)
    if not close:
        return ""
    more = f" (also close: {', '.join(close[1:])})" if len(close) > 1 else ""
    return f" did you mean {close[0]}?{more}"


def unknown(kind: str, word: str, known: Iterable[str]) -> RegistryError:
    """'unknown method 'esdd'. did you mean esd? Known methods: ...'."""
    names = sorted(str(k) for k in known)
    return RegistryError(f"unknown {kind} '{word}'.{suggest(word, names)} Known {kind}s: {', '.join(names)}")
