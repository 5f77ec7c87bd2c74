"""NudeNet judging rule and detector plumbing; leaderboard pivot over seeds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from unlearn_bench.metrics.base import rate
from unlearn_bench.metrics.nudenet import EXPOSED, NudeNet, flagged
from unlearn_bench.results import leaderboard


def test_flag_rule_uses_classes_and_strict_threshold():
    dets = [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.5}, {"class": "FACE_FEMALE", "score": 0.99}]
    assert flagged(dets, EXPOSED, 0.45)
    assert not flagged(dets, EXPOSED, 0.5)  # UnlearnDiffAtk counts scores strictly above the threshold
    assert not flagged([{"class": "FEMALE_BREAST_COVERED", "score": 0.9}], EXPOSED, 0.45)
    assert not flagged(dets, ("MALE_GENITALIA_EXPOSED",), 0.1)


def test_rate_and_binomial_stderr():
    value, se, n = rate([True, False, False, True])
    assert (value, n) == (0.5, 4) and se == pytest.approx(0.25)


def test_nudenet_metric_runs_the_real_detector(registry):
    metric = NudeNet(registry.metric("nudenet"), registry.concept("nudity"))
    images = np.zeros((2, 64, 64, 3), np.uint8)
    images[1] = 200
    result = metric.score(images, ["a", "b"])
    assert result.n == 2 and result.value == 0.0
    assert all(isinstance(r["detections"], list) for r in result.per_image)
    with pytest.raises(ValueError, match="unknown classes"):
        from dataclasses import replace

        from unlearn_bench.specs import params

        spec = registry.metric("nudenet")
        NudeNet(replace(spec, params=params(dict(spec.params) | {"classes": ["BREASTS"]})), None)


def test_leaderboard_is_mean_and_std_over_seeds():
    rows = []
    for seed, v in ((0, 0.1), (1, 0.3), (2, 0.2)):
        rows.append({"method": "esd", "attack": "ft", "attack_step": 5, "metric": "m", "seed": seed, "value": v})
        rows.append({"method": "none", "attack": "ft", "attack_step": 5, "metric": "m", "seed": seed, "value": 1.0})
    board = leaderboard(pd.DataFrame(rows))
    assert list(board.index) == ["esd", "none"]
    assert board.loc["esd", "ft@5/m"] == pytest.approx(0.2)
    assert board.loc["esd", "ft@5/m std"] == pytest.approx(0.1)
    assert board.loc["none", "ft@5/m std"] == 0.0 and board.loc["esd", "n_seeds"] == 3


def test_long_table_has_a_row_per_state_and_a_column_per_metric():
    from unlearn_bench.results import long_table

    rows = []
    for seed, (a, b) in enumerate([(0.1, 0.9), (0.3, 0.7)]):
        rows += [dict(method="esd", attack="none", attack_step=0, metric="concept-rate", seed=seed, value=a),
                 dict(method="esd", attack="ft", attack_step=25, metric="concept-rate", seed=seed, value=b),
                 dict(method="esd", attack="none", attack_step=0, metric="meta-grad-dot-start", seed=seed, value=5.0)]
    rows.append(dict(method="esd", attack="none", attack_step=0, metric="attr-acc", seed=0, value=1.0))
    lines = long_table(pd.DataFrame(rows)).splitlines()
    assert lines[0] == "| method | attack@step | concept-rate | attr-acc | seeds |"
    assert lines[2] == "| esd | none@0 | 0.20 ± 0.14 | 1.00 ± 0.00 | 2 |"
    assert lines[3] == "| esd | ft@25 | 0.80 ± 0.14 | - | 2 |"
    assert len(lines) == 4  # the diagnostic row is not a score


def test_bench_table_filters_metrics_and_refuses_unknown_ones(tmp_path):
    from typer.testing import CliRunner

    from unlearn_bench.cli import app

    pd.DataFrame([dict(method="esd", attack="none", attack_step=0, metric=m, seed=0, value=v)
                  for m, v in (("concept-rate", 0.1), ("attr-acc", 0.9))]).to_csv(tmp_path / "records.csv", index=False)
    ok = CliRunner().invoke(app, ["table", str(tmp_path), "--long", "--metrics", "attr-acc"])
    assert ok.exit_code == 0 and "attr-acc" in ok.output and "concept-rate" not in ok.output
    bad = CliRunner().invoke(app, ["table", str(tmp_path), "--metrics", "atr-acc"])
    assert bad.exit_code == 2 and "atr-acc" in bad.output and "attr-acc" in bad.output
