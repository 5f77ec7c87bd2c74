"""Relearning-robustness scores on hand-made curves (interpolation, censoring, ties, flat curves, a curve already
relearned at step 0, higher-is-better metrics) and the bootstrap interval's coverage on a synthetic run whose true
curve is known."""

from __future__ import annotations

import numpy as np
import pytest

from unlearn_bench.robustness import (
    Curves,
    MetricCurves,
    Settings,
    bootstrap_means,
    interval,
    permutation_p,
    point_means,
    relearn_auc,
    relearn_threshold,
    scores,
    steps_to_relearn,
    value_at,
)

STEPS = np.array([0, 1, 2, 5, 10, 25, 50, 100])


def relearn(values, tau=0.5, higher=False, steps=STEPS):
    step, censored = steps_to_relearn(steps, np.array([values], float), tau, higher)
    return float(step[0]), bool(censored[0])


def test_steps_to_relearn_interpolates_between_the_checkpoints_around_the_crossing():
    # 0.2 at step 5, 0.8 at step 10: 0.5 is crossed half way, at 7.5
    assert relearn([0, 0, 0.1, 0.2, 0.8, 1, 1, 1]) == (pytest.approx(7.5), False)
    # a quarter of the way from 10 (0.4) to 25 (0.8)
    assert relearn([0, 0, 0, 0, 0.4, 0.8, 1, 1]) == (pytest.approx(13.75), False)


def test_steps_to_relearn_is_right_censored_at_the_last_step_when_never_reached():
    assert relearn([0, 0, 0.1, 0.2, 0.3, 0.4, 0.45, 0.49]) == (100.0, True)


def test_a_flat_curve_is_censored_and_a_curve_at_threshold_from_step_0_is_zero():
    assert relearn([0.0] * 8) == (100.0, True)
    assert relearn([0.5] * 8) == (0.0, False)  # reaching = at or above the threshold
    assert relearn([0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]) == (0.0, False)  # already back before the attack


def test_ties_the_first_checkpoint_exactly_at_threshold_is_the_step_and_a_plateau_does_not_move_it():
    assert relearn([0, 0, 0, 0.5, 0.5, 0.5, 1, 1]) == (5.0, False)
    # touches the threshold, falls back, rises again: the first crossing counts
    assert relearn([0, 0.5, 0.2, 0.2, 0.9, 1, 1, 1]) == (1.0, False)


def test_higher_is_better_metric_relearns_when_it_falls_to_base_over_fraction():
    # a higher-is-better concept metric (e.g. "share of images without the concept"): base 0.2, f = 0.5 -> 0.4
    tau = float(relearn_threshold(0.2, True, Settings(fraction=0.5)))
    assert tau == pytest.approx(0.4)
    assert relearn([1.0, 1.0, 0.9, 0.8, 0.6, 0.2, 0.2, 0.2], tau, higher=True) == (pytest.approx(17.5), False)


def test_absolute_threshold_replaces_fraction_times_base():
    assert float(relearn_threshold(0.8, False, Settings(fraction=0.5))) == pytest.approx(0.4)
    assert float(relearn_threshold(0.8, False, Settings(threshold=0.3))) == pytest.approx(0.3)


def test_auc_is_the_normalised_area_of_the_presence_ratio():
    s = np.array([0, 50, 100])
    assert relearn_auc(s, np.array([[0, 0, 0]]), 1.0, False)[0] == 0.0
    assert relearn_auc(s, np.array([[1, 1, 1]]), 1.0, False)[0] == 1.0
    assert relearn_auc(s, np.array([[0, 1, 1]]), 1.0, False)[0] == pytest.approx(0.75)  # 25 + 50 over 100
    # ratio to the base (0.5), clipped at 1: a curve above the base counts as fully relearned
    assert relearn_auc(s, np.array([[0.25, 0.5, 0.8]]), 0.5, False)[0] == pytest.approx((0.75 * 50 + 50) / 100)
    # log axis: the first steps weigh more, so rising at step 1 rather than at 10 matters more there
    early, late = np.array([[0, 1, 1, 1, 1, 1, 1, 1]]), np.array([[0, 0, 0, 0, 1, 1, 1, 1]])
    gap = {x: relearn_auc(STEPS, early, 1.0, False, x)[0] - relearn_auc(STEPS, late, 1.0, False, x)[0]
           for x in ("linear", "log1p")}
    assert gap["linear"] == pytest.approx(0.995 - 0.925)  # (0.5 + 99) / 100 against (2.5 + 90) / 100
    assert gap["log1p"] > 4 * gap["linear"]


def test_value_at_interpolates_each_row_at_its_own_step():
    v = np.array([[0.0, 1.0, 2.0], [10.0, 10.0, 0.0]])
    got = value_at(np.array([0, 10, 20]), v, np.array([5.0, 15.0]))
    assert got == pytest.approx([0.5, 5.0])
    assert value_at(np.array([0, 10]), v[:, :2], np.array([99.0, -1.0])) == pytest.approx([1.0, 10.0])  # clamped


def test_permutation_p_is_one_for_a_null_of_zeros_and_small_for_an_extreme_observation():
    assert permutation_p(0.0, np.zeros(100)) == 1.0
    assert permutation_p(1.0, np.linspace(-0.5, 0.5, 99)) == pytest.approx(0.01)


def synthetic(rng, true_curve, n_seeds=3, n_images=120) -> Curves:
    """A run with the base model (concept in every image) and one method whose images show the concept at step t
    with probability true_curve[t] (each image keeps one uniform draw across steps, like a real relearning curve)."""
    states = [("none", "none", 0), ("esd", "none", 0)] + [("esd", "ft", int(s)) for s in STEPS[1:]]
    values = []
    for _ in range(n_seeds):
        u = rng.random(n_images)
        rows = [np.ones(n_images)] + [(u < p).astype(float) for p in true_curve]
        values.append(np.stack(rows))
    concept = MetricCurves("concept-rate", False, states, list(range(n_seeds)), values, "target:120")
    return Curves({"concept-rate": concept}, "concept-rate", {"ft": [int(s) for s in STEPS]})


def test_bootstrap_interval_covers_the_true_steps_to_relearn_and_rate_at_about_the_nominal_level():
    true_curve = np.clip(STEPS / 40.0, 0, 1)  # crosses 0.5 at step 20 exactly
    settings = Settings(n_boot=200)
    covered_steps = covered_rate = 0
    reps = 100
    rng = np.random.default_rng(7)
    for _ in range(reps):
        curves = synthetic(rng, true_curve)
        draws = bootstrap_means(curves, settings.n_boot, rng)
        lo, hi = interval(scores(curves, draws, settings)[("esd", "ft", "relearn-steps")][0], 0.95)
        covered_steps += lo <= 20.0 <= hi
        i = curves.metrics["concept-rate"].index()[("esd", "ft", 10)]
        lo, hi = interval(draws["concept-rate"][:, i], 0.95)
        covered_rate += lo <= 0.25 <= hi
    assert 0.85 <= covered_steps / reps <= 1.0
    assert 0.85 <= covered_rate / reps <= 1.0
    # and the intervals are not trivially wide: the point estimate is close to the truth
    point = scores(curves, point_means(curves), settings)[("esd", "ft", "relearn-steps")][0][0]
    assert point == pytest.approx(20.0, abs=4.0)


def test_settings_refuse_bad_definitions():
    for bad in (dict(fraction=0), dict(fraction=1.5), dict(auc_x="log"), dict(level=1.0), dict(n_boot=0),
                dict(base_value=0.0)):
        with pytest.raises(ValueError):
            Settings(**bad)
