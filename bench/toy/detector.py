"""The toy world's concept detector: a small CNN that names an image's colour and shape.

It plays NudeNet's role (concept rate: "is this image red?"), attribute accuracy plays CLIP score's role, and
its penultimate features feed a Frechet distance that plays FID's. It is trained on bench.toy.world images
with augmentations that imitate what a diffusion model gets slightly wrong (noise, blur, colour shifts, a
faint checkerboard), so that it judges generated images by their content rather than by how clean they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unlearn_bench.toy import world
from unlearn_bench.toy.model import WEIGHTS_DIR, atomic_save_safetensors, from_uint8

DETECTOR_FILE = "detector.safetensors"
FEATURE_DIM = 128


class ToyDetector(nn.Module):
    """Four conv stages (32 -> 16 -> 8 -> 4), a global pool, and colour and shape heads on shared features.

    The fourth stage is there because shape needs a receptive field covering the whole shape (TOY-NOTES: one
    more conv/pool layer took shapes to 100%).
    """

    def __init__(self, n_colours: int = len(world.COLOURS), n_shapes: int = len(world.SHAPES)) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        # Narrow at full resolution, wide at 4x4: cheap enough to train in a minute or two on a laptop CPU.
        self.body = nn.Sequential(
            *conv(3, 16),
            nn.MaxPool2d(2),
            *conv(16, 32),
            *conv(32, 32),
            nn.MaxPool2d(2),
            *conv(32, 64),
            *conv(64, 64),
            nn.MaxPool2d(2),
            *conv(64, FEATURE_DIM),
            *conv(FEATURE_DIM, FEATURE_DIM),
        )
        self.colour_head = nn.Linear(FEATURE_DIM, n_colours)
        self.shape_head = nn.Linear(FEATURE_DIM, n_shapes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: float [B, 3, 32, 32] in [-1, 1] -> (colour_logits, shape_logits, features [B, 128])."""
        features = self.body(x).mean(dim=(2, 3))
        return self.colour_head(features), self.shape_head(features), features


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Make clean renders look like generated ones: flip, blur, colour jitter, noise (all seeded by gen)."""
    b = x.shape[0]

    def u(*shape: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        return torch.rand(*shape, generator=gen).to(x.device) * (hi - lo) + lo

    # horizontal flip (the shapes are mirror-symmetric; positions already vary in the data)
    flip = u(b) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    # blur half the batch with a random-width 3x3 Gaussian
    sigma = u(b, lo=0.3, hi=1.0)
    k1 = torch.exp(-torch.tensor([1.0, 0.0, 1.0], device=x.device)[None, :] / (2 * sigma[:, None] ** 2))
    k1 = k1 / k1.sum(dim=1, keepdim=True)
    k2 = k1[:, :, None] * k1[:, None, :]  # [B, 3, 3]
    blurred = F.conv2d(
        x.reshape(1, b * 3, 32, 32), k2.repeat_interleave(3, 0)[:, None], padding=1, groups=b * 3
    ).reshape_as(x)
    x = torch.where((u(b) < 0.5)[:, None, None, None], blurred, x)
    # colour jitter: brightness/contrast scale and a per-channel shift
    x = x * u(b, 1, 1, 1, lo=0.85, hi=1.1) + u(b, 3, 1, 1, lo=-0.08, hi=0.08)
    # pixel noise of a random strength, plus a faint 2x2 checkerboard like a pixel-shuffle codec can leave
    x = x + torch.randn(x.shape, generator=gen).to(x.device) * u(b, 1, 1, 1, lo=0.0, hi=0.12)
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 2.0 - 1.0
    x = x + checker.to(x.device) * u(b, 1, 1, 1, lo=-0.05, hi=0.05)
    return x.clamp(-1, 1)


def train_detector(
    seed: int,
    steps: int = 1000,
    device: str | torch.device = "cpu",
    n_train: int = 15_000,
    batch_size: int = 128,
    progress: Any = None,
) -> ToyDetector:
    """Train from scratch on make_dataset(n_train, seed) with augmentation; deterministic for a seed on CPU.

    progress: optional callable(step) called after every step (the build's progress bar).
    """
    images, _, colour_idx, shape_idx = world.make_dataset(n_train, seed=seed * 1000 + 11)
    x_all = from_uint8(images)
    c_all = torch.from_numpy(colour_idx)
    s_all = torch.from_numpy(shape_idx)
    gen = torch.Generator().manual_seed(seed * 1000 + 12)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + 13)
        det = ToyDetector().to(device)
    opt = torch.optim.AdamW(det.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(steps, 1), pct_start=0.1)
    det.train()
    for step in range(steps):
        idx = torch.randint(0, n_train, (batch_size,), generator=gen)
        x = augment(x_all[idx].to(device), gen)
        c_logits, s_logits, _ = det(x)
        c_true, s_true = c_all[idx].to(device), s_all[idx].to(device)
        loss = F.cross_entropy(c_logits, c_true) + F.cross_entropy(s_logits, s_true)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(step + 1)
    return det.eval()


@torch.no_grad()
def classify(detector: ToyDetector, images_uint8: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Judge uint8 [N, 32, 32, 3] images: names, probabilities and features per image."""
    device = next(detector.parameters()).device
    was_training = detector.training
    detector.eval()
    c_probs, s_probs, feats = [], [], []
    for start in range(0, len(images_uint8), batch_size):
        x = from_uint8(images_uint8[start : start + batch_size], device)
        c, s, f = detector(x)
        c_probs.append(c.float().softmax(-1).cpu())
        s_probs.append(s.float().softmax(-1).cpu())
        feats.append(f.float().cpu())
    detector.train(was_training)
    if c_probs:
        colour_prob = torch.cat(c_probs).numpy()
        shape_prob = torch.cat(s_probs).numpy()
        features = torch.cat(feats).numpy()
    else:
        colour_prob = np.zeros((0, len(world.COLOURS)), dtype=np.float32)
        shape_prob = np.zeros((0, len(world.SHAPES)), dtype=np.float32)
        features = np.zeros((0, FEATURE_DIM), dtype=np.float32)
    colour_names = np.array(list(world.COLOURS))
    shape_names = np.array(list(world.SHAPES))
    return {
        "colour": colour_names[colour_prob.argmax(1)] if len(colour_prob) else colour_names[:0],
        "shape": shape_names[shape_prob.argmax(1)] if len(shape_prob) else shape_names[:0],
        "colour_prob": colour_prob,
        "shape_prob": shape_prob,
        "features": features,
    }


def heldout_accuracy(detector: ToyDetector, n: int = 3000, seed: int = 987_654) -> dict[str, float]:
    """Colour / shape accuracy on freshly rendered images the detector never saw (a seed no build uses)."""
    images, _, colour_idx, shape_idx = world.make_dataset(n, seed=seed)
    out = classify(detector, images)
    colours = np.array(list(world.COLOURS))[colour_idx]
    shapes = np.array(list(world.SHAPES))[shape_idx]
    return {
        "colour": float((out["colour"] == colours).mean()),
        "shape": float((out["shape"] == shapes).mean()),
        "n": n,
    }


def save_detector(detector: ToyDetector, weights_dir: Path | None = None) -> Path:
    path = (WEIGHTS_DIR if weights_dir is None else Path(weights_dir)) / DETECTOR_FILE
    atomic_save_safetensors(detector.state_dict(), path)
    return path


def load_detector(weights_dir: Path | None = None, device: str | torch.device = "cpu") -> ToyDetector:
    from safetensors.torch import load_file

    path = (WEIGHTS_DIR if weights_dir is None else Path(weights_dir)) / DETECTOR_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"toy detector weights not found at {path}; build them with `bench toy build`"
            f" (`bench toy build --out {path.parent}`)"
        )
    det = ToyDetector()
    det.load_state_dict(load_file(str(path)))
    return det.to(device).eval()
