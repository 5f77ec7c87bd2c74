"""What the toy metrics share: the cached detector, the concept test, and the Frechet distance.

The detector plays the judge's role (NudeNet / CLIP / Inception on real models): it is trained on the synthetic
dataset only, never on generated images, so it cannot be fitted to any method's outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np

ATTRIBUTES = ("colour", "shape")


@lru_cache(maxsize=2)
def detector(weights_dir: str | None = None) -> Any:
    from unlearn_bench.toy.detector import load_detector

    return load_detector(None if weights_dir is None else __import__("pathlib").Path(weights_dir))


def judge(images: np.ndarray, weights_dir: str | None = None) -> dict[str, np.ndarray]:
    from unlearn_bench.toy.detector import classify

    return classify(detector(weights_dir), images)


def concept_attributes(params: Mapping[str, Any], concept_name: str) -> dict[str, str]:
    """The attribute values that make an image show the concept, from the concept's `toy` params
    (e.g. {colour: red}, {shape: triangle}, or both for a colour-shape pair)."""
    from unlearn_bench.toy import world

    attrs = {k: v for k, v in dict(params.get("toy", {})).items() if k in ATTRIBUTES}
    if not attrs:
        raise ValueError(f"concept {concept_name}: toy metrics need params.toy with colour and/or shape")
    allowed = {"colour": list(world.COLOURS), "shape": list(world.SHAPES)}
    for k, v in attrs.items():
        if v not in allowed[k]:
            raise ValueError(f"concept {concept_name}: toy.{k}={v!r}; allowed: {allowed[k]}")
    return attrs


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2), the FID formula, via symmetric eigendecompositions."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    tr_sqrt = float(np.sqrt(np.clip(middle, 0, None)).sum())
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt)
