"""Real Stable Diffusion checkpoints (1.x, 2.x, XL) through diffusers, from a local path or the local HF cache.

Nothing is downloaded unless the model spec sets allow_download, and only safetensors weights load unless it sets
allow_pickle (pickle files can execute code). The safety checker is not loaded: the harness measures what the
weights generate, and the concept metrics are the judges.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from unlearn_bench.models.base import Cond, DiffusionModel
from unlearn_bench.models.codecs import VAECodec
from unlearn_bench.specs import ModelSpec


class SDXLModel(DiffusionModel):
    """SDXL: two text encoders (penultimate hidden states concatenated) plus pooled-text and size conditions.

    Methods that train the text encoder (e.g. AdvUnlearn) refuse SDXL at plan time; UNet methods see only
    `encode_prompt` and `predict`, which handle the added conditions here.
    """

    def __init__(self, spec: ModelSpec, pipe: Any, device: str) -> None:
        self.pipe = pipe
        self.text_encoder_2 = pipe.text_encoder_2
        super().__init__(spec, pipe.unet, pipe.text_encoder, pipe.tokenizer, dict(pipe.scheduler.config),
                         VAECodec(pipe.vae), device)
        self.text_encoder_2.to(self.device).requires_grad_(False)

    def modules(self) -> dict[str, torch.nn.Module]:
        mods = super().modules()
        if hasattr(self, "text_encoder_2"):
            mods["text_encoder_2"] = self.text_encoder_2
        return mods

    def encode_prompt(self, prompts: Sequence[str]) -> Cond:
        hidden, _, pooled, _ = self.pipe.encode_prompt(list(prompts), device=self.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        size = self.resolution
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=hidden.dtype, device=self.device)
        return Cond(hidden, {"text_embeds": pooled, "time_ids": time_ids.expand(len(prompts), -1)})


def load_sd(spec: ModelSpec, device: str = "cpu", dtype: torch.dtype = torch.float32) -> DiffusionModel:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    source = spec.path or spec.hub_id
    # use_safetensors=True refuses pickle weights (they can run code); with allow_pickle, None lets diffusers
    # prefer safetensors and fall back to pickle (False would ignore safetensors even where they exist).
    kwargs: dict[str, Any] = {"torch_dtype": dtype, "local_files_only": not spec.allow_download,
                              "use_safetensors": None if spec.allow_pickle else True}
    if spec.revision:
        kwargs["revision"] = spec.revision
    if spec.kind == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(source, **kwargs)
        return SDXLModel(spec, pipe, device)
    pipe = StableDiffusionPipeline.from_pretrained(source, safety_checker=None, requires_safety_checker=False,
                                                   **kwargs)
    pipe.vae.requires_grad_(False).eval()
    return DiffusionModel(spec, pipe.unet, pipe.text_encoder, pipe.tokenizer, dict(pipe.scheduler.config),
                          VAECodec(pipe.vae), device)
