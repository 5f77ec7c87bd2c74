"""Finite or failed: the checks that stop a diverged stage from becoming a number.

Why: a training run whose weights went to NaN generates black images, and a black image shows no nudity, so a
diverged unlearning run would read as perfect erasure. Every place where numbers are produced (training losses,
the weights a stage stores, sampled latents, metric values) checks them here and raises `NonFinite`, naming the
component, the parameter set and the step; the store then keeps nothing for that stage and the run records the
cell as failed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


class NonFinite(RuntimeError):
    """A non-finite loss, weight, latent or metric value (the stage fails; nothing is stored)."""

    def __init__(self, component: str, what: str, step: int | None = None, detail: str = "") -> None:
        self.component, self.what, self.step, self.detail = component, what, step, detail
        at = f" at step {step}" if step is not None else ""
        super().__init__(f"{component}: non-finite {what}{at}" + (f" ({detail})" if detail else ""))


def describe_params(names: list[str], limit: int = 2) -> str:
    """A short name for a parameter set: how many tensors and the first few names."""
    head = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f"{len(names)} tensors: {head}" if names else "no tensors"


def check_loss(loss: Any, component: str, step: int, params: str = "") -> float:
    """The loss as a float, or NonFinite when it is nan/inf (`step` 1-based, as progress shows it)."""
    value = float(loss.detach()) if hasattr(loss, "detach") else float(loss)
    if not math.isfinite(value):
        raise NonFinite(component, f"loss ({value})", step, f"training {params}" if params else "")
    return value


def check_tensors(tensors: Mapping[str, Any], component: str, what: str = "weights", step: int | None = None) -> None:
    """NonFinite naming the first tensors with a nan/inf value (one reduction per tensor, no host copy)."""
    import torch

    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFinite(component, what, step, describe_params(bad, limit=3))


def check_value(value: float, component: str, what: str = "value") -> float:
    if value is None or not math.isfinite(float(value)):
        raise NonFinite(component, f"{what} ({value})")
    return float(value)
