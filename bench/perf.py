"""`bench perf`: speed and memory, measured side by side in one process (never asserted in tests).

Compares (1) ESD iterations/s of the harness (bf16 autocast, frozen teacher in bf16, TF32, SDPA) against a plain
fp32 loop of the same loss (fp32 teacher, no autocast, TF32 off), with peak GPU memory; (2) images/s of the
harness's sampler against diffusers' StableDiffusionPipeline with the same components, scheduler, noise and
guidance, at several batch sizes, with the largest pixel difference between the two (identical images expected).
On a GPU it uses an SD-1.4-shaped UNet, text encoder and VAE built from config with random weights (no download);
on CPU the tiny model.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

SD14_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SD14_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406,
                 eos_token_id=49407, pad_token_id=49407)
SD14_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)


def sd14_shaped(spec: Any, device: str) -> Any:
    """An SD-1.4-shaped DiffusionModel with seeded random weights (for speed/memory, not for images)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from unlearn_bench.models.base import DiffusionModel, VAECodec
    from unlearn_bench.models.tiny import SD1_SCHEDULER
    from unlearn_bench.models.tokenizer import load_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD14_UNET)
    te = CLIPTextModel(CLIPTextConfig(**SD14_TEXT))
    vae = AutoencoderKL(**SD14_VAE).requires_grad_(False).eval()
    return DiffusionModel(spec, unet, te, load_clip_tokenizer(77), SD1_SCHEDULER, VAECodec(vae), device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_esd(model: Any, esd_spec: Any, concept: Any, iters: int, plain: bool) -> dict[str, float]:
    """ESD iterations/s through the shared loop; plain=True: fp32 teacher, no autocast, TF32 off."""
    from unlearn_bench.methods_runtime import build_method
    from unlearn_bench.training import make_optimizer

    device = str(model.device)
    saved = (model.amp_dtype, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if plain:
        model.amp_dtype = None
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    method = build_method(esd_spec, concept)
    model.load_state([])
    method.prepare(model, 0)
    params = list(method.trainable(model).values())
    for p in params:
        p.requires_grad_(True)
    opt = make_optimizer("adam", params, 1e-5)
    gen = torch.Generator().manual_seed(0)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(iters + 1):  # the first iteration warms up kernels and allocators
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        method.loss(model, step, gen).backward()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    for p in params:
        p.requires_grad_(False)
    method.cleanup()
    model.load_state([])
    model.amp_dtype, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    return {"it_per_s": 1.0 / float(np.median(times[1:])), "peak_gb": peak}


def time_sampling(model: Any, batch: int, steps: int, guidance: float) -> dict[str, float]:
    """Images/s of the harness sampler vs diffusers' pipeline on the same components; max pixel difference."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    device = str(model.device)
    prompts = [f"a photo number {i}" for i in range(batch)]
    seeds = list(range(batch))
    pipe = StableDiffusionPipeline(vae=model.codec.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=DDIMScheduler.from_config(model.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def ours() -> np.ndarray:
        return model.sample(prompts, seeds, guidance=guidance, steps=steps, batch_size=batch)

    def theirs() -> np.ndarray:
        latents = model.initial_noise(seeds)
        with model.autocast():
            out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, latents=latents,
                       height=model.resolution, width=model.resolution, output_type="np").images
        return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)

    result = {}
    for name, fn in (("ours", ours), ("diffusers", theirs)):
        fn()  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        images = fn()
        _sync(device)
        result[f"{name}_img_per_s"] = batch / (time.perf_counter() - t0)
        result[f"{name}_images"] = images
    diff = np.abs(result.pop("ours_images").astype(int) - result.pop("diffusers_images").astype(int)).max()
    result["max_pixel_diff"] = float(diff)
    return result


def run_perf(model_name: str, device: str, iters: int, batch_sizes: list[int], steps: int) -> list[dict[str, Any]]:
    from unlearn_bench.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from unlearn_bench.models.loading import load_model
    from unlearn_bench.registry import Registry

    reg = Registry.load()
    if model_name == "sd14-shaped":
        spec = replace(reg.model("sd14"), name="sd14-shaped")
        model = sd14_shaped(spec, device)
        esd = reg.method("esd", spec)
    else:
        spec = reg.model(model_name)
        model = load_model(replace(spec, precision="bf16"), device)
        esd = reg.method("esd", spec)
    concept = reg.concept("nudity")
    rows: list[dict[str, Any]] = []
    fast = time_esd(model, esd, concept, iters, plain=False)
    plain = time_esd(model, esd, concept, iters, plain=True)
    rows.append({"what": "esd", "harness_it_s": fast["it_per_s"], "plain_fp32_it_s": plain["it_per_s"],
                 "speedup": fast["it_per_s"] / plain["it_per_s"], "harness_peak_gb": fast["peak_gb"],
                 "plain_peak_gb": plain["peak_gb"]})
    model.amp_dtype = None  # sampling comparison in fp32 (TF32 on GPU) so images can be identical
    for b in batch_sizes:
        r = time_sampling(model, b, steps, 7.5)
        rows.append({"what": f"sample bs{b}", "harness_img_s": r["ours_img_per_s"],
                     "diffusers_img_s": r["diffusers_img_per_s"],
                     "ratio": r["ours_img_per_s"] / r["diffusers_img_per_s"], "max_pixel_diff": r["max_pixel_diff"]})
    return rows
