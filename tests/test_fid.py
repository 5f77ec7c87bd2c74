"""fid / kid: torchmetrics' distances on a small injected feature extractor, the reference features as a store
stage shared by every cell (and keyed into the score stage), the missing-weights message, and the real Inception
when its weights are on disk (marked `weights`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from unlearn_bench.specs import ComponentSpec, params


@pytest.fixture(scope="module")
def tiny_extractor(torch_single_thread):
    torch = torch_single_thread
    from unlearn_bench.compat import ensure_torchvision_importable

    ensure_torchvision_importable()

    class Pooled(torch.nn.Module):
        """uint8 NCHW -> 8 features: 4x4 average-pooled colours under a fixed random projection."""

        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Parameter(torch.randn(48, 8, generator=torch.Generator().manual_seed(0)))

        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1) @ self.proj

    return Pooled()


def noise(n: int, lo: int, hi: int, seed: int, size: tuple[int, int] = (32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi, (n, *size, 3), dtype=np.uint8)


@pytest.fixture()
def reference(tmp_path):
    from PIL import Image

    folder = tmp_path / "ref"
    folder.mkdir()
    for i, img in enumerate(noise(24, 60, 180, 1, (40, 48))):  # not square: the loader centre-crops
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return folder


def spec(name: str = "fid", **over) -> ComponentSpec:
    base = {"scope": "benign", "reference": None, "feature": 2048, "weights": None, "ref_resolution": 32}
    base |= {"bootstrap": 6} if name == "fid" else {"subsets": 20, "subset_size": 1000, "degree": 3}
    module = "unlearn_bench.metrics.fid:FID" if name == "fid" else "unlearn_bench.metrics.fid:KID"
    return ComponentSpec("metric", name, module, params(base | over), higher_is_better=False)


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_equals_the_closed_form_and_orders_distributions(reference, tiny_extractor, tmp_path):
    from unlearn_bench.components import MetricContext
    from unlearn_bench.metrics.fid import FID
    from unlearn_bench.store import Store

    metric = FID(spec(reference=str(reference)), None, extractor=tiny_extractor)
    metric.bind(MetricContext(store=Store(tmp_path / "store")))
    near, far = noise(16, 60, 180, 2), noise(16, 170, 255, 3)
    r_near, r_far = metric.score(near, ["p"] * 16), metric.score(far, ["p"] * 16)
    expected = frechet(metric.features(near), metric.reference_features())
    assert r_near.value == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert r_far.value > 10 * r_near.value and r_near.n == 16
    assert np.isfinite(r_near.stderr) and r_near.stderr > 0
    s = metric.settings()
    assert s["reference"] == str(reference) and s["n_reference"] == 24 and s["backend"] == "torchmetrics"


def test_reference_features_are_one_store_stage_keyed_by_content(reference, tiny_extractor, tmp_path):
    from PIL import Image

    from unlearn_bench.components import MetricContext
    from unlearn_bench.metrics.fid import FID, _listing
    from unlearn_bench.store import Store

    store = Store(tmp_path / "store")
    a = FID(spec(reference=str(reference)), None, extractor=tiny_extractor)
    b = FID(spec(reference=str(reference)), None, extractor=tiny_extractor)
    for m in (a, b):
        m.bind(MetricContext(store=store))
        m.score(noise(8, 60, 180, 4), ["p"] * 8)
    assert store.counts == {"computed": 1, "cached": 1}
    entry = store.lookup("fid-ref", a.reference_key())
    assert entry is not None and np.load(entry.file("features.npy")).shape == (24, 8)
    key = a.reference_key()
    Image.fromarray(noise(1, 0, 255, 9)[0]).save(reference / "extra.png")
    _listing.cache_clear()
    assert a.reference_key() != key  # new reference images -> new features and new score keys


def test_runner_score_stage_carries_the_reference_key(reference, tiny_extractor, tmp_path, monkeypatch, registry):
    import unlearn_bench.metrics.fid as fid
    from unlearn_bench.components import MetricContext
    from unlearn_bench.images import save_images
    from unlearn_bench.plan import Plan
    from unlearn_bench.runner import Runner
    from unlearn_bench.store import Store

    monkeypatch.setattr(fid, "inception_weights", lambda path, metric="fid": Path("unused"))
    monkeypatch.setattr(fid, "inception", lambda feature, weights, device: tiny_extractor)
    store = Store(tmp_path / "store")

    def gen(tmp: Path) -> dict:
        names = save_images(tmp / "images", noise(6, 60, 180, 5))
        (tmp / "images.json").write_text(json.dumps({"files": names, "prompts": ["p"] * 6, "seeds": list(range(6))}))
        return {"n": 6}

    images = store.get_or_compute("generate", {"test": 1}, gen)
    s = spec(reference=str(reference))
    runner = Runner(Plan("t", registry.model("tiny"), registry.concept("nudity"), [], [], [s], [0]), store)
    scored = runner.score(images, s)
    bare = fid.FID(s, None)
    bare.bind(MetricContext(numerics=runner.numerics))  # the runner's context: the reference stage's numerics
    assert scored.manifest["inputs"]["reference"] == bare.reference_key()
    ref = next(m for m in store.root.rglob("manifest.json") if m.parent.parent.parent.name == "fid-ref")
    assert json.loads(ref.read_text())["inputs"]["numerics"] == runner.numerics
    assert np.isfinite(scored.meta["value"]) and scored.meta["settings"]["n_reference"] == 24
    assert {m.parent.parent.parent.name for m in store.root.rglob("manifest.json")} == {"generate", "fid-ref", "score"}


def test_kid_is_seeded_and_orders_distributions(reference, tiny_extractor):
    from unlearn_bench.metrics.fid import KID

    metric = KID(spec("kid", reference=str(reference)), None, extractor=tiny_extractor)
    near, far = noise(12, 60, 180, 6), noise(12, 170, 255, 7)
    a, b = metric.score(near, ["p"] * 12), metric.score(near, ["p"] * 12)
    assert a.value == b.value and a.stderr == b.stderr  # subsets drawn from a fixed seed
    assert metric.score(far, ["p"] * 12).value > a.value + 3 * a.stderr
    assert metric.settings()["effective_subset_size"] == 12


def test_missing_weights_and_reference_are_clear(tmp_path, monkeypatch, reference):
    from unlearn_bench.metrics.fid import FID, INCEPTION_FILE, INCEPTION_URL, FidUnavailable, inception_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FidUnavailable, match=INCEPTION_URL.replace(".", r"\.")) as err:
        inception_weights(None)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILE) in str(err.value)
    with pytest.raises(FidUnavailable, match="no reference set"):
        FID.preflight(spec())
    with pytest.raises(FidUnavailable, match="not found"):
        FID.preflight(spec(reference=str(tmp_path / "nowhere")))
    with pytest.raises(FidUnavailable, match="weights|torch-fidelity"):
        FID.preflight(spec(reference=str(reference)))


@pytest.mark.weights
def test_real_inception_fid_of_a_set_with_itself_is_near_zero(tmp_path, reference):
    from unlearn_bench.compat import ensure_torchvision_importable
    from unlearn_bench.metrics.fid import FID, FidUnavailable, inception_weights, load_reference

    ensure_torchvision_importable()
    try:
        import torch_fidelity  # noqa: F401

        inception_weights(None)
    except (ImportError, FidUnavailable) as exc:
        pytest.skip(f"standard FID Inception not available offline: {exc}")
    metric = FID(spec(reference=str(reference), ref_resolution=64, bootstrap=0), None)
    imgs = load_reference(reference, sorted(p.name for p in reference.iterdir()), 64)
    assert metric.score(imgs, ["p"] * len(imgs)).value == pytest.approx(0.0, abs=1e-2)
