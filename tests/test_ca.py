"""Concept Ablation (methods/ca.py) at the level of its equations, on the tiny model, plus `ca+meta` end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unlearn_bench.data import ImageSet
from unlearn_bench.registry import Registry


def _load(overrides: tuple[str, ...] = ()) -> Registry:
    return Registry.load(overrides=list(overrides))


@pytest.fixture(scope="module")
def reg() -> Registry:
    return _load()


def _method(reg: Registry, concept: str = "nudity", overrides: tuple[str, ...] = (), name: str = "ca"):
    from unlearn_bench.methods_runtime import build_method

    r = _load(overrides) if overrides else reg
    spec, c = r.method(name, r.model("tiny")), r.concept(concept)
    return build_method(spec, c), spec, c


def _data(method) -> dict[str, ImageSet]:
    """Seeded random images with the captions the runner would generate (the equations do not care what they show)."""
    return {role: ImageSet(np.random.default_rng(i).integers(0, 256, (req.n_images, 32, 32, 3), dtype=np.uint8),
                           req.captions())
            for i, (role, req) in enumerate(sorted(method.data_requests().items()))}


def _prepared(model, reg, overrides=(), concept="nudity"):
    method, _, _ = _method(reg, concept, overrides)
    method.data = _data(method)
    method.prepare(model, 0)
    return method


def _perturb(model, names, scale=0.05):
    """Move the trained weights, as training would, so 'the current model' and 'the original' differ."""
    params = model.named_parameters()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n in names:
            params[n].add_(scale * torch.randn(params[n].shape, generator=gen))


def test_target_captions_follow_the_official_templates():
    from unlearn_bench.methods.ca import target_captions

    assert target_captions("a green circle", "red", "object", "green") == ["a red circle"]
    assert target_captions("a man", "nudity, nsfw", "nudity") == [
        "nudity, nsfw, a man", "in nudity, nsfw style, a man", "a man, nudity, nsfw"]
    style = target_captions("a house", "van gogh", "style")
    assert style.count("in van gogh's style, a house") == 2 and style[0] == "a house, in the style of van gogh"
    with pytest.raises(ValueError, match="anchor_word"):
        target_captions("a blue circle", "red", "object", "green")


def test_per_concept_defaults_resolve(reg):
    from unlearn_bench.methods.ca import ConceptAblation

    sd = reg.model("sd14")
    nud = ConceptAblation(reg.method("ca", sd), reg.concept("nudity"))
    i2p = ConceptAblation(reg.method("ca", sd), reg.concept("nudity-i2p"))
    red = ConceptAblation(reg.method("ca", reg.model("toy")), reg.concept("red"))
    for m in (nud, i2p):  # nudity-i2p reads nudity's recipe through its target word
        assert (m.param("train"), m.param("prior_loss_weight"), m.target_word()) == ("attn", 1.0, "nudity, nsfw")
        assert m.train_settings()["steps"] == 400 and m.train_settings()["lr"] == pytest.approx(6.4e-5)
    assert red.param("train") == "cross-attn" and red.param("prior_loss_weight") == 0.0
    assert red.anchor_prompts() == ["a green circle", "a green square", "a green triangle"]
    req = red.data_requests()["anchor"]
    assert req.prompts == ("a green circle", "a green square", "a green triangle") and req.role == "anchor"


def test_parameter_groups_match_train_py(tiny_model, reg):
    kv, _, _ = _method(reg, "red")
    names = set(kv.trainable(tiny_model))
    assert names and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in names)
    attn, _, _ = _method(reg, "nudity")
    names = set(attn.trainable(tiny_model))
    assert any(".attn1.to_q." in n for n in names) and any(".attn2.to_out." in n for n in names)
    assert not any("conv" in n or "norm" in n or "ff." in n for n in names)


@pytest.mark.parametrize("anchor_model", ["trained", "frozen"])
def test_model_based_target_is_the_stop_gradient_anchor_prediction(tiny_model, reg, anchor_model):
    """Target = out(x_t, c_anchor, t) under no-grad, on the same x_t and t as the target-caption prediction.
    At step 0 it equals the original model's prediction; `trained` (train.py) then follows the current weights,
    `frozen` stays with the original UNet."""
    m = tiny_model
    m.load_state([])
    original = m.frozen_copy(m.unet)
    ca = _prepared(m, reg, (f"method.ca.anchor_model={anchor_model}",))
    try:
        batch = ca.draw(m, torch.Generator().manual_seed(1))
        target = ca.target(m, batch)
        assert not target.requires_grad
        torch.testing.assert_close(target, m.predict(batch.x_t, batch.t, batch.c_anchor, unet=original))
        expected_xt = ca.scheduler.add_noise(batch.x0, batch.noise, batch.t)
        torch.testing.assert_close(batch.x_t, expected_xt)

        # the loss's gradient is exactly that of MSE(pred, constant target): no gradient reaches the anchor term
        params = ca.trainable(m)
        for p in params.values():
            p.requires_grad_(True)
        loss = ca.ablation_loss(m, batch)
        got = torch.autograd.grad(loss, list(params.values()))
        pred = m.predict(batch.x_t, batch.t, batch.c_target)
        ref = torch.autograd.grad(torch.nn.functional.mse_loss(pred, target), list(params.values()))
        for p in params.values():
            p.requires_grad_(False)
        for g, r in zip(got, ref, strict=True):
            torch.testing.assert_close(g, r)
        assert any(float(g.abs().sum()) > 0 for g in got)

        _perturb(m, list(params))
        moved = ca.target(m, batch)
        now = m.predict(batch.x_t, batch.t, batch.c_anchor)
        then = m.predict(batch.x_t, batch.t, batch.c_anchor, unet=original)
        assert not torch.allclose(now, then)
        torch.testing.assert_close(moved, now if anchor_model == "trained" else then)
    finally:
        m.load_state([])
        ca.cleanup()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noise_based_target_is_the_denoising_target(tiny_model, reg, prediction_type):
    m = tiny_model
    m.load_state([])
    saved = m.prediction_type
    m.prediction_type = prediction_type
    ca = _prepared(m, reg, ("method.ca.loss=noise-based",))
    try:
        batch = ca.draw(m, torch.Generator().manual_seed(2))
        target = ca.target(m, batch)
        want = batch.noise if prediction_type == "epsilon" else \
            ca.scheduler.get_velocity(batch.x0, batch.noise, batch.t)
        torch.testing.assert_close(target, want)
        assert not torch.allclose(target, m.predict(batch.x_t, batch.t, batch.c_anchor))
    finally:
        m.prediction_type = saved
        ca.cleanup()


def test_prior_preservation_adds_the_anchor_denoising_loss(tiny_model, reg):
    """loss = ablation term + w * standard denoising loss of a second anchor batch under its anchor captions."""
    m = tiny_model
    m.load_state([])
    ca = _prepared(m, reg, ("method.ca.prior_loss_weight=2.5",))
    order = {k: list(v) for k, v in ca._order.items()}
    total = ca.loss(m, 0, torch.Generator().manual_seed(3))
    ca._order = order
    gen = torch.Generator().manual_seed(3)
    ablate = ca.ablation_loss(m, ca.draw(m, gen))
    prior = ca.draw(m, gen, role="prior")
    standard = m.denoising_loss(prior.x0, prior.c_anchor, scheduler=ca.scheduler, noise_t=(prior.noise, prior.t))
    torch.testing.assert_close(total, ablate + 2.5 * standard)
    assert float(standard) > 0
    ca.cleanup()


def test_target_caption_pairs_with_its_anchor_caption(tiny_model, reg):
    """Each target condition is one of the target captions made from that sample's own anchor caption."""
    m = tiny_model
    m.load_state([])
    ca = _prepared(m, reg, concept="red")
    batch = ca.draw(m, torch.Generator().manual_seed(4))
    caps = list(ca.data["anchor"].captions)
    with torch.no_grad():
        for i in range(len(batch.x0)):
            # closeness, not bitwise equality: a batched and a single encoding may round differently on some CPUs
            hits = [j for j in range(len(caps)) if torch.allclose(batch.c_anchor.hidden[i],
                                                                  m.encode_prompt([caps[j]]).hidden[0], atol=1e-5)]
            assert hits
            want = m.encode_prompt([caps[hits[0]].replace("green", "red")]).hidden[0]
            torch.testing.assert_close(batch.c_target.hidden[i], want)
    ca.cleanup()


def test_ca_and_ca_meta_train_only_their_parameters(tiny_model, reg):
    from unlearn_bench.methods_runtime import build_method, run_method

    m = tiny_model
    for name in ("ca", "ca+meta"):
        spec, concept = reg.method(name, reg.model("tiny")), reg.concept("red")
        m.load_state([])
        try:
            result = run_method(m, spec, concept, 0, data=_data(build_method(spec, concept)))
            delta = m.delta()
        finally:
            m.load_state([])
        assert delta and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in delta), name
        assert len(result["history"]) == 2 and all(np.isfinite(result["history"]))
        if name == "ca+meta":
            assert "grad_dot_start" in result["diagnostics"]


@pytest.mark.slow  # trains and samples the toy model (minutes on 2 shared cores): `make test-slow`
def test_ca_erases_red_on_the_toy_and_spares_other_colours(tmp_path, torch_single_thread):
    """The toy-scaled defaults meet the project's bar on seed 0: concept-rate <= 0.10, attr-acc >= 0.80."""
    import csv

    from unlearn_bench.execute import execute
    from unlearn_bench.plan import RunRequest, make_plan

    req = RunRequest("custom", "toy", "red", ("ca",), ("none",), ("concept-rate", "attr-acc"), (0,))
    execute(make_plan(_load(), req), tmp_path / "out", tmp_path / "store", device="cpu", quiet=True)
    rows = {r["metric"]: float(r["value"]) for r in csv.DictReader((tmp_path / "out" / "records.csv").open())}
    assert rows["concept-rate"] <= 0.10 and rows["attr-acc"] >= 0.80, rows
