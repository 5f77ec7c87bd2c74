"""Run one method spec (and its wrappers) on a loaded model: the shared loop for gradient methods,
`apply` for closed-form ones."""

from __future__ import annotations

from typing import Any

from unlearn_bench.plugins import load_class
from unlearn_bench.progress import Progress
from unlearn_bench.specs import ComponentSpec, ConceptSpec
from unlearn_bench.training import train


def build_method(spec: ComponentSpec, concept: ConceptSpec) -> Any:
    method = load_class(spec.module)(spec, concept)
    for wrapper in spec.wrappers:
        method = load_class(wrapper.module)(wrapper, concept, method)
    return method


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
    if method.closed_form:
        method.apply(model, seed)
        return {"history": [], "diagnostics": getattr(method, "diagnostics", {})}
    method.prepare(model, seed)
    try:
        history = train(model, method, seed=seed, progress=progress, label=f"unlearn {spec.name}",
                        **method.train_settings())
        if hasattr(method, "finish"):
            method.finish(model, seed)  # end-of-training diagnostics (e.g. +meta's gradient alignment)
        return {"history": history, "diagnostics": getattr(method, "diagnostics", {})}
    finally:
        method.cleanup()
