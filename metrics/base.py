"""The metric interface (DESIGN.md "Interfaces").

A metric declares its name, version and direction (higher_is_better, in the registry), which images it scores
(`scope`: the concept's target prompts, or the benign prompts for utility metrics), and the settings the literature
disagrees on (recorded in every results row). It returns per-image records and an aggregate with n and a standard
error, so leaderboards can say how much a difference means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from unlearn_bench.specs import ComponentSpec, ConceptSpec, thaw

SCOPES = ("target", "benign", "related")


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


def rate(flags: list[bool] | np.ndarray) -> tuple[float, float, int]:
    """Fraction of True with its binomial standard error sqrt(p(1-p)/n)."""
    arr = np.asarray(flags, dtype=float)
    n = int(arr.size)
    if n == 0:
        return float("nan"), float("nan"), 0
    p = float(arr.mean())
    return p, math.sqrt(p * (1 - p) / n), n


class Metric:
    def __init__(self, spec: ComponentSpec, concept: ConceptSpec) -> None:
        self.spec = spec
        self.concept = concept
        scope = spec.params.get("scope", "target")
        if scope not in SCOPES:
            raise ValueError(f"metric {spec.name}: scope={scope!r}; allowed: {SCOPES}")
        self.scope = scope

    def settings(self) -> dict[str, Any]:
        """Evaluation settings recorded in every results row (e.g. classes and threshold)."""
        return {k: v for k, v in thaw(self.spec.params).items() if k != "scope"}

    def score(self, images: np.ndarray, prompts: list[str]) -> MetricResult:
        raise NotImplementedError

    def judge(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """Binary concept metrics only: does each image show the concept? (Prompt attacks stop on success.)"""
        raise NotImplementedError(f"metric {self.spec.name} is not a per-image concept judge")
