"""A results folder stands alone: `bench report` works on a copy of it on a machine without the store (grids from
the PNGs saved beside records.csv, and the report says so), and run.json keeps the provenance of the run that
computed the results when a cached re-run writes the folder again (history in `runs`; a changed plan resets it)."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from unlearn_bench.cli import app
from unlearn_bench.results import merge_run_json, plan_digest

COMMITTED = Path(__file__).resolve().parent.parent / "results" / "toy"
# the cheapest run that samples and scores (one state, one image per prompt)
TINY = ["run", "--model", "tiny", "--concept", "nudity", "--methods", "none", "--attacks", "none",
        "--metrics", "nudenet", "--set", "model.tiny.images_per_prompt=1", "--quiet"]


def embedded_pngs(page: str) -> dict[str, bytes]:
    """alt text -> the PNG bytes of every inlined image of a report page."""
    return {alt: base64.b64decode(data) for alt, data in
            re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)">', page)}


def report(folder: Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["report", str(folder)])
    page = (folder / "report.html").read_text() if (folder / "report.html").exists() else ""
    return result.exit_code, result.output, page


@pytest.fixture
def committed_copy(tmp_path, monkeypatch):
    """results/toy copied into an empty folder on "another machine": the store run.json names does not exist,
    BENCH_CACHE is empty and there is no .store beside the folder."""
    if not (COMMITTED / "records.csv").exists():
        pytest.skip("results/toy is not in this checkout")
    folder = tmp_path / "elsewhere" / "toy"
    shutil.copytree(COMMITTED, folder, ignore=shutil.ignore_patterns("report.html"))
    run = json.loads((folder / "run.json").read_text())
    # every store run.json names (the latest run's and each run's in its history, which a local `make run` adds)
    # is the other machine's, absent here
    run["store"] = str(tmp_path / "the-other-machines-store")
    for entry in run.get("runs", []):
        entry["store"] = run["store"]
    (folder / "run.json").write_text(json.dumps(run))
    (tmp_path / "empty-cache").mkdir()
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "empty-cache"))
    return folder


@pytest.mark.parametrize("figures_record", [True, False], ids=["with-figures-record", "saved-before-the-record"])
def test_committed_toy_folder_reports_from_its_own_files_without_a_store(committed_copy, figures_record):
    if not figures_record:  # a folder saved before report-figures.json existed: grids shown, flagged as unchecked
        (committed_copy / "report-figures.json").unlink()
    grids = sorted(committed_copy.glob("report-grid-*.png"))
    assert grids, "results/toy should hold its image grids (report-grid-*.png)"
    saved = {p.name: p.read_bytes() for p in grids}
    records = (committed_copy / "records.csv").read_bytes()
    code, output, page = report(committed_copy)
    assert code == 0, output
    assert "Traceback" not in output
    images = embedded_pngs(page)
    for name, data in saved.items():  # each saved grid is in the page, byte for byte, and left as it was
        method = name.removeprefix("report-grid-").removesuffix(".png")
        assert images.get(f"grid {method}") == data, name
        assert (committed_copy / name).read_bytes() == data
    assert any(alt.startswith("curve ") for alt in images)  # curves are drawn from records.csv
    assert "<h2 id='board'>Leaderboard</h2>" in page and "concept-rate" in page and "lower is better" in page
    assert "No stored images found" not in page and "No image grids" not in page
    if figures_record:
        assert "saved in the folder (report-grid-esd.png, " in page and "shows the images records.csv names" in page
    else:
        assert "saved in the folder (report-grid-esd.png) before report-figures.json recorded" in page
    assert "saved in the folder" in output
    assert "the-other-machines-store" in page  # where it looked is stated
    assert (committed_copy / "records.csv").read_bytes() == records


def test_report_without_store_or_saved_grids_names_both_places(committed_copy, tmp_path):
    for p in committed_copy.glob("report-grid-*.png"):
        p.unlink()
    code, output, page = report(committed_copy)
    assert code == 0 and "Traceback" not in output
    message = re.search(r"No image grids: [^<]*", page)
    assert message, page[-2000:]
    text = message.group(0)
    assert str(tmp_path / "the-other-machines-store") in text and str(tmp_path / "empty-cache") in text
    assert str(committed_copy) in text and "report-grid-*.png" in text and "No image grids" in output
    assert "<h2 id='board'>Leaderboard</h2>" in page  # the rest of the report is still there


@pytest.fixture(scope="module")
def history(tmp_path_factory, torch_single_thread):
    """The same tiny run twice into one folder (computed, then cached), a report while the store exists, a copy
    of the folder at that point, then a run with another plan (seed 1) into the same folder."""
    root = tmp_path_factory.mktemp("standalone")
    out, store = root / "out", root / "store"

    def run(*extra: str) -> dict:
        result = CliRunner().invoke(app, [*TINY, "--out", str(out), "--store", str(store), *extra])
        assert result.exit_code == 0, result.output
        return json.loads((out / "run.json").read_text())

    first = run("--seeds", "0")
    second = run("--seeds", "0")
    code, output, _ = report(out)
    assert code == 0, output
    shutil.copytree(out, root / "moved" / "out")
    changed = run("--seeds", "1")
    return {"root": root, "first": first, "second": second, "changed": changed}


def test_cached_rerun_is_added_and_the_computing_run_stays_on_top(history):
    first, second = history["first"], history["second"]
    assert len(first["runs"]) == 1 and first["stages"]["computed"] > 0
    assert first["provenance_of"]["run_id"] == first["run_id"] == first["runs"][0]["run_id"]
    assert len(second["runs"]) == 2
    rerun = second["runs"][1]
    assert rerun["run_id"] != first["run_id"] and rerun["stages"]["computed"] == 0 and rerun["stages"]["cached"] > 0
    assert rerun["status"] == "complete" and rerun["argv"] and rerun["git"]["commit"] and rerun["finished_at"]
    spent = first["compute_seconds"]  # where the computing run's time went, by stage kind, largest first
    assert {"generate", "score"} <= set(spent) and all(v >= 0 for v in spent.values())
    assert list(spent.values()) == sorted(spent.values(), reverse=True)
    assert rerun["compute_seconds"] == {}  # a cached re-run computed nothing
    assert second["runs"][0] == first["runs"][0]  # the computing run's record is never rewritten
    for key in ("run_id", "stages", "seconds", "store_keys", "git", "device", "argv", "status"):
        assert second[key] == first[key], key  # the top level still describes the run that computed the results
    assert second["provenance_of"]["run_id"] == first["run_id"] and "computed" in second["provenance_of"]["why"]
    assert "history_reset" not in second


def test_changed_plan_starts_a_fresh_history_and_says_so(history):
    first, second, changed = history["first"], history["second"], history["changed"]
    assert [r["run_id"] for r in changed["runs"]] == [changed["run_id"]]
    assert changed["plan"]["seeds"] == [1] and changed["stages"]["computed"] > 0
    reset = changed["history_reset"]
    assert "plan changed" in reset["reason"]
    assert reset["previous_runs"] == [r["run_id"] for r in second["runs"]]
    assert reset["previous_plan_digest"] == first["plan_digest"] != changed["plan_digest"]


def test_folder_reports_after_its_store_is_gone(history, monkeypatch, tmp_path):
    """A report made with the store saves the grids and what they show; without the store, the copy reports them,
    prompts included, and warns when they no longer match records.csv."""
    moved = history["root"] / "moved" / "out"
    figures = json.loads((moved / "report-figures.json").read_text())
    rows = figures["grids"]["none"]["rows"]
    assert rows and figures["grids"]["none"]["columns"] and (moved / "report-grid-none.png").is_file()
    shutil.rmtree(history["root"] / "store")
    (tmp_path / "cache").mkdir()
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    saved = (moved / "report-grid-none.png").read_bytes()
    code, output, page = report(moved)
    assert code == 0, output
    assert embedded_pngs(page)["grid none"] == saved
    assert "shows the images records.csv names" in page and figures["grids"]["none"]["columns"][0][:40] in page
    assert "NudeNet per-class counts" in page and "folder (report-figures.json)" in page  # from the score manifests
    # a grid saved for other images than records.csv names now is still shown, with a warning
    figures["grids"]["none"]["rows"] = [[label, "0" * 24] for label, _ in rows]
    (moved / "report-figures.json").write_text(json.dumps(figures))
    code, output, page = report(moved)
    assert code == 0 and "may be out of date" in page and embedded_pngs(page)["grid none"] == saved


PLAN = {"name": "p", "seeds": [0], "methods": [{"name": "esd"}], "catalogue": [{"kind": "file", "source": "/a/r.yaml"}],
        "prompt_sources": {"target": {"name": "t", "source": "/a/t.csv", "sha256": "ab"}}}


def info(run_id: str, computed: int | None, plan: dict | None = None) -> dict:
    """One run's record as `bench run` writes it: at its start (computed None: running) or at its end."""
    out = {"plan": plan or PLAN, "prompts_seeds_hash": "h", "run_id": run_id, "git": {"commit": run_id},
           "status": "running", "store": f"/stores/{run_id}"}
    if computed is not None:
        out |= {"status": "complete", "stages": {"cached": 5 - computed, "computed": computed}, "seconds": 1.0,
                "failures": [], "store_keys": {"score": [run_id]}}
    return out


def test_plan_identity_ignores_where_the_catalogue_and_prompt_files_were_read_from():
    moved = PLAN | {"catalogue": [{"kind": "file", "source": "/b/r.yaml"}],
                    "prompt_sources": {"target": {"name": "t", "source": "/b/t.csv", "sha256": "ab"}}}
    assert plan_digest(moved) == plan_digest(PLAN)
    assert plan_digest(PLAN | {"seeds": [0, 1]}) != plan_digest(PLAN)
    other_file = PLAN | {"prompt_sources": {"target": {"name": "t", "source": "/a/t.csv", "sha256": "cd"}}}
    assert plan_digest(other_file) != plan_digest(PLAN)


def test_killed_run_is_kept_and_the_run_that_finished_the_work_is_on_top():
    doc = merge_run_json(None, info("a", None), "t0")
    assert doc["provenance_of"]["run_id"] == "a" and doc["status"] == "running"
    doc = merge_run_json(doc, info("b", None), "t1")  # "a" was killed: no end record
    assert [r["status"] for r in doc["runs"]] == ["did not finish (no end record)", "running"]
    doc = merge_run_json(doc, info("b", 3), "t2")
    assert doc["provenance_of"]["run_id"] == "b" and doc["store_keys"] == {"score": ["b"]}
    assert doc["runs"][1]["started_at"] == "t1" and doc["runs"][1]["finished_at"] == "t2"
    doc = merge_run_json(doc, info("c", None), "t3")
    doc = merge_run_json(doc, info("c", 0), "t4")
    assert doc["provenance_of"]["run_id"] == "b" and doc["git"] == {"commit": "b"} and doc["store"] == "/stores/b"
    assert [r["run_id"] for r in doc["runs"]] == ["a", "b", "c"] and doc["runs"][2]["failed_cells"] == 0


def test_run_json_written_before_histories_becomes_the_first_entry_with_a_caveat():
    legacy = {k: v for k, v in info("x", 0).items() if k != "run_id"}
    doc = merge_run_json(legacy, info("d", None), "t1")
    assert [r["run_id"] for r in doc["runs"]] == ["unrecorded", "d"] and "cached re-run" in doc["runs"][0]["note"]
    assert doc["provenance_of"]["run_id"] == "unrecorded" and doc["store_keys"] == {"score": ["x"]}
    fresh = merge_run_json({}, info("e", 1), "t2")  # present but unreadable
    assert [r["run_id"] for r in fresh["runs"]] == ["e"] and "could not be read" in fresh["history_reset"]["reason"]


def test_saved_rewrites_are_used_only_for_cells_records_csv_has(tmp_path):
    import pandas as pd

    from unlearn_bench.report_sources import resolve_rewrites

    df = pd.DataFrame({"method": ["esd"], "attack": ["unlearndiffatk"], "seed": [0]})
    row = {"method": "esd", "attack": "unlearndiffatk", "seed": 0, "prompt": "p", "rewrite": "x p",
           "pre_success": False, "success": True, "timestep": 3, "truncated_tokens": 0}
    pd.DataFrame([row]).to_csv(tmp_path / "report-rewrites.csv", index=False)
    found, source = resolve_rewrites([], tmp_path, df)
    assert source == "folder (report-rewrites.csv)" and found[0]["success"] is True
    assert found[0]["pre_success"] is False and found[0]["rewrite"] == "x p"
    pd.DataFrame([row | {"seed": 7}]).to_csv(tmp_path / "report-rewrites.csv", index=False)
    found, source = resolve_rewrites([], tmp_path, df)
    assert found == [] and "stale" in source


def test_run_json_records_the_code_version_read_before_the_run_writes_its_outputs(tmp_path, monkeypatch):
    """The default out folder (results/toy) is tracked, so a run rewrites tracked files; a git status read after
    that would call a clean checkout dirty. run.json and the store must carry the one reading taken at the start."""
    import unlearn_bench.results as results

    readings = iter([{"commit": "c0ffee", "dirty": False}])
    monkeypatch.setattr(results, "code_version", lambda: next(readings, {"commit": "c0ffee", "dirty": True}))
    out, store = tmp_path / "out", tmp_path / "store"
    result = CliRunner().invoke(app, [*TINY, "--out", str(out), "--store", str(store)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["git"] == {"commit": "c0ffee", "dirty": False}
    versions = {json.loads(p.read_text()).get("code_version") for p in store.rglob("manifest.json")}
    assert versions == {"c0ffee"}
