"""Run one method spec (and its wrappers) on a loaded model: the shared loop for gradient methods,
`apply` for closed-form ones. Every hook of the Method contract (unlearn_bench.methods.base) is called here,
unconditionally and in its documented order; the base class supplies the no-ops."""

from __future__ import annotations

from typing import Any

from unlearn_bench.components import build_component, component_class
from unlearn_bench.methods.base import Method
from unlearn_bench.progress import Progress
from unlearn_bench.specs import ComponentSpec, ConceptSpec
from unlearn_bench.training import train


def build_method(spec: ComponentSpec, concept: ConceptSpec) -> Method:
    """The method with its wrappers applied innermost first (esd+meta -> Meta(ESD)); each class checked to be a
    Method."""
    check_wrappable(spec)
    method = build_component(spec, Method, concept)
    for wrapper in spec.wrappers:
        method = build_component(wrapper, Method, concept, method)
    return method


def check_wrappable(spec: ComponentSpec) -> None:
    """A wrapped method (sld+meta) whose class refuses wrappers (Method.wrap_refusal) raises RegistryError with
    the class's reason; plan time calls this so the run stops with exit 2 before any model loads."""
    if not spec.wrappers:
        return
    reason = component_class(spec, Method).wrap_refusal
    if reason:
        from unlearn_bench.registry import RegistryError

        names = "+".join(w.name for w in spec.wrappers)
        raise RegistryError(f"method {spec.name}: +{names} cannot wrap {spec.name.split('+')[0]}: {reason}")


def sampling_guidance(spec: ComponentSpec, concept: ConceptSpec) -> Any:
    """The method's sampling-time guidance (Method.sampling_guidance), from a fresh instance: nothing trains."""
    return build_method(spec, concept).sampling_guidance()


def changes_weights(spec: ComponentSpec) -> bool:
    """Whether running this method can change any weight: False only for an unwrapped method whose class says so
    (`none`), which then needs no unlearn stage at all."""
    return bool(spec.wrappers) or component_class(spec, Method).changes_weights


def run_method(model: Any, spec: ComponentSpec, concept: ConceptSpec, seed: int,
               progress: Progress | None = None, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Apply or train the method on `model` in place; return {"history": losses, "diagnostics": {...}}."""
    import torch

    torch.manual_seed(seed)
    model.snapshot()
    method = build_method(spec, concept)
    missing = sorted(set(method.data_requests()) - set(data or {}))
    if missing:
        raise ValueError(f"method {spec.name} needs data roles {missing}")
    method.data = dict(data or {})
    history: list[float] = []
    method.prepare(model, seed)
    try:
        if method.closed_form:
            method.apply(model, seed)
        else:
            history = train(model, method, seed=seed, progress=progress, label=f"unlearn {spec.name}",
                            **method.train_settings())
        method.finish(model, seed)  # end-of-run diagnostics (e.g. +meta's gradient alignment)
        return {"history": history, "diagnostics": dict(method.diagnostics)}
    finally:
        method.cleanup()
