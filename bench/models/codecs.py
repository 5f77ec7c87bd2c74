"""SD's VAE behind the codec interface every model wrapper uses (encode, decode, to, scale_factor,
latent_channels); the toy model brings its own lossless codec (bench/toy/model.py)."""

from __future__ import annotations

from typing import Any

import torch


class VAECodec:
    """AutoencoderKL with SD's latent scaling (and SD3-style shift when configured).

    Encoding uses the posterior mean rather than a sample, so the attack data latents are deterministic.
    """

    def __init__(self, vae: Any) -> None:
        self.vae = vae
        cfg = vae.config
        self.scaling = float(getattr(cfg, "scaling_factor", 0.18215))
        self.shift = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.scale_factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_channels = int(cfg.latent_channels)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return ((dist.mean - self.shift) * self.scaling).float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = latents / self.scaling + self.shift
        return self.vae.decode(x.to(self.vae.dtype)).sample.float()

    def to(self, device: Any) -> VAECodec:
        self.vae.to(device)
        return self
