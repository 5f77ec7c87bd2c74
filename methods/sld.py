"""`sld`: Safe Latent Diffusion (Schramowski et al., CVPR 2023) - a change to SAMPLING, not to the weights.

Source: huggingface/diffusers, pipelines/stable_diffusion_safe/pipeline_stable_diffusion_safe.py (now under
pipelines/deprecated/), `__call__`'s guidance block (paper Eq. 3-8), and SafetyConfig in that package's __init__.py
for the presets. Per denoising step i, with three UNet branches batched as [uncond, prompt, safety concept]
(e_u, e_p, e_S) and the classifier-free guidance scale s_g:

    mu    = min(1, s_S |e_p - e_S|)  where e_p - e_S < lambda, else 0           (Eq. 6, elementwise)
    gamma = mu * (e_S - e_u) + s_m nu                                            (Eq. 4 and 7)
    nu   <- beta_m nu + (1 - beta_m) gamma,   nu_0 = 0 (also during warmup)      (Eq. 8)
    e     = e_u + s_g ((e_p - e_u) - [i >= delta] gamma)                         (Eq. 3: scaled by s_g too)

SLD is on only when s_S > 1 and s_g > 1 (diffusers: `sld_guidance_scale > 1 and guidance_scale > 1`): with
s_S <= 1 the method returns no guidance at all (its images are plain CFG's, cached like `none`'s), and samples
whose own guidance is <= 1 (per-prompt guidance from a prompt file) get plain CFG.

Presets (diffusers SafetyConfig; MEDIUM is also `__call__`'s default and this entry's params) are the registry
entries sld-weak, sld (medium), sld-strong, sld-max, and PRESETS below.

Deviations and choices, each deliberate:
- Safety concept text per concept (`safety_concept`, looked up by concept name, then its target word, then
  `default`): diffusers' default text for nudity; "" = the concept's target word(s) (toy `red` -> "red"), since
  the paper's text lists harms, not e.g. a colour. The concept text is encoded once and repeated over the batch, as
  diffusers does.
- Warmup counts denoising steps, so a model sampled with fewer steps needs a smaller delta (registry `scaled`: the
  toy's 10 DDIM steps take delta x 10/50, rounded, from SD's 50; see the registry entry).
- v-prediction models (the toy, SD 2.x) apply the same formula to v (guidance is linear in the prediction; the
  threshold and s_S then act on v differences).
- OPTML-Group/Diffusion-MU-Attack (src/tasks/classifier_.py) uses s_S = 200 for "weak" (diffusers: 20), a safety text
  without "an image showing", and compares the warmup with the timestep t instead of the step index; this follows
  diffusers. Like that code, UnlearnDiffAtk's loss uses the raw UNet prediction; SLD is applied when it samples.
- `+meta` cannot wrap SLD: there are no weights to meta-learn (Method.wrap_refusal; refused at plan time).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from unlearn_bench.methods.base import Method
from unlearn_bench.models.base import SamplingGuidance

# diffusers StableDiffusionPipelineSafe.__init__ `safety_concept`
DEFAULT_SAFETY_CONCEPT = ("an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, "
                          "sexual, nudity, bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, "
                          "vandalism, weapons, child abuse, brutality, cruelty")

# diffusers SafetyConfig, keyed by this module's parameter names (sld_warmup_steps, sld_guidance_scale,
# sld_threshold, sld_momentum_scale, sld_mom_beta).
PRESETS: dict[str, dict[str, float | int]] = {
    "weak": {"warmup_steps": 15, "guidance_scale": 20, "threshold": 0.0, "momentum_scale": 0.0, "momentum_beta": 0.0},
    "medium": {"warmup_steps": 10, "guidance_scale": 1000, "threshold": 0.01, "momentum_scale": 0.3,
               "momentum_beta": 0.4},
    "strong": {"warmup_steps": 7, "guidance_scale": 2000, "threshold": 0.025, "momentum_scale": 0.5,
               "momentum_beta": 0.7},
    "max": {"warmup_steps": 0, "guidance_scale": 5000, "threshold": 1.0, "momentum_scale": 0.5, "momentum_beta": 0.7},
}


class SafetyGuidance(SamplingGuidance):
    """SLD's guidance rule (module docstring) for one safety concept text; momentum lives in the per-batch state."""

    name = "sld"

    def __init__(self, concept_text: str, warmup_steps: int, guidance_scale: float, threshold: float,
                 momentum_scale: float, momentum_beta: float) -> None:
        self.concept_text = concept_text
        self.warmup_steps = int(warmup_steps)
        self.guidance_scale = float(guidance_scale)
        self.threshold = float(threshold)
        self.momentum_scale = float(momentum_scale)
        self.momentum_beta = float(momentum_beta)

    def params(self) -> dict[str, float | int]:
        return {"warmup_steps": self.warmup_steps, "guidance_scale": self.guidance_scale, "threshold": self.threshold,
                "momentum_scale": self.momentum_scale, "momentum_beta": self.momentum_beta}

    def preset(self) -> str:
        """The diffusers preset whose s_S, lambda, s_m and beta_m these are (the warmup may be scaled to the
        model's step count), or 'custom'."""
        mine = {k: float(v) for k, v in self.params().items() if k != "warmup_steps"}
        return next((name for name, v in PRESETS.items()
                     if mine == {k: float(x) for k, x in v.items() if k != "warmup_steps"}), "custom")

    def prompts(self) -> list[str]:
        return [self.concept_text]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "preset": self.preset(), "safety_concept": self.concept_text, **self.params()}

    def guide(self, uncond: torch.Tensor, text: torch.Tensor, extra: list[torch.Tensor], scale: torch.Tensor,
              step: int, state: dict[str, Any]) -> torch.Tensor:
        """e_u + s_g ((e_p - e_u) - [step >= delta] gamma), operations in diffusers' order (same float results)."""
        (safety,) = extra
        diff = text - safety
        mu = torch.where(diff >= self.threshold, torch.zeros_like(diff),
                         torch.clamp(torch.abs(diff) * self.guidance_scale, max=1.0))  # Eq. 6
        gamma = torch.mul(safety - uncond, mu)  # Eq. 4
        momentum = state.get("momentum")
        if momentum is None:
            momentum = torch.zeros_like(gamma)
        gamma = gamma + self.momentum_scale * momentum  # Eq. 7
        state["momentum"] = self.momentum_beta * momentum + (1 - self.momentum_beta) * gamma  # Eq. 8
        guidance = text - uncond
        if step >= self.warmup_steps:  # Eq. 3, after the warmup; only for samples guided at all (s_g > 1)
            guidance = torch.where(scale > 1.0, guidance - gamma, guidance)
        return uncond + scale * guidance


class SLD(Method):
    """Params: warmup_steps (delta), guidance_scale (s_S), threshold (lambda), momentum_scale (s_m), momentum_beta
    (beta_m), safety_concept (per concept; "" = the concept's target word)."""

    closed_form = True
    changes_weights = False  # no unlearn stage: the base weights are evaluated, sampled with SLD
    wrap_refusal: ClassVar[str] = ("SLD changes sampling, not weights, so there are no weights for a wrapper such as "
                                   "+meta to meta-learn; run `sld` alone (a relearning attack finetunes the base UNet "
                                   "and is evaluated with SLD still on)")

    def apply(self, model: Any, seed: int) -> None:
        return None

    def concept_text(self) -> str:
        """The safety concept for this concept: by name, then by target word, then `default`; "" = the target."""
        value = self.param("safety_concept")
        return str(value or self.concept.target)

    def sampling_guidance(self) -> SafetyGuidance | None:
        p = self.spec.params
        if float(p["guidance_scale"]) <= 1.0:  # diffusers: SLD off unless sld_guidance_scale > 1
            return None
        return SafetyGuidance(self.concept_text(), int(p["warmup_steps"]), float(p["guidance_scale"]),
                              float(p["threshold"]), float(p["momentum_scale"]), float(p["momentum_beta"]))
