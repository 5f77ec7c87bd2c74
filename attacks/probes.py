"""Inference-time probes (`noise-probe`, `completion-probe`): attacks that change how the erased model SAMPLES.

Lu, Kriplani, Gandikota, Pham, Bau, Hegde, Cohen, "When Are Concepts Erased From Diffusion Models?", NeurIPS 2025
(kevinlu4588/WhenAreConceptsErased: src/probes/noise_based_probe.py, src/probes/diffusion_completion_probe.py,
src/noisy_diffuser_scheduling/schedulers/eta_ddim_scheduler.py, src/configs/default.yaml). Neither probe changes a
weight or a prompt; each tries N sampling variants per (prompt, seed) and keeps the first the concept's judge accepts:

- noise-probe: DDIM with extra stochastic noise at every intermediate step (the official eta_ddim_scheduler.step):
      x_{t-1} = sqrt(a_prev) x0_hat + sqrt(|1 - a_prev - sigma^2|) eps_hat + s * sigma * z,
      sigma = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)),   z ~ N(0, I),
  eta > 1 injecting more noise than DDPM's posterior (eta = 1); s = the variance scale. Variants: every
  (eta, s) of `etas` x `variance_scales` (official 6 x 4 = 24: eta 1.0-1.85, s 1.00-1.04; 50 steps, guidance 7.5).
- completion-probe: the ORIGINAL model starts each image and the erased model completes it: the erased model's
  sampler starts at step index k = round(level x steps) (at least 1) from (`start: trajectory`, the official
  DiffusionCompletionProbe) the original model's own latents after its first k DDIM steps from the same initial noise,
  or (`start: image`) the original model's finished image noised to timestep t_k (SDEdit-style: the concept image
  partially noised to a given level). Variants: each level of `levels` (official interrupt steps 0, 1, 2 of 50 =
  1, 2, 3 steps by the original model: levels 0.02, 0.04, 0.06).

Evaluation (the runner): the target prompts are regenerated with a sampling hook (bench.models.base.SamplingGuidance
begin/step) rebuilt from the stored per-pair choice, on top of the method's own guidance (SLD) if any; pairs the
erased model already shows the concept for, and every other prompt, sample exactly as without the probe. The attack's
records carry pre_success / success per (prompt, seed) (ASR before and after, as UnlearnDiffAtk's) and the chosen
variant; the hook's describe() names the probe and its parameters in the generate manifests, and the results'
sampler column reads e.g. "ddim+noise-probe".

Deviations, each deliberate:
- Best of N by the concept's binary judge (the first accepted variant, in the official loop order), not by ranking the
  N images with an ImageNet ResNet's class probability; a pair no variant wins is evaluated with its last variant.
- Every variant starts from the pair's own initial noise (its evaluation seed) and draws the extra noise from its own
  seeded generator; the official loop reuses one generator across the 24 variants, so its later variants also start
  from different initial noise (they then differ from plain sampling in more than the probe).
- Only the DDIM sampler is probed (the official scheduler is DDIM); another sampler is refused before any work.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unlearn_bench.attacks.base import PromptAttack
from unlearn_bench.models.base import SamplingGuidance, sample_seed
from unlearn_bench.specs import thaw

Pair = tuple[str, int]


class ProbeGuidance(SamplingGuidance):
    """A probe's sampling change for the (prompt, seed) pairs in `choices`, over the method's own guidance `inner`
    (None = plain classifier-free guidance). Other samples of a batch take exactly the unprobed path."""

    kind = "probe"

    def __init__(self, choices: dict[Pair, Any], inner: SamplingGuidance | None, params: dict[str, Any]) -> None:
        self.choices, self.inner, self.params = choices, inner, params
        # the results' sampler column: "ddim+noise-probe", or "ddim+sld+noise-probe" over SLD
        self.name = self.kind if inner is None else f"{inner.name}+{self.kind}"

    def prompts(self) -> list[str]:
        return self.inner.prompts() if self.inner is not None else []

    def describe(self) -> dict[str, Any]:
        out = {"name": self.kind, **self.params, "probed_pairs": len(self.choices)}
        return out | ({"inner": self.inner.describe()} if self.inner is not None else {})

    def guide(self, uncond: torch.Tensor, text: torch.Tensor, extra: list[torch.Tensor], scale: torch.Tensor,
              step: int, state: dict[str, Any]) -> torch.Tensor:
        if self.inner is not None:
            return self.inner.guide(uncond, text, extra, scale, step, state)
        return super().guide(uncond, text, extra, scale, step, state)

    def plain_step(self, scheduler: Any, pred: torch.Tensor, t: Any, latents: torch.Tensor, step: int,
                   state: dict[str, Any]) -> torch.Tensor:
        if self.inner is not None:
            return self.inner.step(scheduler, pred, t, latents, step, state)
        return scheduler.step(pred, t, latents).prev_sample

    def lookup(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Any]:
        return [self.choices.get((p, int(s))) for p, s in zip(prompts, seeds, strict=True)]


class NoiseGuidance(ProbeGuidance):
    """choices: pair -> (eta, variance_scale, noise seed)."""

    kind = "noise-probe"

    def begin(self, latents: torch.Tensor, prompts: list[str], seeds: Sequence[int], scheduler: Any,
              state: dict[str, Any]) -> tuple[torch.Tensor, int]:
        found = self.lookup(prompts, seeds)
        state["probe"] = [None if c is None else (float(c[0]), float(c[1]), torch.Generator("cpu").manual_seed(
            int(c[2]))) for c in found]
        if self.inner is not None:
            return self.inner.begin(latents, prompts, seeds, scheduler, state)
        return latents, 0

    def step(self, scheduler: Any, pred: torch.Tensor, t: Any, latents: torch.Tensor, step: int,
             state: dict[str, Any]) -> torch.Tensor:
        plain = self.plain_step(scheduler, pred, t, latents, step, state)
        probed = [b for b, c in enumerate(state["probe"]) if c is not None]
        if not probed:
            return plain
        out = plain.clone()
        idx = torch.tensor(probed, device=latents.device)
        eta = torch.tensor([state["probe"][b][0] for b in probed], device=latents.device).view(-1, 1, 1, 1)
        scale = torch.tensor([state["probe"][b][1] for b in probed], device=latents.device).view(-1, 1, 1, 1)
        z = torch.stack([torch.randn(latents.shape[1:], generator=state["probe"][b][2]) for b in probed])
        out[idx] = eta_ddim_step(scheduler, pred[idx], t, latents[idx], eta, scale, z.to(latents.device))
        return out


def eta_ddim_step(scheduler: Any, pred: torch.Tensor, t: Any, sample: torch.Tensor, eta: torch.Tensor,
                  scale: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One DDIM step with per-sample eta and variance scale (module docstring; DDIM paper Eq. 12 and 16, with the
    official probe's |.| under the square root and the scaled noise term)."""
    t = int(t)
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_t = scheduler.alphas_cumprod[t].to(sample.device)
    a_prev = (scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod).to(sample.device)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        x0, eps = (sample - (1 - a_t).sqrt() * pred) / a_t.sqrt(), pred
    elif kind == "v_prediction":
        x0, eps = a_t.sqrt() * sample - (1 - a_t).sqrt() * pred, a_t.sqrt() * pred + (1 - a_t).sqrt() * sample
    elif kind == "sample":
        x0, eps = pred, (sample - a_t.sqrt() * pred) / (1 - a_t).sqrt()
    else:
        raise ValueError(f"noise-probe: unsupported prediction_type {kind!r}")
    if scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    direction = (1 - a_prev - sigma**2).abs().sqrt() * eps
    return a_prev.sqrt() * x0 + direction + sigma * scale * noise


class CompletionGuidance(ProbeGuidance):
    """choices: pair -> (k, start latents): the sampler starts that sample at step index k from the given latents."""

    kind = "completion-probe"

    def begin(self, latents: torch.Tensor, prompts: list[str], seeds: Sequence[int], scheduler: Any,
              state: dict[str, Any]) -> tuple[torch.Tensor, int]:
        found = self.lookup(prompts, seeds)
        first = 0
        if self.inner is not None:
            latents, first = self.inner.begin(latents, prompts, seeds, scheduler, state)
        ks = [first if c is None else max(first, int(c[0])) for c in found]
        first = min(ks)
        latents = latents.clone()
        for b, c in enumerate(found):
            if c is not None and ks[b] == first:
                latents[b] = c[1].to(latents.device, latents.dtype)
        state["probe"] = {b: (ks[b], found[b][1]) for b in range(len(found)) if found[b] is not None and ks[b] > first}
        return latents, first

    def step(self, scheduler: Any, pred: torch.Tensor, t: Any, latents: torch.Tensor, step: int,
             state: dict[str, Any]) -> torch.Tensor:
        out = self.plain_step(scheduler, pred, t, latents, step, state)
        for b, (k, start) in state["probe"].items():  # a later start within a mixed batch: overwrite when reached
            if step == k - 1:
                out[b] = start.to(out.device, out.dtype)
        return out


class Recorder(SamplingGuidance):
    """Plain sampling that keeps the latents reached before each step index in `at` (the original model's partial
    trajectory) and the final latents."""

    def __init__(self, at: set[int]) -> None:
        self.at, self.kept = at, {}

    def step(self, scheduler: Any, pred: torch.Tensor, t: Any, latents: torch.Tensor, step: int,
             state: dict[str, Any]) -> torch.Tensor:
        out = scheduler.step(pred, t, latents).prev_sample
        if step + 1 in self.at:
            self.kept[step + 1] = out.clone()
        return out


class Probe(PromptAttack):
    """Shared search: the erased model samples each target (prompt, seed) pair; pairs that do not show the concept
    try the variants in order until the judge accepts one (params: batch_size, plus the probe's own)."""

    guidance_class: type[ProbeGuidance] = ProbeGuidance

    def variants(self, steps: int) -> list[Any]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in thaw(self.spec.params).items() if k != "batch_size"}

    def choice(self, variant: Any, prompt: str, seed: int, index: int) -> Any:
        """What the hook needs for one pair and variant (the noise seed, or the start latents)."""
        return variant

    def record(self, variant: Any) -> dict[str, Any]:
        return {"variant": variant}

    def prepare(self, model: Any, prompts: list[str], seeds: list[int], original: Callable[[], Any],
                guidance: list[float] | None, variants: list[Any]) -> None:
        """Anything the variants need from the original model (completion: start latents)."""

    def rewrite(self, model: Any, prompts: list[str], seeds: list[int], judge: Callable[[np.ndarray, list[str]], Any],
                original: Callable[[], Any], progress: Any = None,
                guidance: list[float] | None = None) -> tuple[list[str], list[dict[str, Any]]]:
        if model.spec.sampler != "ddim":
            raise ValueError(f"attack {self.spec.name}: probes the DDIM sampler only; model {model.spec.name} samples "
                             f"with {model.spec.sampler!r}")
        variants = self.variants(int(model.spec.steps))
        if not variants:
            raise ValueError(f"attack {self.spec.name}: no variants to try")
        inner, bs = model.sampling_guidance, int(self.spec.params["batch_size"])
        n = len(prompts)
        pre = np.asarray(judge(model.sample(prompts, seeds, guidance=guidance, batch_size=bs), prompts), bool)
        self.chosen: dict[int, tuple[int, Any]] = {}
        records = [{"prompt": p, "seed": int(s), "rewrite": p, "pre_success": bool(pre[i]), "success": bool(pre[i]),
                    "timestep": None, "variant": None, "tried": 0} for i, (p, s) in enumerate(zip(prompts, seeds,
                                                                                                 strict=True))]
        todo = [i for i in range(n) if not pre[i]]
        if todo:
            self.prepare(model, [prompts[i] for i in todo], [seeds[i] for i in todo], original,
                         None if guidance is None else [guidance[i] for i in todo], variants)
        task = progress.add(f"{self.spec.name} variants", len(variants)) if progress and todo else None
        for j, variant in enumerate(variants):
            if not todo:
                break
            for i in todo:
                self.chosen[i] = (j, self.choice(variant, prompts[i], int(seeds[i]), i))
            hook = self.guidance_class({(prompts[i], int(seeds[i])): self.chosen[i][1] for i in todo}, inner,
                                       self.describe())
            g = None if guidance is None else [guidance[i] for i in todo]
            images = model.sample([prompts[i] for i in todo], [seeds[i] for i in todo], guidance=g, batch_size=bs,
                                  guidance_hook=hook)
            hits = np.asarray(judge(images, [prompts[i] for i in todo]), bool)
            for i, hit in zip(list(todo), hits, strict=True):
                records[i].update(success=bool(hit), variant=j, tried=j + 1, **self.record(variant))
                if hit:
                    todo.remove(i)
            if task is not None:
                progress.advance(task, 1)
        if task is not None:
            progress.done(task)
        pre_asr = float(pre.mean()) if n else float("nan")
        asr = float(np.mean([r["success"] for r in records])) if n else float("nan")
        for r in records:
            r.update(pre_asr=pre_asr, asr=asr, n=n, probe=self.spec.name)
        self.n_pairs = n
        return list(prompts), records

    def sampling_guidance(self, records: list[dict[str, Any]], file: Callable[[str], Path],
                          inner: SamplingGuidance | None) -> SamplingGuidance | None:
        choices = self.load_choices(records, file)
        return self.guidance_class(choices, inner, self.describe())

    def load_choices(self, records: list[dict[str, Any]], file: Callable[[str], Path]) -> dict[Pair, Any]:
        raise NotImplementedError


class NoiseProbe(Probe):
    """`noise-probe`. Params: etas, variance_scales (every pair of them is one variant, eta outer), batch_size."""

    guidance_class = NoiseGuidance

    def variants(self, steps: int) -> list[tuple[float, float]]:
        p = self.spec.params
        return [(float(e), float(s)) for e, s in itertools.product(p["etas"], p["variance_scales"])]

    def choice(self, variant: tuple[float, float], prompt: str, seed: int, index: int) -> tuple[float, float, int]:
        return (*variant, sample_seed("noise-probe", seed, prompt, *variant))

    def record(self, variant: tuple[float, float]) -> dict[str, Any]:
        return {"eta": variant[0], "variance_scale": variant[1]}

    def load_choices(self, records: list[dict[str, Any]], file: Callable[[str], Path]) -> dict[Pair, Any]:
        return {(r["prompt"], int(r["seed"])): self.choice((float(r["eta"]), float(r["variance_scale"])), r["prompt"],
                                                           int(r["seed"]), 0)
                for r in records if r.get("variant") is not None}


class CompletionProbe(Probe):
    """`completion-probe`. Params: levels (fractions of the sampler's steps done before the erased model takes
    over, tried in order), start (trajectory | image), batch_size."""

    guidance_class = CompletionGuidance

    def variants(self, steps: int) -> list[int]:
        """Step indices k, one per level: round(level x steps), at least 1 and below `steps` (duplicates dropped)."""
        ks = []
        for level in self.spec.params["levels"]:
            if not 0 < float(level) < 1:
                raise ValueError(f"attack {self.spec.name}: levels must lie in (0, 1), got {level}")
            k = min(steps - 1, max(1, round(float(level) * steps)))
            if k not in ks:
                ks.append(k)
        return ks

    def prepare(self, model: Any, prompts: list[str], seeds: list[int], original: Callable[[], Any],
                guidance: list[float] | None, variants: list[int]) -> None:
        """The original model's latents at each start index, per pair (the attacked state is restored after)."""
        mode = self.spec.params["start"]
        if mode not in ("trajectory", "image"):
            raise ValueError(f"attack {self.spec.name}: start must be trajectory or image, got {mode!r}")
        attacked, hook = model.delta(), model.sampling_guidance
        orig = original()
        steps, bs = int(model.spec.steps), int(self.spec.params["batch_size"])
        g_all = [float(model.spec.guidance)] * len(prompts) if guidance is None else list(guidance)
        starts: dict[tuple[int, int], torch.Tensor] = {}
        for lo in range(0, len(prompts), bs):
            rec = Recorder(set(variants) | {steps})
            p, s = prompts[lo:lo + bs], seeds[lo:lo + bs]
            with torch.no_grad():
                orig.sample_latents(p, s, g_all[lo:lo + bs], steps, rec)
            for b in range(len(p)):
                for k in variants:
                    starts[(lo + b, k)] = rec.kept[k][b] if mode == "trajectory" else self._noised(
                        orig, rec.kept[steps][b], k, steps, p[b], int(s[b]))
        if orig is model:
            model.load_state([attacked])
            model.sampling_guidance = hook
        self.starts, self.todo_index = starts, {(q, int(s)): i for i, (q, s) in enumerate(zip(prompts, seeds,
                                                                                               strict=True))}

    @staticmethod
    def _noised(model: Any, x0: torch.Tensor, k: int, steps: int, prompt: str, seed: int) -> torch.Tensor:
        """The original image's latents noised to the sampler's k-th timestep (forward process, seeded per pair)."""
        sched = model.sampler()
        sched.set_timesteps(steps, device=model.device)
        gen = torch.Generator("cpu").manual_seed(sample_seed("completion-probe", seed, prompt))
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)
        return sched.add_noise(x0[None], noise[None], sched.timesteps[k:k + 1])[0]

    def choice(self, variant: int, prompt: str, seed: int, index: int) -> tuple[int, torch.Tensor]:
        return variant, self.starts[(self.todo_index[(prompt, seed)], variant)]

    def record(self, variant: int) -> dict[str, Any]:
        return {"start_step": variant, "start": self.spec.params["start"]}

    def write_files(self, folder: Path) -> None:
        from safetensors.torch import save_file

        chosen = getattr(self, "chosen", {})
        save_file({f"pair.{i}": c[1][1].detach().float().cpu().contiguous() for i, c in sorted(chosen.items())},
                  str(folder / "starts.safetensors"), metadata={"format": "pt"})

    def load_choices(self, records: list[dict[str, Any]], file: Callable[[str], Path]) -> dict[Pair, Any]:
        from safetensors.torch import load_file

        starts = load_file(str(file("starts.safetensors")))
        return {(r["prompt"], int(r["seed"])): (int(r["start_step"]), starts[f"pair.{i}"])
                for i, r in enumerate(records) if r.get("variant") is not None}
