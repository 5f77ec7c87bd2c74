"""Forget-Me-Not at the level of its equation on the tiny model: the loss is the Frobenius norm of the attn2 softmax
probabilities at the concept positions (recomputed here by hand from to_q / to_k), the processors leave the UNet's
output unchanged and are removed by cleanup, and fmn / fmn+meta run through the shared loop."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from unlearn_bench.data import ImageSet
from unlearn_bench.methods.fmn import ForgetMeNot, concept_positions, cross_attention_modules
from unlearn_bench.methods_runtime import build_method, run_method
from unlearn_bench.specs import ComponentSpec, params

TINY = {"train": "full", "iterations": 3, "lr": 1.0e-3, "optimizer": "adamw", "weight_decay": 0.01,
        "grad_clip": 1.0, "batch_size": 2, "forget_images": 4, "prompt": None, "concept_text": None,
        "use_pooler": True, "pooler_padding": False}
# the concept word sits at different positions, so a batch of two checks the per-sample selection
CAPTIONS = ["a red circle", "a big red square", "a red triangle", "one small red circle"]


def _spec(**over) -> ComponentSpec:
    return ComponentSpec(kind="method", name="fmn", module="unlearn_bench.methods.fmn:ForgetMeNot",
                         params=params(TINY | over))


def _data() -> dict[str, ImageSet]:
    imgs = np.random.default_rng(0).integers(0, 256, (len(CAPTIONS), 32, 32, 3), dtype=np.uint8)
    return {"forget": ImageSet(imgs, list(CAPTIONS))}


@pytest.fixture
def fmn(tiny_model, registry):
    tiny_model.load_state([])
    method = ForgetMeNot(_spec(), registry.concept("red"))
    method.data = _data()
    method.prepare(tiny_model, 0)
    yield method
    method.cleanup()
    tiny_model.load_state([])


def test_concept_positions_and_the_padding_choice(tiny_model):
    tok = tiny_model.tokenizer  # max length 16: <sot> a red circle <eot> + 11 padding <eot>
    assert concept_positions(tok, "a red circle", "red", use_pooler=False, pooler_padding=False) == [2]
    assert concept_positions(tok, "a red circle", "red", use_pooler=True, pooler_padding=False) == [2, 4]
    assert concept_positions(tok, "a red circle", "red", use_pooler=True, pooler_padding=True) == [2] + list(
        range(4, 16))
    # multi-token concepts and repeated occurrences are all marked
    assert concept_positions(tok, "a painting by van gogh", "van gogh", False, False) == [4, 5]
    assert concept_positions(tok, "red and red", "red", False, False) == [1, 3]
    with pytest.raises(ValueError, match="does not occur"):
        concept_positions(tok, "a blue circle", "red", True, False)


def test_loss_equals_the_hand_computed_attention_norm(tiny_model, fmn):
    """L = sqrt(sum over attn2 layers, samples, heads, pixels, concept positions of softmax(q k^T / sqrt d)^2),
    with q = to_q(h), k = to_k(text) read from each layer's own inputs."""
    m = tiny_model
    mods = cross_attention_modules(m.unet)
    assert len(mods) == sum(1 for n, _ in m.unet.named_modules() if n.endswith("attn2")) > 1
    inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [mod.register_forward_pre_hook(
        lambda _m, args, kwargs, n=n: inputs.__setitem__(n, (args[0] if args else kwargs["hidden_states"],
                                                             kwargs["encoder_hidden_states"])), with_kwargs=True)
        for n, mod in mods.items()]
    try:
        loss = fmn.loss(m, 0, torch.Generator().manual_seed(3))
    finally:
        for h in hooks:
            h.remove()
    assert set(inputs) == set(mods) == set(fmn.last_layers)
    # the batch drawn: the first two of the seeded permutation (batch_size 2 of 4 images)
    batch = torch.randperm(4, generator=torch.Generator().manual_seed(3))[:2].tolist()
    pos = {0: [2, 4], 1: [3, 5], 2: [2, 4], 3: [3, 5]}  # "red" and the first <eot>, per caption
    total = torch.zeros((), dtype=torch.float64)
    for name, mod in mods.items():
        h, ctx = (t.double() for t in inputs[name])
        q = h @ mod.to_q.weight.double().T
        k = ctx @ mod.to_k.weight.double().T
        b, n_q, _ = q.shape
        heads = mod.heads
        q = q.view(b, n_q, heads, -1).transpose(1, 2)
        k = k.view(b, k.shape[1], heads, -1).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # [B, H, pixels, tokens]
        picked = torch.cat([probs[i][..., pos[j]].flatten() for i, j in enumerate(batch)])
        torch.testing.assert_close(fmn.last_layers[name].double().sort().values, picked.sort().values,
                                   rtol=1e-4, atol=1e-6)
        total = total + (picked ** 2).sum()
    assert float(loss) == pytest.approx(float(total.sqrt()), rel=1e-5)
    # it is a differentiable function of the cross-attention queries/keys (the UNet output is not used)
    w = next(iter(mods.values())).to_k.weight
    w.requires_grad_(True)
    try:
        g, = torch.autograd.grad(fmn.loss(m, 1, torch.Generator().manual_seed(4)), [w])
    finally:
        w.requires_grad_(False)
    assert float(g.abs().sum()) > 0


def test_processors_keep_the_output_record_only_in_the_loss_and_are_removed(tiny_model, registry):
    m = tiny_model
    m.load_state([])
    before = {n: mod.processor for n, mod in cross_attention_modules(m.unet).items()}
    x = torch.randn(2, *m.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = m.encode_prompt(["a red circle", "a blue square"])
    with torch.no_grad():
        ref = m.predict(x, 500, cond)
    method = ForgetMeNot(_spec(), registry.concept("red"))
    method.data = _data()
    method.prepare(m, 0)
    try:
        assert all(type(mod.processor).__name__ == "RecordingCrossAttnProcessor"
                   for mod in cross_attention_modules(m.unet).values())
        with torch.no_grad():
            torch.testing.assert_close(m.predict(x, 500, cond), ref, rtol=1e-4, atol=1e-5)
            shadow = copy.deepcopy(m.unet)  # what +meta makes for its simulated attacker
            m.predict(x, 500, cond, unet=shadow)
        assert method.recorder.probs == {}  # forwards outside loss() record nothing
    finally:
        method.cleanup()
    assert {n: mod.processor for n, mod in cross_attention_modules(m.unet).items()} == before


def _loss_now(m, spec, concept) -> float:
    """FMN's loss on the model's current weights, at a fixed draw (prepare and cleanup around it)."""
    method = ForgetMeNot(spec, concept)
    method.data = _data()
    method.prepare(m, 0)
    try:
        with torch.no_grad():
            return float(method.loss(m, 0, torch.Generator().manual_seed(9)))
    finally:
        method.cleanup()


def test_fmn_trains_and_lowers_the_attention_norm(tiny_model, registry):
    m = tiny_model
    m.load_state([])
    concept = registry.concept("red")
    spec = _spec(iterations=6, lr=3e-3, batch_size=4)
    l0 = _loss_now(m, spec, concept)
    try:
        result = run_method(m, spec, concept, 0, data=_data())
        delta = m.delta()
        assert delta and all(k.startswith("unet.") for k in delta)
        l1 = _loss_now(m, spec, concept)
        assert all(np.isfinite(result["history"])) and len(result["history"]) == 6
        assert l1 < 0.9 * l0, (l0, l1)
        xattn = ForgetMeNot(_spec(train="xattn"), concept).trainable(m)
        assert xattn and all(".attn2." in k for k in xattn)
    finally:
        m.load_state([])


def test_fmn_meta_composes(tiny_model, registry):
    m = tiny_model
    m.load_state([])
    concept = registry.concept("red")
    meta = registry.method("esd-x+meta", registry.model("tiny")).wrappers
    spec = replace(_spec(iterations=2), wrappers=meta)
    method = build_method(spec, concept)
    rng = np.random.default_rng(1)
    data = {role: ImageSet(rng.integers(0, 256, (req.n_images, 32, 32, 3), dtype=np.uint8), req.captions())
            for role, req in method.data_requests().items()}
    assert "forget" in data and "meta-forget" in data
    try:
        result = run_method(m, spec, concept, 0, data=data)
        assert len(result["history"]) == 2 and all(np.isfinite(result["history"]))
        assert {"grad_dot_start", "grad_dot_end"} <= set(result["diagnostics"])
        assert m.delta()
        assert all(type(mod.processor).__name__ != "RecordingCrossAttnProcessor"
                   for mod in cross_attention_modules(m.unet).values())
    finally:
        m.load_state([])


def test_gradient_checkpointing_gives_the_same_loss_and_gradient(registry):
    """Under checkpointing the UNet re-runs its blocks in backward without recording: the loss and its gradient
    must equal the plain run's (recording must not change what the forward saves)."""
    from unlearn_bench.models.loading import load_model

    m = load_model(replace(registry.model("tiny"), gradient_checkpointing=True), "cpu")
    method = ForgetMeNot(_spec(), registry.concept("red"))
    method.data = _data()
    method.prepare(m, 0)
    try:
        x = torch.randn(2, *m.latent_shape, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([100, 700])
        w = m.unet.down_blocks[0].resnets[0].conv1.weight
        w.requires_grad_(True)
        out = []
        for checkpointing in (True, False):
            if not checkpointing:
                m.unet.disable_gradient_checkpointing()
            loss = method.attention_loss(m, x, t, method.cond.index(slice(0, 2)), method.mask[:2])
            out.append((float(loss.detach()), torch.autograd.grad(loss, [w])[0]))
        assert out[0][0] == pytest.approx(out[1][0], rel=1e-6)
        torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-4, atol=1e-7)
        assert float(out[0][1].abs().sum()) > 0
    finally:
        method.cleanup()
