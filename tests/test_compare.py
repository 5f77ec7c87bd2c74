"""`bench compare`, the robustness summary in leaderboard.csv / `bench table` / the report, on results folders
built by hand (records.csv, run.json and a store holding each score's per-image values): two identical methods
differ by 0 with p = 1; a method whose curve is shifted later is found slower, with an interval excluding 0; bad
input exits 2 naming the problem."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from unlearn_bench.cli import app
from unlearn_bench.results import RECORD_COLUMNS
from unlearn_bench.store import Store

STEPS = [1, 2, 5, 10, 25, 50, 100]
BLANK = {c: "" for c in RECORD_COLUMNS} | {"metric_settings": "{}", "sampler": "ddim", "steps": 10}
N_IMAGES = 64


def onset(shift: float):
    """A relearning curve: the share of images showing the concept at step t, rising from 0 at `shift`."""
    return lambda t: float(np.clip((t - shift) / 20.0, 0.0, 1.0))


def make_run(folder: Path, curves: dict[str, object], seeds=(0, 1, 2), with_none: bool = True,
             attacks: bool = True, direction: str = "True") -> Path:
    """A results folder and its store: methods -> curve (share of concept images per step; step 0 = none rows).
    Each image keeps one uniform draw per seed, shared by every method: the same prompts and seeds (paired)."""
    store = Store(folder.parent / "store")
    rows = []
    methods = ({"none": lambda t: 1.0} if with_none else {}) | curves
    for seed in seeds:
        u = np.random.default_rng(seed).random(N_IMAGES)
        w = np.random.default_rng(100 + seed).random(N_IMAGES)
        for method, f in methods.items():
            states = [("none", 0)] + ([("ft", s) for s in STEPS] if attacks else [])
            for attack, step in states:
                p = f(step) if method != "none" else 1.0
                for metric, flags, hib in (("concept-rate", u < p, "False"), ("attr-acc", w < 0.9 - 0.2 * p, "True")):
                    per = [{"prompt": "a red circle", "correct" if hib == "True" else "concept": bool(x)}
                           for x in flags]
                    value = float(np.mean(flags))

                    def write(tmp: Path, per=per, value=value) -> dict:
                        (tmp / "per_image.json").write_text(json.dumps(per))
                        return {"value": value, "stderr": 0.0, "n": N_IMAGES}

                    entry = store.get_or_compute("score", {"m": method, "a": attack, "s": step, "seed": seed,
                                                           "metric": metric, "f": folder.name}, write)
                    rows.append(BLANK | dict(suite="t", model="toy", concept="red", method=method, attack=attack,
                                     attack_step=step, metric=metric, seed=seed, value=value, stderr=0.0,
                                     n=N_IMAGES, higher_is_better=hib if metric == "attr-acc" else
                                     ("False" if direction == "True" else direction),
                                     cell_hash=entry.key, prompt_set=f"red:{metric}"))
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "records.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (folder / "run.json").write_text(json.dumps({"store": str(store.root), "plan": {
        "name": "t", "concept": {"name": "red", "metrics": ["concept-rate", "attr-acc"]}}}))
    return folder


def compare(folder: Path, *args: str) -> tuple[int, str, list[dict]]:
    out = folder / "compare.csv"
    result = CliRunner().invoke(app, ["compare", str(folder), *args, "--csv", str(out), "--n-boot", "400",
                                      "--n-perm", "400"])
    rows = list(csv.DictReader(out.open())) if out.exists() and result.exit_code == 0 else []
    return result.exit_code, result.output, rows


def pick(rows: list[dict], quantity: str, attack: str = "ft", metric: str = "concept-rate") -> dict:
    return next(r for r in rows if r["quantity"] == quantity and r["attack"] == attack and r["metric"] == metric)


def test_compare_of_two_identical_methods_is_zero_with_p_one(tmp_path):
    folder = make_run(tmp_path / "run", {"esd": onset(3), "esd-copy": onset(3)})
    code, output, rows = compare(folder, "esd", "esd-copy")
    assert code == 0, output
    for quantity in ("relearn-steps", "relearn-auc", "step 10"):
        r = pick(rows, quantity)
        assert float(r["diff"]) == 0.0 and float(r["lo"]) <= 0.0 <= float(r["hi"])
        assert float(r["p"]) == pytest.approx(1.0)
    assert pick(rows, "attr-acc@relearn", metric="attr-acc")["diff"] in ("0", "0.0")
    assert "seeds+images" in output  # per-image values came from the store


def test_compare_finds_a_curve_shifted_ten_steps_later(tmp_path):
    folder = make_run(tmp_path / "run", {"esd": onset(3), "esd+meta": onset(13)})
    code, output, rows = compare(folder, "esd", "esd+meta")
    assert code == 0, output
    steps = pick(rows, "relearn-steps")
    # true crossing of half the base (1.0): step 13 for esd, 23 for esd+meta
    assert float(steps["a"]) == pytest.approx(13, abs=3) and float(steps["b"]) == pytest.approx(23, abs=3)
    assert float(steps["diff"]) == pytest.approx(10, abs=3)
    assert float(steps["lo"]) > 0 and float(steps["p"]) < 0.05 and steps["favours"] == "esd+meta"
    auc = pick(rows, "relearn-auc")
    assert float(auc["diff"]) < 0 and float(auc["hi"]) < 0 and auc["favours"] == "esd+meta"
    # at step 10 esd shows the concept in ~35% of images, esd+meta in none; at step 100 both in all
    assert float(pick(rows, "step 10")["diff"]) == pytest.approx(-0.35, abs=0.15)
    assert float(pick(rows, "step 100")["diff"]) == 0.0


def test_summary_leads_leaderboard_and_bench_table(tmp_path):
    from unlearn_bench.results import write_leaderboard

    folder = make_run(tmp_path / "run", {"esd": onset(3), "esd+meta": onset(13)})
    write_leaderboard(folder)
    header = (folder / "leaderboard.csv").read_text().splitlines()[0].split(",")
    assert header[1:5] == ["ft/relearn-steps", "ft/relearn-steps lo", "ft/relearn-steps hi",
                           "ft/relearn-steps censored"]
    assert header.index("ft/relearn-auc") < header.index("none@0/concept-rate")
    summary = list(csv.DictReader((folder / "robustness.csv").open()))
    row = next(r for r in summary if r["method"] == "esd+meta" and r["score"] == "relearn-steps")
    assert float(row["value"]) == pytest.approx(23, abs=3)
    assert (row["fraction"], row["threshold"], row["resample"], row["steps"]) == ("0.5", "0.5", "seeds+images",
                                                                                 "0 1 2 5 10 25 50 100")
    assert row["definition"].startswith("first attack step")
    table = CliRunner().invoke(app, ["table", str(folder)])
    assert table.exit_code == 0, table.output
    first = table.output.splitlines()[0]
    assert first.startswith("| method | ft relearn-steps | ft relearn-auc")


def test_censored_steps_read_as_beyond_the_last_step(tmp_path):
    folder = make_run(tmp_path / "run", {"esd": onset(3), "never": lambda t: 0.0})
    code, output, rows = compare(folder, "esd", "never")
    assert code == 0, output
    assert "| > 100 |" in output
    from unlearn_bench.results import write_leaderboard

    write_leaderboard(folder)
    table = CliRunner().invoke(app, ["table", str(folder)]).output
    assert table.splitlines()[4].startswith("| never | > 100 |")


def test_report_has_the_robustness_table_and_forest_plot(tmp_path):
    folder = make_run(tmp_path / "run", {"esd": onset(3), "esd+meta": onset(13)})
    result = CliRunner().invoke(app, ["report", str(folder)])
    assert result.exit_code == 0, result.output
    page = (folder / "report.html").read_text()
    assert "id='robustness'" in page and 'alt="forest plot"' in page and "<script" not in page
    assert (folder / "report-forest.png").stat().st_size > 1000
    assert page.count('class="rr"') == 3  # a sortable row per method (none, esd, esd+meta)


@pytest.mark.parametrize(("case", "args", "message"), [
    ("unknown-method", ["esd", "esdd"], "unknown method 'esdd'"),
    ("same-method", ["esd", "esd"], "two different methods"),
    ("no-attack", ["esd", "esd+meta"], "no relearning attack"),
    ("no-direction", ["esd", "esd+meta"], "has no direction"),
    ("no-base", ["esd", "esd+meta"], "no base model rows"),
    ("bad-fraction", ["esd", "esd+meta", "--fraction", "2"], "fraction 2.0"),
])
def test_bad_input_exits_2_with_the_reason(tmp_path, case, args, message):
    folder = make_run(tmp_path / "run", {"esd": onset(3), "esd+meta": onset(13)}, seeds=(0,),
                      attacks=case != "no-attack", with_none=case != "no-base",
                      direction="" if case == "no-direction" else "True")
    result = CliRunner().invoke(app, ["compare", str(folder), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    if case == "unknown-method":
        assert "did you mean esd" in result.output


def test_bench_help_does_not_import_torch_or_numpy_heavy_modules():
    import subprocess
    import sys

    code = ("import sys; from unlearn_bench.cli import app; "
            "print(any(m in sys.modules for m in ('torch', 'unlearn_bench.robustness', 'pandas')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
