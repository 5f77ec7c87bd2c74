"""ESD: Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023).

Eq. 7 of the paper, with the anchor generalisation of the authors' later code (`c_from`, default the empty prompt,
which is the paper's equation):

    L = || eps_theta(x_t, c, t) - [ eps_0(x_t, c_anchor, t) - eta * (eps_0(x_t, c, t) - eps_0(x_t, "", t)) ] ||^2

eps_0 is the frozen original model; x_t comes from a partial DDIM trajectory (k of `ddim_steps` steps, k uniform)
started from noise and guided by `start_guidance` toward c, sampled with the model being trained (the paper's
train-esd.py) or the frozen one (`sample_with: frozen`). The training timestep is the one the partial trajectory
ended at (as in the authors' diffusers script esd_diffusers.py; the original CompVis script maps the DDIM index to
a DDPM timestep in the opposite direction, which mismatches the latent's noise level - a named deviation).
Outputs are compared in the model's own prediction space (epsilon or v): for a fixed x_t and t, v is an affine
function of epsilon with the same coefficients for every prompt, so the guidance combination is preserved.

Variants select the trained parameters (official train-esd.py `train_method`):
  esd-x: cross-attention (attn2) only - for styles;   esd-x-strict: attn2.to_k / attn2.to_v only;
  esd-u: everything but cross-attention, time embedding and the output conv - for nudity / global concepts;
  esd-all: the whole UNet.
SD defaults (official code, paper Sec. 4): 1000 iterations, Adam lr 1e-5, eta 1.0, ddim_steps 50,
start_guidance 3, 512 px, batch 1.

Note: an earlier specification of this project wrote the anchor as eps_0(x_t, c, t); with eta = 1 that would make the
target the unconditional prediction rather than negative guidance. We follow the paper (anchor "") and expose
`anchor` so the other reading is one override away.
"""

from __future__ import annotations

from typing import Any

import torch

from unlearn_bench.methods.base import Method, select_parameters
from unlearn_bench.models.base import Cond

VARIANTS: dict[str, tuple[list[str], list[str]]] = {
    "esd-x": (["attn2"], []),
    "esd-x-strict": ([r"attn2\.to_k", r"attn2\.to_v"], []),
    "esd-u": ([".*"], ["attn2", r"^time_embedding", r"^conv_out", r"^conv_norm_out"]),
    "esd-all": ([".*"], []),
}


def esd_target(e0_anchor: torch.Tensor, e0_concept: torch.Tensor, e0_uncond: torch.Tensor,
               eta: float) -> torch.Tensor:
    """The ESD regression target (paper Eq. 7 with the anchor prediction in place of the unconditional one)."""
    return e0_anchor - eta * (e0_concept - e0_uncond)


class ESD(Method):
    def variant(self) -> str:
        """`train` for this concept (per concept: ESD-u for nudity and objects, ESD-x for styles)."""
        return str(self.param("train"))

    def prepare(self, model: Any, seed: int) -> None:
        p = self.spec.params
        if self.variant() not in VARIANTS:
            raise ValueError(f"esd: train={p['train']!r}; allowed: {sorted(VARIANTS)}")
        self.frozen = model.frozen_copy(model.unet)
        with torch.no_grad():
            prompt = p.get("prompt") or self.concept.target
            self.c_concept = model.encode_prompt([prompt]).detach()
            self.c_uncond = model.encode_prompt([""]).detach()
            self.c_anchor = model.encode_prompt([p.get("anchor", "")]).detach()

    def cleanup(self) -> None:
        self.__dict__.pop("frozen", None)

    def trainable(self, model: Any) -> dict[str, torch.nn.Parameter]:
        include, exclude = VARIANTS[self.variant()]
        return select_parameters(model.unet, "unet", include, exclude)

    @staticmethod
    def _rep(c: Cond, n: int) -> Cond:
        added = None if c.added is None else {k: v.expand(n, *v.shape[1:]) for k, v in c.added.items()}
        return Cond(c.hidden.expand(n, *c.hidden.shape[1:]), added)

    @torch.no_grad()
    def partial_trajectory(self, model: Any, k: int, n: int, generator: torch.Generator) -> tuple[Any, Any]:
        """Run k of ddim_steps DDIM steps from noise, guided toward the concept; return (x_t, t)."""
        p = self.spec.params
        sched = model.sampler("ddim")
        sched.set_timesteps(int(p["ddim_steps"]), device=model.device)
        x = torch.randn((n, *model.latent_shape), generator=generator).to(model.device) * sched.init_noise_sigma
        unet = self.frozen if p.get("sample_with", "trained") == "frozen" else model.unet
        cond = self._rep(self.c_uncond, n).cat(self._rep(self.c_concept, n))
        g = float(p["start_guidance"])
        for t in sched.timesteps[:k]:
            u, c = model.predict(torch.cat([x, x]), t, cond, unet=unet).chunk(2)
            x = sched.step(u + g * (c - u), t, x).prev_sample
        return x, sched.timesteps[k]

    def loss(self, model: Any, step: int, generator: torch.Generator) -> torch.Tensor:
        p = self.spec.params
        n = int(p.get("batch_size", 1))
        k = int(torch.randint(0, int(p["ddim_steps"]), (1,), generator=generator))
        x_t, t = self.partial_trajectory(model, k, n, generator)
        with torch.no_grad():
            e0_c = model.predict(x_t, t, self._rep(self.c_concept, n), unet=self.frozen)
            e0_u = model.predict(x_t, t, self._rep(self.c_uncond, n), unet=self.frozen)
            e0_a = e0_u if p.get("anchor", "") == "" else model.predict(x_t, t, self._rep(self.c_anchor, n),
                                                                        unet=self.frozen)
            target = esd_target(e0_a, e0_c, e0_u, float(p["eta"]))
        e_n = model.predict(x_t, t, self._rep(self.c_concept, n))
        return torch.nn.functional.mse_loss(e_n.float(), target.float())
