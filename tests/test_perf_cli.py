"""`bench perf` on CPU: it runs on the tiny and toy models, prints what it measured and on what, its reference ESD
loop computes the harness's losses, and the toy model (no VAE) compares against diffusers' pipeline too.
Speeds are printed, never asserted."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from unlearn_bench.cli import app

FAST = ["--iters", "1", "--batch-sizes", "2", "--steps", "2", "--threads", "1", "--set", "method.esd.batch_size=2",
        "--set", "method.esd.ddim_steps=4"]


def invoke(*args: str):
    return CliRunner().invoke(app, ["perf", *args])


@pytest.mark.parametrize("model", ["toy", "tiny"])
def test_perf_prints_harness_reference_and_diffusers_rows_on_cpu(model, torch_single_thread):
    result = invoke("--model", model, *FAST)
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"model {model} on cpu" in out and "1 CPU thread(s)" in out
    assert "batch 2, ddim_steps 4" in out  # --set reaches the measured ESD
    assert re.search(r"^\s+harness fp32\s+[\d.e+-]+\s", out, re.M)  # what a CPU runs: fp32, not bf16
    assert re.search(r"^\s+reference fp32\s+[\d.e+-]+\s", out, re.M)
    assert "bf16" not in out.split("Columns:")[0]  # no CPU bf16 row: it would only measure slow CPU autocast
    row = re.search(r"^\s+2\s+([\d.e+-]+)\s+([\d.e+-]+)\s+([\d.e+-]+)x\s+(\d+)$", out, re.M)
    assert row, out  # the batch-2 generation row: harness img/s, diffusers img/s, ratio, max pixel diff
    assert int(row.group(4)) <= 1  # same noise, scheduler and guidance: the same images
    for column in ("harness ", "reference ", "vs ref ", "loss diff ", "peak GiB ", "ratio "):
        assert f"  {column}" in out.split("Columns:")[1]
    assert max(len(line) for line in out.splitlines()) <= 80


def test_perf_json_reference_loop_computes_the_harness_losses(torch_single_thread):
    result = invoke("--model", "tiny", "--iters", "2", "--batch-sizes", "1", "--steps", "2", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["setup"]["device"] == "cpu" and data["setup"]["precision"] == "fp32"
    assert data["setup"]["threads"] >= 1 and data["setup"]["model"] == "tiny"
    loops = {r["loop"]: r for r in data["esd"]}
    assert set(loops) == {"harness fp32", "reference fp32"}
    # same seed, step k, noise and starting weights: the plain loop from Eq. 7 and the harness agree every step
    assert loops["harness fp32"]["loss_rel_diff"] <= 1e-4
    assert loops["harness fp32"]["it_per_s"] > 0 and loops["harness fp32"]["peak_gb"] is None
    assert [r["batch"] for r in data["sampling"]] == [1] and data["sampling"][0]["max_pixel_diff"] <= 1


def test_toy_sampler_matches_diffusers_pipeline_without_a_vae(registry, torch_single_thread):
    """The toy's codec is not a VAE (it has no .vae): the comparison runs the pipeline to latents and decodes
    them with the toy codec, instead of failing with AttributeError."""
    from unlearn_bench.models.loading import load_model
    from unlearn_bench.perf import time_sampling

    toy = load_model(registry.model("toy"), "cpu")
    assert not hasattr(toy.codec, "vae")
    result = time_sampling(toy, batch=2, steps=3, guidance=3.0)
    assert result["max_pixel_diff"] <= 1.0
    assert result["ours_img_per_s"] > 0 and result["diffusers_img_per_s"] > 0


@pytest.mark.parametrize(("args", "needle"), [
    (["--model", "toyy"], "did you mean toy"),
    (["--device", "tpu"], "allowed: cpu, cuda"),
    (["--batch-sizes", "0,2"], "--batch-sizes"),
    (["--batch-sizes", "a"], "--batch-sizes"),
    (["--iters", "0"], "--iters 0"),
    (["--device", "cuda"], None),
], ids=["model", "device", "batch-zero", "batch-word", "iters", "cuda-absent"])
def test_perf_bad_input_exits_2(args, needle):
    import torch

    if args == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert (needle or "CUDA is not available") in result.output


def test_perf_bad_option_exits_2_before_torch_loads():
    import subprocess
    import sys

    code = ("import sys; from unlearn_bench.cli import app\n"
            "try:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('TORCH' if 'torch' in sys.modules else 'NOTORCH', file=sys.stderr); raise\n")
    proc = subprocess.run([sys.executable, "-c", code, "perf", "--model", "tiny", "--batch-sizes", "1,x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--batch-sizes" in proc.stderr and "NOTORCH" in proc.stderr, proc.stderr
