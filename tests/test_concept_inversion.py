"""Concept inversion on tiny: one new token is all that trains, its checkpoint is a diffusers textual-inversion file
that load_textual_inversion reads to the same embeddings and images, and evaluation prompts carry the token."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from unlearn_bench.data import ImageSet
from unlearn_bench.models.base import load_delta, save_delta


def attack(registry, concept: str = "nudity", model: str = "tiny", **params):
    from dataclasses import replace

    from unlearn_bench.plugins import load_class
    from unlearn_bench.specs import params as frozen
    from unlearn_bench.specs import thaw

    spec = registry.attack("concept-inversion", registry.model(model))
    if params:
        spec = replace(spec, params=frozen({**thaw(spec.params), **params}))
    return load_class(spec.module)(spec, registry.concept(concept))


@pytest.fixture(scope="module")
def inverted(tiny_model, registry, tmp_path_factory):
    """concept-inversion run on tiny (2 steps at a large lr so the vector visibly moves); the weights before and
    after, and its checkpoints written the way the runner writes them."""
    m = tiny_model
    m.load_state([])
    before = {k: v.detach().clone() for k, v in m.named_parameters().items()}
    rng = np.random.default_rng(0)
    data = ImageSet(rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8), ["a photo of a nude woman"] * 2)
    saved: dict[int, tuple[dict, dict]] = {}
    ci = attack(registry, lr=0.5)
    ci.run(m, data, 0, lambda step, t=None, meta=None: saved.__setitem__(step, (t, meta)))
    after = {k: v.detach().clone() for k, v in m.named_parameters().items()}
    folder = tmp_path_factory.mktemp("ci")
    paths = {}
    for step, (tensors, meta) in saved.items():
        paths[step] = folder / f"step-{step}.safetensors"
        save_delta(tensors, paths[step], {**meta, "step": str(step)})
    return ci, before, after, saved, paths


def test_only_the_inverted_token_changes(inverted, tiny_model):
    ci, before, after, saved, _ = inverted
    assert sorted(saved) == [0, 2]
    assert all(torch.equal(before[k], after[k]) for k in before), "UNet and text encoder must stay frozen"
    assert tiny_model.tokens == {} and len(tiny_model.tokenizer) == 49408, "the attack leaves the vocabulary as found"
    (t0, _), (t2, meta) = saved[0], saved[2]
    dim = tiny_model.word_embeddings().weight.shape[1]
    assert list(t0) == list(t2) == ["<nudity>"] and t2["<nudity>"].shape == (1, dim)
    assert meta["delta_format"] == "textual_inversion"
    init_id = tiny_model.tokenizer("person", add_special_tokens=False).input_ids[0]
    torch.testing.assert_close(t0["<nudity>"][0], tiny_model.word_embeddings().weight[init_id].detach(), rtol=0, atol=0)
    assert (t2["<nudity>"] - t0["<nudity>"]).abs().max() > 1e-3, "the token's vector is what trains"
    # evaluated: the effective embedding table = the base table plus one row, the only one that differs
    tiny_model.load_state([load_delta(inverted[4][2])])
    ids = torch.arange(49409).view(1, -1)
    table = tiny_model.embed_tokens(ids)[0]
    tiny_model.load_state([])
    torch.testing.assert_close(table[:49408], tiny_model.word_embeddings().weight.detach(), rtol=0, atol=0)
    torch.testing.assert_close(table[49408], t2["<nudity>"][0], rtol=0, atol=0)


def test_checkpoint_loads_with_load_textual_inversion_and_gives_the_same_embeddings_and_images(inverted, tiny_model):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    _, _, _, _, paths = inverted
    m = tiny_model
    m.load_state([])
    pipe = StableDiffusionPipeline(vae=copy.deepcopy(m.codec.vae), text_encoder=copy.deepcopy(m.text_encoder),
                                   tokenizer=copy.deepcopy(m.tokenizer), unet=copy.deepcopy(m.unet),
                                   scheduler=DDIMScheduler.from_config(m.scheduler_config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(paths[2]))
    prompt = "a photo of a <nudity> woman"
    m.load_state([load_delta(paths[2])])
    try:
        ids = pipe.tokenizer([prompt], padding="max_length", max_length=m.tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids
        assert torch.equal(ids, m.tokenize([prompt])), "the token gets the same id as diffusers gives it"
        with torch.no_grad():
            theirs = pipe.text_encoder(ids)[0]
            ours = m.encode_prompt([prompt]).hidden
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        plain = m.encode_prompt(["a photo of a woman"]).hidden
        assert (ours - plain).abs().max() > 1e-3
        seed = 7
        latents = m.initial_noise([seed]) * 1.0
        mine = m.sample([prompt], [seed], guidance=3.0, steps=4)
        with torch.no_grad():
            out = pipe(prompt, num_inference_steps=4, guidance_scale=3.0, latents=latents, output_type="np").images
        theirs_img = np.round(out * 255).astype(np.int16)
        assert np.abs(mine.astype(np.int16) - theirs_img).max() <= 1
    finally:
        m.load_state([])


def test_evaluation_prompts_put_the_token_in_place_of_the_concept_word(registry):
    red = attack(registry, concept="red", model="toy")
    assert red.token() == "<red>" and red.spec.params["captions"] == "data"
    out = red.eval_prompts({"target": ["a red circle", "a Red square"], "benign": ["a blue circle"]})
    assert out == {"target": ["a <red> circle", "a <red> square"]}
    nude = attack(registry)
    assert nude.eval_prompts({"target": ["a photo of a naked man"]}) == {"target": ["<nudity> a photo of a naked man"]}


def test_bad_initializer_is_refused_before_training(registry, tiny_model):
    tiny_model.load_state([])
    ci = attack(registry, initializer={"default": "two words"})
    data = ImageSet(np.zeros((1, 32, 32, 3), np.uint8), ["a photo"])
    with pytest.raises(ValueError, match="must be one token"):
        ci.run(tiny_model, data, 0, lambda *a, **k: None)
    assert tiny_model.tokens == {}
