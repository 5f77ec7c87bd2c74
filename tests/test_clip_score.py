"""clip metric: the open_clip path offline on a tiny architecture (pretrained=None), a local checkpoint, the
missing-weights message at plan time, and the real ViT-L/14 when its weights are cached (marked `weights`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from unlearn_bench.specs import ComponentSpec, params

TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
PROMPTS = ["a red circle", "a photo of a dog", "a bowl of fruit", "a church in the mountains", "a red circle"]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory, torch_single_thread):
    path = tmp_path_factory.mktemp("clip") / "bench-test-tiny-clip.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def spec(**over) -> ComponentSpec:
    base = {"scope": "benign", "model": "ViT-L-14", "pretrained": "openai", "model_config": None, "scale": 100.0}
    return ComponentSpec("metric", "clip", "unlearn_bench.metrics.clip_score:ClipScore", params(base | over),
                         higher_is_better=True)


def images(n: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_score_is_100_times_clamped_cosine(tiny_config):
    from unlearn_bench.metrics.clip_score import ClipScore

    metric = ClipScore(spec(model="bench-test-tiny-clip", pretrained=None, model_config=tiny_config), None)
    result = metric.score(images(), PROMPTS)
    img, txt = metric.embed(images(), PROMPTS)
    cos = (img * txt).sum(-1).numpy()
    per = 100 * np.clip(cos, 0, None)
    assert result.n == 5 and result.value == pytest.approx(per.mean(), abs=1e-4)
    assert result.stderr == pytest.approx(per.std(ddof=1) / np.sqrt(5), abs=1e-4)
    assert [r["cos"] for r in result.per_image] == pytest.approx(cos.tolist(), abs=1e-5)
    assert all(r["clip_score"] >= 0 for r in result.per_image)
    settings = metric.settings()
    assert settings["backbone"] == "bench-test-tiny-clip/random-init" and settings["scale"] == 100.0
    assert settings["formula"] == "100 * max(cos, 0)" and "scope" not in settings


def test_batching_and_scale_do_not_change_the_embedding(tiny_config):
    from unlearn_bench.metrics.clip_score import ClipScore

    a = ClipScore(spec(model="bench-test-tiny-clip", pretrained=None, model_config=tiny_config), None)
    b = ClipScore(spec(model="bench-test-tiny-clip", pretrained=None, model_config=tiny_config, scale=1.0), None)
    i1, t1 = a.embed(images(), PROMPTS, batch_size=2)
    i2, t2 = a.embed(images(), PROMPTS, batch_size=32)
    assert np.allclose(i1.numpy(), i2.numpy(), atol=1e-5) and np.allclose(t1.numpy(), t2.numpy(), atol=1e-5)
    assert b.score(images(), PROMPTS).value == pytest.approx(a.score(images(), PROMPTS).value / 100, rel=1e-5)


def test_local_checkpoint_file_is_loaded(tiny_config, tmp_path):
    import torch

    from unlearn_bench.metrics.clip_score import ClipScore, load_clip

    net, _, _ = load_clip("bench-test-tiny-clip", None, tiny_config, "cpu")
    ckpt = tmp_path / "tiny.pt"
    torch.save(net.state_dict(), ckpt)
    random = ClipScore(spec(model="bench-test-tiny-clip", pretrained=None, model_config=tiny_config), None)
    local = ClipScore(spec(model="bench-test-tiny-clip", pretrained=str(ckpt), model_config=tiny_config), None)
    assert local.settings()["backbone"] == f"bench-test-tiny-clip/{ckpt}"
    assert local.score(images(), PROMPTS).value == pytest.approx(random.score(images(), PROMPTS).value, abs=1e-4)


def test_missing_weights_stop_planning_with_the_download_command(monkeypatch, tmp_path, registry):
    import huggingface_hub

    from unlearn_bench.metrics.clip_score import ClipWeightsMissing, resolve_weights
    from unlearn_bench.plan import RunRequest, make_plan
    from unlearn_bench.registry import RegistryError

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/clip
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    with pytest.raises(ClipWeightsMissing, match="hf download timm/vit_large_patch14_clip_224.openai"):
        resolve_weights("ViT-L-14", "openai")
    with pytest.raises(ClipWeightsMissing, match="neither a pretrained tag"):
        resolve_weights("ViT-L-14", "no-such-tag")
    req = RunRequest("t", "tiny", "nudity", ("none",), ("none",), ("clip",), (0,))
    with pytest.raises(RegistryError, match=r"metric\.clip\.pretrained=/path/to/checkpoint"):
        make_plan(registry, req)


@pytest.mark.weights
def test_real_vit_l14_prefers_the_matching_prompt():
    from unlearn_bench.metrics.clip_score import ClipScore, ClipWeightsMissing, resolve_weights

    try:
        resolve_weights("ViT-L-14", "openai")
    except ClipWeightsMissing as exc:
        pytest.skip(f"ViT-L-14/openai weights not cached: {exc}")
    red = np.zeros((2, 224, 224, 3), np.uint8)
    red[..., 0] = 230
    metric = ClipScore(spec(), None)
    match, other = metric.score(red, ["a plain red square", "a plain red square"]).value, \
        metric.score(red, ["a photo of a green forest", "a photo of a green forest"]).value
    assert 15 < match < 40 and match > other + 2
