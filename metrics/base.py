"""The metric interface (DESIGN.md "Interfaces").

A metric declares its name, version and direction (higher_is_better, in the registry), which images it scores
(`scope`: the concept's target prompts, or the benign prompts for utility metrics), and the settings the literature
disagrees on (recorded in every results row). It returns per-image records and an aggregate with n and a standard
error, so leaderboards can say how much a difference means.

Required: score(). Optional hooks, each a documented no-op the runner calls unconditionally: preflight (plan time,
before anything expensive), bind (the MetricContext before scoring: device, numeric environment, a cached stage of
the metric's own, data paths), reference_key (data outside the params that the score depends on), settings, and
judge (binary concept metrics only, for prompt attacks).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from unlearn_bench.components import DEFAULT_CONTEXT, MetricContext, MetricResult
from unlearn_bench.specs import ComponentSpec, ConceptSpec, thaw

SCOPES = ("target", "benign", "related")
__all__ = ["SCOPES", "Metric", "MetricContext", "MetricResult", "rate"]


def rate(flags: list[bool] | np.ndarray) -> tuple[float, float, int]:
    """Fraction of True with its binomial standard error sqrt(p(1-p)/n)."""
    arr = np.asarray(flags, dtype=float)
    n = int(arr.size)
    if n == 0:
        return float("nan"), float("nan"), 0
    p = float(arr.mean())
    return p, math.sqrt(p * (1 - p) / n), n


class Metric(ABC):
    def __init__(self, spec: ComponentSpec, concept: ConceptSpec) -> None:
        self.spec = spec
        self.concept = concept
        scope = spec.params.get("scope", "target")
        if scope not in SCOPES:
            raise ValueError(f"metric {spec.name}: scope={scope!r}; allowed: {SCOPES}")
        self.scope = scope
        self.context: MetricContext = DEFAULT_CONTEXT  # cpu, no store, until the runner binds its own

    @classmethod
    def preflight(cls, spec: ComponentSpec, context: MetricContext = DEFAULT_CONTEXT) -> None:
        """At plan time, without loading anything heavy: raise RuntimeError/OSError/ValueError naming what is
        missing (weights, a reference folder, an optional package); planning turns it into exit status 2.
        context gives resolve_path for data paths (no device or store yet). Nothing to check by default."""
        return None

    def bind(self, context: MetricContext) -> None:
        """Before scoring: the runner's device, numeric environment and store access (see MetricContext).
        Overrides call super().bind(context)."""
        self.context = context

    def reference_key(self) -> object | None:
        """A JSON-able fingerprint of data outside the params that the score depends on (fid: its reference
        folder's content and features key); it enters the score stage's key. None (default): nothing such."""
        return None

    def settings(self) -> dict[str, Any]:
        """Evaluation settings recorded in every results row (e.g. classes and threshold)."""
        return {k: v for k, v in thaw(self.spec.params).items() if k != "scope"}

    @abstractmethod
    def score(self, images: np.ndarray, prompts: list[str]) -> MetricResult:
        """uint8 NHWC images and the prompt of each -> the aggregate (value, stderr, n) and per-image records."""

    def judge(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """Binary concept metrics only: does each image show the concept? (Prompt attacks stop on success.)"""
        raise NotImplementedError(f"metric {self.spec.name} is not a per-image concept judge")
