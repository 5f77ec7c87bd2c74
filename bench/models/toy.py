"""`toy`: the project's own small text-to-image model (bench/toy), loaded through the same DiffusionModel wrapper
as Stable Diffusion, so methods, attacks and metrics take the identical code path on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unlearn_bench.models.base import DiffusionModel
from unlearn_bench.specs import ModelSpec


class _DeviceCodec:
    """Adapter giving the toy codec the `.to(device)` the wrapper calls (its transform tensors move with it)."""

    def __init__(self, codec: Any) -> None:
        self.codec = codec
        self.scale_factor = codec.scale_factor
        self.latent_channels = codec.latent_channels

    def encode(self, images: Any, generator: Any = None) -> Any:
        return self.codec.encode(images)

    def decode(self, latents: Any) -> Any:
        return self.codec.decode(latents)

    def to(self, device: Any) -> _DeviceCodec:
        if hasattr(self.codec, "to"):
            self.codec = self.codec.to(device) or self.codec
        return self


def wrap_toy(components: dict[str, Any], spec: ModelSpec | None = None, device: str = "cpu") -> DiffusionModel:
    """Toy components (loaded, or just trained by `bench toy build`) behind the harness's model wrapper."""
    spec = spec or ModelSpec(name="toy", kind="toy", defaults="toy", family="toy", resolution=components["resolution"])
    return DiffusionModel(spec, components["unet"], components["text_encoder"], components["tokenizer"],
                          components["scheduler_config"], _DeviceCodec(components["codec"]), device,
                          resolution=components["resolution"])


def load_toy(spec: ModelSpec, device: str = "cpu") -> DiffusionModel:
    from unlearn_bench.toy.model import load_toy_components

    comps = load_toy_components(Path(spec.path).expanduser() if spec.path else None, device="cpu")
    return wrap_toy(comps, spec, device)
