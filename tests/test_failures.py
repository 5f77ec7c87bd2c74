"""Finite or failed: a diverged or crashing cell is reported as failed, never as a number, and the rest go on."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

NAN_RUN = ["run", "--model", "tiny", "--concept", "nudity", "--methods", "none,esd", "--attacks", "none,ft-lr1e-5",
           "--metrics", "nudenet", "--seeds", "0", "--set", "method.esd.lr=1e10", "--quiet"]


def bench(args: list[str], store: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"BENCH_CACHE": str(store), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "unlearn_bench", *args], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("nan")
    proc = bench([*NAN_RUN, "--out", str(root / "out")], root / "store")
    return root, proc


def test_diverged_method_fails_its_cells_and_leaves_no_row(nan_run):
    root, proc = nan_run
    assert proc.returncode == 3, proc.stderr  # EXIT_FAILED_CELLS
    assert "Traceback" not in proc.stderr
    rows = list(csv.DictReader((root / "out" / "records.csv").open()))
    assert rows and {r["method"] for r in rows} == {"none"}  # the healthy cells are all there
    assert {(r["attack"], r["attack_step"]) for r in rows} == {("none", "0"), ("ft-lr1e-5", "2"), ("ft-lr1e-5", "4")}
    assert all(math.isfinite(float(r["value"])) for r in rows)
    run = json.loads((root / "out" / "run.json").read_text())
    assert run["status"] == "failed cells"
    failed = {(f["method"], f["attack"]) for f in run["failures"]}
    assert failed == {("esd", "none"), ("esd", "ft-lr1e-5")}
    for f in run["failures"]:
        assert f["stage"] == "unlearn" and "non-finite loss" in f["reason"] and "at step" in f["reason"]
        assert "unlearn esd" in f["reason"] and "tensors" in f["reason"]  # component, step and parameter set
    assert "FAILED" in proc.stderr and "esd x none seed 0" in proc.stderr
    board = list(csv.DictReader((root / "out" / "leaderboard.csv").open()))
    assert [r["method"] for r in board] == ["none"]
    store = root / "store"
    assert not list(store.glob("unlearn/*/*/manifest.json"))  # nothing stored for the diverged stage
    assert not [p for p in (store / "tmp").glob("*") if p.is_dir()] if (store / "tmp").exists() else True


def test_rerun_retries_only_the_failed_cells(nan_run, tmp_path):
    root, _ = nan_run
    again = bench([*NAN_RUN, "--out", str(tmp_path / "out")], root / "store")
    assert again.returncode == 3
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["stages"]["computed"] == 0 and run["stages"]["cached"] > 0  # healthy cells came from the store
    assert len(run["failures"]) == 2  # the failed unlearning was tried again (and failed again)
    assert (tmp_path / "out" / "records.csv").read_text() == (root / "out" / "records.csv").read_text()


def test_train_names_component_parameter_set_and_step(tiny_model, registry):
    from unlearn_bench.finite import NonFinite
    from unlearn_bench.methods_runtime import run_method

    spec = registry.method("esd", tiny_model.spec)
    from dataclasses import replace

    from unlearn_bench.specs import params

    spec = replace(spec, params=params(dict(spec.params) | {"lr": 1e10, "iterations": 4}))
    try:
        with pytest.raises(NonFinite) as err:
            run_method(tiny_model, spec, registry.concept("nudity"), 0)
    finally:
        tiny_model.reset()
    msg = str(err.value)
    assert msg.startswith("unlearn esd: non-finite loss") and "at step" in msg and "tensors: unet." in msg
    assert err.value.step is not None and 1 <= err.value.step <= 4


def test_meta_inner_loop_divergence_is_caught(tiny_model, registry):
    """+meta's simulated attack has its own optimiser: its divergence is caught there, named as such."""
    from dataclasses import replace

    import numpy as np

    from unlearn_bench.data import ImageSet
    from unlearn_bench.finite import NonFinite
    from unlearn_bench.methods_runtime import build_method, run_method
    from unlearn_bench.specs import params

    spec = registry.method("esd+meta", tiny_model.spec)
    meta = replace(spec.wrappers[0], params=params(dict(spec.wrappers[0].params) | {"inner_lr": 1e30}))
    spec = replace(spec, wrappers=(meta,))
    concept = registry.concept("nudity")
    requests = build_method(spec, concept).data_requests()
    data = {role: ImageSet(np.full((req.n_images, 32, 32, 3), 128, np.uint8), req.captions())
            for role, req in requests.items()}
    try:
        with pytest.raises(NonFinite) as err:
            run_method(tiny_model, spec, concept, 0, data=data)
    finally:
        tiny_model.reset()
    assert "non-finite" in str(err.value)


def test_nan_weights_never_become_images(tiny_model):
    import torch

    from unlearn_bench.finite import NonFinite

    tiny_model.snapshot()
    p = next(iter(tiny_model.unet.parameters()))
    try:
        with torch.no_grad():
            p.fill_(float("nan"))
        with pytest.raises(NonFinite, match="latents"):
            tiny_model.sample(["a photo"], [0])
    finally:
        tiny_model.reset()
    assert tiny_model.sample(["a photo"], [0]).shape[0] == 1  # restored weights sample again


def test_check_tensors_names_the_bad_tensor():
    import torch

    from unlearn_bench.finite import NonFinite, check_tensors, check_value

    check_tensors({"a": torch.ones(2), "ids": torch.tensor([1, 2])}, "x")  # finite and integer tensors pass
    with pytest.raises(NonFinite, match=r"attack ft: non-finite checkpoint weights at step 3 \(1 tensors: unet.b\)"):
        check_tensors({"unet.a": torch.ones(2), "unet.b": torch.tensor([1.0, float("inf")])}, "attack ft",
                      "checkpoint weights", 3)
    with pytest.raises(NonFinite, match="metric m: non-finite value"):
        check_value(float("nan"), "metric m")


def test_one_crashing_cell_does_not_stop_the_matrix(tmp_path, registry, monkeypatch):
    """An ordinary exception (not a NaN) inside one stage: that cell fails with its reason, the others finish,
    records.csv holds them, run.json lists the failure."""
    from unlearn_bench import runner as runner_mod
    from unlearn_bench.execute import execute
    from unlearn_bench.plan import make_plan, request_from

    original = runner_mod.Runner.generate

    def flaky(self, state, scope, seed):
        if state.attack == "ft-lr1e-5" and state.step == 4:
            raise OSError("disk full (simulated)")
        return original(self, state, scope, seed)

    monkeypatch.setattr(runner_mod.Runner, "generate", flaky)
    req = request_from(registry, None, "tiny", "nudity", "none", "none,ft-lr1e-5", "nudenet", "0")
    outcome = execute(make_plan(registry, req), tmp_path / "out", tmp_path / "store", device="cpu", quiet=True)
    assert [(f["method"], f["attack"], f["stage"]) for f in outcome.failures] == [("none", "ft-lr1e-5", "setup")]
    assert "disk full (simulated)" in outcome.failures[0]["reason"]
    rows = list(csv.DictReader((tmp_path / "out" / "records.csv").open()))
    assert {(r["attack"], r["attack_step"]) for r in rows} == {("none", "0")}  # no partial curve of the failed cell
    assert json.loads((tmp_path / "out" / "run.json").read_text())["failures"] == outcome.failures


def test_toy_esd_at_an_absurd_lr_fails_instead_of_erasing(registry, torch_single_thread):
    """The same divergence on the shipped toy model (its scaled ESD-x defaults): a NonFinite naming the step and
    the cross-attention parameters, never a model that reads as a perfect erasure."""
    from dataclasses import replace

    from unlearn_bench.compat import ensure_torchvision_importable
    from unlearn_bench.finite import NonFinite
    from unlearn_bench.methods_runtime import run_method
    from unlearn_bench.models.loading import load_model
    from unlearn_bench.specs import params

    ensure_torchvision_importable()
    toy = load_model(registry.model("toy"), "cpu")
    spec = registry.method("esd", toy.spec)
    spec = replace(spec, params=params(dict(spec.params) | {"lr": 1e10}))
    with pytest.raises(NonFinite) as err:
        run_method(toy, spec, registry.concept("red"), 0)
    assert "attn2" in str(err.value) and err.value.step is not None and err.value.step < 200
