"""`bench check`: a metric past its tolerance in its bad direction fails (exit 1), an improvement passes, the
direction comes from higher_is_better, and tolerances are absolute or in standard errors."""

from __future__ import annotations

import csv
import math

import pytest
from typer.testing import CliRunner

from unlearn_bench.check import Tolerance, compare, parse_tolerances, read_table
from unlearn_bench.cli import app

COLS = ["model", "concept", "method", "attack", "attack_step", "metric", "seed", "value", "stderr", "n",
        "higher_is_better", "metric_version"]


def records(path, rate: float = 0.10, acc: float = 0.90, rate_se: float = 0.01, seeds=(0, 1, 2), drop=()):
    """esd's concept-rate (lower is better) and attr-acc (higher is better) after a finetune attack."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLS)
        for s in seeds:
            jitter = 0.001 * (s - 1)
            for metric, v, se, hib in (("concept-rate", rate, rate_se, False), ("attr-acc", acc, 0.01, True)):
                if metric not in drop:
                    w.writerow(["toy", "red", "esd", "ft-lr1e-4", 50, metric, s, v + jitter, se, 96, hib, 1])
    return path


def check(run, baseline, *args):
    return CliRunner().invoke(app, ["check", str(run), "--baseline", str(baseline), *args])


def test_regression_in_the_bad_direction_fails(tmp_path):
    base = records(tmp_path / "base.csv")
    out = check(records(tmp_path / "run" / "records.csv", rate=0.30), base, "--tolerance", "0.05")
    assert out.exit_code == 1, out.output
    assert "regression" in out.output and "concept-rate" in out.output and "1 regression" in out.output
    worse_acc = check(records(tmp_path / "run2" / "records.csv", acc=0.70), base, "--tolerance", "0.05")
    assert worse_acc.exit_code == 1 and "attr-acc" in worse_acc.output  # higher is better: a drop regresses


def test_improvement_and_small_changes_pass(tmp_path):
    base = records(tmp_path / "base.csv")
    better = check(records(tmp_path / "run" / "records.csv", rate=0.02, acc=0.97), base, "--tolerance", "0.05")
    assert better.exit_code == 0, better.output
    assert "2 improvement" in better.output and "0 regression" in better.output
    small = check(records(tmp_path / "run2" / "records.csv", rate=0.13), base, "--tolerance", "0.05")
    assert small.exit_code == 0 and "0 regression" in small.output and "2 ok" in small.output


def test_standard_error_tolerance(tmp_path):
    base = records(tmp_path / "base.csv", rate_se=0.05)
    # se of each cell mean = max(within sqrt(3*0.05^2)/3, between) ~ 0.0289; of the difference ~ 0.0408
    assert check(records(tmp_path / "a" / "records.csv", rate=0.15, rate_se=0.05), base, "--tolerance",
                 "2se").exit_code == 0
    assert check(records(tmp_path / "b" / "records.csv", rate=0.25, rate_se=0.05), base, "--tolerance",
                 "2se").exit_code == 1
    # per-metric margins: the larger of several wins
    assert check(records(tmp_path / "b" / "records.csv", rate=0.25, rate_se=0.05), base, "--tolerance", "2se",
                 "--tolerance", "concept-rate=0.2").exit_code == 0


def test_missing_cells_fail_unless_allowed_and_update_writes_a_baseline(tmp_path):
    base = records(tmp_path / "base.csv")
    run = records(tmp_path / "run" / "records.csv", drop=("attr-acc",))
    out = check(run, base)
    assert out.exit_code == 1 and "missing" in out.output
    assert check(run, base, "--allow-missing").exit_code == 0
    new_base = tmp_path / "baselines" / "toy-ci.csv"
    upd = check(tmp_path / "run", new_base, "--update")
    assert upd.exit_code == 0 and new_base.exists()
    assert check(tmp_path / "run", new_base).exit_code == 0
    assert check(tmp_path / "run", new_base, "--tolerance", "fast").exit_code == 2
    assert check(tmp_path / "nowhere", new_base).exit_code == 2


def test_compare_verdicts_and_tolerance_parsing(tmp_path):
    assert parse_tolerances(None) == {None: Tolerance(k_se=2.0)}
    tol = parse_tolerances(["0.01", "fid=1.5", "fid=3se"])
    assert tol == {None: Tolerance(absolute=0.01), "fid": Tolerance(absolute=1.5, k_se=3.0)}
    assert tol["fid"].margin(1.0) == 3.0 and tol["fid"].margin(float("nan")) == 1.5
    with pytest.raises(ValueError, match=">= 0"):
        parse_tolerances(["-1"])
    base = read_table(records(tmp_path / "base.csv"))
    cur = read_table(records(tmp_path / "cur.csv", rate=0.5, seeds=(0,)))
    (rate, acc) = sorted(compare(cur, base, {None: Tolerance(absolute=0.05)}), key=lambda r: r["metric"])[::-1]
    assert rate["metric"] == "concept-rate" and rate["verdict"] == "regression"
    assert rate["delta"] == pytest.approx(0.5 - 0.1 - 0.001, abs=1e-9) and acc["verdict"] == "ok"
    assert math.isclose(rate["allowed"], 0.05)
