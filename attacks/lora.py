"""LoRA relearning attack (`lora-r4`, `lora-r16`): low-rank adapters on the UNet attention projections.

The attacker finetunes only LoRA factors (Hu et al., ICLR 2022: W' = W + (alpha / r) B A, A gaussian, B = 0 at
init) on to_q, to_k, to_v and to_out.0 of every attention block, as diffusers' reference LoRA training script does
(examples/text_to_image/train_text_to_image_lora.py: LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
target_modules=["to_k", "to_q", "to_v", "to_out.0"]), AdamW, lr 1e-4, weight decay 1e-2, grad clip 1.0, rank 4).
Data, loss, batching and checkpoints are the full finetune's (attacks/finetune.py): the denoising loss on images of
the concept, evaluated at several steps of the relearning curve.

Each checkpoint is stored as LoRA factors only, in the file layout of StableDiffusionPipeline.save_lora_weights
(diffusers keys "unet.<module>.lora.down.weight" / ".lora.up.weight" from
convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)), peft's LoraConfig as "lora_adapter_metadata"),
so `pipe.load_lora_weights(file)` loads it on top of the unlearned pipeline. The harness evaluates a checkpoint by
merging W += B A into the (unlearned) weights (`merge_lora`), which is what diffusers' fuse_lora computes.

Deviations: alpha is fixed to the rank (scale 1, the reference scripts' choice), so a file loads identically with or
without its metadata; the gaussian init of A is seeded from the attack seed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from unlearn_bench.attacks.finetune import Finetune

TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
FORMAT_KEY = "delta_format"  # safetensors metadata marking a file of LoRA factors (vs full tensor values)


def lora_parameters(unet: Any) -> dict[str, torch.nn.Parameter]:
    """The trainable LoRA factors peft injected into the UNet, by their 'unet.'-prefixed parameter names."""
    return {f"unet.{n}": p for n, p in unet.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def lora_state_dict(unet: Any) -> dict[str, torch.Tensor]:
    """The adapter in diffusers' LoRA format with the pipeline's 'unet.' prefix (what save_lora_weights writes)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return {f"unet.{k}": v.detach().float().cpu().clone() for k, v in sd.items()}


def lora_metadata(unet: Any) -> dict[str, str]:
    """safetensors metadata: peft's LoraConfig under diffusers' 'lora_adapter_metadata' key, plus our format tag."""
    cfg = unet.peft_config["default"].to_dict()
    cfg = {f"unet.{k}": sorted(v) if isinstance(v, set) else v for k, v in cfg.items()}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(cfg, indent=2, sort_keys=True, default=str),
            FORMAT_KEY: "lora"}


@contextmanager
def attached_lora(unet: Any, rank: int, seed: int,
                  targets: tuple[str, ...] = TARGET_MODULES) -> Iterator[dict[str, torch.nn.Parameter]]:
    """Inject a fresh LoRA adapter (alpha = rank) for the duration of the block, then remove it, leaving the base
    weights exactly as they were (peft never modifies them unless merged)."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        unet.add_adapter(config)
    try:
        yield lora_parameters(unet)
    finally:
        unet.unload_lora()


def lora_saver(unet: Any, save: Callable[..., None]) -> Callable[[int], None]:
    """save(step) for the runner's callback: store the adapter's factors instead of changed base tensors."""
    return lambda step: save(step, lora_state_dict(unet), lora_metadata(unet))


class LoRA(Finetune):
    """`lora-r*`: the finetune attack with only LoRA factors trainable (params: rank, plus Finetune's)."""

    def trainable(self, model: Any) -> dict[str, torch.nn.Parameter]:
        named = lora_parameters(model.unet)
        if not named:
            raise RuntimeError(f"attack {self.spec.name}: no LoRA adapter is attached")
        return named

    def run(self, model: Any, data: Any, seed: int, save: Callable[..., None], progress: Any = None) -> None:
        with attached_lora(model.unet, int(self.spec.params["rank"]), seed):
            super().run(model, data, seed, lora_saver(model.unet, save), progress)
