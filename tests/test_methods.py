"""UCE, SalUn and AdvUnlearn at the level of their equations, on the tiny model, plus a tiny end-to-end run."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from unlearn_bench.data import ImageSet
from unlearn_bench.registry import Registry


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _data(method) -> dict[str, ImageSet]:
    """Seeded random images with the captions the runner would generate (the equations do not care what they show)."""
    return {role: ImageSet(_images(req.n_images, i), req.captions())
            for i, (role, req) in enumerate(sorted(method.data_requests().items()))}


def _run(model, registry, name: str, seed: int = 0, overrides: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    from unlearn_bench.methods_runtime import build_method, run_method

    reg = Registry.load(overrides=list(overrides)) if overrides else registry
    spec, concept = reg.method(name, reg.model("tiny")), reg.concept("nudity")
    model.load_state([])
    try:
        run_method(model, spec, concept, seed, data=_data(build_method(spec, concept)))
        return model.delta()
    finally:
        model.load_state([])


# --- UCE -----------------------------------------------------------------------------------------------------
def test_uce_last_subject_token_index(tiny_model):
    from unlearn_bench.methods.uce import last_subject_index

    assert last_subject_index(tiny_model.tokenizer, "") == 0  # the guide "" reads the <sot> position
    assert last_subject_index(tiny_model.tokenizer, "a red circle") == 3  # <sot> a red circle <eos>


@pytest.mark.parametrize("tokens", ["last", "all"])
def test_uce_edit_solves_its_normal_equations(tiny_model, registry, tokens):
    """W* must satisfy W* (lam I + sum s c c^T) = lam W0 + sum_e s_e v*_e c_e^T + sum_p s_p W0 c_p c_p^T."""
    over = ("method.uce.tokens=" + tokens, "method.uce.lam=0.7", "method.uce.erase_scale=2.0",
            "method.uce.preserve_scale=0.5", "method.uce.guide=a photo")
    m = tiny_model
    m.load_state([])
    w0 = {k: v.clone() for k, v in m.named_parameters().items()}
    delta = _run(m, registry, "uce", overrides=over)
    assert delta and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in delta)
    n_layers = sum(1 for k in w0 if ".attn2.to_k.weight" in k or ".attn2.to_v.weight" in k)
    assert len(delta) == n_layers

    concept = registry.concept("nudity")
    with torch.no_grad():
        def vecs(texts):
            h = m.encode_prompt(texts).hidden.double()
            if tokens == "all":
                return h.reshape(-1, h.shape[-1])
            last = [len(m.tokenizer(t).input_ids) - 2 for t in texts]
            return h[torch.arange(len(texts)), torch.tensor(last)]
        c_e, c_g = vecs(["nudity"]), vecs(["a photo"])
        c_p = vecs(list(concept.related + concept.unrelated))
    lam, s_e, s_p = 0.7, 2.0, 0.5
    for name, w_new in delta.items():
        w, w_old = w_new.double(), w0[name].double()
        v_star = c_g @ w_old.T
        rhs = lam * w_old + s_e * v_star.T @ c_e + s_p * (w_old @ c_p.T) @ c_p
        gram = lam * torch.eye(w.shape[1], dtype=torch.float64) + s_e * c_e.T @ c_e + s_p * c_p.T @ c_p
        rel = (w @ gram - rhs).norm() / rhs.norm()
        assert rel < 1e-4, (name, float(rel))
        assert not torch.allclose(w, w_old)


def test_uce_is_deterministic(tiny_model, registry):
    a, b = _run(tiny_model, registry, "uce", 3), _run(tiny_model, registry, "uce", 3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_uce_edit_under_bf16_precision_equals_the_fp32_edit(tiny_model, registry):
    """The closed form reads fp32 text embeddings whatever the model's precision: the bf16 model's edit is the fp32
    edit (and the bf16-autocast embeddings it avoids are measurably different, so this test can fail)."""
    from dataclasses import replace

    from unlearn_bench.methods.uce import text_vectors
    from unlearn_bench.models.loading import load_model

    bf16 = load_model(replace(registry.model("tiny"), precision="bf16"), "cpu")
    assert bf16.amp_dtype is torch.bfloat16
    exact, edited = _run(tiny_model, registry, "uce"), _run(bf16, registry, "uce")
    assert exact.keys() == edited.keys() and exact
    for k in exact:
        assert (exact[k] - edited[k]).abs().max() < 1e-5, k
    with torch.no_grad():
        autocast = bf16.encode_prompt(["nudity"]).hidden.double()[0, 1]
    assert (autocast - text_vectors(bf16, ["nudity"], "last")[0]).abs().max() > 1e-4
    assert bf16.amp_dtype is torch.bfloat16  # full_precision() restores the model's setting


def test_uce_keeps_a_preserve_prompt_that_is_also_erased(tiny_model, registry):
    """As the official script: the overlapping prompt stays in both sums (listed in the diagnostics)."""
    from unlearn_bench.methods_runtime import build_method

    reg = Registry.load(overrides=["method.uce.preserve=[nudity, a photo]"])
    method = build_method(reg.method("uce", reg.model("tiny")), reg.concept("nudity"))
    erase, _, preserve = method.prompts()
    assert erase == ["nudity"] and preserve == ["nudity", "a photo"]
    tiny_model.load_state([])
    try:
        method.apply(tiny_model, 0)
    finally:
        tiny_model.load_state([])
    assert method.diagnostics["preserve_also_erased"] == ["nudity"] and method.diagnostics["n_preserve"] == 2


# --- SalUn ---------------------------------------------------------------------------------------------------
def test_saliency_mask_keeps_the_largest_gradients():
    from unlearn_bench.methods.salun import saliency_mask

    g = torch.Generator().manual_seed(0)
    grads = {"a": torch.randn(7, 5, generator=g), "b": torch.randn(13, generator=g)}
    for frac in (0.0, 0.3, 0.5, 1.0):
        mask = saliency_mask(grads, frac)
        kept = torch.cat([mask[k].flatten() for k in grads])
        flat = torch.cat([grads[k].abs().flatten() for k in grads])
        assert int(kept.sum()) == int(flat.numel() * frac)
        if 0 < frac < 1:
            assert flat[kept].min() >= flat[~kept].max()


@pytest.mark.parametrize("fraction", [0.5, 0.2])
def test_salun_mask_fraction_and_only_masked_entries_change(tiny_model, registry, fraction):
    from unlearn_bench.methods_runtime import build_method
    from unlearn_bench.training import train

    reg = Registry.load(overrides=[f"method.salun.mask_fraction={fraction}"])
    spec, concept = reg.method("salun", reg.model("tiny")), reg.concept("nudity")
    m = tiny_model
    m.load_state([])
    method = build_method(spec, concept)
    method.data = _data(method)
    method.prepare(m, 0)
    try:
        mask = {k: v.clone() for k, v in method.mask.items()}
        total = sum(v.numel() for v in mask.values())
        assert total == sum(p.numel() for p in m.unet.parameters())  # train: full = the whole UNet
        assert sum(int(v.sum()) for v in mask.values()) == int(total * fraction)
        train(m, method, seed=0, **method.train_settings())
    finally:
        method.cleanup()
    before = m._original
    delta = m.delta()
    m.load_state([])
    assert delta and all(k.startswith("unet.") for k in delta)
    changed = sum(int((delta[k] != before[k]).sum()) for k in delta)
    assert changed > 0
    for k, v in delta.items():
        assert not bool(((v != before[k]) & ~mask[k]).any()), k
    assert all(not p._backward_hooks for p in m.unet.parameters())  # hooks removed by cleanup


def test_salun_defaults_follow_the_concept(registry):
    from unlearn_bench.methods.salun import NUDITY_BENIGN, SalUn

    tiny = registry.model("tiny")
    nud = SalUn(registry.method("salun", tiny), registry.concept("nudity"))
    red = SalUn(registry.method("salun", tiny), registry.concept("red"))
    assert nud.alpha() == 0.1 and red.alpha() == 0.5
    assert nud.benign_prompts(["x"]) == [NUDITY_BENIGN] and red.benign_prompts(["x"]) == [""]
    swap = SalUn(Registry.load(overrides=["method.salun.benign_swap=green"]).method("salun", tiny),
                 registry.concept("red"))
    assert swap.benign_prompts(["a red circle"]) == ["a green circle"]
    assert set(nud.data_requests()) == {"forget", "retain"}


def test_salun_is_deterministic_under_a_seed(tiny_model, registry):
    a, b, c = (_run(tiny_model, registry, "salun", s) for s in (3, 3, 4))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a.keys() != c.keys() or any(not torch.equal(a[k], c[k]) for k in a)


# --- AdvUnlearn ----------------------------------------------------------------------------------------------
def test_advunlearn_trains_only_the_text_encoder_never_embeddings(tiny_model, registry):
    delta = _run(tiny_model, registry, "advunlearn")
    assert delta and all(k.startswith("text_encoder.") for k in delta)
    assert not any("embeddings" in k for k in delta)
    assert any("final_layer_norm" in k for k in delta) and any("layers.0." in k for k in delta)
    only1 = _run(tiny_model, registry, "advunlearn", overrides=("method.advunlearn.layers=1",
                                                                "method.advunlearn.final_layer_norm=false"))
    assert only1 and all(".layers.1." in k for k in only1)


def test_advunlearn_prefix_equals_the_prompt_with_a_real_token(tiny_model, registry):
    from unlearn_bench.methods.advunlearn import AdvUnlearn

    m = tiny_model
    m.load_state([])
    method = AdvUnlearn(registry.method("advunlearn", registry.model("tiny")), registry.concept("nudity"))
    method.prepare(m, 0)
    tok = m.tokenizer("photo").input_ids[1]
    adv = m.word_embeddings().weight[tok].detach().view(1, 1, -1)
    with torch.no_grad():
        ours = m.encode_embeddings(method.adversarial_embeddings(m, adv)).hidden
        ref = m.encode_prompt(["photo nudity"]).hidden
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attack_method", ["pgd", "fast_at"])
def test_advunlearn_inner_attack_lowers_the_attack_loss(tiny_model, registry, attack_method):
    from unlearn_bench.methods.advunlearn import AdvUnlearn

    reg = Registry.load(overrides=[f"method.advunlearn.attack_method={attack_method}",
                                   "method.advunlearn.attack_steps=15"])
    m = tiny_model
    m.load_state([])
    method = AdvUnlearn(reg.method("advunlearn", reg.model("tiny")), reg.concept("nudity"))
    method.prepare(m, 0)
    gen = torch.Generator().manual_seed(0)
    fixed = method.draw(m, gen)
    method.draw = lambda model, generator: fixed  # one (z_t, t, target) so the objective is deterministic
    start = method.init_adv(m, gen)
    method.adv = start  # attack_init latest: warm start from here
    with torch.no_grad():
        before = float(method.attack_loss(m, start, *fixed))
    adv = method.inner_attack(m, gen)
    with torch.no_grad():
        after = float(method.attack_loss(m, adv, *fixed))
    assert after < 0.9 * before, (before, after)
    assert all(p.grad is None for p in m.text_encoder.parameters())  # the attack never fills encoder grads


def test_advunlearn_is_deterministic_under_a_seed(tiny_model, registry):
    a, b, c = (_run(tiny_model, registry, "advunlearn", s) for s in (3, 3, 4))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_advunlearn_refuses_sdxl(registry):
    from types import SimpleNamespace

    from unlearn_bench.methods.advunlearn import AdvUnlearn

    with pytest.raises(ValueError, match="TWO text encoders"):
        AdvUnlearn.check_model(registry.model("sdxl"))
    AdvUnlearn.check_model(registry.model("sd14"))
    method = AdvUnlearn(registry.method("advunlearn", registry.model("sdxl")), registry.concept("nudity"))
    with pytest.raises(ValueError, match="SDXL"):
        method.prepare(SimpleNamespace(spec=registry.model("sdxl")), 0)


# --- end to end ----------------------------------------------------------------------------------------------
def test_run_uce_salun_advunlearn_end_to_end(registry, tmp_path, torch_single_thread):
    from unlearn_bench.execute import execute
    from unlearn_bench.plan import RunRequest, make_plan

    req = RunRequest("custom", "tiny", "nudity", ("none", "uce", "salun", "advunlearn"), ("none",), ("nudenet",),
                     (0,))
    execute(make_plan(registry, req), tmp_path / "out", tmp_path / "store", device="cpu", quiet=True)
    rows = list(csv.DictReader((tmp_path / "out" / "records.csv").open()))
    assert {r["method"] for r in rows} == {"none", "uce", "salun", "advunlearn"}
    assert all(0.0 <= float(r["value"]) <= 1.0 and r["unlearn_key"] for r in rows if r["method"] != "none")
    assert len({r["unlearn_key"] for r in rows}) == 4  # three distinct unlearned models plus the baseline
