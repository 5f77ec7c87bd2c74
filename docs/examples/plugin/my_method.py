"""Negative-prompt finetuning: a worked example of a plug-in unlearning method, NOT a method from a paper.

It is written only against the harness's public interface, the way a method outside this repository would be:
a `unlearn_bench.methods.base.Method` subclass that names its trainable parameters (`trainable`) and its loss
(`loss`); the shared training loop (seeding, optimiser, clipping, progress, nan checks) runs it, and the `+meta`
wrapper can wrap it unchanged (`negprompt+meta`).

The idea: make the model answer the concept's prompt the way the original model answers the empty prompt.
Noisy latents x_t come from a short DDIM trajectory of the frozen original model guided toward the concept (data
free: no images), and only the UNet's cross-attention trains (the only place the text enters):

    L = || eps_theta(x_t, c_concept, t) - eps_0(x_t, "", t) ||^2

(ESD's target with eta = 0, restricted to cross-attention - which is why it is a fair, small example and not a
new contribution.) Registered by docs/examples/plugin/my-bench.yaml; README "Add your own method / attack /
metric / concept" walks through it.
"""

from __future__ import annotations

from typing import Any

import torch

from unlearn_bench.methods.base import Method, select_parameters
from unlearn_bench.models.base import Cond


class NegativePromptFinetune(Method):
    """Finetune cross-attention so that the concept's noise prediction matches the empty prompt's."""

    def prepare(self, model: Any, seed: int) -> None:
        """Once before training: a frozen copy of the UNet (the teacher) and the two text conditions."""
        p = self.spec.params
        self.frozen = model.frozen_copy(model.unet)
        with torch.no_grad():
            self.c_concept = model.encode_prompt([p["prompt"] or self.concept.target]).detach()
            self.c_empty = model.encode_prompt([""]).detach()

    def cleanup(self) -> None:
        self.__dict__.pop("frozen", None)  # give the teacher's memory back before the next stage

    def trainable(self, model: Any) -> dict[str, torch.nn.Parameter]:
        return select_parameters(model.unet, "unet", list(self.spec.params["modules"]))

    @torch.no_grad()
    def noisy_latents(self, model: Any, n: int, generator: torch.Generator) -> tuple[torch.Tensor, Any]:
        """x_t after k of `ddim_steps` DDIM steps (k drawn uniformly) of the frozen model toward the concept."""
        p = self.spec.params
        sched = model.sampler("ddim")
        sched.set_timesteps(int(p["ddim_steps"]), device=model.device)
        k = int(torch.randint(0, int(p["ddim_steps"]), (1,), generator=generator))
        x = torch.randn((n, *model.latent_shape), generator=generator).to(model.device) * sched.init_noise_sigma
        cond = _repeat(self.c_empty, n).cat(_repeat(self.c_concept, n))
        g = float(p["guidance"])
        for t in sched.timesteps[:k]:
            uncond, text = model.predict(torch.cat([x, x]), t, cond, unet=self.frozen).chunk(2)
            x = sched.step(uncond + g * (text - uncond), t, x).prev_sample
        return x, sched.timesteps[k]

    def loss(self, model: Any, step: int, generator: torch.Generator) -> torch.Tensor:
        n = int(self.spec.params["batch_size"])
        x_t, t = self.noisy_latents(model, n, generator)
        with torch.no_grad():
            target = model.predict(x_t, t, _repeat(self.c_empty, n), unet=self.frozen)
        pred = model.predict(x_t, t, _repeat(self.c_concept, n))
        return torch.nn.functional.mse_loss(pred.float(), target.float())


def _repeat(cond: Any, n: int) -> Any:
    """A one-prompt condition repeated for a batch of n (SDXL's pooled extras included)."""
    added = None if cond.added is None else {k: v.expand(n, *v.shape[1:]) for k, v in cond.added.items()}
    return Cond(cond.hidden.expand(n, *cond.hidden.shape[1:]), added)
