"""`tiny`: a Stable-Diffusion-shaped model with seeded random weights, built from config (no files).

Same classes and module names as SD 1.x (UNet2DConditionModel with attn1/attn2, AutoencoderKL, CLIPTextModel, the
real CLIP tokenizer, SD's scheduler config), scaled down like diffusers' own pipeline tests so a forward+backward
pass takes milliseconds on CPU. Its images are noise: it proves code paths, not unlearning.
"""

from __future__ import annotations

import torch

from unlearn_bench.models.base import DiffusionModel
from unlearn_bench.models.codecs import VAECodec
from unlearn_bench.models.tokenizer import load_clip_tokenizer
from unlearn_bench.specs import ModelSpec

# SD 1.x scheduler settings (CompVis/stable-diffusion-v1-4 scheduler_config.json).
SD1_SCHEDULER = {
    "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "set_alpha_to_one": False, "steps_offset": 1,
    "clip_sample": False, "skip_prk_steps": True,
}


def build_tiny(spec: ModelSpec, device: str = "cpu", seed: int = 0, max_length: int = 16) -> DiffusionModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=spec.resolution // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=spec.resolution,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
        max_position_embeddings=max_length, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    vae.requires_grad_(False).eval()
    return DiffusionModel(spec, unet, text_encoder, load_clip_tokenizer(max_length), SD1_SCHEDULER,
                          VAECodec(vae), device)
