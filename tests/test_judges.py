"""The classifier judges (object-rate, style-rate, clip-zeroshot): the ranking rule on hand-made logits, each
architecture built from its config with seeded random weights (no download), the preprocessing of the weights it
loads, per-image records and recorded settings, and the plan-time messages naming what to download."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from unlearn_bench.metrics.classifier import JudgeUnavailable, concept_value, in_top_k, rank_of, top_classes
from unlearn_bench.specs import ComponentSpec, params

CHURCH = SimpleNamespace(name="church", target="church")
VANGOGH = SimpleNamespace(name="vangogh", target="Van Gogh")
IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def images(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def metric(name: str, module: str, **p: object) -> ComponentSpec:
    return ComponentSpec("metric", name, module, params({"scope": "target"} | p), higher_is_better=False)


def object_rate(**p: object) -> ComponentSpec:
    base = {"class_index": {"church": 497}, "source": "hf", "model": "microsoft/resnet-50",
            "weights": "IMAGENET1K_V2", "allow_pickle": False}
    return metric("object-rate", "unlearn_bench.metrics.object_rate:ObjectRate", **(base | p))


def style_rate(**p: object) -> ComponentSpec:
    base = {"classifier": None, "label": {"vangogh": "vincent-van-gogh"}, "top_k": 1, "extra_top_k": [3],
            "allow_pickle": False}
    return metric("style-rate", "unlearn_bench.metrics.style_rate:StyleRate", **(base | p))


def build_resnet_folder(out: Path, seed: int = 0, width: int = 8) -> Path:
    """A ResNetForImageClassification folder with seeded random weights (bottleneck blocks as ResNet-50, thinner)
    and microsoft/resnet-50's image processor settings (short side 224/0.875, bicubic, crop 224, ImageNet norm)."""
    import torch

    from unlearn_bench.compat import ensure_torchvision_importable

    ensure_torchvision_importable()  # before transformers, which imports torchvision
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    cfg = ResNetConfig(embedding_size=width, hidden_sizes=[width] * 4, depths=[1, 1, 1, 1], layer_type="bottleneck",
                       num_labels=1000, id2label={i: f"class{i}" for i in range(1000)})
    ResNetForImageClassification(cfg).save_pretrained(out, safe_serialization=True)
    ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875, resample=3, image_mean=IMAGENET_MEAN.tolist(),
                           image_std=IMAGENET_STD.tolist()).save_pretrained(out)
    return out


def build_artist_folder(out: Path, seed: int = 0) -> Path:
    """A 129-label ViTForImageClassification folder (a thin ViT with seeded random weights) whose label 5 is
    'vincent-van-gogh', with a ViT image processor (resize 224, mean/std 0.5) as the WikiArt checkpoint's."""
    import torch

    from unlearn_bench.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    labels = [f"artist-{i}" for i in range(129)]
    labels[5] = "vincent-van-gogh"
    cfg = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=224,
                    patch_size=16, num_labels=129, id2label=dict(enumerate(labels)))
    ViTForImageClassification(cfg).save_pretrained(out, safe_serialization=True)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory, torch_single_thread) -> Path:
    return build_resnet_folder(tmp_path_factory.mktemp("resnet") / "resnet")


@pytest.fixture(scope="module")
def artist_dir(tmp_path_factory, torch_single_thread) -> Path:
    return build_artist_folder(tmp_path_factory.mktemp("artist") / "artist")


@pytest.fixture(scope="module")
def clip_config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("clip") / "judges-tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return str(path)


# --- the ranking rule -------------------------------------------------------------------------------------------
def test_rank_rule_on_hand_made_logits_top1_topk_and_ties():
    s = np.array([[0.1, 2.0, 0.5, 2.0],  # classes 1 and 3 tie at the top: the lower index ranks first
                  [3.0, 1.0, 1.0, 0.0],  # 1 and 2 tie in second place
                  [0.0, 0.0, 0.0, 0.0]])  # all tie: the rank is the index
    assert rank_of(s, 1).tolist() == [0, 1, 1]
    assert rank_of(s, 3).tolist() == [1, 3, 3]
    assert rank_of(s, 2).tolist() == [2, 2, 2]
    assert rank_of(s, 0).tolist() == [3, 0, 0]
    assert (top_classes(s, 1)[:, 0] == s.argmax(1)).all()  # top-1 = argmax's first maximal index
    assert top_classes(s, 2).tolist() == [[1, 3], [0, 1], [0, 1]]
    assert in_top_k(s, 3, 1).tolist() == [False, False, False]
    assert in_top_k(s, 3, 2).tolist() == [True, False, False]
    assert in_top_k(s, 2, 3).tolist() == [True, True, True]
    for k in range(1, 5):  # every class is in exactly k of the top-k sets per row
        assert sum(in_top_k(s, c, k).astype(int) for c in range(4)).tolist() == [k] * 3
    with pytest.raises(ValueError, match="k >= 1"):
        in_top_k(s, 0, 0)
    with pytest.raises(ValueError, match="outside"):
        rank_of(s, 4)


def test_per_concept_values_read_name_then_target_then_default():
    value = {"church": 497, "Van Gogh": "by target", "default": 1}
    assert concept_value(value, CHURCH, "x") == 497
    assert concept_value(value, VANGOGH, "x") == "by target"
    assert concept_value(value, SimpleNamespace(name="tench", target="tench"), "x") == 1
    assert concept_value(7, CHURCH, "x") == 7
    with pytest.raises(ValueError, match="no value for concept 'tench'.*--set metric.m.class_index.tench"):
        concept_value({"church": 497}, SimpleNamespace(name="tench", target="tench"), "metric.m.class_index")


# --- the real architectures, from config, random weights --------------------------------------------------------
def test_real_judge_architectures_build_from_config(torch_single_thread):
    """The ResNet-50 of both layouts (HF microsoft/resnet-50's config = transformers' ResNetConfig defaults;
    torchvision's resnet50) and the ViT-base 129-artist classifier, seeded, with no download."""
    import torch

    from unlearn_bench.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from torchvision.models import resnet50
    from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

    with torch.device("meta"):  # shapes only: drawing ~110 M random weights takes long on a CPU (the seeded
        # torchvision ResNet-50 with real random weights is built in the weights-file test below)
        hf = ResNetForImageClassification(ResNetConfig(num_labels=1000)).eval()
        tv = resnet50().eval()
        vit = ViTForImageClassification(ViTConfig(num_labels=129)).eval()  # ViTConfig() is ViT-base/16 at 224
    cfg = hf.config
    assert (list(cfg.depths), list(cfg.hidden_sizes), cfg.layer_type) == ([3, 4, 6, 3], [256, 512, 1024, 2048],
                                                                         "bottleneck")
    n_hf, n_tv = (sum(p.numel() for p in m.parameters()) for m in (hf, tv))
    assert n_hf == n_tv == 25_557_032  # the same ResNet-50, two layouts
    assert (vit.config.hidden_size, vit.config.num_hidden_layers, vit.config.patch_size) == (768, 12, 16)
    assert sum(p.numel() for p in vit.parameters()) == 85_798_656 + 768 * 129 + 129  # ViT-B/16 + a 129-way head
    with torch.no_grad():
        x = torch.zeros(1, 3, 224, 224, device="meta")
        assert hf(pixel_values=x).logits.shape == (1, 1000) and tv(x).shape == (1, 1000)
        assert vit(pixel_values=x).logits.shape == (1, 129)


# --- object-rate ------------------------------------------------------------------------------------------------
def test_object_rate_is_the_top1_share_with_records_and_settings(resnet_dir):
    from unlearn_bench.metrics.object_rate import ObjectRate

    imgs = images(4)
    probe = ObjectRate(object_rate(model=str(resnet_dir)), CHURCH)
    logits, labels = probe.logits(imgs)
    assert logits.shape == (4, 1000) and labels[7] == "class7"
    c = int(logits[0].argmax())
    m = ObjectRate(object_rate(model=str(resnet_dir), class_index={"church": c}), CHURCH)
    result = m.score(imgs, ["p"] * 4)
    want = logits.argmax(1) == c
    assert result.value == pytest.approx(want.mean()) and result.n == 4 and want[0]
    assert m.judge(imgs, ["p"] * 4).tolist() == want.tolist()
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    first = result.per_image[0]
    assert first["class"] == c and first["label"] == f"class{c}" and first["shows"] is True
    assert first["prob"] == pytest.approx(probs[0, c], abs=1e-6) == pytest.approx(first["concept_prob"], abs=1e-6)
    assert [t[0] for t in first["top5"]] == list(np.argsort(-logits[0], kind="stable")[:5])
    settings = m.settings()
    assert settings["class_index"] == c and settings["class_label"] == f"class{c}" and settings["source"] == "hf"
    assert settings["model"] == str(resnet_dir) and settings["rule"] == f"top-1 ImageNet class == {c}"
    assert result.summary["top1_counts"][f"class{c}"] >= 1
    key = m.reference_key()
    assert set(key) == {"model.safetensors", "config.json"}


def test_object_rate_preprocessing_is_the_folders_own(resnet_dir):
    from unlearn_bench.metrics.object_rate import ObjectRate

    m = ObjectRate(object_rate(model=str(resnet_dir)), CHURCH)
    x = m.preprocess(images(2, size=48)).numpy()
    assert x.shape == (2, 3, 224, 224)  # short side 256, centre crop 224
    lo, hi = (0 - IMAGENET_MEAN) / IMAGENET_STD, (1 - IMAGENET_MEAN) / IMAGENET_STD
    assert (x.min(axis=(0, 2, 3)) >= lo - 0.05).all() and (x.max(axis=(0, 2, 3)) <= hi + 0.05).all()
    white = m.preprocess(np.full((1, 40, 64, 3), 255, np.uint8)).numpy()
    assert white.shape == (1, 3, 224, 224) and np.allclose(white[0].mean((1, 2)), hi, atol=1e-3)


def test_object_rate_loads_torchvisions_weights_file_and_transforms(tmp_path, monkeypatch, torch_single_thread):
    import torch

    from unlearn_bench.compat import ensure_torchvision_importable
    from unlearn_bench.metrics import object_rate as mod

    ensure_torchvision_importable()
    from safetensors.torch import save_file
    from torchvision.models import ResNet50_Weights, resnet50

    for tag, name in mod.TV_FILES.items():  # the file torchvision would download for each tag
        assert ResNet50_Weights[tag].url == mod.TV_URL + name
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert mod.torch_hub_dir() == Path(torch.hub.get_dir())
    torch.manual_seed(0)
    net = resnet50().eval()
    (tmp_path / "torch/hub/checkpoints").mkdir(parents=True)
    torch.save(net.state_dict(), tmp_path / "torch/hub/checkpoints" / mod.TV_FILES["IMAGENET1K_V2"])
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "r50.safetensors")
    imgs = images(2, size=64)
    from PIL import Image

    transform = ResNet50_Weights.IMAGENET1K_V2.transforms()
    x = torch.stack([transform(Image.fromarray(im)) for im in imgs])
    with torch.no_grad():
        want = net(x).double().numpy()
    for model in (None, str(tmp_path / "r50.safetensors")):
        m = mod.ObjectRate(object_rate(source="torchvision", model=model), CHURCH)
        mod.ObjectRate.preflight(m.spec)
        got, labels = m.logits(imgs)
        assert np.allclose(got, want, atol=1e-4) and labels[497] == "church"
        assert m.preprocess(imgs).shape == (2, 3, 224, 224)
        assert m.settings()["weights"] == "torchvision ResNet50_Weights.IMAGENET1K_V2"
        assert m.settings()["class_label"] == "church"


# --- style-rate -------------------------------------------------------------------------------------------------
def test_style_rate_top_k_rows_records_and_settings(artist_dir):
    from unlearn_bench.metrics.style_rate import StyleRate

    imgs = images(5)
    m = StyleRate(style_rate(classifier=str(artist_dir), top_k=1, extra_top_k=[3, 129]), VANGOGH)
    logits, labels, index = m.logits(imgs)
    assert logits.shape == (5, 129) and index == 5 and labels[5] == "vincent-van-gogh"
    ranks = rank_of(logits, 5)
    result = m.score(imgs, ["p"] * 5)
    assert result.value == pytest.approx((ranks < 1).mean())
    assert result.variants["style-rate@top3"]["value"] == pytest.approx((ranks < 3).mean())
    assert result.variants["style-rate@top129"]["value"] == 1.0  # every label is in the top 129
    assert result.variants["style-rate@top3"]["settings"]["top_k"] == 3
    assert m.judge(imgs, ["p"] * 5).tolist() == (ranks < 1).tolist()
    rec = result.per_image[0]
    assert rec["rank"] == ranks[0] and len(rec["top"]) == 10
    assert [p for _, p in rec["top"]] == sorted((p for _, p in rec["top"]), reverse=True)
    assert m.settings() == {"classifier": str(artist_dir), "label": "vincent-van-gogh", "top_k": 1,
                            "rule": "'vincent-van-gogh' in the top 1 labels"}
    x = m.preprocess(imgs).numpy()
    assert x.shape == (5, 3, 224, 224) and x.min() >= -1.0 - 1e-6 and x.max() <= 1.0 + 1e-6
    wrong = StyleRate(style_rate(classifier=str(artist_dir), label={"vangogh": "vincent-van-gog"}), VANGOGH)
    with pytest.raises(ValueError, match="no label 'vincent-van-gog'.*vincent-van-gogh"):
        wrong.score(imgs, ["p"] * 5)


# --- clip-zeroshot ----------------------------------------------------------------------------------------------
def test_clip_zeroshot_ranks_the_concept_among_its_alternatives(clip_config):
    from unlearn_bench.metrics.clip_zeroshot import ClipZeroShot

    def spec(top_k: int) -> ComponentSpec:
        return metric("clip-zeroshot", "unlearn_bench.metrics.clip_zeroshot:ClipZeroShot", model="judges-tiny-clip",
                      pretrained=None, model_config=clip_config, template={"default": "a photo of a {}"},
                      concept_text={"default": None}, alternatives={"church": ["dog", "golf ball", "tench"]},
                      top_k=top_k)

    m = ClipZeroShot(spec(2), CHURCH)
    assert m.classes() == ["a photo of a church", "a photo of a dog", "a photo of a golf ball", "a photo of a tench"]
    imgs = images(4)
    cos, _ = m.cosines(imgs)
    result = m.score(imgs, ["p"] * 4)
    assert cos.shape == (4, 4) and result.value == pytest.approx((rank_of(cos, 0) < 2).mean())
    assert m.judge(imgs, ["p"] * 4).tolist() == (rank_of(cos, 0) < 2).tolist()
    assert result.per_image[0]["cos"] == pytest.approx(cos[0].tolist(), abs=1e-6)
    assert m.settings()["backbone"] == "judges-tiny-clip/random-init" and m.settings()["top_k"] == 2
    with pytest.raises(ValueError, match="no value for concept 'vangogh'"):
        ClipZeroShot(spec(2), VANGOGH)
    with pytest.raises(ValueError, match="top_k=4 must lie in"):
        ClipZeroShot(spec(4), CHURCH)  # as many as the alternatives: every image would show the concept


# --- plan-time messages -----------------------------------------------------------------------------------------
def test_missing_judge_weights_name_what_to_download(tmp_path, monkeypatch, resnet_dir):
    from unlearn_bench.metrics.object_rate import ObjectRate
    from unlearn_bench.metrics.style_rate import StyleRate

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hint = "hf download microsoft/resnet-50 config.json model.safetensors preprocessor_config.json"
    with pytest.raises(JudgeUnavailable, match=hint.replace(".", r"\.")) as err:
        ObjectRate.preflight(object_rate())
    assert "--set metric.object-rate.model=" in str(err.value)
    with pytest.raises(JudgeUnavailable, match=r"wget https://download\.pytorch\.org/models/resnet50-11ad3fa6\.pth"):
        ObjectRate.preflight(object_rate(source="torchvision", model=None))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in ("config.json", "preprocessor_config.json"):
        (pickled / f).write_text((resnet_dir / f).read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(JudgeUnavailable, match="(?s)pickle.*allow_pickle=true"):
        ObjectRate.preflight(object_rate(model=str(pickled)))
    ObjectRate.preflight(object_rate(model=str(pickled), allow_pickle=True))
    with pytest.raises(JudgeUnavailable, match="no classifier folder.*OPTML-Group/Diffusion-MU-Attack"):
        StyleRate.preflight(style_rate())
    with pytest.raises(JudgeUnavailable, match="does not exist.*Artist classifier"):
        StyleRate.preflight(style_rate(classifier=str(tmp_path / "checkpoint-2800")))
    with pytest.raises(JudgeUnavailable, match="lacks preprocessor_config.json"):
        (tmp_path / "half").mkdir()
        (tmp_path / "half/config.json").write_text("{}")
        (tmp_path / "half/model.safetensors").write_bytes((resnet_dir / "model.safetensors").read_bytes())
        StyleRate.preflight(style_rate(classifier=str(tmp_path / "half")))


def test_printed_resnet_download_command_parses_with_the_pinned_hub():
    from test_download_hints import HF, _hf_accepts

    from unlearn_bench.models.loading import download_command

    if not HF.exists():
        pytest.skip("huggingface-hub's hf CLI is not installed")
    _hf_accepts(download_command("microsoft/resnet-50", "config.json", "model.safetensors",
                                 "preprocessor_config.json"))



def test_object_rate_finds_microsoft_resnet50_in_the_hf_cache(tmp_path, monkeypatch, resnet_dir):
    """The hub id resolves to the cached snapshot (refs/main -> snapshots/<rev>); a partial snapshot is named."""
    from unlearn_bench.metrics.object_rate import ObjectRate

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--microsoft--resnet-50"
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    (snap / "config.json").write_text((resnet_dir / "config.json").read_text())
    with pytest.raises(JudgeUnavailable, match="(?s)lacks preprocessor_config.json, model.safetensors.*hf download"):
        ObjectRate.preflight(object_rate())
    for f in ("preprocessor_config.json", "model.safetensors"):
        (snap / f).write_bytes((resnet_dir / f).read_bytes())
    ObjectRate.preflight(object_rate())
    m = ObjectRate(object_rate(), CHURCH)
    assert m.locate(m.spec, m.context) == snap and m.logits(images(1))[0].shape == (1, 1000)
