"""Where component classes come from: the one place that imports what a registry `module:` names, and the
discovery of installed plug-in packages' registry fragments.

A `module:` is either `package.module:Class` (imported by name, as any installed module) or a Python file and a
class, `path/to/file.py:Class` (anything whose module part ends in `.py` or contains a path separator). A file is
loaded by path under a module name derived from its absolute path (`unlearn_bench_plugin_<stem>_<hash>`) and
registered in sys.modules, so its classes pickle within a process and one file is executed once per process. The
registry stores file paths absolute (bench.includes resolves them against the file that names them), so a spawned
worker that receives a resolved spec loads the same file with no registry at hand.

Installed packages contribute registry fragments through the entry-point group `unlearn_bench.registry` (see
ENTRY_POINT_GROUP and bench.includes); BENCH_NO_PLUGINS=1 turns that discovery off. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any

from unlearn_bench.errors import RegistryError

ENTRY_POINT_GROUP = "unlearn_bench.registry"
NO_PLUGINS_ENV = "BENCH_NO_PLUGINS"


def split_ref(ref: str) -> tuple[str, str]:
    """(module or file, class) of a `module:` string; the class is after the last colon (a path may hold one)."""
    mod, _, attr = str(ref).rpartition(":")
    return mod, attr


def is_file_ref(ref: str) -> bool:
    """Whether a `module:` string names a Python file rather than an importable module."""
    mod, _ = split_ref(ref)
    return mod.endswith(".py") or "/" in mod or "\\" in mod


def absolute_ref(ref: str, base: Path) -> str:
    """A file `module:` with its path made absolute against `base` (the folder of the file that names it)."""
    if not is_file_ref(ref):
        return ref
    mod, attr = split_ref(ref)
    path = Path(os.path.expanduser(mod))
    return f"{path if path.is_absolute() else (base / path).resolve()}:{attr}"


def file_module_name(path: Path) -> str:
    """A stable module name for a plug-in file: the same absolute path gives the same name in every process."""
    stem = re.sub(r"\W", "_", path.stem) or "module"
    return f"unlearn_bench_plugin_{stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"


def load_file_module(path: Path, ref: str) -> Any:
    """Execute a plug-in file once per process (registered in sys.modules under file_module_name)."""
    path = path.expanduser().absolute()
    if not path.is_file():
        raise RegistryError(f"plug-in file not found: {path} (module: {ref})" if not path.exists() else
                            f"plug-in path {path} is not a file (module: {ref})")
    name = file_module_name(path)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RegistryError(f"cannot load {path} as a Python module (module: {ref}); the file must end in .py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before executing: dataclasses and pickle look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load_class(ref: str) -> Any:
    """The object a registry `module:` names (`package.module:Class` or `file.py:Class`), importing on demand."""
    mod, attr = split_ref(ref)
    if not mod or not attr:
        raise RegistryError(f"module '{ref}' must be 'package.module:Class' or 'path/to/file.py:Class'")
    if is_file_ref(ref):
        module = load_file_module(Path(mod), ref)
    else:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            raise RegistryError(f"cannot import '{mod}' for '{ref}': {exc}") from exc
    if not hasattr(module, attr):
        from unlearn_bench.errors import suggest

        classes = sorted(n for n in vars(module) if n[:1].isupper())
        raise RegistryError(f"'{mod}' has no '{attr}' (registry module '{ref}').{suggest(attr, classes)} "
                            f"Classes there: {', '.join(classes) or 'none'}")
    return getattr(module, attr)


def plugins_disabled() -> bool:
    return os.environ.get(NO_PLUGINS_ENV, "").strip().lower() not in ("", "0", "false", "no")


def entry_points() -> list[Any]:
    """Installed `unlearn_bench.registry` entry points, in a stable order (distribution, then name); none when
    BENCH_NO_PLUGINS is set. Reading the metadata imports nothing; loading one imports only its module."""
    if plugins_disabled():
        return []
    from importlib.metadata import entry_points as found

    eps = list(found(group=ENTRY_POINT_GROUP))
    return sorted(eps, key=lambda ep: (distribution(ep), ep.name, ep.value))


def distribution(ep: Any) -> str:
    """The name of the distribution that declares an entry point (or '?' when the metadata does not say)."""
    dist = getattr(ep, "dist", None)
    return str(getattr(dist, "name", None) or (dist.metadata["Name"] if dist is not None else "?"))
