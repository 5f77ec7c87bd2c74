"""SDD: Safe self-Distillation Diffusion (Kim et al. 2023, arXiv 2307.05977; ICML 2023 workshop).

Official code: nannullna/safe-diffusion, train_sdd.py (train_step, sample_until, gather_parameters, main) and
run_sdd_nudity.sh (the nudity recipe: --removing_concepts "nudity", every other flag at its default).

Two UNets start from the same weights: the student (trained) and a teacher that never gets gradients and follows
the student by an exponential moving average (EMA). Each step:
  1. the removal concept c_s: `concept_method` iterative (default) cycles through the concept list, step k uses
     concepts[k mod n]; composite = all joined with ", "; random = one drawn uniformly; sequential = below;
  2. x_t: from z_T ~ N(0, I), k ~ U{0..ddim_steps-1} DDIM steps (eta 0) of the TEACHER under classifier-free
     guidance `guidance` toward c_p = ", ".join(concepts) (the whole list, whatever c_s is), without gradient;
  3. the UNet timestep t ~ U[round((1-(k+1)/N) T), round((1-k/N) T)), the DDPM interval around DDIM step k
     (N = ddim_steps, T = the scheduler's num_train_timesteps, 1000 for SD);
  4. L = || eps_student(x_t, t, c_s) - sg[ eps_student(x_t, t, "") ] ||^2 (mean): the target is the STUDENT's own
     unconditional prediction under no_grad, not the teacher's;
  5. optimiser step (AdamW, grad clip), then teacher <- decay * teacher + (1 - decay) * student.
The EMA teacher, not the student, is what the official script saves and evaluates.

How the EMA fits the Method interface (the shared loop owns the optimiser, so there is no after-step hook):
the EMA update for optimiser step s is applied at the start of loss(step = s + 1), i.e. before the teacher samples
that step's x_t, which is exactly when the official loop has applied it; finish() applies the last step's update
and then copies the EMA weights into the trained parameters, so the stored delta (and every later stage) is the
EMA model. The EMA is kept in fp32 for the trained parameters (a bf16 copy would round a 0.1% update away) and
copied into the teacher UNet (bf16 under bf16 precision) after each update; untrained parameters are identical in
both UNets, as in the official code, where the EMA runs over every parameter but only the trained ones move.
With `+meta` the wrapper's loss calls this loss() once per step and its finish() calls this finish() first, so the
meta gradient acts on the student inside the loop, the EMA of that student is the result, and +meta's end-of-run
gradient alignment is measured on the EMA weights that are stored.

Trained parameters (`train` = --finetuning_method, names as gather_parameters matches them): xattn (default) =
names containing "attn2"; selfattn = "attn1"; full = all; noxattn = all but attn2, conv_out.* and names containing
"time_embed"; notime = all but conv_out.* and "time_embed". (Unlike ESD-u here, conv_norm_out is trained.)
Outputs are compared in the model's own prediction space (epsilon or v; v is affine in epsilon with the same
coefficients for every prompt at fixed x_t and t), as the other methods do.

SD defaults (train_sdd.py argparse at the commit that set --guidance_scale 3.0): 1500 steps, AdamW lr 1e-5,
betas (0.9, 0.999), eps 1e-8, weight decay 1e-4, grad clip 1.0, constant lr (its 500 warm-up steps are ignored by
`constant`), EMA 0.999, guidance 3.0, 50 DDIM steps, 1000 DDPM steps, batch 1 (--train_batch_size is never used:
the latent batch is the one prompt).

Named deviations:
- k = 0 means x_T, the pure noise, paired with t in the top window. The official sample_until breaks at
  i == k - 1, which never happens for k = 0, so it runs all 50 steps and pairs a clean sample with t in
  [980, 1000) (2% of steps); we do what the window formula intends.
- `sequential` uses contiguous blocks of iterations / n steps per concept. The official index
  (step - 1) // num_train_steps is 0 for every step, i.e. always the first concept.
- `random` draws with the run's torch generator (official: Python's random.choice).
- `batch_size` > 1 draws that many independent z_T (one k per step, a t per sample, as train_step draws t) for
  the scaled toy runs; the SD default is the official 1.
- The window assumes the DDIM timestep after k steps lies in it; it does for SD 1.x/2.x ("leading", offset 1)
  and for the toy's "trailing" spacing (tests/test_sdd.py checks both).
As in the official code, guidance <= 1 samples x_t unconditionally (the "" branch only), not toward c_p.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from unlearn_bench.methods.base import Method, select_parameters
from unlearn_bench.models.base import Cond

# train_sdd.py gather_parameters (--finetuning_method), as include / exclude regexes over diffusers names
TRAIN_CHOICES: dict[str, tuple[list[str], list[str]]] = {
    "xattn": (["attn2"], []),
    "selfattn": (["attn1"], []),
    "full": ([".*"], []),
    "noxattn": ([".*"], ["attn2", r"^conv_out\.", "time_embed"]),
    "notime": ([".*"], [r"^conv_out\.", "time_embed"]),
}
CONCEPT_METHODS = ("iterative", "composite", "random", "sequential")  # --concept_method choices


def timestep_window(k: int, ddim_steps: int, train_steps: int) -> tuple[int, int]:
    """[start, end) of the training timesteps around DDIM step k (train_step's t_ddpm_start / t_ddpm_end)."""
    start = round((1 - (k + 1) / ddim_steps) * train_steps)
    end = round((1 - k / ddim_steps) * train_steps)
    return start, end


def removal_concept(concepts: list[str], method: str, step: int, steps: int, generator: torch.Generator) -> str:
    """c_s for the 0-based training step (the official loop counts from 1 and indexes with step - 1)."""
    n = len(concepts)
    if method == "iterative":
        return concepts[step % n]
    if method == "composite":
        return ", ".join(concepts)
    if method == "random":
        return concepts[int(torch.randint(n, (1,), generator=generator))]
    if method == "sequential":
        return concepts[min(step * n // max(steps, 1), n - 1)]
    raise ValueError(f"sdd: concept_method={method!r}; allowed: {', '.join(CONCEPT_METHODS)}")


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], student: dict[str, torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * student, in place (train_sdd.py main, after optimizer.step())."""
    for name, value in ema.items():
        value.mul_(decay).add_(student[name].detach().to(value.device, value.dtype), alpha=1 - decay)


@dataclass
class SDDBatch:
    """One step's draw: the DDIM index k, x_t made by the teacher, the training timesteps t, and c_s's text."""

    k: int
    x_t: torch.Tensor
    t: torch.Tensor
    concept: str


class SDD(Method):
    # --- parameters ------------------------------------------------------------------------------------------
    def concepts(self) -> list[str]:
        """--removing_concepts; [] = the concept's target word (run_sdd_nudity.sh removes "nudity")."""
        return list(self.spec.params.get("concepts") or [self.concept.target])

    def check(self) -> None:
        """Every value the schema cannot express, rejected before any model work."""
        p = self.spec.params
        if p["train"] not in TRAIN_CHOICES:
            raise ValueError(f"sdd: train={p['train']!r}; allowed: {', '.join(TRAIN_CHOICES)}")
        if p["concept_method"] not in CONCEPT_METHODS:
            raise ValueError(f"sdd: concept_method={p['concept_method']!r}; allowed: {', '.join(CONCEPT_METHODS)}")
        bad = [c for c in self.concepts() if not isinstance(c, str) or not c.strip()]
        if bad:
            raise ValueError(f"sdd: concepts={self.concepts()!r} holds an empty text; allowed: non-empty strings "
                             "([] = the concept's target)")
        if not 0.0 <= float(p["ema_decay"]) < 1.0:
            raise ValueError(f"sdd: ema_decay={p['ema_decay']!r}; allowed: 0 <= ema_decay < 1")
        if int(p["ddim_steps"]) < 1 or int(p["batch_size"]) < 1:
            raise ValueError(f"sdd: ddim_steps={p['ddim_steps']!r}, batch_size={p['batch_size']!r}; both must be "
                             ">= 1")

    def train_settings(self) -> dict[str, Any]:
        p = self.spec.params
        return {"steps": int(p["iterations"]), "lr": float(p["lr"]), "optimizer": p["optimizer"],
                "weight_decay": float(p["weight_decay"]), "grad_clip": p["grad_clip"]}

    # --- set-up ----------------------------------------------------------------------------------------------
    def prepare(self, model: Any, seed: int) -> None:
        self.check()
        p = self.spec.params
        self.sampler = model.sampler("ddim")
        self.train_steps = int(self.sampler.config.num_train_timesteps)
        if int(p["ddim_steps"]) > self.train_steps:
            raise ValueError(f"sdd: ddim_steps={p['ddim_steps']} exceeds the model's {self.train_steps} training "
                             "timesteps; allowed: 1..num_train_timesteps")
        self.sampler.set_timesteps(int(p["ddim_steps"]), device=model.device)
        texts = self.concepts()
        with torch.no_grad():
            self.c_uncond = model.encode_prompt([""]).detach()
            self.c_prompt = model.encode_prompt([", ".join(texts)]).detach()  # c_p: the whole list, for sampling
            removal = sorted(set(texts) | {", ".join(texts)})
            self.c_removal = {t: model.encode_prompt([t]).detach() for t in removal}
        self.teacher = model.frozen_copy(model.unet)
        teacher_params = dict(self.teacher.named_parameters())
        self.student = self.trainable(model)
        self.ema = {n: v.detach().float().clone() for n, v in self.student.items()}
        self.teacher_params = {n: teacher_params[n.removeprefix("unet.")] for n in self.ema}
        self.ema_updates = 0  # optimiser steps folded into the EMA so far

    def cleanup(self) -> None:
        for key in ("sampler", "c_uncond", "c_prompt", "c_removal", "teacher", "student", "ema",
                    "teacher_params"):
            self.__dict__.pop(key, None)

    def trainable(self, model: Any) -> dict[str, torch.nn.Parameter]:
        include, exclude = TRAIN_CHOICES[self.spec.params["train"]]
        return select_parameters(model.unet, "unet", include, exclude)

    # --- the EMA teacher -------------------------------------------------------------------------------------
    @torch.no_grad()
    def ema_step(self, model: Any) -> None:
        """Fold the student's current weights into the EMA and refresh the teacher UNet from it."""
        ema_update(self.ema, self.student, float(self.spec.params["ema_decay"]))
        for name, value in self.ema.items():
            self.teacher_params[name].copy_(value.to(self.teacher_params[name].dtype))

    def finish(self, model: Any, seed: int) -> None:
        """The last step's EMA update, then the EMA weights become the trained parameters: the result."""
        steps = int(self.spec.params["iterations"])
        if self.ema_updates < steps:
            self.ema_step(model)
            self.ema_updates = steps
        with torch.no_grad():
            for name, value in self.ema.items():
                self.student[name].copy_(value.to(self.student[name].dtype))
        self.diagnostics["ema_updates"] = self.ema_updates

    # --- the objective ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_xt(self, model: Any, z: torch.Tensor, k: int) -> torch.Tensor:
        """k DDIM steps (eta 0) of the teacher from z_T = z * init_noise_sigma, under CFG toward c_p (sample_until)."""
        n, g = len(z), float(self.spec.params["guidance"])
        x = z.to(model.device) * self.sampler.init_noise_sigma
        guided = g > 1.0  # train_step: CFG only when guidance_scale > 1, else the unconditional branch alone
        cond = self.c_uncond.repeat(n).cat(self.c_prompt.repeat(n)) if guided else self.c_uncond.repeat(n)
        for t in self.sampler.timesteps[:k]:
            inp = self.sampler.scale_model_input(torch.cat([x, x]) if guided else x, t)
            out = model.predict(inp, t, cond, unet=self.teacher)
            if guided:
                u, c = out.chunk(2)
                out = u + g * (c - u)
            x = self.sampler.step(out, t, x).prev_sample
        return x

    def draw(self, model: Any, step: int, generator: torch.Generator) -> SDDBatch:
        p = self.spec.params
        n, steps = int(p["batch_size"]), int(p["ddim_steps"])
        concept = removal_concept(self.concepts(), p["concept_method"], step, int(p["iterations"]), generator)
        k = int(torch.randint(0, steps, (1,), generator=generator))
        z = torch.randn((n, *model.latent_shape), generator=generator)
        start, end = timestep_window(k, steps, self.train_steps)
        t = torch.randint(start, end, (n,), generator=generator).to(model.device)
        return SDDBatch(k, self.sample_xt(model, z, k), t, concept)

    def sdd_loss(self, model: Any, x_t: torch.Tensor, t: torch.Tensor, c_s: Cond) -> torch.Tensor:
        """MSE(eps_student(x_t, t, c_s), sg[eps_student(x_t, t, "")]): the student is its own target."""
        n = len(x_t)
        with torch.no_grad():
            target = model.predict(x_t, t, self.c_uncond.repeat(n)).detach()
        pred = model.predict(x_t, t, c_s.repeat(n))
        return torch.nn.functional.mse_loss(pred.float(), target.float())

    def loss(self, model: Any, step: int, generator: torch.Generator) -> torch.Tensor:
        if step > self.ema_updates:  # the previous optimiser step has happened: the official loop's EMA update
            self.ema_step(model)
            self.ema_updates = step
        batch = self.draw(model, step, generator)
        return self.sdd_loss(model, batch.x_t, batch.t, self.c_removal[batch.concept])
