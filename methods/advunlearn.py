"""AdvUnlearn: Defensive Unlearning with Adversarial Training (Zhang et al., NeurIPS 2024; arXiv 2405.15234).

Bi-level objective (paper Eq. 5-6), official OPTML-Group/AdvUnlearn train-scripts/AdvUnlearn.py:

    min_theta  l_ESD(theta, c*) + gamma * E_{c ~ C_retain} || eps_theta(x_t | c) - eps_theta_o(x_t | c) ||^2
    s.t.       c* = argmin_{c'} l_atk(theta, c'),
               l_atk = || eps_theta(z_t | E_theta([sot, delta, c_e])) - eps_o(z_t | c_e) ||^2

theta is the TEXT ENCODER only (UNet frozen): by default every transformer layer plus the final layer norm
(official param_choices: text_encoder_full, component all), never the token or position embeddings. l_ESD is ESD's
regression (methods.esd.esd_target) with the trained encoder's condition on the left and the frozen model's
predictions on the right. The inner attack optimises k soft prefix tokens delta in word-embedding space (official
attack_type prefix_k, attack_embd_type word_embd; they are inserted after <sot> and the last k positions dropped so
the length stays max_length), with Adam (lr attack_lr) for attack_steps steps, each on a fresh partial-DDIM latent
z_t; `attack_method: fast_at` takes the sign of the gradient before the Adam step (official fast_at). Warm start
(`attack_init: latest`) continues from the previous round's delta; the first round starts from k random vocabulary
tokens (official init_adv). The attack is regenerated every `attack_every` iterations after `warmup_iterations`
iterations trained on the plain concept prompt. `prompts` lists the concepts c_e (official --prompt split by
--seperator); one is drawn every `attack_every` iterations ([] = the concept's target). The retain term
(official retain_train "reg") uses `retain_batch` prompts per step on latents from the frozen model guided by
those prompts (same DDIM index as the forget latent).
Outputs are compared in the model's own prediction space (epsilon or v), as in methods.esd.

SD defaults (official argparse and README command): 1000 iterations, Adam lr 1e-5, eta (negative_guidance) 1,
start_guidance 3, ddim_steps 50, k = 1, attack_steps 30, attack_lr 1e-3, attack_init latest, attack_every 1,
warm-up 200, retain_batch 5, gamma 0.3 for nudity / 0.5 otherwise (`retain_weight: null` picks by concept),
retain prompts: 243 COCO-object prompts there, the concept's related + unrelated prompts here.

Named deviations: (1) the training timestep is the one the partial DDIM trajectory ended at (as methods.esd; the
official code draws a DDPM step from the opposite end of the schedule); (2) the prompt length is counted in tokens,
not in words (official split_embd uses len(prompt.split())); (3) retain prompts come from the concept spec.
The output is a text-encoder delta, usable with any UNet of the same family. SDXL (two text encoders, both read by
the UNet) is refused: see `check_model`.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from unlearn_bench.methods.base import Method
from unlearn_bench.methods.esd import esd_target
from unlearn_bench.models.base import Cond

NUDITY_GAMMA, OTHER_GAMMA = 0.3, 0.5  # README --retain_loss_w 0.3 for nudity; paper Sec. 5: 0.5 style/objects


class AdvUnlearn(Method):
    @classmethod
    def check_model(cls, model_spec: Any) -> None:
        """Refuse models this method cannot unlearn (callable at plan time with a ModelSpec)."""
        if getattr(model_spec, "family", "") == "sdxl" or getattr(model_spec, "kind", "") == "sdxl":
            raise ValueError(f"advunlearn cannot run on '{model_spec.name}': SDXL conditions its UNet on TWO text "
                             "encoders (CLIP ViT-L and OpenCLIP bigG), while AdvUnlearn adversarially trains the "
                             "single CLIP text encoder of SD 1.x/2.x; use an SD 1.x/2.x model")

    # --- parameter selection -------------------------------------------------------------------------------
    def trainable(self, model: Any) -> dict[str, torch.nn.Parameter]:
        p = self.spec.params
        layers = {int(i) for i in p.get("layers") or []}
        component = str(p.get("component", "all"))
        if component not in ("all", "attn", "ffn"):
            raise ValueError(f"advunlearn: component={component!r}; allowed: all, attn, ffn")
        out = {}
        for name, t in model.text_encoder.named_parameters():
            if "embeddings." in name:
                continue  # token and position embeddings never train
            m = re.search(r"(?:^|\.)encoder\.layers\.(\d+)\.", name)
            if m:
                ok = (not layers or int(m.group(1)) in layers) and (
                    component == "all" or (component == "attn" and "self_attn" in name)
                    or (component == "ffn" and ".mlp." in name))
            else:
                ok = bool(p.get("final_layer_norm", True)) and re.search(r"(?:^|\.)final_layer_norm\.", name)
            if ok:
                out[f"text_encoder.{name}"] = t
        return out

    # --- set-up ----------------------------------------------------------------------------------------------
    def prepare(self, model: Any, seed: int) -> None:
        self.check_model(model.spec)
        p = self.spec.params
        self.prompts = list(p.get("prompts") or [self.concept.target])
        self.retain_prompts = list(p.get("retain_prompts") or self.concept.role_prompts("retain"))
        with torch.no_grad():  # the ORIGINAL encoder's conditions: frozen-model targets and trajectories
            self.c_prompts = model.encode_prompt(self.prompts).detach()
            self.c_uncond = model.encode_prompt([""]).detach()
            self.c_retain = model.encode_prompt(self.retain_prompts).detach() if self.retain_prompts else None
        self.ids = model.tokenize(self.prompts)  # [P, L]
        self.select(0)
        self.adv: torch.Tensor | None = None  # latest adversarial prefix [1, k, D]
        self.attack_history: list[list[float]] = []

    def cleanup(self) -> None:
        for key in ("c_prompts", "c_concept", "c_uncond", "c_retain", "adv"):
            self.__dict__.pop(key, None)

    def gamma(self) -> float:
        w = self.spec.params.get("retain_weight")
        if w is not None:
            return float(w)
        return NUDITY_GAMMA if "nudity" in (self.concept.name.lower(), self.concept.target.lower()) else OTHER_GAMMA

    # --- pieces ----------------------------------------------------------------------------------------------
    def select(self, i: int) -> None:
        """Make prompts[i] the concept prompt c_e of the coming iterations (official: one word per update step)."""
        self.cur = i
        self.prompt = self.prompts[i]
        self.c_concept = Cond(self.c_prompts.hidden[i:i + 1])

    @staticmethod
    def _rep(c: Cond, n: int) -> Cond:
        return Cond(c.hidden.expand(n, *c.hidden.shape[1:]))

    @torch.no_grad()
    def trajectory(self, model: Any, cond: Cond, k: int, generator: torch.Generator) -> tuple[Any, Any]:
        """k of ddim_steps DDIM steps of the frozen model from noise, guided by start_guidance toward `cond`."""
        p = self.spec.params
        sched = model.sampler("ddim")
        sched.set_timesteps(int(p["ddim_steps"]), device=model.device)
        n = len(cond)
        x = torch.randn((n, *model.latent_shape), generator=generator).to(model.device) * sched.init_noise_sigma
        both = self._rep(self.c_uncond, n).cat(cond)
        g = float(p["start_guidance"])
        for t in sched.timesteps[:k]:
            u, c = model.predict(torch.cat([x, x]), t, both).chunk(2)
            x = sched.step(u + g * (c - u), t, x).prev_sample
        return x, sched.timesteps[k]

    def draw(self, model: Any, generator: torch.Generator) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """A concept latent z_t, its timestep and the frozen model's concept prediction at it (attack target)."""
        k = int(torch.randint(0, int(self.spec.params["ddim_steps"]), (1,), generator=generator))
        z, t = self.trajectory(model, self.c_concept, k, generator)
        with torch.no_grad():
            e_p = model.predict(z, t, self.c_concept)
        return z, t, e_p

    def adversarial_embeddings(self, model: Any, adv: torch.Tensor) -> torch.Tensor:
        """[sot, delta_1..k, prompt tokens ...] in word-embedding space, truncated to the encoder's length."""
        words = model.word_embeddings()(self.ids[self.cur:self.cur + 1]).detach()  # the table never trains
        length = words.shape[1]
        return torch.cat([words[:, :1], adv.to(words.dtype), words[:, 1:length - adv.shape[1]]], dim=1)

    def attack_loss(self, model: Any, adv: torch.Tensor, z: torch.Tensor, t: Any, e_p: torch.Tensor) -> torch.Tensor:
        cond = model.encode_embeddings(self.adversarial_embeddings(model, adv))
        return torch.nn.functional.mse_loss(model.predict(z, t, cond).float(), e_p.float())

    def init_adv(self, model: Any, generator: torch.Generator) -> torch.Tensor:
        p = self.spec.params
        if p.get("attack_init", "latest") == "latest" and self.adv is not None:
            return self.adv.detach().clone()
        if p.get("attack_init", "latest") not in ("latest", "random"):
            raise ValueError(f"advunlearn: attack_init={p['attack_init']!r}; allowed: latest, random")
        table = model.word_embeddings().weight
        ids = torch.randint(0, table.shape[0], (int(p["adv_tokens"]),), generator=generator).to(table.device)
        return table[ids].detach().clone().unsqueeze(0)

    def inner_attack(self, model: Any, generator: torch.Generator) -> torch.Tensor:
        """c* = argmin l_atk over the soft prefix (Adam, or Adam on sign gradients for fast_at)."""
        p = self.spec.params
        method = p.get("attack_method", "pgd")
        if method not in ("pgd", "fast_at"):
            raise ValueError(f"advunlearn: attack_method={method!r}; allowed: pgd, fast_at")
        adv = self.init_adv(model, generator).requires_grad_(True)
        opt = torch.optim.Adam([adv], lr=float(p["attack_lr"]))
        losses = []
        for _ in range(int(p["attack_steps"])):
            z, t, e_p = self.draw(model, generator)
            loss = self.attack_loss(model, adv, z, t, e_p)
            (grad,) = torch.autograd.grad(loss, [adv])  # never touches the encoder's .grad
            adv.grad = grad.sign() if method == "fast_at" else grad
            opt.step()
            losses.append(float(loss.detach()))
        self.attack_history.append(losses)
        self.adv = adv.detach()
        return self.adv

    # --- outer loss ------------------------------------------------------------------------------------------
    def loss(self, model: Any, step: int, generator: torch.Generator) -> torch.Tensor:
        p = self.spec.params
        attacking = step >= int(p["warmup_iterations"])
        update = step % int(p["attack_every"]) == 0
        if update and len(self.prompts) > 1:
            self.select(int(torch.randint(0, len(self.prompts), (1,), generator=generator)))
        if attacking and (update or self.adv is None):
            self.inner_attack(model, generator)
        n = int(p.get("batch_size", 1))
        k = int(torch.randint(0, int(p["ddim_steps"]), (1,), generator=generator))
        z, t = self.trajectory(model, self._rep(self.c_concept, n), k, generator)
        with torch.no_grad():
            e_0 = model.predict(z, t, self._rep(self.c_uncond, n))
            e_p = model.predict(z, t, self._rep(self.c_concept, n))
            target = esd_target(e_0, e_p, e_0, float(p["eta"]))
        if attacking:
            cond = model.encode_embeddings(self.adversarial_embeddings(model, self.adv))
        else:
            cond = model.encode_prompt([self.prompt])
        e_n = model.predict(z, t, self._rep(cond, n))
        loss = torch.nn.functional.mse_loss(e_n.float(), target.float())
        if self.c_retain is not None and self.gamma() > 0:
            b = min(int(p["retain_batch"]), len(self.retain_prompts))
            idx = torch.randperm(len(self.retain_prompts), generator=generator)[:b]
            c_o = Cond(self.c_retain.hidden[idx.to(self.c_retain.hidden.device)])
            z_r, t_r = self.trajectory(model, c_o, k, generator)
            with torch.no_grad():
                e_r = model.predict(z_r, t_r, c_o)
            c_n = model.encode_prompt([self.retain_prompts[i] for i in idx.tolist()])
            loss = loss + self.gamma() * torch.nn.functional.mse_loss(model.predict(z_r, t_r, c_n).float(),
                                                                      e_r.float())
        return loss

    def finish(self, model: Any, seed: int) -> None:
        """The inner attack's last round (first and last loss) and how many rounds ran, as diagnostics."""
        h = self.__dict__.get("attack_history") or []
        self.diagnostics = {"attack_rounds": len(h), "attack_loss_first": h[-1][0] if h else None,
                            "attack_loss_last": h[-1][-1] if h else None}
