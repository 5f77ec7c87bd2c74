"""`bench export`: a state the harness evaluated, written as a diffusers folder, holds exactly the weights the runner
built for it (base + unlearn delta + attack checkpoint, LoRA merged), loads with diffusers, and bad input is exit 2."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from unlearn_bench.cli import app

# No `none` method: the base state is runner.model([]) (and fake_run below), and half the stages are saved.
RUN = ["run", "--model", "tiny", "--concept", "nudity", "--methods", "esd",
       "--attacks", "none,ft-lr1e-5,lora-r4,unlearndiffatk", "--metrics", "nudenet", "--seeds", "0",
       "--set", "model.tiny.images_per_prompt=1", "--quiet"]


def bench(*args: str, store: Path | None = None):
    env = {"BENCH_CACHE": str(store)} if store else None
    return CliRunner().invoke(app, list(args), env=env)


@pytest.fixture(scope="module")
def suite(tmp_path_factory, torch_single_thread):
    root = tmp_path_factory.mktemp("export")
    result = bench(*RUN, "--out", str(root / "out"), store=root / "store")
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def runner(suite):
    """The harness's own way to build a state (Runner.model), on the run's resolved plan."""
    from unlearn_bench.plan import Plan
    from unlearn_bench.runner import Runner
    from unlearn_bench.score import concept_from, model_from
    from unlearn_bench.store import Store

    plan_d = json.loads((suite / "out" / "run.json").read_text())["plan"]
    plan = Plan("t", model_from(plan_d["model"]), concept_from(plan_d["concept"]), [], [], [], [0])
    return Runner(plan, Store(suite / "store"))


def keys(suite: Path, method: str, attack: str, step: int) -> tuple[str, str]:
    rows = [r for r in csv.DictReader((suite / "out" / "records.csv").open())
            if (r["method"], r["attack"], r["attack_step"]) == (method, attack, str(step))]
    return rows[0]["unlearn_key"], rows[0]["attack_key"]


def harness_state(suite: Path, runner, method: str, attack: str, step: int) -> dict[str, dict]:
    """unet and text_encoder tensors of the state as the runner evaluated it (deltas read from the store)."""
    ukey, akey = keys(suite, method, attack, step) if method != "none" else ("", "")
    files = [runner.store.path("unlearn", ukey) / "delta.safetensors"] if ukey else []
    if akey and (runner.store.path("attack", akey) / f"step-{step}.safetensors").exists():
        files.append(runner.store.path("attack", akey) / f"step-{step}.safetensors")
    model = runner.model(files)
    return {c: {k: v.clone() for k, v in getattr(model, c).state_dict().items()} for c in ("unet", "text_encoder")}


def same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def load_pipeline(folder: Path) -> dict[str, dict]:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    return {c: getattr(pipe, c).state_dict() for c in ("unet", "text_encoder")}


def export(suite: Path, to: Path, *args: str, results: Path | None = None):
    return bench("export", str(results or suite / "out"), "--to", str(to), *args)


def fake_run(suite: Path, folder: Path, model: dict | None = None) -> Path:
    """A results folder whose only row is the base state (method none, no stage keys), optionally with another
    model in its plan: the export of an untouched model without running one."""
    folder.mkdir()
    run = json.loads((suite / "out" / "run.json").read_text())
    run["plan"]["model"] = model or run["plan"]["model"]
    (folder / "run.json").write_text(json.dumps(run))
    rows = list(csv.DictReader((suite / "out" / "records.csv").open()))
    with (folder / "records.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerow(rows[0] | {"method": "none", "unlearn_key": "", "attack_key": ""})
    return folder


def test_unlearned_export_loads_as_pipeline_with_the_runners_weights(suite, runner, tmp_path):
    result = export(suite, tmp_path / "esd", "--method", "esd")
    assert result.exit_code == 0, result.output
    assert "StableDiffusionPipeline.from_pretrained" in result.output
    loaded = load_pipeline(tmp_path / "esd")
    want, base = harness_state(suite, runner, "esd", "none", 0), harness_state(suite, runner, "none", "none", 0)
    assert same(loaded["unet"], want["unet"]) and same(loaded["text_encoder"], want["text_encoder"])
    assert not same(loaded["unet"], base["unet"])  # ESD-u changed the UNet...
    assert same(loaded["text_encoder"], base["text_encoder"])  # ...and nothing else
    info = json.loads((tmp_path / "esd" / "export.json").read_text())
    assert info["components_changed"] == ["unet"] and info["layout"] == "StableDiffusionPipeline"
    assert info["stage_keys"]["unlearn"] == keys(suite, "esd", "none", 0)[0] and info["stage_keys"]["attack"] is None
    assert info["base_model"]["name"] == "tiny" and info["state"] == {
        "method": "esd", "attack": "none", "step": 0, "seed": 0, "concept": "nudity"}
    from unlearn_bench.store import sha256_file

    weights = [f for f in info["files"] if f.endswith(".safetensors")]
    assert {f.split("/")[0] for f in weights} == {"unet", "text_encoder", "vae"}
    assert all(sha256_file(tmp_path / "esd" / f) == info["files"][f]["sha256"] for f in info["files"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temp dir was renamed away


def test_finetune_checkpoint_export_equals_the_attacked_state(suite, runner, tmp_path):
    result = export(suite, tmp_path / "ft", "--method", "esd", "--attack", "ft-lr1e-5", "--step", "2")
    assert result.exit_code == 0, result.output
    loaded = load_pipeline(tmp_path / "ft")
    assert same(loaded["unet"], harness_state(suite, runner, "esd", "ft-lr1e-5", 2)["unet"])
    assert not same(loaded["unet"], harness_state(suite, runner, "esd", "none", 0)["unet"])  # the attack applied
    info = json.loads((tmp_path / "ft" / "export.json").read_text())
    assert info["stage_keys"]["attack"] == keys(suite, "esd", "ft-lr1e-5", 2)[1] and info["state"]["step"] == 2


def test_lora_checkpoint_exports_merged_weights(suite, runner, tmp_path):
    result = export(suite, tmp_path / "lora", "--method", "esd", "--attack", "lora-r4", "--step", "4")
    assert result.exit_code == 0, result.output
    loaded = load_pipeline(tmp_path / "lora")
    want = harness_state(suite, runner, "esd", "lora-r4", 4)
    assert same(loaded["unet"], want["unet"])
    unlearned = harness_state(suite, runner, "esd", "none", 0)["unet"]
    moved = [k for k in unlearned if not (loaded["unet"][k] == unlearned[k]).all()]
    assert moved and all(".to_" in k for k in moved)  # only the adapted attention projections changed


def test_only_changed_writes_only_the_unet(suite, runner, tmp_path):
    from diffusers import UNet2DConditionModel

    result = export(suite, tmp_path / "u", "--method", "esd", "--attack", "ft-lr1e-5", "--step", "4",
                    "--only-changed")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "u").iterdir()) == ["README.md", "export.json", "unet"]
    unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "u"), subfolder="unet")
    assert same(unet.state_dict(), harness_state(suite, runner, "esd", "ft-lr1e-5", 4)["unet"])
    assert json.loads((tmp_path / "u" / "export.json").read_text())["components_written"] == ["unet"]


def test_prompt_attack_exports_unlearned_weights_and_its_prompts(suite, runner, tmp_path):
    result = export(suite, tmp_path / "p", "--method", "esd", "--attack", "unlearndiffatk")
    assert result.exit_code == 0, result.output
    assert same(load_pipeline(tmp_path / "p")["unet"], harness_state(suite, runner, "esd", "none", 0)["unet"])
    akey = keys(suite, "esd", "unlearndiffatk", 0)[1]
    stored = runner.store.path("attack", akey) / "prompts.json"
    assert (tmp_path / "p" / "prompts.json").read_bytes() == stored.read_bytes()
    assert json.loads(stored.read_text())["rewrites"] and "adversarial prompts" in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "esdd"], "--method 'esdd': not in"),
    (["--method", "none"], "Available: esd"),
    (["--method", "esd", "--attack", "ft-lr1e-4"], "Available: none, ft-lr1e-5, lora-r4, unlearndiffatk"),
    (["--method", "esd", "--attack", "ft-lr1e-5"], "several steps [2, 4]: pass --step"),
    (["--method", "esd", "--attack", "ft-lr1e-5", "--step", "3"], "--step 3: not in"),
    (["--method", "esd", "--seed", "1"], "--seed 1: not in"),
    (["--method", "esd", "--device", "gpu"], "--device 'gpu'"),
])
def test_bad_selection_is_exit_2_naming_value_and_choices(suite, tmp_path, args, message):
    result = export(suite, tmp_path / "x", *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "x").exists()


def test_missing_results_dir_and_missing_store_entry_are_exit_2(suite, tmp_path):
    result = bench("export", str(tmp_path / "nope"), "--method", "esd", "--to", str(tmp_path / "x"))
    assert result.exit_code == 2 and "no such directory" in result.output
    empty = tmp_path / "empty-store"
    result = export(suite, tmp_path / "x", "--method", "esd", "--store", str(empty))
    ukey = keys(suite, "esd", "none", 0)[0]
    assert result.exit_code == 2 and f"unlearn entry {ukey}" in result.output and str(empty) in result.output
    assert not (tmp_path / "x").exists() and not empty.exists()  # a lookup creates nothing


def test_destination_is_never_overwritten_without_force_and_force_replaces_only_an_export(suite, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    result = export(suite, other, "--method", "esd")
    assert result.exit_code == 2 and "exists and is not empty" in result.output
    result = export(suite, other, "--method", "esd", "--force")
    assert result.exit_code == 2 and "replaces only a previous export" in result.output
    assert (other / "keep.txt").read_text() == "mine"
    first = export(suite, tmp_path / "e", "--method", "esd", "--attack", "lora-r4", "--step", "2", "--only-changed")
    again = export(suite, tmp_path / "e", "--method", "esd", "--force")
    assert first.exit_code == 0 and again.exit_code == 0, again.output
    assert json.loads((tmp_path / "e" / "export.json").read_text())["state"]["attack"] == "none"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "other"]  # no temp or replaced folders left


def test_base_state_exports_the_base_model_but_not_with_only_changed(suite, runner, tmp_path):
    results = fake_run(suite, tmp_path / "run")
    result = export(suite, tmp_path / "b", "--method", "none", "--only-changed", results=results)
    assert result.exit_code == 2 and "nothing changed" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    result = export(suite, tmp_path / "b", "--method", "none", results=results)
    assert result.exit_code == 0, result.output
    loaded, base = load_pipeline(tmp_path / "b"), harness_state(suite, runner, "none", "none", 0)
    assert same(loaded["unet"], base["unet"]) and same(loaded["text_encoder"], base["text_encoder"])
    assert json.loads((tmp_path / "b" / "export.json").read_text())["components_changed"] == []


def test_a_failed_write_leaves_nothing_behind(suite, tmp_path, monkeypatch):
    import unlearn_bench.export as ex

    def broken(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(ex, "write_weights", broken)
    with pytest.raises(OSError, match="disk full"):
        ex.export_state(suite / "out", "esd", tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_toy_export_is_components_and_says_it_is_no_pipeline(suite, tmp_path, registry):
    """The toy model's base state, through a run folder whose plan names the toy model (no toy run needed)."""
    from unlearn_bench.specs import thaw

    out = fake_run(suite, tmp_path / "toyrun", thaw(registry.model("toy").__dict__))
    result = bench("export", str(out), "--method", "none", "--to", str(tmp_path / "toy"))
    assert result.exit_code == 0, result.output
    assert "not a StableDiffusionPipeline" in result.output
    folder = tmp_path / "toy"
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "export.json", "scheduler", "text_encoder", "tokenizer", "unet"]
    assert "NOT A StableDiffusionPipeline" in (folder / "README.md").read_text()
    info = json.loads((folder / "export.json").read_text())
    assert info["loadable_with"] is None and info["codec"]["name"] == "haar"
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from unlearn_bench.models.loading import load_model

    toy = load_model(registry.model("toy"))
    assert same(UNet2DConditionModel.from_pretrained(str(folder / "unet")).state_dict(), toy.unet.state_dict())
    assert isinstance(DDIMScheduler.from_pretrained(str(folder / "scheduler")), DDIMScheduler)  # the toy's sampler


def test_sdxl_model_is_written_as_an_xl_pipeline(tmp_path, torch_single_thread):
    """A tiny random SDXL pipeline behind the harness's SDXL wrapper: all components written, loadable, exact."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from unlearn_bench.export import changed_components, write_weights
    from unlearn_bench.models.sd import SDXLModel
    from unlearn_bench.models.tokenizer import load_clip_tokenizer
    from unlearn_bench.specs import ModelSpec

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, down_block_types=(
            "DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8, sample_size=32,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    cfg = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=49408, max_position_embeddings=16, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407, projection_dim=32)
    tok = load_clip_tokenizer(16)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(cfg),
                                     text_encoder_2=CLIPTextModelWithProjection(cfg), tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=EulerDiscreteScheduler())
    model = SDXLModel(ModelSpec(name="xl", kind="sdxl", defaults="sd", family="sdxl", resolution=32), pipe, "cpu")
    model.snapshot()
    with torch.no_grad():
        model.unet.conv_out.bias.add_(1.0)  # an "unlearned" UNet
    assert changed_components(model) == ["unet"]
    (tmp_path / "xl").mkdir()
    assert write_weights(model, tmp_path / "xl", None) == "StableDiffusionXLPipeline"
    loaded = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "xl"))
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        assert same(getattr(loaded, name).state_dict(), getattr(pipe, name).state_dict()), name


def test_a_cell_that_failed_in_the_run_is_exit_2_with_its_reason(suite, tmp_path):
    results = fake_run(suite, tmp_path / "run")
    run = json.loads((results / "run.json").read_text())
    run["failures"] = [{"seed": 0, "method": "uce", "attack": "none", "stage": "unlearn", "what": "unlearn uce",
                        "reason": "NonFinite: loss is nan"}]
    (results / "run.json").write_text(json.dumps(run))
    result = export(suite, tmp_path / "x", "--method", "uce", results=results)
    assert result.exit_code == 2 and "failed in this run" in result.output and "loss is nan" in result.output
