"""The method interface (DESIGN.md "Interfaces").

A method is either gradient-based (it selects trainable parameters and defines `loss`; the shared loop in
bench.training runs it) or closed-form (it defines `apply`). Wrappers such as `+meta` rely on exactly this split,
so a method must not run its own optimisation loop.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from bench.specs import ComponentSpec, ConceptSpec


class Method:
    closed_form: bool = False

    def __init__(self, spec: ComponentSpec, concept: ConceptSpec) -> None:
        self.spec = spec
        self.concept = concept

    # gradient-based methods
    def prepare(self, model: Any, seed: int) -> None:
        """One-time set-up before training (frozen teacher copies, cached text embeddings, masks)."""

    def trainable(self, model: Any) -> dict[str, torch.nn.Parameter]:
        raise NotImplementedError

    def loss(self, model: Any, step: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def cleanup(self) -> None:
        """Drop what prepare() built (frozen copies) so memory returns before the next stage."""

    # closed-form methods
    def apply(self, model: Any, seed: int) -> None:
        raise NotImplementedError

    # shared-loop settings
    def train_settings(self) -> dict[str, Any]:
        p = self.spec.params
        return {"steps": int(p["iterations"]), "lr": float(p["lr"]), "optimizer": p.get("optimizer", "adam"),
                "weight_decay": float(p.get("weight_decay", 0.0)), "grad_clip": p.get("grad_clip")}


def select_parameters(module: torch.nn.Module, prefix: str, include: list[str] | None = None,
                      exclude: list[str] | None = None) -> dict[str, torch.nn.Parameter]:
    """Parameters of `module` whose names match any `include` regex and no `exclude` regex, keyed "prefix.name"."""
    inc = [re.compile(p) for p in include or [".*"]]
    exc = [re.compile(p) for p in exclude or []]
    return {f"{prefix}.{n}": p for n, p in module.named_parameters()
            if any(r.search(n) for r in inc) and not any(r.search(n) for r in exc)}


class NoUnlearning(Method):
    """`none`: the untouched model, the baseline row of every leaderboard."""

    closed_form = True

    def apply(self, model: Any, seed: int) -> None:
        return None
