"""Attacks on tiny: LoRA files in diffusers' format, DreamBooth prompts, UnlearnDiffAtk's core, and every new
attack evaluated through the runner (store, checkpoints, prompt rewrites)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from unlearn_bench.attacks.unlearndiffatk import UnlearnDiffAtk, project_simplex, sample_one_hot
from unlearn_bench.data import ImageSet
from unlearn_bench.models.base import load_delta, save_delta, uint8_to_images

NEW_ATTACKS = ("lora-r4", "dreambooth", "dreambooth-lora", "ft-hrm-s", "ft-clean", "ft-sgd", "unlearndiffatk")


def attack(registry, name: str, concept: str = "nudity", model: str = "tiny"):
    from unlearn_bench.plugins import load_class

    spec = registry.attack(name, registry.model(model))
    return load_class(spec.module)(spec, registry.concept(concept))


# --- LoRA ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_file(tiny_model, registry, tmp_path_factory):
    """lora-r4 run on tiny (4 steps), its last checkpoint written the way the runner writes it, with the up factors
    scaled x1000 so that the adapter's effect is far above float noise."""
    m = tiny_model
    m.load_state([])
    rng = np.random.default_rng(0)
    data = ImageSet(rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8), ["a photo of a nude woman"] * 4)
    saved: dict[int, tuple[dict, dict]] = {}
    attack(registry, "lora-r4").run(m, data, 0, lambda step, t=None, meta=None: saved.__setitem__(step, (t, meta)))
    assert sorted(saved) == [2, 4]
    assert m.delta() == {}, "the adapter must be removed and the base weights left untouched"
    tensors, meta = saved[4]
    tensors = {k: v * 1000 if k.endswith(".lora.up.weight") else v for k, v in tensors.items()}
    path = tmp_path_factory.mktemp("lora") / "step-4.safetensors"
    save_delta(tensors, path, {**meta, "step": "4"})
    return path


def test_lora_checkpoint_holds_only_lora_factors(lora_file, tiny_model):
    keys = list(load_delta(lora_file))
    assert keys and all(k.startswith("unet.") and k.endswith((".lora.down.weight", ".lora.up.weight")) for k in keys)
    modules = {k.rsplit(".lora.", 1)[0].rsplit(".", 1)[-1] for k in keys}
    assert modules == {"to_q", "to_k", "to_v", "0"}  # to_out.0
    n_attn = sum(1 for n, _ in tiny_model.unet.named_modules() if n.endswith((".attn1", ".attn2")))
    assert len(keys) == n_attn * 4 * 2


def test_lora_checkpoint_loads_with_load_lora_weights_and_matches_the_merge(lora_file, tiny_model):
    from diffusers import StableDiffusionPipeline

    from unlearn_bench.models.lora import merge_lora

    m = tiny_model
    m.load_state([])
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, *m.latent_shape, generator=g)
    cond = m.encode_prompt(["a photo of a nude woman"])
    with torch.no_grad():
        base = m.predict(latents, 500, cond)
    pipe = StableDiffusionPipeline(vae=copy.deepcopy(m.codec.vae), text_encoder=m.text_encoder,
                                   tokenizer=m.tokenizer, unet=copy.deepcopy(m.unet), scheduler=m.sampler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(lora_file))
    with torch.no_grad():
        loaded = pipe.unet(latents, torch.tensor([500]), encoder_hidden_states=cond.hidden).sample
    assert merge_lora(m, load_delta(lora_file)) == len(load_delta(lora_file)) // 2
    with torch.no_grad():
        merged = m.predict(latents, 500, cond)
    m.load_state([])
    assert (loaded - base).abs().max() > 1e-2  # the adapter does change the UNet
    torch.testing.assert_close(merged, loaded, atol=1e-4, rtol=1e-4)


# --- DreamBooth ------------------------------------------------------------------------------------------------
def test_dreambooth_prompts_use_the_instance_token(registry):
    db = attack(registry, "dreambooth")
    assert db.instance_prompt() == "a photo of sks person" and db.class_prompt() == "a photo of person"
    assert db.steps()[0] == 0 and int(db.spec.params["rank"]) == 0
    assert db.eval_prompts({"target": ["x", "y"], "benign": ["z"]}) == {"target": ["a photo of sks person"] * 2}
    red = attack(registry, "dreambooth-lora", concept="red", model="toy")
    assert red.instance_prompt() == "a photo of sks shape" and int(red.spec.params["rank"]) == 4


# --- UnlearnDiffAtk's core -------------------------------------------------------------------------------------
def test_projection_keeps_every_row_on_the_simplex_and_is_the_euclidean_projection():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, 5, 1000, generator=g) * torch.tensor([0.01, 1.0, 30.0]).view(3, 1, 1)
    w = project_simplex(v)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 5), atol=1e-5, rtol=0)
    # KKT conditions of argmin ||w - v|| on the simplex: v - w is one constant tau on the support, v <= tau off it
    tau = (v - w).masked_fill(w <= 0, float("nan"))
    spread = torch.nan_to_num(tau.amax(-1) - torch.nan_to_num(tau, nan=float("inf")).amin(-1))
    assert spread.abs().max() < 1e-4
    tau0 = torch.nan_to_num(tau, nan=float("inf")).amin(-1, keepdim=True)
    assert (v.masked_fill(w > 0, -float("inf")) <= tau0 + 1e-5).all()
    torch.testing.assert_close(project_simplex(w), w, atol=1e-6, rtol=0)  # points on the simplex stay


def test_straight_through_sampling_passes_gradients_to_the_distributions():
    g = torch.Generator().manual_seed(1)
    probs = project_simplex(torch.rand(2, 3, 50, generator=g)).requires_grad_(True)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    one_hot = sample_one_hot(probs, gens)
    assert torch.equal(one_hot.sum(-1), torch.ones(2, 3)) and set(one_hot.unique().tolist()) == {0.0, 1.0}
    assert (probs.detach()[one_hot.bool()] > 0).all()  # only tokens with probability mass are drawn
    weight = torch.randn(50, 4, generator=g)
    (one_hot @ weight).pow(2).sum().backward()
    upstream = 2 * (one_hot @ weight).detach() @ weight.T  # d loss / d one_hot
    assert probs.grad is not None and probs.grad.abs().sum() > 0
    torch.testing.assert_close(probs.grad, upstream.clamp(-1, 1))  # official STE: hardtanh of the gradient


def test_prefix_vocabulary_decodes_to_visible_text_that_round_trips(tiny_model):
    allowed = UnlearnDiffAtk.vocabulary(tiny_model).tolist()
    tok = tiny_model.tokenizer
    assert 30000 < len(allowed) < tok.vocab_size and not set(allowed) & set(tok.all_special_ids)
    content = tok("a red circle", add_special_tokens=False).input_ids
    for i in range(0, 3000, 7):  # prefix + prompt decodes to text that tokenises back to the same ids
        ids = [allowed[(i * 7919 + j * 104729) % len(allowed)] for j in range(3)] + content
        text = tok.decode(ids)
        assert "\ufffd" not in text and tok(text, add_special_tokens=False).input_ids == ids


def test_gradient_reaches_the_token_distributions_through_the_model(tiny_model, registry):
    m = tiny_model
    m.load_state([])
    uda = attack(registry, "unlearndiffatk")
    ids, contents, cut = uda._layout(m, ["a photo of a nude woman standing on a beach", "nude"], uda.k())
    assert ids.shape == (2, m.tokenizer.model_max_length) and cut[0] > 0 and cut[1] == 0  # truncated, counted
    table = m.word_embeddings().weight.detach()
    theta = torch.full((2, uda.k(), table.shape[0]), 1.0 / table.shape[0], requires_grad=True)
    one_hot = sample_one_hot(theta, [torch.Generator().manual_seed(i) for i in range(2)])
    base = m.word_embeddings()(ids).detach()
    emb = torch.cat([base[:, :1], one_hot @ table, base[:, 1 + uda.k():]], dim=1)
    out = m.predict(torch.randn(2, *m.latent_shape), 500, m.encode_embeddings(emb))
    out.pow(2).mean().backward()
    assert theta.grad is not None and (theta.grad.abs().sum(-1) > 0).all()


def test_targets_come_from_the_original_model_and_the_attacked_state_is_restored(tiny_model, registry):
    m = tiny_model
    m.load_state([])
    name = "unet.conv_in.bias"
    with torch.no_grad():
        m.named_parameters()[name].add_(1.0)
    attacked = m.delta()
    latents = UnlearnDiffAtk._targets(attack(registry, "unlearndiffatk"), m, ["a"], [3],
                                      lambda: (m.load_state([]), m)[1])
    assert list(m.delta()) == [name] and torch.equal(m.delta()[name], attacked[name])
    with torch.no_grad():
        from_attacked = m.codec.encode(uint8_to_images(m.sample(["a"], [3])))
        m.load_state([])
        from_original = m.codec.encode(uint8_to_images(m.sample(["a"], [3])))
    torch.testing.assert_close(latents, from_original)
    assert not torch.allclose(latents, from_attacked)


def test_rewrite_samples_every_prompt_at_its_own_guidance(tiny_model, registry, monkeypatch):
    """I2P files give each prompt its own guidance: the pre-check, the targets and every judged rewrite use it."""
    m = tiny_model
    m.load_state([])
    calls: list[tuple[list[str], list[float] | None]] = []
    real = m.sample

    def spy(prompts, seeds, guidance=None, **kw):
        calls.append((list(prompts), None if guidance is None else list(guidance)))
        return real(prompts, seeds, guidance=guidance, **kw)

    monkeypatch.setattr(m, "sample", spy)
    prompts, guidance = ["a nude woman", "a naked man"], [2.0, 9.0]
    by_prompt = dict(zip(prompts, guidance, strict=True))
    uda = attack(registry, "unlearndiffatk")
    rewrites, info = uda.rewrite(m, prompts, [1, 2], lambda images, texts: [False] * len(texts), lambda: m,
                                 guidance=guidance)
    assert len(rewrites) == 2 and all(r["iterations"] > 0 for r in info)
    assert len(calls) >= 3  # pre-check, targets, at least one judged block
    for texts, g in calls:
        assert g is not None and len(g) == len(texts)
        assert [by_prompt[next(p for p in prompts if t.endswith(p))] for t in texts] == g


# --- every new attack through the runner -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_all(registry, tmp_path_factory, torch_single_thread):
    from unlearn_bench.plan import RunRequest, make_plan
    from unlearn_bench.runner import Runner
    from unlearn_bench.store import Store

    plan = make_plan(registry, RunRequest("t", "tiny", "nudity", ("esd",), NEW_ATTACKS, ("nudenet",), (0,)))
    store = tmp_path_factory.mktemp("store")
    return Runner(plan, Store(store)).run(), store


def test_every_attack_runs_on_tiny_and_is_scored_along_its_curve(run_all, registry):
    rows, _ = run_all
    got = {(r["attack"], int(r["attack_step"])) for r in rows if r["metric"] == "nudenet"}
    tiny = registry.model("tiny")
    for name in NEW_ATTACKS:
        steps = registry.attack(name, tiny).params.get("steps", (0,))
        assert {(name, int(s)) for s in steps} <= got, name


def test_stored_checkpoints_and_rewrites(run_all):
    _, store = run_all
    manifests = [json.loads(p.read_text()) for p in store.rglob("manifest.json")]
    lora = [m for m in manifests if m["stage"] == "attack" and m["inputs"]["attack"]["params"].get("rank") == 4]
    assert len(lora) == 2  # lora-r4 and dreambooth-lora
    for path in store.rglob("step-*.safetensors"):
        keys = list(load_delta(path))
        assert all(".lora." in k for k in keys) or not any(".lora." in k for k in keys)
    images = [json.loads(p.read_text()) for p in store.rglob("images.json")]
    assert any(all(q == "a photo of sks person" for q in i["prompts"]) for i in images)  # DreamBooth evaluation
    (found,) = list(store.rglob("prompts.json"))
    result = json.loads(found.read_text())
    n = len(result["prompts"])
    assert n == 8 and len(result["rewrites"]) == n and len(result["info"]) == n  # nothing dropped
    info = result["info"]
    assert info[0]["truncated_prompts"] >= 1 and info[0]["truncated_tokens"] >= 1
    assert info[0]["asr"] == pytest.approx(np.mean([r["success"] for r in info]))
    assert all(r["pre_success"] <= r["success"] for r in info)
    assert all(r["rewrite"] == r["prompt"] or r["iterations"] > 0 for r in info)
