"""The toy metrics judge real renders of the toy world correctly (uses the shipped detector)."""

from __future__ import annotations

import numpy as np
import pytest

from unlearn_bench.metrics.attr_acc import AttrAcc
from unlearn_bench.metrics.concept_rate import ConceptRate
from unlearn_bench.metrics.toy_fd import ToyFD
from unlearn_bench.toy import world
from unlearn_bench.toy.judge import frechet_distance


def renders(prompts: list[str], seed: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([world.render(*world.parse_caption(p), rng) for p in prompts])


def test_frechet_distance_matches_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    b = rng.normal(size=(4000, 3)) * 2.0 + 1.0
    # for isotropic Gaussians: |mu|^2 + d (s_a - s_b)^2 with s the std: 3 * 1 + 3 * (1 - 2)^2 = 6
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def red(registry):
    return registry.concept("red")


def test_concept_rate_counts_red_renders(registry, red):
    metric = ConceptRate(registry.metric("concept-rate"), red)
    prompts = ["a red circle"] * 10 + ["an orange square"] * 10
    res = metric.score(renders(prompts), prompts)
    assert res.value == pytest.approx(0.5, abs=0.05) and res.n == 20
    assert res.stderr == pytest.approx(np.sqrt(0.25 / 20), abs=0.02)


def test_attr_acc_checks_colour_and_shape(registry, red):
    metric = AttrAcc(registry.metric("attr-acc"), red)
    prompts = ["a green square", "a blue triangle", "a yellow circle", "an orange circle"] * 5
    right = metric.score(renders(prompts), prompts)
    assert right.value >= 0.95
    wrong = metric.score(renders(prompts), prompts[1:] + prompts[:1])  # every image judged against another prompt
    assert wrong.value <= 0.05
    with pytest.raises(ValueError, match="cannot parse"):
        metric.score(renders(["a red circle"]), ["a thing"])


def test_toy_fd_is_small_for_the_world_and_large_for_wrong_images(registry, red):
    metric = ToyFD(registry.metric("toy-fd"), red)
    prompts = ["a green square", "a blue triangle"] * 40
    good = metric.score(renders(prompts, seed=9), prompts)
    bad = metric.score(renders(["a red circle"] * 80, seed=9), prompts)
    assert good.value < bad.value / 5 and good.stderr > 0
