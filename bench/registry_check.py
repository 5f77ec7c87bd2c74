"""`bench validate`: every problem of a registry, listed at once, beyond what reading the file already checks.

What it adds to the structural check of bench.catalogue: each entry resolved with names and paths checked, each
component's params and schema covering each other, every `scaled.<group>` value conforming to the schema (for every
group, not only the groups today's models use, and no group that no model uses), each `module` naming a class that
exists (an importable module, or a plug-in file given by path), and suites naming known entries once each. Each
problem cites the file and line that wrote the entry, which may be an include file (bench.includes).

Why modules are checked statically by default: `bench validate` must stay instant and never import torch (README);
finding the module file and parsing it proves the module and class exist and the file parses. `import_modules=True`
(`bench validate --import`) imports each one through bench.plugins.load_class, which also proves its dependencies
import - at the cost of importing torch.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unlearn_bench.catalogue import COMPONENT_KINDS
from unlearn_bench.errors import RegistryError, suggest
from unlearn_bench.plugins import is_file_ref, split_ref
from unlearn_bench.schema import SchemaError

if TYPE_CHECKING:
    from unlearn_bench.registry import Registry


def _defined_names(path: Path) -> set[str]:
    """Top-level names a Python file defines (classes, functions, assignments, imports)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def module_problem(ref: str, import_modules: bool = False) -> str | None:
    """Why `package.module:Class` (or `path/to/file.py:Class`) does not name a class, or None."""
    mod, attr = split_ref(ref)
    if import_modules:
        from unlearn_bench.plugins import load_class

        static = module_problem(ref)  # the same wording (and did-you-mean) for a missing module or class
        if static is not None:
            return static

        try:
            obj = load_class(ref)
        except RegistryError as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - any import-time failure is the finding to report
            return f"importing '{mod}' failed: {type(exc).__name__}: {exc}"
        return None if isinstance(obj, type) else f"'{ref}' is not a class"
    if is_file_ref(ref):
        origin = Path(mod).expanduser().absolute()
        if not origin.is_file():
            return (f"plug-in file not found: {origin} (module: {ref})" if not origin.exists() else
                    f"plug-in path {origin} is not a file (module: {ref})")
    else:
        try:
            spec = importlib.util.find_spec(mod)
        except (ImportError, ValueError) as exc:
            return f"cannot find module '{mod}': {exc}"
        if spec is None:
            return f"no module named '{mod}' (module: {ref})"
        if not spec.origin or not spec.origin.endswith(".py"):
            return None  # a compiled or namespace module: only an import could tell
        origin = Path(spec.origin)
    try:
        names = _defined_names(origin)
    except (OSError, SyntaxError, UnicodeDecodeError) as exc:
        return f"cannot read '{mod}' ({origin}): {exc}"
    if attr not in names:
        classes = sorted(n for n in names if n[:1].isupper())
        return f"'{mod}' defines no '{attr}'.{suggest(attr, classes)} Classes there: {', '.join(classes) or 'none'}"
    return None


def validate(reg: Registry, import_modules: bool = False) -> list[str]:
    """Resolve every entry and check everything above; return the problems (empty = valid)."""
    problems: list[str] = []

    def attempt(what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except RegistryError as exc:
            problems.append(f"{what}: {exc}")
        return None

    models = [m for m in (attempt(f"model {n}", reg.model, n) for n in reg.names("models")) if m is not None]
    groups = {m.defaults for m in models}
    for c in reg.names("concepts"):
        attempt(f"concept {c}", reg.concept, c)
    for p in reg.names("prompt_sets"):
        attempt(f"prompt set {p}", reg.prompt_set, p)
    for section, kind in COMPONENT_KINDS.items():
        for n in reg.names(section):
            what = f"{kind} {n}"
            if attempt(what, reg.component, section, n) is None:
                continue
            problems.extend(f"{what}: {reg._where(section, n, 'scaled')}.{p}"
                            for p in _scaled_problems(reg, section, n, groups))
            problem = module_problem(reg.entry(section, n)["module"], import_modules)
            if problem:
                problems.append(f"{what}: {reg._where(section, n, 'module')}.module: {problem}")
    for s in reg.names("suites"):
        suite = attempt(f"suite {s}", reg.suite, s)
        if suite is None:
            continue
        for label, names in (("methods", suite.methods), ("attacks", suite.attacks), ("metrics", suite.metrics),
                             ("seeds", suite.seeds)):
            dup = sorted({str(n) for n in names if names.count(n) > 1})
            if dup:
                problems.append(f"suite {s}: {label} listed twice: {dup}")
    default = reg.data["defaults"].get("suite")
    if default is not None and default not in reg.data["suites"]:
        problems.append(f"defaults.suite: unknown suite '{default}'.{suggest(default, reg.data['suites'])}")
    return problems


def _scaled_problems(reg: Registry, section: str, name: str, groups: set[str]) -> list[str]:
    """Every scaled.<group> value against the schema, and groups that no model's `defaults` names."""
    out = []
    raw = reg.entry(section, name)
    base = raw.get("params") or {}
    types = reg.param_schema(section, name)
    ctx = reg.ctx()
    for group, values in (raw.get("scaled") or {}).items():
        if groups and group not in groups:
            out.append(f"scaled.{group}: no model uses this group.{suggest(group, groups)} "
                       f"Models' defaults groups: {', '.join(sorted(groups))}")
        for key, value in (values or {}).items():
            if key not in base:
                out.append(f"scaled.{group}.{key}: not a parameter.{suggest(key, base)}")
                continue
            try:
                types[key].check(value, ctx)
            except SchemaError as exc:
                out.append(exc.at(f".{key}").message(f"scaled.{group}"))
    return out
