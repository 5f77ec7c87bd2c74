"""External unlearned models as methods (`--methods LABEL=path:PATH`, registry entry `external`) on the tiny model:
each accepted checkpoint layout evaluated through `bench run`; a checkpoint holding an in-harness method's weights
gives that method's delta and records; the cache follows content (a moved checkpoint is cached, one changed tensor
recomputes); `LABEL+meta` runs; bad inputs stop at plan time with exit 2 naming the path or value."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

import unlearn_bench.execute
from unlearn_bench.cli import app

# two 2-step images per cell: the tests compare weights and image bytes, so more sampling would only cost time
RUN = ["run", "--model", "tiny", "--concept", "nudity", "--metrics", "nudenet", "--seeds", "0", "--quiet",
       "--set", "model.tiny.steps=2", "--set", "concept.nudity.params.images.target=2"]
VALUE = ("value", "stderr", "n")


def bench(w: SimpleNamespace, out: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [*RUN, *args, "--out", str(w.root / out), "--store", str(w.store)],
                                env={"BENCH_HOME": str(w.root / "home")})
    return result.exit_code, result.output + (repr(result.exception) if result.exit_code not in (0, 2) else "")


def records(out: Path) -> dict[tuple[str, str, str, str], dict[str, str]]:
    return {(r["method"], r["attack"], r["attack_step"], r["metric"]): r
            for r in csv.DictReader((out / "records.csv").open())}


def unlearned(w: SimpleNamespace, key: str) -> dict:
    from safetensors.torch import load_file

    from unlearn_bench.store import Store

    return load_file(str(Store(w.store).path("unlearn", key) / "delta.safetensors"))


def image_digests(w: SimpleNamespace, key: str) -> list[str]:
    from unlearn_bench.store import Store

    files = json.loads((Store(w.store).path("generate", key) / "manifest.json").read_text())["files"]
    return [v["sha256"] for k, v in sorted(files.items()) if k.startswith("images/")]


def manifests(w: SimpleNamespace, stage: str) -> int:
    return len(list((w.store / stage).rglob("manifest.json")))


def assert_same_tensors(a: dict, b: dict, atol: float = 0.0) -> None:
    import torch

    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=atol), k


@pytest.fixture(autouse=True)
def digest_cache_in_tmp(monkeypatch, tmp_path_factory):
    """Checkpoint digests are remembered under $BENCH_HOME: keep the tests' out of the user's cache."""
    monkeypatch.setenv("BENCH_HOME", str(tmp_path_factory.getbasetemp() / "bench-home"))


@pytest.fixture(scope="module")
def world(tmp_path_factory, torch_single_thread, registry):
    """ESD run on tiny through `bench run`; its stored delta; a fresh tiny model for writing checkpoints."""
    from unlearn_bench.models.loading import load_model

    w = SimpleNamespace(root=tmp_path_factory.mktemp("external"))
    w.store = w.root / "store"
    code, output = bench(w, "esd", "--methods", "esd", "--attacks", "none,ft-lr1e-5")
    assert code == 0, output
    w.esd = records(w.root / "esd")
    w.esd_delta = unlearned(w, w.esd[("esd", "none", "0", "nudenet")]["unlearn_key"])
    w.model = load_model(registry.model("tiny"), "cpu")
    w.model.snapshot()
    return w


@pytest.fixture(scope="module")
def files(world):
    """Checkpoints in every layout: ESD's weights as a changed-only state dict, a full bare-name UNet state dict and
    a UNet folder; a text-encoder folder with one changed tensor; a LoRA file (diffusers + peft keys, an alpha)."""
    import torch
    from safetensors.torch import save_file

    w, m, d = world, world.model, world.root / "ckpt"
    d.mkdir()
    save_file(w.esd_delta, str(d / "esd-delta.safetensors"))
    m.load_state([w.esd_delta])
    save_file({k: v.contiguous() for k, v in m.unet.state_dict().items()}, str(d / "esd-unet-full.safetensors"))
    m.unet.save_pretrained(str(d / "esd-unet"))
    name = "text_encoder." + next(n for n, _ in m.text_encoder.named_parameters() if "q_proj.weight" in n)
    w.te_delta = {name: m.named_parameters()[name].detach() + 0.05}
    m.load_state([w.te_delta])
    m.text_encoder.save_pretrained(str(d / "te"))
    m.load_state([])
    gen = torch.Generator().manual_seed(0)
    attn2 = next(n for n, _ in m.unet.named_modules() if n.endswith("attn2.to_q"))
    out_f, in_f = m.named_parameters()[f"unet.{attn2}.weight"].shape
    lora = {f"unet.{attn2}.lora.down.weight": torch.randn(2, in_f, generator=gen),
            f"unet.{attn2}.lora.up.weight": torch.randn(out_f, 2, generator=gen),
            f"unet.{attn2}.alpha": torch.tensor(4.0),  # scale alpha / rank = 2
            f"{name.removesuffix('.weight')}.lora_A.weight": torch.randn(2, 32, generator=gen),
            f"{name.removesuffix('.weight')}.lora_B.weight": torch.randn(32, 2, generator=gen)}
    save_file(lora, str(d / "lora.safetensors"))
    params = m.named_parameters()
    w.lora_delta = {f"unet.{attn2}.weight": params[f"unet.{attn2}.weight"].detach()
                    + 2.0 * lora[f"unet.{attn2}.lora.up.weight"] @ lora[f"unet.{attn2}.lora.down.weight"],
                    name: params[name].detach() + lora[name.replace(".weight", ".lora_B.weight")]
                    @ lora[name.replace(".weight", ".lora_A.weight")]}
    return d


def test_changed_only_state_dict_gives_the_in_harness_records(world, files):
    w = world
    code, output = bench(w, "a", "--methods", f"esd,mine=path:{files / 'esd-delta.safetensors'}",
                         "--attacks", "none,ft-lr1e-5")
    assert code == 0, output
    assert "method mine: external checkpoint" in output and "state-dict file" in output
    rows = records(w.root / "a")
    mine = {k[1:]: r for k, r in rows.items() if k[0] == "mine"}
    esd = {k[1:]: r for k, r in rows.items() if k[0] == "esd"}
    assert len(mine) == len(esd) == 3 and mine.keys() == esd.keys()
    for cell, row in mine.items():
        assert {f: row[f] for f in VALUE} == {f: esd[cell][f] for f in VALUE}, cell
        assert image_digests(w, row["images_key"]) == image_digests(w, esd[cell]["images_key"]), cell
    assert_same_tensors(unlearned(w, mine[("none", "0", "nudenet")]["unlearn_key"]), w.esd_delta)
    w.mine_key = mine[("none", "0", "nudenet")]["unlearn_key"]


def test_every_layout_and_meta_run_through_bench(world, files):
    w = world
    methods = (f"full=path:{files / 'esd-unet-full.safetensors'},folder=path:{files / 'esd-unet'},"
               f"te=path:{files / 'te'},lora=path:{files / 'lora.safetensors'},"
               f"mine=path:{files / 'esd-delta.safetensors'},mine+meta")
    code, output = bench(w, "b", "--methods", methods, "--attacks", "none")
    assert code == 0, output
    full = f"{len(w.model.unet.state_dict())} unet tensors"
    for what in ("UNet folder", "text-encoder folder", "LoRA file", full, "1 text_encoder tensors"):
        assert what in output
    rows = records(w.root / "b")
    key = {m: rows[(m, "none", "0", "nudenet")]["unlearn_key"] for m in ("full", "folder", "te", "lora", "mine+meta")}
    assert_same_tensors(unlearned(w, key["full"]), w.esd_delta)
    assert_same_tensors(unlearned(w, key["folder"]), w.esd_delta)
    assert_same_tensors(unlearned(w, key["te"]), w.te_delta)
    assert_same_tensors(unlearned(w, key["lora"]), w.lora_delta, atol=1e-5)
    for m in ("full", "folder"):
        assert {f: rows[(m, "none", "0", "nudenet")][f] for f in VALUE} == \
               {f: w.esd[("esd", "none", "0", "nudenet")][f] for f in VALUE}
    meta = unlearned(w, key["mine+meta"])  # meta-trained from the loaded weights, over the tensors they changed
    assert sorted(meta) == sorted(w.esd_delta)
    assert any(not (meta[k] == w.esd_delta[k]).all() for k in meta)
    assert ("mine+meta", "none", "0", "meta-grad-dot-start") in rows


def test_moved_checkpoint_is_cached_and_a_changed_tensor_recomputes(world, files):
    import torch
    from safetensors.torch import load_file, save_file

    w = world
    if not hasattr(w, "mine_key"):
        pytest.skip("needs test_changed_only_state_dict_gives_the_in_harness_records")
    moved = w.root / "elsewhere" / "renamed.safetensors"
    moved.parent.mkdir()
    shutil.copy2(files / "esd-delta.safetensors", moved)
    before = {s: manifests(w, s) for s in ("unlearn", "generate", "score")}
    code, output = bench(w, "c", "--methods", f"moved=path:{moved}", "--attacks", "none")
    assert code == 0, output
    assert {s: manifests(w, s) for s in before} == before  # nothing computed: the key is the content's
    assert records(w.root / "c")[("moved", "none", "0", "nudenet")]["unlearn_key"] == w.mine_key
    tensors = load_file(str(moved))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + torch.full_like(tensors[first], 1e-3)
    save_file(tensors, str(moved))
    code, output = bench(w, "d", "--methods", f"moved=path:{moved}", "--attacks", "none")
    assert code == 0, output
    assert manifests(w, "unlearn") == before["unlearn"] + 1
    assert records(w.root / "d")[("moved", "none", "0", "nudenet")]["unlearn_key"] != w.mine_key


def test_pipeline_folder_sharded_unet_and_subfolder_param_load_the_same_weights(world, files, tmp_path):
    from unlearn_bench.checkpoints import detect, load_into

    m = world.model
    pipe = tmp_path / "pipe"
    shutil.copytree(files / "esd-unet", pipe / "unet")
    shutil.copytree(files / "te", pipe / "text_encoder")
    (pipe / "vae").mkdir()
    (pipe / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not read: other components are ignored")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"],
                                                       "text_encoder": ["transformers", "CLIPTextModel"]}))
    m.load_state([world.esd_delta])
    m.unet.save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")
    m.load_state([])
    cases = [(detect(str(pipe)), "pipeline", world.esd_delta | world.te_delta),
             (detect(str(tmp_path / "sharded")), "unet", world.esd_delta),
             (detect(str(pipe), subfolder="text_encoder"), "text_encoder", world.te_delta)]
    assert len(cases[1][0].parts) > 1  # really sharded
    for layout, fmt, expected in cases:
        assert layout.format == fmt
        m.load_state([])
        load_into(m, layout)
        assert_same_tensors(m.delta(), expected)
    m.load_state([])


def test_content_identity_ignores_path_and_location_params(world, files, tmp_path, registry):
    from unlearn_bench.external_methods import LOCATION_PARAMS, registry_for_run
    from unlearn_bench.plan import make_plan, request_from
    from unlearn_bench.stage_keys import component_identity

    copy = tmp_path / "copy.safetensors"
    shutil.copy(files / "esd-delta.safetensors", copy)
    methods = f"a=path:{files / 'esd-delta.safetensors'},b=path:{copy},b+meta"
    reg = registry_for_run(None, ["method.b.format=state_dict"], methods)
    plan = make_plan(reg, request_from(reg, None, "tiny", "nudity", methods, "none", "nudenet", "0"), False)
    a, b, meta = plan.methods
    assert a.fingerprint and a.fingerprint == b.fingerprint == meta.fingerprint
    assert component_identity(a) == component_identity(b)
    assert not set(LOCATION_PARAMS) & set(component_identity(a)["params"])
    assert component_identity(meta)["wrappers"][0]["module"].endswith("meta:Meta")


def test_digests_are_cached_by_path_size_and_times(tmp_path, monkeypatch):
    import unlearn_bench.digests as digests

    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))
    calls = []
    real = digests.sha256_file
    monkeypatch.setattr(digests, "sha256_file", lambda p: calls.append(p) or real(p))
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x" * 100)
    first = digests.file_digest(f)
    assert digests.file_digest(f) == first and len(calls) == 1  # remembered
    f.write_bytes(b"y" * 100)  # same size: the times tell
    assert digests.file_digest(f) != first and len(calls) == 2
    assert str(f.resolve()) in json.loads(digests.cache_path().read_text())


def test_pickle_loads_only_with_allow_pickle(world, tmp_path, registry):
    import torch

    from unlearn_bench.external_methods import registry_for_run
    from unlearn_bench.methods.external import External
    from unlearn_bench.plan import make_plan, request_from

    m = world.model
    m.load_state([])
    target = m.named_parameters()["unet.conv_in.bias"].detach() + 1.0
    torch.save({"conv_in.bias": target.clone()}, tmp_path / "w.pt")
    methods = f"mine=path:{tmp_path / 'w.pt'}"
    reg = registry_for_run(None, ["method.mine.allow_pickle=true"], methods)
    spec = make_plan(reg, request_from(reg, None, "tiny", "nudity", methods, "none", "nudenet", "0"), False).methods[0]
    External(spec, registry.concept("nudity")).apply(m, 0)
    assert_same_tensors(m.delta(), {"unet.conv_in.bias": target})
    m.load_state([])


def test_lora_scale_comes_from_alpha_tensors_or_the_adapter_metadata():
    import torch

    from unlearn_bench.models.lora import is_lora_delta, merge_lora

    weight = torch.zeros(3, 4)
    model = SimpleNamespace(named_parameters=lambda: {"unet.blk.to_k.weight": weight})
    down, up = torch.ones(2, 4), torch.ones(3, 2)
    meta = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 8, "unet.r": 2})}
    assert merge_lora(model, {"unet.blk.to_k.lora_A.weight": down, "unet.blk.to_k.lora_B.weight": up}, 1.0, meta) == 1
    assert torch.allclose(weight, torch.full((3, 4), 2.0 * 8 / 2))
    weight.zero_()
    tensors = {"unet.blk.processor.to_k_lora.down.weight": down, "unet.blk.processor.to_k_lora.up.weight": up,
               "unet.blk.to_k.alpha": torch.tensor(1.0)}
    assert is_lora_delta(tensors) and not is_lora_delta({"unet.blk.to_k.alpha": torch.tensor(1.0)})
    merge_lora(model, tensors, 0.5)
    assert torch.allclose(weight, torch.full((3, 4), 0.5 * 2.0 * 1 / 2))


# --- plan-time refusals ------------------------------------------------------------------------------------------
def _bad_checkpoint(kind: str, d: Path) -> tuple[str, tuple[str, ...]]:
    """(--methods value, what the message must name) for one bad input, its files written under d."""
    import torch
    from safetensors.torch import save_file

    if kind == "missing":
        return f"mine=path:{d / 'nope'}", (str(d / "nope"), "does not exist")
    if kind == "no-weights":
        (d / "empty").mkdir()
        (d / "empty" / "notes.txt").write_text("no weights here")
        return f"mine=path:{d / 'empty'}", (str(d / "empty"), "holds no weights")
    if kind == "shape":
        save_file({"conv_in.weight": torch.zeros(1, 4, 3, 3)}, str(d / "s.safetensors"))
        return f"mine=path:{d / 's.safetensors'}", (str(d / "s.safetensors"), "'conv_in.weight'", "[1, 4, 3, 3]",
                                                    "[16, 4, 3, 3]")
    if kind == "name":
        save_file({"down_blocks.9.nope.weight": torch.zeros(2)}, str(d / "n.safetensors"))
        return f"mine=path:{d / 'n.safetensors'}", (str(d / "n.safetensors"), "'down_blocks.9.nope.weight'",
                                                    "is not in the base model")
    if kind == "lora":
        save_file({"unet.conv_in.lora.down.weight": torch.zeros(2, 7, 3, 3),
                   "unet.conv_in.lora.up.weight": torch.zeros(16, 2, 1, 1)}, str(d / "l.safetensors"))
        return f"mine=path:{d / 'l.safetensors'}", (str(d / "l.safetensors"), "'unet.conv_in'", "do not fit")
    if kind == "corrupt":
        (d / "c.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
        return f"mine=path:{d / 'c.safetensors'}", (str(d / "c.safetensors"), "corrupt")
    if kind == "pickle":
        torch.save({"conv_in.bias": torch.zeros(16)}, d / "w.pt")
        return f"mine=path:{d / 'w.pt'}", (str(d / "w.pt"), "pickle", "allow_pickle")
    return {"syntax": ("mine=foo:/x", ("'mine=foo:/x'", "LABEL=path:PATH")),
            "empty": ("mine=", ("'mine='", "LABEL=path:PATH")),
            "label": ("Mine=path:/x", ("bad label 'Mine'", "LABEL=path:PATH")),
            "collision": ("esd=path:/x", ("'esd' is already a method",)),
            "no-path": ("external", ("method external", "no checkpoint path"))}[kind]


@pytest.mark.parametrize("kind", ["missing", "no-weights", "shape", "name", "lora", "corrupt", "pickle", "syntax",
                                  "empty", "label", "collision", "no-path"])
def test_bad_external_checkpoints_exit_2_at_plan_time(kind, tmp_path, monkeypatch, torch_single_thread):
    def refuse(*args, **kwargs):
        raise AssertionError("planning accepted a bad input")

    monkeypatch.setattr(unlearn_bench.execute, "execute", refuse)
    methods, needles = _bad_checkpoint(kind, tmp_path)
    w = SimpleNamespace(root=tmp_path, store=tmp_path / "store")
    code, output = bench(w, "out", "--methods", f"none,{methods}", "--attacks", "none")
    assert code == 2, output
    assert "Traceback" not in output and not (tmp_path / "store").exists()
    for needle in needles:
        assert needle in output, (needle, output)


def test_registry_entry_extending_external_and_ls(world, files, tmp_path, monkeypatch):
    from unlearn_bench.registry import DEFAULT_REGISTRY

    entry = f"\nmethods:\n  my-esd:\n    extends: external\n    params: {{path: '{files / 'esd-unet'}'}}\n"
    text = DEFAULT_REGISTRY.read_text().replace("\nmethods:\n", entry, 1)
    (tmp_path / "r.yaml").write_text(text)
    seen = []
    monkeypatch.setattr(unlearn_bench.execute, "execute",
                        lambda plan, *a, **k: seen.append(plan) or SimpleNamespace(failures=[]))
    result = CliRunner().invoke(app, [*RUN, "--registry", str(tmp_path / "r.yaml"), "--methods", "my-esd,my-esd+meta",
                                      "--attacks", "none", "--out", str(tmp_path / "o")],
                                env={"BENCH_HOME": str(world.root / "home"), "BENCH_CACHE": str(tmp_path / "s")})
    assert result.exit_code == 0, result.output
    assert [m.fingerprint for m in seen[0].methods] == [seen[0].methods[0].fingerprint] * 2
    assert "UNet folder" in seen[0].methods[0].description
    listing = CliRunner().invoke(app, ["ls", "methods"])
    assert listing.exit_code == 0 and "external" in listing.output


def test_sd_base_shapes_come_from_folder_headers_and_clip_names_match_across_transformers_versions(world, files,
                                                                                                   tmp_path):
    """An SD model's names and shapes are read from its local folder's safetensors headers (never loaded);
    text-encoder weights named by transformers 4 ('text_model.' level) fit a model named by 5, and back."""
    from safetensors.torch import load_file, save_file

    from unlearn_bench.checkpoints import check_fits, detect, load_into
    from unlearn_bench.external_methods import base_shapes
    from unlearn_bench.specs import ModelSpec

    m = world.model
    sd = tmp_path / "sd"
    (sd / "text_encoder").mkdir(parents=True)
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    shutil.copytree(files / "esd-unet", sd / "unet")
    te = load_file(str(files / "te" / "model.safetensors"))
    save_file({f"text_model.{k}": v for k, v in te.items()}, str(sd / "text_encoder" / "model.safetensors"))
    shapes = base_shapes(ModelSpec(name="fake-sd", kind="sd", defaults="sd", family="sd1", path=str(sd)))
    assert shapes is not None and all(k.startswith("text_model.") for k in shapes["text_encoder"])
    assert check_fits(detect(str(files / "te")), shapes, "fake-sd") == {"text_encoder": len(te)}
    assert check_fits(detect(str(sd)), shapes, "fake-sd") == {"unet": len(m.unet.state_dict()), "text_encoder": len(te)}
    m.load_state([])
    load_into(m, detect(str(sd / "text_encoder")))  # transformers-4 names into the transformers-5 model
    assert_same_tensors(m.delta(), world.te_delta)
    m.load_state([])


def test_exported_esd_reimported_gives_identical_records(world, files):
    """The round trip a user makes: the harness's own esd, exported by `bench export` as a diffusers pipeline and as
    only its changed component, then evaluated as an external method - the same records as esd itself."""
    w = world
    full, unet_only = w.root / "export-full", w.root / "export-unet"
    for to, extra in ((full, ()), (unet_only, ("--only-changed",))):
        result = CliRunner().invoke(app, ["export", str(w.root / "esd"), "--method", "esd", "--to", str(to),
                                          "--store", str(w.store), *extra])
        assert result.exit_code == 0, result.output
    assert (full / "model_index.json").is_file() and not (unet_only / "text_encoder").exists()
    code, output = bench(w, "roundtrip", "--methods", f"pipe=path:{full},unet=path:{unet_only / 'unet'}",
                         "--attacks", "none,ft-lr1e-5")
    assert code == 0, output
    rows = records(w.root / "roundtrip")
    for label in ("pipe", "unet"):
        mine = {k[1:]: r for k, r in rows.items() if k[0] == label}
        esd = {k[1:]: r for k, r in w.esd.items() if k[0] == "esd"}
        assert mine.keys() == esd.keys() and len(mine) == 3
        for cell, row in mine.items():
            assert {f: row[f] for f in VALUE} == {f: esd[cell][f] for f in VALUE}, (label, cell)
        assert_same_tensors(unlearned(w, mine[("none", "0", "nudenet")]["unlearn_key"]), w.esd_delta)
