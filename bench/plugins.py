"""Instantiate the class a registry entry names ("package.module:Class"), importing it only when needed."""

from __future__ import annotations

import importlib
from typing import Any

from unlearn_bench.registry import RegistryError


def load_class(ref: str) -> Any:
    mod, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(mod)
    except ModuleNotFoundError as exc:
        raise RegistryError(f"cannot import '{mod}' for '{ref}': {exc}") from exc
    if not hasattr(module, attr):
        raise RegistryError(f"'{mod}' has no '{attr}' (registry module '{ref}')")
    return getattr(module, attr)
