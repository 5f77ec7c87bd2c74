"""Full finetuning relearning attack: the standard denoising loss on concept images, AdamW, whole UNet.

This is the attack of Meta-Unlearning (Gao et al., ICCV 2025, Sec. 5: finetune the unlearned model on images of
the erased concept and measure the concept rate after 50/100/200/300 steps). The paper does not publish the
attacker's learning rate or modules, so the registry names the learning rate (ft-lr1e-5, ...) and finetunes the
whole UNet with AdamW (weight decay 1e-2, torch's default), batch 4, gradient clip 1.0; the relearning data are
images the ORIGINAL model generates from the concept's attack prompts (cached as a stage), or a user folder of
image + caption pairs (`data_dir`: each image file with a same-named .txt caption).
The loss honours the model's prediction type (epsilon or v).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from unlearn_bench.attacks.base import AttackData, WeightAttack
from unlearn_bench.data import DataRequest
from unlearn_bench.methods.base import select_parameters
from unlearn_bench.models.base import Cond, uint8_to_images


class Finetune(WeightAttack):
    """Relearning by finetuning (full UNet, chosen modules, or LoRA in a subclass) on the attack's image set."""

    samples_model = False  # trains on data made by the original model (or a folder); never samples itself

    def steps(self) -> list[int]:
        steps = sorted({int(s) for s in self.spec.params["steps"]})
        if not steps or steps[0] <= 0:
            raise ValueError(f"attack {self.spec.name}: steps must be positive integers, got {steps}")
        return steps

    def data_request(self) -> DataRequest:
        p = self.spec.params
        return DataRequest(tuple(p.get("prompts") or self.concept.attack_prompts), int(p["n_images"]),
                           p.get("data_dir"))

    def trainable(self, model: Any) -> dict[str, torch.nn.Parameter]:
        return select_parameters(model.unet, "unet", self.spec.params.get("modules") or None)

    def run(self, model: Any, data: AttackData | None, seed: int, save: Callable[[int], None],
            progress: Any = None) -> None:
        if data is None or len(data) == 0:
            raise ValueError(f"attack {self.spec.name} needs relearning data")
        with torch.no_grad():
            self.latents = model.codec.encode(uint8_to_images(data.images).to(model.device))
            uniq = sorted(set(data.captions))
            enc = model.encode_prompt(uniq).detach()
            self.cond_index = torch.tensor([uniq.index(c) for c in data.captions])
            self.cond = enc
        self.scheduler = model.noise_scheduler()
        self.train_to_checkpoints(model, seed, save, progress)

    def loss(self, model: Any, step: int, generator: torch.Generator) -> torch.Tensor:
        n = len(self.latents)
        bs = min(int(self.spec.params["batch_size"]), n)
        idx = torch.randperm(n, generator=generator)[:bs]
        cond = self.cond.index(self.cond_index[idx].to(self.cond.hidden.device))
        return model.denoising_loss(self.latents[idx.to(self.latents.device)], Cond(cond.hidden, cond.added),
                                    generator, self.scheduler)
