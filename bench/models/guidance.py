"""The sampling hook: a change to classifier-free guidance or to the sampler's step made while sampling, not in the
weights. Kept apart from the model wrapper because methods (SLD) and attacks (the inference-time probes) subclass it
without needing the wrapper."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class SamplingGuidance:
    """A change to classifier-free guidance made while sampling, not in the weights (SLD, methods/sld.py). Every
    stage that samples (evaluation, attacks sampling the attacked model, UnlearnDiffAtk's judge) goes through
    DiffusionModel.sample, so a hook set there applies everywhere at once. The sampler batches one UNet branch per
    text of `prompts()` after the unconditional and prompt branches, and asks `guide` for the guided prediction."""

    name: str = "guidance"  # short label for records (the results' sampler column: "ddim+sld")

    def prompts(self) -> list[str]:
        """Extra conditioning texts, each one UNet branch shared by every sample (SLD: the safety concept)."""
        return []

    def describe(self) -> dict[str, Any]:
        """JSON-able parameters, recorded in the manifests of the stages that sampled with this hook."""
        return {"name": self.name}

    def guide(self, uncond: torch.Tensor, text: torch.Tensor, extra: list[torch.Tensor], scale: torch.Tensor,
              step: int, state: dict[str, Any]) -> torch.Tensor:
        """The guided prediction at step index `step` (0 = the first denoising step) from the unconditional, prompt
        and extra-branch predictions; scale: per-sample guidance [B,1,1,1]; state: a dict that lives for one
        batch's trajectory (momentum). Plain classifier-free guidance by default."""
        return uncond + scale * (text - uncond)

    def begin(self, latents: torch.Tensor, prompts: list[str], seeds: Sequence[int], scheduler: Any,
              state: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """Before the first step of a batch: the starting latents and the index of the first step to run (the
        inference-time probes start some samples from another model's partial trajectory). Unchanged by default."""
        return latents, 0

    def step(self, scheduler: Any, pred: torch.Tensor, t: Any, latents: torch.Tensor, step: int,
             state: dict[str, Any]) -> torch.Tensor:
        """The next latents from the guided prediction at step index `step` (the noise probe injects extra noise
        here). The sampler's own step by default."""
        return scheduler.step(pred, t, latents).prev_sample
