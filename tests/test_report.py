"""`bench report` and `bench score` on a tiny run (tiny model: images are noise, so only the plumbing is judged):
report.html holds the leaderboard table, a curve <img> and the image grids, all inlined; re-scoring reuses the
stored images, is a full cache hit when nothing changed, and adds one row per extra NudeNet threshold."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from unlearn_bench.cli import app

METRICS = ("nudenet",)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, torch_single_thread):
    from unlearn_bench.execute import execute
    from unlearn_bench.plan import RunRequest, make_plan
    from unlearn_bench.registry import Registry

    root = tmp_path_factory.mktemp("report")
    small = ["method.esd.iterations=2", "attack.ft-lr1e-5.n_images=2", "attack.ft-lr1e-5.batch_size=1",
             "attack.unlearndiffatk.timesteps=1", "attack.unlearndiffatk.iterations=1",
             "model.tiny.images_per_prompt=1"]  # the smallest run that still has curves over two seeds
    reg = Registry.load(None, small)
    attacks = ("none", "ft-lr1e-5", "unlearndiffatk")
    plan = make_plan(reg, RunRequest("tiny-report", "tiny", "nudity", ("none", "esd"), attacks, METRICS, (0, 1)))
    execute(plan, root / "out", root / "store", device="cpu", quiet=True)
    return root


def rows(path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def generate_entries(store) -> int:
    return len(list((store / "generate").rglob("manifest.json")))


def test_report_has_table_curves_and_grids(tiny_run):
    result = CliRunner().invoke(app, ["report", str(tiny_run / "out")])
    assert result.exit_code == 0, result.output
    page = (tiny_run / "out" / "report.html").read_text()
    assert "<table>" in page and "nudenet" in page and "ft-lr1e-5@4" in page and "lower is better" in page
    assert 'alt="curve nudenet" src="data:image/png;base64,' in page
    assert 'alt="grid none"' in page and 'alt="grid esd"' in page
    assert "Evaluation settings" in page and "Provenance" in page and "git commit" in page
    assert "NudeNet per-class counts" in page and "female breast" in page
    assert 'src="http' not in page and "<script" not in page  # self-contained, nothing fetched
    from PIL import Image

    for name in ("report-curve-nudenet.png", "report-grid-esd.png", "report-grid-none.png"):
        with Image.open(tiny_run / "out" / name) as im:
            assert im.format == "PNG" and im.size[0] > 200


def test_report_shows_the_prompt_attack_rewrites(tiny_run):
    result = CliRunner().invoke(app, ["report", str(tiny_run / "out")])
    assert result.exit_code == 0, result.output
    page = (tiny_run / "out" / "report.html").read_text()
    assert "Prompt attacks" in page and "ASR before" in page
    found = rows(tiny_run / "out" / "report-rewrites.csv")
    scored = [r for r in rows(tiny_run / "out" / "records.csv")
              if r["attack"] == "unlearndiffatk" and r["metric"] == "nudenet"]
    assert len(scored) == 4 and len(found) == sum(int(r["n"]) for r in scored)  # every target image, none dropped
    assert {r["method"] for r in found} == {"none", "esd"} and all(r["rewrite"] for r in found)
    for r in found:  # a prefix, then the prompt as the tokenizer decodes it (spacing aside; cut at the end when
        # the tiny tokenizer's length is reached)
        rewrite, prompt = ("".join(t.lower().split()) for t in (r["rewrite"], r["prompt"]))
        whole = int(r["truncated_tokens"]) == 0
        head = "".join(r["prompt"].lower().split()[:3])
        assert rewrite == prompt or (rewrite.endswith(prompt) if whole else head in rewrite)


def test_report_renders_in_headless_chromium(tiny_run, tmp_path):
    """The page as a browser draws it: a screenshot whose upper part holds the table and the inlined curve/grid
    images (many distinct colours), not a blank or broken page. Skipped where no Chromium is installed."""
    import shutil
    import subprocess

    import numpy as np
    from PIL import Image

    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome", "headless_shell")
                    if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no headless Chromium on this machine (install chromium to run the screenshot check)")
    page = tiny_run / "out" / "report.html"
    if not page.exists():
        assert CliRunner().invoke(app, ["report", str(tiny_run / "out")]).exit_code == 0
    shot = tmp_path / "report.png"
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--screenshot={shot}", "--window-size=1200,2400", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.exists(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2400, 1200)
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert colours > 500, f"only {colours} colours: the images did not render"
    assert (pixels < 128).any(axis=2).mean() > 0.01  # text, axes and images are drawn


def test_rescore_unchanged_metric_is_a_cache_hit(tiny_run):
    from unlearn_bench.registry import Registry
    from unlearn_bench.score import rescore

    before = (tiny_run / "out" / "records.csv").read_text()
    n_gen = generate_entries(tiny_run / "store")
    out = rescore(tiny_run / "out", Registry.load(), (), dest=tiny_run / "same")
    assert len(out) == len(rows(tiny_run / "out" / "records.csv"))
    assert (tiny_run / "same" / "records.csv").read_text() == before
    assert generate_entries(tiny_run / "store") == n_gen
    run = json.loads((tiny_run / "same" / "run.json").read_text())
    assert run["rescored"][-1]["stages"]["computed"] == 0


def test_rescore_with_extra_thresholds_adds_rows_without_generating(tiny_run):
    n_gen = generate_entries(tiny_run / "store")
    result = CliRunner().invoke(app, ["score", str(tiny_run / "out"), "--metrics", "nudenet", "--set",
                                      "metric.nudenet.thresholds=0.3,0.6", "--to", str(tiny_run / "thr"), "-q"])
    assert result.exit_code == 0, result.output
    old, new = rows(tiny_run / "out" / "records.csv"), rows(tiny_run / "thr" / "records.csv")
    assert len(new) == 3 * len(old) and generate_entries(tiny_run / "store") == n_gen
    assert [r["metric"] for r in new[:3]] == ["nudenet", "nudenet@0.3", "nudenet@0.6"]
    assert {r["images_key"] for r in new} == {r["images_key"] for r in old}
    assert json.loads(new[1]["metric_settings"])["threshold"] == 0.3
    board = (tiny_run / "thr" / "leaderboard.csv").read_text()
    assert "ft-lr1e-5@4/nudenet@0.6" in board
    # images of another scope were never generated: a clear error, nothing written
    bad = CliRunner().invoke(app, ["score", str(tiny_run / "out"), "--set", "metric.nudenet.scope=benign",
                                   "--to", str(tiny_run / "bad")])
    assert bad.exit_code == 2 and "generated only ['target']" in bad.output
    assert not (tiny_run / "bad" / "records.csv").exists()
