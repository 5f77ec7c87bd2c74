"""EraseDiff and ScissorHands at the level of their equations, on the tiny model: EraseDiff's step is the remain loss
plus lam times the forget-to-pseudo-prompt loss (stop-gradient target, shared noise and t); ScissorHands' mask is
the top fraction by |w * sum|grad||, its re-initialised entries are exactly the masked ones of the chosen layers;
both run inside +meta."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from unlearn_bench.data import ImageSet
from unlearn_bench.models.base import sample_seed, uint8_to_images
from unlearn_bench.specs import ComponentSpec, params

TINY = {"train": "full", "iterations": 2, "lr": 1.0e-3, "optimizer": "adam", "batch_size": 2, "lam": 0.3,
        "forget_images": 4, "retain_images": 4, "pseudo_prompt": "a photo of a pokemon", "pseudo_swap": None,
        "grad_clip": None}
TINY_LAYERS = [r"^up_blocks\.[01]\.attentions\.1\..*\.attn1\."]
SHS_TINY = TINY | {"sparsity": 0.9, "prune_num": 2, "reinit_layers": TINY_LAYERS, "reinit_init": "kaiming_uniform",
                   "pseudo_prompt": None}


def _spec(name: str, **over) -> ComponentSpec:
    module = {"erasediff": "unlearn_bench.methods.erasediff:EraseDiff",
              "scissorhands": "unlearn_bench.methods.scissorhands:ScissorHands"}[name]
    return ComponentSpec("method", name, module, params((SHS_TINY if name == "scissorhands" else TINY) | over))


def _data(method) -> dict[str, ImageSet]:
    """Seeded random images with the captions the runner would generate (the equations do not care what they show)."""
    return {role: ImageSet(np.random.default_rng(i).integers(0, 256, (req.n_images, 32, 32, 3), dtype=np.uint8),
                           req.captions())
            for i, (role, req) in enumerate(sorted(method.data_requests().items()))}


def _method(registry, name: str, concept: str = "nudity", **over):
    from unlearn_bench.methods_runtime import build_method

    method = build_method(_spec(name, **over), registry.concept(concept))
    method.data = _data(method)
    return method


def _noised(sched, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """q(x0, t, n) = sqrt(abar_t) x0 + sqrt(1 - abar_t) n, written out."""
    abar = sched.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


# --- EraseDiff -------------------------------------------------------------------------------------------------
def test_erasediff_step_is_remain_plus_lam_times_forget_by_hand(tiny_model, registry):
    m = tiny_model
    m.load_state([])
    method = _method(registry, "erasediff")
    method.prepare(m, 0)
    try:
        d = method.draw(m, torch.Generator().manual_seed(5))
        names = ["up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight", "conv_in.weight"]
        params_ = [dict(m.unet.named_parameters())[n] for n in names]
        for p in params_:
            p.requires_grad_(True)
        ours = method.objective(m, d)
        g_ours = torch.autograd.grad(ours, params_)

        sched = m.noise_scheduler()
        f_imgs, r_imgs = method.data["forget"], method.data["retain"]
        fi, ri = d.forget.tolist(), d.retain.tolist()
        with torch.no_grad():
            x0_f = m.codec.encode(uint8_to_images(f_imgs.images[fi]))
            x0_r = m.codec.encode(uint8_to_images(r_imgs.images[ri]))
            c_f = m.encode_prompt([f_imgs.captions[i] for i in fi]).hidden
            c_ps = m.encode_prompt(["a photo of a pokemon"] * len(fi)).hidden
            c_r = m.encode_prompt([r_imgs.captions[i] for i in ri]).hidden
        (n_f, t_f), (n_r, t_r) = d.forget_noise_t, d.retain_noise_t
        x_f = _noised(sched, x0_f, n_f, t_f)
        e_f = m.unet(x_f, t_f, encoder_hidden_states=c_f).sample
        e_ps = m.unet(x_f, t_f, encoder_hidden_states=c_ps).sample  # same x_t, same t: only the prompt differs
        e_r = m.unet(_noised(sched, x0_r, n_r, t_r), t_r, encoder_hidden_states=c_r).sample
        remain = ((e_r - n_r) ** 2).mean()  # tiny predicts epsilon: the remain target is the noise
        hand = remain + 0.3 * ((e_f - e_ps.detach()) ** 2).mean()
        no_stop = remain + 0.3 * ((e_f - e_ps) ** 2).mean()
        g_hand = torch.autograd.grad(hand, params_, retain_graph=True)
        g_no_stop = torch.autograd.grad(no_stop, params_)
    finally:
        for p in m.unet.parameters():
            p.requires_grad_(False)
        method.cleanup()
    torch.testing.assert_close(ours, hand, rtol=1e-5, atol=1e-6)
    assert float(((e_f - e_ps) ** 2).mean().detach()) > 1e-6  # the forget term is not trivially zero
    for a, b in zip(g_ours, g_hand, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # the pseudo prediction is a stop-gradient target: gradients through it would differ
    assert not torch.allclose(g_ours[0], g_no_stop[0], rtol=1e-3, atol=0)


def test_erasediff_loss_draws_then_evaluates_the_objective(tiny_model, registry):
    m = tiny_model
    m.load_state([])
    method = _method(registry, "erasediff")
    method.prepare(m, 0)
    try:
        with torch.no_grad():
            a = method.loss(m, 0, torch.Generator().manual_seed(3))
            method._order = {}
            b = method.objective(m, method.draw(m, torch.Generator().manual_seed(3)))
    finally:
        method.cleanup()
    assert float(a) == float(b)


def test_erasediff_batches_are_shuffled_epochs_not_the_first_batch(tiny_model, registry):
    m = tiny_model
    m.load_state([])
    method = _method(registry, "erasediff", forget_images=6, batch_size=2)
    method.prepare(m, 0)
    gen = torch.Generator().manual_seed(0)
    try:
        epochs = [[method._indices("forget", 6, gen).tolist() for _ in range(3)] for _ in range(2)]
    finally:
        method.cleanup()
    for epoch in epochs:
        assert sorted(i for b in epoch for i in b) == list(range(6))  # each image once per epoch
    assert epochs[0] != epochs[1]


def test_pseudo_prompts_fixed_swapped_and_concept_defaults(registry):
    from unlearn_bench.methods.erasediff import EraseDiff
    from unlearn_bench.methods.scissorhands import NUDITY_PSEUDO, ScissorHands

    red, nud = registry.concept("red"), registry.concept("nudity")
    assert EraseDiff(_spec("erasediff"), nud).pseudo_prompts(["x", "y"]) == ["a photo of a pokemon"] * 2
    assert EraseDiff(_spec("erasediff", pseudo_swap="green"), red).pseudo_prompts(["a red circle"]) == \
        ["a green circle"]
    assert ScissorHands(_spec("scissorhands"), nud).pseudo_prompts(["x"]) == [NUDITY_PSEUDO]
    assert ScissorHands(_spec("scissorhands"), red).pseudo_prompts(["x"]) == ["a photo of a pokemon"]
    assert ScissorHands(_spec("scissorhands", pseudo_prompt=""), nud).pseudo_prompts(["x"]) == [""]
    assert set(EraseDiff(_spec("erasediff"), red).data_requests()) == {"forget", "retain"}


def test_erasediff_noxattn_trains_what_the_official_train_method_names(tiny_model, registry):
    from unlearn_bench.methods_runtime import run_method

    m = tiny_model
    m.load_state([])
    spec, concept = _spec("erasediff", train="noxattn"), registry.concept("nudity")
    try:
        from unlearn_bench.methods_runtime import build_method

        run_method(m, spec, concept, 0, data=_data(build_method(spec, concept)))
        delta = m.delta()
    finally:
        m.load_state([])
    assert delta and all(k.startswith("unet.") for k in delta)
    assert not any("attn2" in k or k.startswith(("unet.time_embedding", "unet.conv_out", "unet.conv_norm_out"))
                   for k in delta)
    assert any("attn1" in k for k in delta) and any("resnets" in k for k in delta)


# --- ScissorHands ----------------------------------------------------------------------------------------------
def test_snip_mask_is_the_top_fraction_over_all_tensors():
    from unlearn_bench.methods.scissorhands import snip_mask

    g = torch.Generator().manual_seed(0)
    sal = {"a": torch.rand(7, 5, generator=g), "b": torch.rand(13, generator=g)}
    flat = torch.cat([s.flatten() for s in sal.values()])
    for sparsity in (0.0, 0.5, 0.9, 1.0):
        mask = snip_mask(sal, sparsity)
        kept = torch.cat([mask[k].flatten() for k in sal])
        assert int(kept.sum()) == flat.numel() - int(sparsity * flat.numel())
        if 0 < sparsity < 1:
            assert flat[kept].min() > flat[~kept].max()
    with pytest.raises(ValueError, match="sparsity"):
        snip_mask(sal, 1.5)


def test_scissorhands_mask_and_reinit_by_hand(tiny_model, registry):
    m = tiny_model
    m.load_state([])
    method = _method(registry, "scissorhands")
    drawn: list = []
    draw = method.prune_batches
    method.prune_batches = lambda model, gen: drawn.extend(draw(model, gen)) or drawn
    w0 = {n: p.detach().clone() for n, p in m.unet.named_parameters()}
    method.prepare(m, 0)
    try:
        mask = {k.removeprefix("unet."): v.clone() for k, v in method.mask.items()}
        diag = dict(method.diagnostics)
        w1 = {n: p.detach().clone() for n, p in m.unet.named_parameters()}
    finally:
        method.cleanup()
        m.load_state([])
    assert len(drawn) == 2  # prune_num batches

    # SNIP saliency by hand, at the original weights: | w * sum_b |d L_b / d w| |
    sched = m.noise_scheduler()
    forget = method.data["forget"]
    names = list(w0)
    live = dict(m.unet.named_parameters())
    acc = {n: torch.zeros_like(w0[n]) for n in names}
    for p in live.values():
        p.requires_grad_(True)
    try:
        for idx, (noise, t) in drawn:
            ids = idx.tolist()
            with torch.no_grad():
                x0 = m.codec.encode(uint8_to_images(forget.images[ids]))
                c = m.encode_prompt([forget.captions[i] for i in ids]).hidden
            pred = m.unet(_noised(sched, x0, noise, t), t, encoder_hidden_states=c).sample
            grads = torch.autograd.grad(((pred - noise) ** 2).mean(), [live[n] for n in names], allow_unused=True)
            for n, gr in zip(names, grads, strict=True):
                if gr is not None:
                    acc[n] += gr.abs()
    finally:
        for p in live.values():
            p.requires_grad_(False)
    sal = {n: (acc[n] * w0[n]).abs() for n in names}
    flat = torch.cat([sal[n].flatten() for n in names])
    n_keep = flat.numel() - int(0.9 * flat.numel())
    top = torch.zeros(flat.numel(), dtype=torch.bool)
    top[torch.argsort(flat, descending=True)[:n_keep]] = True
    ours = torch.cat([mask[n].flatten() for n in names])
    assert int(ours.sum()) == n_keep  # exactly the top 10 %
    threshold = float(flat.sort().values[flat.numel() - n_keep - 1 : flat.numel() - n_keep + 1].mean())
    disagree = ours ^ top  # only float round-off right at the threshold may flip an entry
    assert bool((((flat[disagree] - threshold).abs()) <= 1e-5 * threshold).all()), int(disagree.sum())
    assert int(disagree.sum()) <= 2

    # re-initialised entries = the masked entries of the chosen layers, with the seeded kaiming/zero values
    layers = [n for n in names if any(re.search(r, n) for r in TINY_LAYERS)]
    assert layers and all("attn1" in n for n in layers)
    gen = torch.Generator("cpu").manual_seed(sample_seed("scissorhands-reinit", 0))
    reinit_count = 0
    for n in names:
        changed = w1[n] != w0[n]
        if n not in layers:
            assert not bool(changed.any()), n
            continue
        assert torch.equal(changed, mask[n]), n
        reinit_count += int(mask[n].sum())
        if n.endswith("bias"):
            expected = torch.zeros_like(w0[n])
        else:
            bound = (6.0 / w0[n].shape[1]) ** 0.5  # kaiming-uniform, a=0, relu, fan_in
            expected = torch.empty_like(w0[n]).uniform_(-bound, bound, generator=gen)
            assert bool((w1[n][mask[n]].abs() <= bound).all())
        torch.testing.assert_close(w1[n][mask[n]], expected[mask[n]])
    assert reinit_count > 0 and diag["reinit_entries"] == reinit_count
    assert diag["mask_fraction"] == pytest.approx(n_keep / flat.numel())


def test_scissorhands_refuses_layers_that_match_nothing(tiny_model, registry):
    m = tiny_model
    m.load_state([])
    method = _method(registry, "scissorhands", reinit_layers=["no_such_layer"])
    try:
        with pytest.raises(ValueError, match="match no UNet parameter"):
            method.prepare(m, 0)
    finally:
        method.cleanup()
        m.load_state([])


# --- composition -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["erasediff", "scissorhands"])
def test_both_run_inside_meta(tiny_model, registry, name):
    """`+meta` composes through trainable()/loss() in the shared loop (no loop of their own)."""
    from unlearn_bench.methods_runtime import build_method, run_method

    meta = registry.method("none+meta", registry.model("tiny")).wrappers
    spec = replace(_spec(name), name=f"{name}+meta", wrappers=meta)
    concept = registry.concept("nudity")
    m = tiny_model
    m.load_state([])
    try:
        out = run_method(m, spec, concept, 1, data=_data(build_method(spec, concept)))
        delta = m.delta()
    finally:
        m.load_state([])
    assert len(out["history"]) == 2 and all(np.isfinite(out["history"]))
    assert {"grad_dot_start", "grad_dot_end"} <= set(out["diagnostics"])
    assert delta and all(k.startswith("unet.") for k in delta)


def test_registry_entries_resolve_for_every_model_group(registry):
    from unlearn_bench.methods.erasediff import TRAIN_CHOICES

    if "erasediff" not in registry.data["methods"]:
        pytest.skip("erasediff/scissorhands are not in the loaded registry (add their entries or include file)")
    for model in ("sd14", "toy", "tiny"):
        ed = registry.method("erasediff", registry.model(model))
        sh = registry.method("scissorhands", registry.model(model))
        assert set(TINY) <= set(ed.params) and set(SHS_TINY) <= set(sh.params)
        assert ed.params["train"] in TRAIN_CHOICES and sh.params["train"] in TRAIN_CHOICES
    sd = registry.method("scissorhands", registry.model("sd14")).params
    assert sd["sparsity"] == 0.995 and sd["lam"] == 0.1 and sd["prune_num"] == 10
    assert registry.method("erasediff", registry.model("sd14")).params["pseudo_prompt"] == "a photo of a pokemon"
