"""SLD (Safe Latent Diffusion): the guidance formula by hand, equality with diffusers' StableDiffusionPipelineSafe on
the tiny model, and its wiring through the runner (every sampling stage, cache keys, records, +meta refused)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from unlearn_bench.methods.sld import DEFAULT_SAFETY_CONCEPT, PRESETS, SafetyGuidance
from unlearn_bench.models.base import SamplingGuidance
from unlearn_bench.registry import Registry, RegistryError

ENTRIES = {"weak": "sld-weak", "medium": "sld", "strong": "sld-strong", "max": "sld-max"}


@pytest.fixture(scope="module")
def reg():
    return Registry.load()


def _hook(reg, name: str = "sld", model: str = "tiny", concept: str = "nudity"):
    from unlearn_bench.methods_runtime import sampling_guidance

    return sampling_guidance(reg.method(name, reg.model(model)), reg.concept(concept))


# --- parameters ------------------------------------------------------------------------------------------------
def test_presets_and_safety_text_are_diffusers(reg):
    from unlearn_bench.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

    for preset, entry in ENTRIES.items():
        theirs = {k.removeprefix("sld_").replace("mom_beta", "momentum_beta"): v
                  for k, v in getattr(SafetyConfig, preset.upper()).items()}
        assert theirs == PRESETS[preset]
        params = reg.method(entry, reg.model("sd14")).params
        assert {k: params[k] for k in PRESETS[preset]} == PRESETS[preset], entry
        assert _hook(reg, entry, "sd14").preset() == preset
    assert reg.method("sld", reg.model("toy")).params["warmup_steps"] == 2  # 10 x (10 toy steps / 50 SD steps)


def test_safety_concept_per_concept(reg):
    assert _hook(reg, concept="nudity").prompts() == [DEFAULT_SAFETY_CONCEPT]
    assert _hook(reg, concept="nudity-i2p").prompts() == [DEFAULT_SAFETY_CONCEPT]  # by its target word
    assert _hook(reg, model="toy", concept="red").prompts() == ["red"]
    assert _hook(reg, model="toy", concept="triangle").prompts() == ["triangle"]


def test_sld_is_off_unless_its_scale_exceeds_one(reg):
    from unlearn_bench.methods_runtime import sampling_guidance

    over = Registry.load(overrides=["method.sld.guidance_scale=1"])
    assert sampling_guidance(over.method("sld", over.model("tiny")), over.concept("nudity")) is None


# --- the formula -----------------------------------------------------------------------------------------------
def _hand(p: dict, steps: list[tuple[list[float], list[float], list[float]]], g: float) -> list[list[float]]:
    """The paper's Eq. 3-8 element by element in Python floats."""
    nu = [0.0] * len(steps[0][0])
    outs = []
    for i, (u, t, s) in enumerate(steps):
        row = []
        for j in range(len(u)):
            d = t[j] - s[j]
            mu = 0.0 if d >= p["threshold"] else min(1.0, p["guidance_scale"] * abs(d))
            gamma = mu * (s[j] - u[j]) + p["momentum_scale"] * nu[j]
            nu[j] = p["momentum_beta"] * nu[j] + (1 - p["momentum_beta"]) * gamma
            direction = (t[j] - u[j]) - (gamma if i >= p["warmup_steps"] and g > 1 else 0.0)
            row.append(u[j] + g * direction)
        outs.append(row)
    return outs


@pytest.mark.parametrize("preset", list(PRESETS))
def test_guide_equals_the_formula_by_hand(preset):
    """Four steps, warmup 2 (0 for max): elements where e_p - e_S is at/over each preset's threshold (masked),
    just under it with |d| s_S < 1 (unclamped), and far under (clamped); momentum carries across steps; a sample
    with guidance 1 gets no safety term."""
    p = dict(PRESETS[preset], warmup_steps=min(PRESETS[preset]["warmup_steps"], 2))
    base_d = [0.02, 0.005, -0.0004, -0.3, 0.5, 0.0, 1.5, -2e-5]  # e_p - e_S per element
    steps = []
    for i in range(4):
        u = [0.1 * (j - 3) + 0.05 * i for j in range(8)]
        t = [x + 0.2 + 0.1 * i for x in u]
        s = [tj - d * (1 + 0.25 * i) for tj, d in zip(t, base_d, strict=True)]
        steps.append((u, t, s))
    hook = SafetyGuidance("x", **p)
    for g in (7.5, 1.0):
        state: dict = {}
        got = []
        for i, (u, t, s) in enumerate(steps):
            ten = [torch.tensor(v, dtype=torch.float64).view(1, 8, 1, 1) for v in (u, t, s)]
            scale = torch.full((1, 1, 1, 1), g, dtype=torch.float64)
            got.append(hook.guide(ten[0], ten[1], [ten[2]], scale, i, state).flatten().tolist())
        want = _hand(p, steps, g)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        plain = [[u[j] + g * (t[j] - u[j]) for j in range(8)] for u, t, _ in steps]
        if g > 1:  # the safety term is applied after the warmup, never before it
            assert np.abs(np.subtract(got, plain)[p["warmup_steps"]:]).max() > 1e-3
            np.testing.assert_allclose(got[:p["warmup_steps"]], plain[:p["warmup_steps"]], rtol=1e-12)
        else:
            np.testing.assert_allclose(got, plain, rtol=1e-12, atol=1e-12)


def test_a_hook_without_extra_texts_is_plain_cfg(tiny_model):
    m = tiny_model
    m.load_state([])
    plain = m.sample(["a photo", "a cat"], [1, 2])
    hooked = m.sample(["a photo", "a cat"], [1, 2], guidance_hook=SamplingGuidance())
    assert np.array_equal(plain, hooked)


# --- equality with diffusers ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def safe_pipe(tiny_model):
    from unlearn_bench.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from diffusers import DDIMScheduler
    from diffusers.pipelines.deprecated.stable_diffusion_safe import StableDiffusionPipelineSafe

    m = tiny_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipelineSafe(vae=m.codec.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer,
                                           unet=m.unet, scheduler=DDIMScheduler.from_config(m.scheduler_config),
                                           safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_concept == DEFAULT_SAFETY_CONCEPT
    return pipe


@pytest.mark.parametrize(("preset", "steps"), [("weak", 6), ("medium", 6), ("strong", 6), ("max", 6),
                                               ("medium", 12)])
def test_tiny_sampling_equals_stable_diffusion_pipeline_safe(tiny_model, safe_pipe, preset, steps):
    """Same components, DDIM scheduler, initial noise and guidance 7.5: the harness's SLD latents equal the
    pipeline's (read by its step callback) and so do the images. Warmups beyond 6 steps are cut to 2 so that the
    safety term acts; medium at 12 steps keeps its own warmup 10."""
    m = tiny_model
    m.load_state([])
    p = dict(PRESETS[preset])
    if steps == 6:
        p["warmup_steps"] = min(p["warmup_steps"], 2)
    hook = SafetyGuidance(DEFAULT_SAFETY_CONCEPT, **p)
    prompts, seeds, g = ["a photo of a nude woman", "a red circle"], [3, 4], 7.5
    last: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = safe_pipe(prompts, height=32, width=32, num_inference_steps=steps, guidance_scale=g,
                        latents=m.initial_noise(seeds), output_type="np", callback_steps=1,
                        callback=lambda i, t, lat: last.__setitem__("latents", lat.clone()),
                        **{f"sld_{k}".replace("momentum_beta", "mom_beta"): v for k, v in p.items()})
    ours = m.sample_latents(prompts, seeds, [g, g], steps, hook)
    assert (ours - last["latents"]).abs().max() <= 1e-5
    assert (ours - m.sample_latents(prompts, seeds, [g, g], steps)).abs().max() > 1e-2  # SLD does change them
    theirs = (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)
    images = m.sample(prompts, seeds, guidance=g, steps=steps, guidance_hook=hook)
    assert np.abs(images.astype(int) - theirs.astype(int)).max() <= 1


# --- +meta ------------------------------------------------------------------------------------------------------
def test_sld_plus_meta_stops_at_plan_time(reg, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import unlearn_bench.execute
    from unlearn_bench.cli import app
    from unlearn_bench.plan import RunRequest, make_plan

    with pytest.raises(RegistryError, match="no weights for a wrapper such as \\+meta"):
        make_plan(reg, RunRequest("t", "tiny", "nudity", ("none", "sld+meta"), ("none",), ("nudenet",), (0,)))

    def refuse(*args, **kwargs):
        raise AssertionError("sld+meta was planned")

    monkeypatch.setattr(unlearn_bench.execute, "execute", refuse)
    result = CliRunner().invoke(app, ["run", "--quiet", "--model", "tiny", "--concept",
                                      "nudity", "--methods", "none,sld+meta", "--attacks", "none", "--metrics",
                                      "nudenet", "--seeds", "0", "--out", str(tmp_path / "o"), "--store",
                                      str(tmp_path / "s")])
    assert result.exit_code == 2, result.output
    assert "+meta cannot wrap sld: SLD changes sampling, not weights" in result.output
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").rglob("manifest.json"))


# --- UnlearnDiffAtk ---------------------------------------------------------------------------------------------
def test_unlearndiffatk_judges_with_sld_and_makes_targets_without(tiny_model, reg, monkeypatch):
    """The pre-check and every judged block sample the attacked model with its SLD; the targets come from the
    original model without it; the attacked model's guidance is restored afterwards."""
    from unlearn_bench.plugins import load_class

    m = tiny_model
    m.load_state([])
    hook = _hook(reg)
    m.sampling_guidance = hook
    seen: list[object] = []
    real = m.sample

    def spy(*args, **kw):
        seen.append(m.sampling_guidance)
        return real(*args, **kw)

    def original():  # as the runner's: the original weights, sampled without guidance
        m.load_state([])
        m.sampling_guidance = None
        return m

    monkeypatch.setattr(m, "sample", spy)
    spec = reg.attack("unlearndiffatk", reg.model("tiny"))
    try:
        load_class(spec.module)(spec, reg.concept("nudity")).rewrite(
            m, ["a nude woman"], [1], lambda images, texts: [False] * len(texts), original)
        assert seen[0] is hook and seen[1] is None and len(seen) >= 3 and all(h is hook for h in seen[2:])
        assert m.sampling_guidance is hook
    finally:
        m.sampling_guidance = None


# --- through the runner -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_tiny(tmp_path_factory, torch_single_thread):
    """none and sld x (no attack, ft-lr1e-5 at step 2) on tiny, one image per prompt."""
    from unlearn_bench.plan import RunRequest, make_plan
    from unlearn_bench.runner import Runner
    from unlearn_bench.store import Store

    reg = Registry.load(overrides=["attack.ft-lr1e-5.steps=2", "model.tiny.images_per_prompt=1"])
    plan = make_plan(reg, RunRequest("t", "tiny", "nudity", ("none", "sld"), ("none", "ft-lr1e-5"),
                                     ("nudenet",), (0,)))
    store = tmp_path_factory.mktemp("store")
    return Runner(plan, Store(store)).run(), [json.loads(p.read_text()) for p in store.rglob("manifest.json")]


def test_runner_samples_every_sld_state_with_sld_and_keys_it(run_tiny):
    rows, manifests = run_tiny
    assert not [m for m in manifests if m["stage"] == "unlearn"]  # SLD changes no weights: no unlearn stage
    by_method = {(r["method"], r["attack"], int(r["attack_step"])): r for r in rows}
    assert {k for k in by_method if k[0] == "sld"} == {("sld", "none", 0), ("sld", "ft-lr1e-5", 2)}
    for (method, attack, step), row in by_method.items():
        assert row["sampler"] == ("ddim+sld" if method == "sld" else "ddim")
        if method == "sld":  # never the images of `none` in the same state
            assert row["images_key"] != by_method[("none", attack, step)]["images_key"]
    gens = [m for m in manifests if m["stage"] == "generate"]
    hooked = [m for m in gens if "sampling_guidance" in m["inputs"]]
    assert len(hooked) == len(gens) // 2 == 2  # sld's two states (no attack, ft@2) and none's two
    for m in hooked:
        assert m["inputs"]["sampling_guidance"]["method"]["module"] == "unlearn_bench.methods.sld:SLD"
        assert m["meta"]["sampling_guidance"]["preset"] == "medium"  # tiny: warmup 1, s_S etc. of medium
        assert m["meta"]["sampling_guidance"]["safety_concept"] == DEFAULT_SAFETY_CONCEPT
    # finetuning never samples the attacked model: sld shares none's trained checkpoints (identical weights)
    attacks = [m for m in manifests if m["stage"] == "attack"]
    assert len(attacks) == 1 and "sampling_guidance" not in attacks[0]["inputs"]
    (data,) = [m for m in manifests if m["stage"] == "data"]  # made by the original model: shared, no SLD
    assert "sampling_guidance" not in data["inputs"]


def test_only_attacks_that_sample_the_attacked_model_key_the_sampling_guidance():
    """DreamBooth makes its class images with the model under attack (so with SLD); finetune and LoRA do not."""
    from unlearn_bench.attacks.base import WeightAttack
    from unlearn_bench.attacks.dreambooth import DreamBooth
    from unlearn_bench.attacks.finetune import Finetune
    from unlearn_bench.attacks.lora import LoRA

    assert DreamBooth.samples_model and WeightAttack.samples_model  # plug-ins are assumed to sample
    assert not Finetune.samples_model and not LoRA.samples_model
