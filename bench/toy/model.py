"""The toy text-to-image model: Stable Diffusion's own classes, shrunk to the world of bench.toy.world.

A diffusers UNet2DConditionModel (so its modules are named like SD's: ``...attn2.to_k``), a small transformers
CLIPTextModel fed by a real CLIP BPE tokenizer, a v-prediction DDPM schedule (SD 2.x is v-prediction too, and
in the toy it was what made training work, see shared/TOY-NOTES.md), and a lossless image codec in place of
the VAE. Every unlearning method, attack and metric therefore runs through the same code path as on SD.

The codec is an orthogonal 2x2 Haar transform (pixel_unshuffle followed by a fixed 4x4 rotation of each 2x2
block, scaled so that every latent stays in [-1, 1]). It is as lossless as pixel_unshuffle and costs the same,
but the UNet then predicts "block mean + three differences" rather than four sub-pixels independently, so
small prediction errors no longer print a 2x2 checkerboard on the decoded image. ``PixelUnshuffleCodec`` is
kept as the plain alternative (``TOY_CONFIG["codec"] = "pixel_unshuffle"``).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from unlearn_bench.compat import ensure_torchvision_importable

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
UNET_FILE = "unet.safetensors"
TEXT_ENCODER_FILE = "text_encoder.safetensors"
CONFIG_FILE = "config.json"

# The architecture and schedule, as plain data: written next to the weights so that a checkpoint always
# carries the shape it was trained with (load_toy_components reads the file's copy, not this one).
TOY_CONFIG: dict[str, Any] = {
    "resolution": 32,
    "max_length": 16,  # "a red circle" is 5 tokens with BOS/EOS; 16 leaves room for longer prompts
    "codec": "haar",
    "text_embedding_scale": 20.0,  # word embeddings x20 at init so that captions start far apart (TOY-NOTES)
    "unet": {
        "sample_size": 16,
        "in_channels": 12,
        "out_channels": 12,
        "block_out_channels": [64, 64],
        "layers_per_block": 1,
        # cross-attention at 8x8 and in the mid block only: at 16x16 it was 3.3x slower (TOY-NOTES)
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": 32,
        "attention_head_dim": 8,  # diffusers' historical name for the number of heads (8 heads of 8 dims)
        "norm_num_groups": 32,
    },
    "text_encoder": {
        "vocab_size": 49408,
        "hidden_size": 32,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
        "hidden_act": "quick_gelu",
        "projection_dim": 32,
    },
    # Keys understood by both DDPMScheduler (training) and DDIMScheduler (sampling). "trailing" spacing starts
    # DDIM at t = 999 where the cosine schedule has (almost) no signal left, matching the pure-noise start.
    "scheduler": {
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "v_prediction",
        "clip_sample": False,
        "timestep_spacing": "trailing",
        "steps_offset": 0,
    },
}


class PixelUnshuffleCodec:
    """Lossless 'VAE': [B, 3, H, W] in [-1, 1] <-> [B, 12, H/2, W/2] by pixel_unshuffle(2)."""

    latent_channels = 12
    scale_factor = 2

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images, self.scale_factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents, self.scale_factor)


class HaarCodec(PixelUnshuffleCodec):
    """Lossless 'VAE': one level of the 2x2 Haar transform, latents = (mean, 3 differences) per colour.

    pixel_unshuffle orders each colour's block as (top-left, top-right, bottom-left, bottom-right); the matrix
    below maps that to (mean, horizontal, vertical, diagonal) differences / 4. It is 1/2 times an orthonormal
    matrix, so latents stay in [-1, 1] and decode is 2x its transpose: exact up to float rounding, and exact
    after quantising back to uint8.
    """

    _H = (
        torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 1.0, -1.0], [1.0, 1.0, -1.0, -1.0], [1.0, -1.0, -1.0, 1.0]])
        / 4.0
    )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        blocks = F.pixel_unshuffle(images, 2).reshape(b, 3, 4, h // 2, w // 2)
        out = torch.einsum("ij,bcjhw->bcihw", self._H.to(images), blocks)
        return out.reshape(b, 12, h // 2, w // 2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, _, h, w = latents.shape
        coeffs = latents.reshape(b, 3, 4, h, w)
        blocks = torch.einsum("ji,bcjhw->bcihw", 4.0 * self._H.to(latents), coeffs)
        return F.pixel_shuffle(blocks.reshape(b, 12, h, w), 2)


CODECS: dict[str, type[PixelUnshuffleCodec]] = {"pixel_unshuffle": PixelUnshuffleCodec, "haar": HaarCodec}


def _make_modules(config: dict[str, Any]) -> dict[str, Any]:
    """Instantiate (randomly initialised) modules from a config; the caller controls the RNG."""
    ensure_torchvision_importable()
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from unlearn_bench.models.tokenizer import load_clip_tokenizer

    tokenizer = load_clip_tokenizer(model_max_length=config["max_length"])
    te_cfg = CLIPTextConfig(
        **config["text_encoder"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    unet = UNet2DConditionModel(**config["unet"])
    text_encoder = CLIPTextModel(te_cfg)
    return {
        "unet": unet,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler_config": dict(config["scheduler"]),
        "codec": CODECS[config["codec"]](),
        "resolution": int(config["resolution"]),
        "max_length": int(config["max_length"]),
        "config": copy.deepcopy(config),
    }


def build_toy_components(seed: int, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fresh, seeded, untrained components (what `bench toy build` trains, and what tests can use untrained).

    Keys: unet, text_encoder, tokenizer, scheduler_config, codec, resolution, max_length, config.
    The global torch RNG is left as it was.
    """
    config = copy.deepcopy(TOY_CONFIG if config is None else config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        comps = _make_modules(config)
        with torch.no_grad():
            emb = comps["text_encoder"].get_input_embeddings()
            emb.weight.mul_(float(config["text_embedding_scale"]))
    comps["unet"].eval()
    comps["text_encoder"].eval()
    return comps


def _atomic_write_bytes(path: Path, write: Any) -> None:
    """Write a temp file in the same folder, then os.replace: a killed process never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; weights are meant to be read by anyone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic_write_bytes(path, lambda tmp: save_file(clean, tmp))


def atomic_save_json(obj: Any, path: Path) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")

    _atomic_write_bytes(path, write)


def save_toy_components(components: dict[str, Any], weights_dir: Path) -> None:
    """Write unet / text encoder safetensors and config.json into weights_dir (each file atomically)."""
    weights_dir = Path(weights_dir)
    atomic_save_safetensors(components["unet"].state_dict(), weights_dir / UNET_FILE)
    atomic_save_safetensors(components["text_encoder"].state_dict(), weights_dir / TEXT_ENCODER_FILE)
    atomic_save_json(components.get("config", TOY_CONFIG), weights_dir / CONFIG_FILE)


def load_toy_components(weights_dir: Path | None = None, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Load the trained toy model (default: the checkpoint shipped in bench/toy/weights)."""
    from safetensors.torch import load_file

    weights_dir = WEIGHTS_DIR if weights_dir is None else Path(weights_dir)
    missing = [f for f in (CONFIG_FILE, UNET_FILE, TEXT_ENCODER_FILE) if not (weights_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"toy model weights not found in {weights_dir} (missing {', '.join(missing)}); "
            f"build them with `bench toy build --out {weights_dir}`"
        )
    config = json.loads((weights_dir / CONFIG_FILE).read_text())
    with torch.random.fork_rng(devices=[]):  # the throw-away random init must not move the caller's RNG
        comps = _make_modules(config)
    comps["unet"].load_state_dict(load_file(str(weights_dir / UNET_FILE)))
    # strict=False only for buffers transformers may or may not persist (position_ids); weights must match.
    te_state = load_file(str(weights_dir / TEXT_ENCODER_FILE))
    result = comps["text_encoder"].load_state_dict(te_state, strict=False)
    bad = [k for k in result.missing_keys if "position_ids" not in k] + list(result.unexpected_keys)
    if bad:
        raise RuntimeError(f"text encoder checkpoint in {weights_dir} does not match its config: {bad[:5]}")
    for key in ("unet", "text_encoder"):
        comps[key].to(device).eval()
    return comps


@torch.no_grad()
def encode_prompts(components: dict[str, Any], prompts: list[str], device: str | torch.device) -> torch.Tensor:
    """Token ids -> the text encoder's last hidden state [B, max_length, hidden], as SD feeds its UNet."""
    ids = components["tokenizer"](
        list(prompts),
        padding="max_length",
        max_length=components["max_length"],
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    return components["text_encoder"](ids)[0].float()


@torch.no_grad()
def sample_images(
    components: dict[str, Any],
    prompts: list[str],
    seeds: list[int] | np.ndarray,
    guidance_scale: float = 3.0,
    num_inference_steps: int = 25,
    device: str | torch.device = "cpu",
    batch_size: int = 128,
) -> np.ndarray:
    """DDIM sampling with classifier-free guidance (empty-caption unconditional branch); uint8 [N, 32, 32, 3].

    Used to measure a toy build; it goes through the harness's model wrapper, so a build is judged by the very
    sampler the suites use (one per-seed CPU generator per image, as there).
    """
    from unlearn_bench.models.toy import wrap_toy

    model = wrap_toy(components, device=str(device))
    return model.sample(list(prompts), [int(s) for s in seeds], guidance=guidance_scale, steps=num_inference_steps,
                        batch_size=batch_size)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def from_uint8(images: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
