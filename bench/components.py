"""The core side of the plug-in contract: the types the runner exchanges with methods, attacks and metrics.

Why these live in the core rather than in methods/, attacks/ or metrics/: the runner needs them, and the core never
imports a plug-in module (only the three base-class modules, for isinstance checks). A plug-in gets everything it
needs from the harness through these types, so a third-party component can do whatever a bundled one does:

- `MetricResult`: what Metric.score returns (re-exported by unlearn_bench.metrics.base).
- `MetricContext`: what the runner lends a metric in Metric.bind - the device, the numeric environment, a
  `cached(stage, inputs, compute)` that memoises the metric's own stage in the artifact store (fid's reference
  features) with the numeric environment in its key, `key(stage, inputs)` for that stage's key without computing it,
  and `resolve_path(text)` for data paths given in parameters.
- `component_class` / `build_component`: load a registry `module:` class and check it derives from the right base,
  so a wrong class fails with its name and the base it should have, not with an AttributeError halfway through.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from unlearn_bench.specs import ComponentSpec
    from unlearn_bench.store import Store

T = TypeVar("T")
StageCompute = Callable[[Path], dict[str, Any]]  # compute(tmp_dir) writes files there, returns small JSON-able meta


@dataclass
class MetricResult:
    value: float
    stderr: float
    n: int
    per_image: list[dict[str, Any]] = field(default_factory=list)
    # Further results from the same pass, each its own results row named by its key (e.g. nudenet@0.5 for an
    # extra threshold): label -> (value, stderr, n, settings). Aggregate extras that are not rows (per-class
    # counts) go in `summary`; both land in the score stage's manifest.
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def extra_meta(self) -> dict[str, Any]:
        return ({"variants": self.variants} if self.variants else {}) | ({"summary": self.summary}
                                                                          if self.summary else {})


class StageOutput(Protocol):
    """A finished stage as a plug-in sees it: its key, its metadata and its files (a store Entry is one)."""

    key: str

    @property
    def meta(self) -> dict[str, Any]: ...

    def file(self, name: str) -> Path: ...


def resolve_data_path(text: str) -> Path:
    """The harness's rule for a data path given in a parameter: absolute as given; a relative one beside the bundled
    registry when a file is there, else under $BENCH_DATA when set, else under the current directory."""
    from unlearn_bench.registry import DEFAULT_REGISTRY
    from unlearn_bench.schema_types import resolve_data_path as resolve

    return resolve(str(text), DEFAULT_REGISTRY.parent)


@dataclass(frozen=True)
class _LocalOutput:
    key: str
    path: Path
    meta: dict[str, Any]

    def file(self, name: str) -> Path:
        return self.path / name


_LOCAL: dict[str, _LocalOutput] = {}  # stage key -> output, for contexts without a store (one per process)


def _compute_locally(stage: str, key: str, compute: StageCompute) -> _LocalOutput:
    """No store bound (a metric used directly): compute once per process into a temp dir removed at exit."""
    if key not in _LOCAL:
        tmp = Path(tempfile.mkdtemp(prefix=f"unlearn-bench-{stage}-"))
        atexit.register(shutil.rmtree, tmp, True)
        _LOCAL[key] = _LocalOutput(key, tmp, compute(tmp))
    return _LOCAL[key]


@dataclass(frozen=True)
class MetricContext:
    """What the runner lends a metric (Metric.bind), and what plan-time checks get (Metric.preflight).

    device: where to run models ("cpu", "cuda:0"). numerics: the numeric environment (device kind, GPU model,
    torch version, CPU threads) that every stage key holds, because it changes stored bytes. store: the artifact
    store, or None (direct use: stages are computed once per process in a temp dir, never persisted). Plug-ins use
    the methods below rather than the store itself."""

    device: str = "cpu"
    numerics: Mapping[str, Any] = field(default_factory=dict)
    store: Store | None = None
    resolver: Callable[[str], Path] = resolve_data_path

    def stage_inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """A stage's full inputs: the metric's own plus the numeric environment (when known)."""
        return dict(inputs) | ({"numerics": dict(self.numerics)} if self.numerics else {})

    def key(self, stage: str, inputs: Mapping[str, Any]) -> str:
        """The store key `cached` would use, without computing anything (for Metric.reference_key)."""
        from unlearn_bench.store import stage_key

        return stage_key(stage, self.stage_inputs(inputs))

    def cached(self, stage: str, inputs: Mapping[str, Any], compute: StageCompute) -> StageOutput:
        """The finished stage for these inputs, computing it once (under the store's per-key lock) if missing.

        `inputs` must hold exactly what changes the result (content fingerprints, never paths or batch sizes)."""
        if self.store is None:
            return _compute_locally(stage, self.key(stage, inputs), compute)
        return self.store.get_or_compute(stage, self.stage_inputs(inputs), compute)

    def resolve_path(self, text: str) -> Path:
        """A data path from a parameter as the harness reads it (see resolve_data_path)."""
        return self.resolver(text)


DEFAULT_CONTEXT = MetricContext()  # before bind, and at plan time: cpu, no store, the standard path rule


def component_class(spec: ComponentSpec, base: type[T]) -> type[T]:
    """The class a registry entry names, checked to derive from `base` (raises RegistryError naming both)."""
    from unlearn_bench.plugins import load_class
    from unlearn_bench.registry import RegistryError

    cls = load_class(spec.module)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise RegistryError(f"{spec.kind} {spec.name}: '{spec.module}' is not a subclass of "
                            f"{base.__module__}.{base.__qualname__}; every {spec.kind} derives from it")
    return cls


def build_component(spec: ComponentSpec, base: type[T], *args: Any) -> T:
    """Instantiate the class a registry entry names as cls(spec, *args), after component_class's check."""
    return component_class(spec, base)(spec, *args)
