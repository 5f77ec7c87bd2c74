"""fid / kid: Frechet and Kernel Inception Distance of generated images to a reference image folder (torchmetrics).

What the unlearning papers report as image quality: FID of the (unlearned, attacked) model's images on COCO prompts
(coco-10k, sometimes 30k) against the real COCO images of those captions (ESD, UCE, SalUn, Meta-Unlearning: SD-1.4
16.71). Their backends differ (T2IBenchmark, clean-fid, pytorch-fid); here it is torchmetrics'
FrechetInceptionDistance / KernelInceptionDistance with the standard FID Inception (torch-fidelity's
`inception-v3-compat` port of the TF graph, 2048-d pool features), so numbers match torchmetrics and torch-fidelity.

Why the reference is a store stage ("fid-ref"): its features cost as much as the generated ones, and every cell of
the matrix shares them. The stage runs through the MetricContext the runner binds (context.cached), so its key
holds the numeric environment like every other stage's; it is keyed by the folder's content fingerprint (file names
and sizes, not its path, so a moved copy still hits) and the extractor; the same key enters the score stage, so
changed reference images re-score. Reference images are centre-cropped and resized to `ref_resolution` (the
generator's resolution), so both sets reach the extractor's own 299 px resize the same way.

Standard error: FID has none in closed form; we report the std of FID over `bootstrap` resamples of the generated
features (0 = none). KID reports torchmetrics' std over its random subsets (seeded here).
Weights are never downloaded: a missing Inception file stops planning (exit 2) naming the URL and the path.
"""

from __future__ import annotations

import hashlib
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from unlearn_bench.components import DEFAULT_CONTEXT, MetricContext
from unlearn_bench.images import IMAGE_SUFFIXES
from unlearn_bench.metrics.base import Metric, MetricResult

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


class FidUnavailable(RuntimeError):
    """Something FID needs is not on this machine: weights, torch-fidelity or the reference folder."""


def inception_weights(path: str | None, metric: str = "fid") -> Path:
    """The local Inception weights: `path`, else where torch.hub (and torch-fidelity) cache them."""
    if path:
        p = Path(path).expanduser()
    else:
        import torch

        p = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not p.is_file():
        raise FidUnavailable(
            f"{metric}: the FID Inception weights are not on this machine (expected {p}). On a machine with internet:\n"
            f"    wget {INCEPTION_URL}\nthen copy the file to {p} (torch.hub's cache; $TORCH_HOME moves it) or pass "
            f"--set metric.{metric}.weights=/path/to/{INCEPTION_FILE}")
    return p


@lru_cache(maxsize=2)
def inception(feature: int, weights: str, device: str) -> Any:
    """torchmetrics' FID extractor (NoTrainInceptionV3 over torch-fidelity), loaded from a local file only."""
    from unlearn_bench.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as exc:
        raise FidUnavailable("fid: the standard Inception extractor needs torch-fidelity: pip install torch-fidelity "
                             "(the project's [fid] extra)") from exc
    from torchmetrics.image.fid import NoTrainInceptionV3

    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(feature)],
                             feature_extractor_weights_path=weights)
    return net.to(device)


def _passthrough(dim: int) -> Any:
    """An identity 'extractor' so torchmetrics' FID/KID run on features we computed (and cached) ourselves."""
    import torch

    class Passthrough(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_features = dim

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    return Passthrough()


def resolve_reference(reference: str | None, context: MetricContext) -> Path:
    if not reference:
        raise FidUnavailable("fid: no reference set; pass a folder of real images, e.g. --set "
                             "metric.fid.reference=/data/coco-10k-images (README: 'Metrics: fid')")
    folder = context.resolve_path(str(reference))
    if not folder.is_dir():
        raise FidUnavailable(f"fid: reference folder {folder} not found (relative paths resolve under $BENCH_DATA "
                             f"when set, else the project root); README 'Metrics: fid' says how to build it")
    return folder


@lru_cache(maxsize=8)
def _listing(folder: str) -> tuple[tuple[str, int], ...]:
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return tuple((p.relative_to(root).as_posix(), p.stat().st_size) for p in files)


def load_reference(folder: Path, names: list[str], size: int) -> np.ndarray:
    """Centre-crop to square and resize (bicubic) to the generator's resolution, as uint8 NHWC."""
    from PIL import Image

    out = []
    for name in names:
        im = Image.open(folder / name).convert("RGB")
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        out.append(np.asarray(im.resize((size, size), Image.Resampling.BICUBIC)))
    return np.stack(out)


class FID(Metric):
    def __init__(self, spec: Any, concept: Any, extractor: Any = None) -> None:
        super().__init__(spec, concept)
        p = spec.params
        self.feature = int(p.get("feature", 2048))
        self.weights = p.get("weights") or None
        self.ref_resolution = int(p.get("ref_resolution", 512))
        self.bootstrap = int(p.get("bootstrap", 10))
        self.extractor = extractor  # injected (tests, custom backbones); else the standard Inception
        # only an injected extractor is identified by its tensors: the standard one, once loaded lazily, keeps its
        # name (hashing its 0-dim BatchNorm counters failed, and the identity would change after the first load)
        self.custom = extractor is not None
        self._ref_n = 0

    # --- plumbing --------------------------------------------------------------------------------------------
    @classmethod
    def preflight(cls, spec: Any, context: MetricContext = DEFAULT_CONTEXT) -> None:
        """At plan time: the reference folder, torch-fidelity and the Inception weights must all be local."""
        folder = resolve_reference(spec.params.get("reference"), context)
        if not _listing(str(folder)):
            raise FidUnavailable(f"fid: reference folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        import importlib.util

        if importlib.util.find_spec("torch_fidelity") is None:
            raise FidUnavailable("fid: the standard Inception extractor needs torch-fidelity: "
                                 "pip install torch-fidelity (the project's [fid] extra)")
        inception_weights(spec.params.get("weights") or None, spec.name)

    def extractor_identity(self) -> dict[str, Any]:
        if self.custom:
            import torch

            h = hashlib.sha256()
            for k, v in sorted(self.extractor.state_dict().items()):
                h.update(k.encode() + v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            return {"custom": f"{type(self.extractor).__module__}.{type(self.extractor).__qualname__}",
                    "state": h.hexdigest()[:16]}
        return {"inception": "torch-fidelity inception-v3-compat", "feature": self.feature, "weights": INCEPTION_FILE}

    def reference_inputs(self) -> dict[str, Any]:
        """The fid-ref stage's own inputs (the context adds the numeric environment: threads and device change the
        features' bytes)."""
        folder = resolve_reference(self.spec.params.get("reference"), self.context)
        listing = _listing(str(folder))
        digest = hashlib.sha256(repr(listing).encode()).hexdigest()[:16]
        return {"reference": {"files": len(listing), "digest": digest}, "extractor": self.extractor_identity(),
                "ref_resolution": self.ref_resolution}

    def reference_key(self) -> str:
        return self.context.key("fid-ref", self.reference_inputs())

    def settings(self) -> dict[str, Any]:
        out = super().settings()
        out["reference"] = str(resolve_reference(out.get("reference"), self.context))
        out["n_reference"] = self._ref_n or len(_listing(out["reference"]))
        out["extractor"] = self.extractor_identity().get("custom", f"inception-v3-compat/{self.feature}")
        out["backend"] = "torchmetrics"
        return out

    # --- features --------------------------------------------------------------------------------------------
    def _net(self) -> Any:
        if self.extractor is None:
            weights = str(inception_weights(self.weights, self.spec.name))
            self.extractor = inception(self.feature, weights, self.context.device)
        return self.extractor

    def features(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """uint8 NHWC -> [N, D] float64 features (the extractor sees uint8 NCHW, as torchmetrics' FID does)."""
        import torch

        net, out = self._net(), []
        device = next(net.parameters(), torch.empty(0)).device
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).permute(0, 3, 1, 2)
                out.append(net(x.to(device)).reshape(len(x), -1).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0))

    def reference_features(self) -> np.ndarray:
        """Features of the reference folder: computed once per (content, extractor, resolution) in the store."""
        folder = resolve_reference(self.spec.params.get("reference"), self.context)
        names = [n for n, _ in _listing(str(folder))]

        def compute(tmp: Path) -> dict[str, Any]:
            feats = [self.features(load_reference(folder, names[i:i + 64], self.ref_resolution))
                     for i in range(0, len(names), 64)]
            arr = np.concatenate(feats).astype(np.float32)
            np.save(tmp / "features.npy", arr)
            return {"n": int(arr.shape[0]), "dim": int(arr.shape[1]), "folder": str(folder)}

        entry = self.context.cached("fid-ref", self.reference_inputs(), compute)  # no store: once per process
        feats = np.load(entry.file("features.npy"))
        self._ref_n = len(feats)
        return feats.astype(np.float64)

    # --- distances -------------------------------------------------------------------------------------------
    def distance(self, real: np.ndarray, fake: np.ndarray) -> float:
        import torch
        from torchmetrics.image.fid import FrechetInceptionDistance

        fid = FrechetInceptionDistance(feature=_passthrough(real.shape[1]))
        fid.update(torch.from_numpy(real), real=True)
        fid.update(torch.from_numpy(fake), real=False)
        return float(fid.compute())

    def score(self, images: np.ndarray, prompts: list[str]) -> MetricResult:
        fake = self.features(images)
        real = self.reference_features()
        if len(fake) < 2 or len(real) < 2:
            raise ValueError(f"{self.spec.name}: needs at least 2 generated and 2 reference images "
                             f"(got {len(fake)} and {len(real)})")
        value = self.distance(real, fake)
        rng = np.random.default_rng(0)
        boots = [self.distance(real, fake[rng.integers(0, len(fake), len(fake))]) for _ in range(self.bootstrap)]
        se = float(np.std(boots, ddof=1)) if len(boots) > 1 else float("nan")
        return MetricResult(value, se, len(fake), [{"prompt": p} for p in prompts])


class KID(FID):
    """Kernel Inception Distance (unbiased polynomial-kernel MMD over random subsets); shares fid's reference stage."""

    def distance(self, real: np.ndarray, fake: np.ndarray) -> tuple[float, float]:  # type: ignore[override]
        import torch
        from torchmetrics.image.kid import KernelInceptionDistance

        p = self.spec.params
        size = min(int(p.get("subset_size", 1000)), len(real), len(fake))
        with warnings.catch_warnings():  # "KID keeps all features in memory": we hold them anyway
            warnings.simplefilter("ignore", UserWarning)
            kid = KernelInceptionDistance(feature=_passthrough(real.shape[1]), subsets=int(p.get("subsets", 100)),
                                          subset_size=size, degree=int(p.get("degree", 3)))
        kid.update(torch.from_numpy(real), real=True)
        kid.update(torch.from_numpy(fake), real=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            mean, std = kid.compute()
        self._subset = size
        return float(mean), float(std)

    def settings(self) -> dict[str, Any]:
        return super().settings() | {"effective_subset_size": getattr(self, "_subset", None)}

    def score(self, images: np.ndarray, prompts: list[str]) -> MetricResult:
        fake, real = self.features(images), self.reference_features()
        if len(fake) < 2 or len(real) < 2:
            raise ValueError(f"kid: needs at least 2 generated and 2 reference images (got {len(fake)}, {len(real)})")
        mean, std = self.distance(real, fake)
        return MetricResult(mean, std, len(fake), [{"prompt": p} for p in prompts])
