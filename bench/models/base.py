"""The model wrapper every method, attack and metric goes through: SD 1.x/2.x/XL, the toy model and tiny alike.

Why one wrapper: methods are written once against `encode_prompt`, `predict`, `training_target` and `sample`, so
they run unchanged on the toy world (CPU tests) and on Stable Diffusion. Prediction type (epsilon or v) is read from
the scheduler config and honoured everywhere, since SD 2.x and the toy model predict v.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# SamplingGuidance is public through this module (unlearn_bench.api): plug-ins import it from here
from unlearn_bench.models.guidance import SamplingGuidance
from unlearn_bench.specs import ModelSpec


@dataclass
class Cond:
    """Text conditioning for the UNet: hidden states plus SDXL's added conditions (None for SD 1.x/2.x)."""

    hidden: torch.Tensor
    added: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def cat(self, other: Cond) -> Cond:
        added = None if self.added is None else {k: torch.cat([v, other.added[k]]) for k, v in self.added.items()}
        return Cond(torch.cat([self.hidden, other.hidden]), added)

    def index(self, idx: Any) -> Cond:
        added = None if self.added is None else {k: v[idx] for k, v in self.added.items()}
        return Cond(self.hidden[idx], added)

    def detach(self) -> Cond:
        added = None if self.added is None else {k: v.detach() for k, v in self.added.items()}
        return Cond(self.hidden.detach(), added)

    def repeat(self, n: int) -> Cond:
        """A one-row condition repeated n times (a fixed extra text shared by every sample of a batch)."""
        return self.index(torch.zeros(n, dtype=torch.long, device=self.hidden.device))


def images_to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1,1] float NCHW -> uint8 NHWC."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def uint8_to_images(arr: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> [-1,1] float NCHW."""
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def sample_seed(*parts: Any) -> int:
    """A 31-bit seed derived from its parts, stable across processes and Python versions."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class DiffusionModel:
    """A loaded text-to-image model (components on one device) plus the operations the harness needs."""

    def __init__(self, spec: ModelSpec, unet: Any, text_encoder: Any, tokenizer: Any, scheduler_config: dict,
                 codec: Any, device: str | torch.device = "cpu", resolution: int | None = None) -> None:
        self.spec = spec
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.codec = codec
        self.device = torch.device(device)
        self.resolution = int(resolution or spec.resolution)
        self.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        if spec.precision not in ("fp32", "bf16"):
            raise ValueError(f"model {spec.name}: precision={spec.precision!r}; allowed: fp32, bf16")
        self.amp_dtype = torch.bfloat16 if spec.precision == "bf16" else None
        if self.device.type == "cuda":  # TF32 matmuls/convolutions: free speed on Ampere+ for fp32 work
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if spec.gradient_checkpointing and hasattr(unet, "enable_gradient_checkpointing"):
            unet.enable_gradient_checkpointing()
        for m in self.modules().values():
            m.to(self.device)
            m.requires_grad_(False)
            m.eval()
        codec.to(self.device)
        self._original: dict[str, torch.Tensor] | None = None
        # Sampling-time guidance every sample() call applies unless given another (SLD); None = plain CFG. The runner
        # sets it with the model state it loads, so it is part of the state like the weights.
        self.sampling_guidance: SamplingGuidance | None = None
        # Learned token embeddings added to the vocabulary (textual inversion, attacks/concept_inversion.py): text ->
        # vector, ids after the base vocabulary in insertion order. Kept beside the weights (which never change), on
        # a copy of the tokenizer; reset() removes them.
        self.tokens: dict[str, torch.Tensor] = {}
        self._base_tokenizer = tokenizer

    # --- components ------------------------------------------------------------------------------------------
    def autocast(self) -> Any:
        """bf16 autocast when the spec asks for it (weights stay fp32 for the optimiser); a no-op otherwise."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def full_precision(self) -> Any:
        """Autocast switched off inside (a nested autocast() then runs fp32 too): for closed-form edits, whose
        normal equations must see fp32 text embeddings whatever the model's precision (UCE, RECE)."""
        import contextlib

        @contextlib.contextmanager
        def off() -> Any:
            saved, self.amp_dtype = self.amp_dtype, None
            try:
                with torch.autocast(self.device.type, enabled=False):
                    yield
            finally:
                self.amp_dtype = saved

        return off()

    def frozen_copy(self, module: torch.nn.Module) -> torch.nn.Module:
        """A frozen teacher/reference copy (e.g. ESD's original UNet), kept in bf16 under bf16 precision."""
        import copy

        frozen = copy.deepcopy(module).requires_grad_(False).eval()
        if self.amp_dtype is None:
            return frozen
        from diffusers.utils import logging as dlog

        level = dlog.get_verbosity()
        dlog.set_verbosity_error()  # SD's UNet has no modules that must stay fp32; silence the generic warning
        try:
            return frozen.to(self.amp_dtype)
        finally:
            dlog.set_verbosity(level)

    def modules(self) -> dict[str, torch.nn.Module]:
        """The trainable modules, by the prefix their parameters carry in deltas."""
        return {"unet": self.unet, "text_encoder": self.text_encoder}

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {f"{p}.{n}": t for p, m in self.modules().items() for n, t in m.named_parameters()}

    def noise_scheduler(self) -> Any:
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler_config)

    def sampler(self, name: str | None = None) -> Any:
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LMSDiscreteScheduler

        table = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler,
                 "lms": LMSDiscreteScheduler}
        name = name or self.spec.sampler
        if name not in table:
            raise ValueError(f"unknown sampler '{name}'; allowed: {sorted(table)}")
        return table[name].from_config(self.scheduler_config)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.resolution // self.codec.scale_factor
        return (self.codec.latent_channels, s, s)

    # --- text ------------------------------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(self.device)

    def encode_prompt(self, prompts: Sequence[str]) -> Cond:
        """CLIP last hidden state, as SD 1.x/2.x condition on (gradients flow if the encoder is trainable, or into
        an added token's vector)."""
        with self.autocast():
            ids = self.tokenize(prompts)
            hidden = self.encode_embeddings(self.embed_tokens(ids)).hidden if self.tokens else self.text_encoder(ids)[0]
        return Cond(hidden.float())

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Word embeddings of token ids, the added tokens' vectors included: what diffusers' load_textual_inversion
        computes after appending the vectors as new rows of the embedding table."""
        table = self.word_embeddings().weight
        if not self.tokens:
            return torch.nn.functional.embedding(ids, table)
        extra = torch.stack([v.reshape(-1).to(table.device, table.dtype) for v in self.tokens.values()])
        return torch.nn.functional.embedding(ids, torch.cat([table, extra]))

    def add_tokens(self, tokens: dict[str, torch.Tensor]) -> list[int]:
        """Add learned tokens (diffusers' textual-inversion layout: text -> one vector, [D] or [1, D]) to a copy of
        the tokenizer; returns their ids. A token already in the vocabulary, or a multi-vector one, is refused."""
        import copy

        if type(self).encode_prompt is not DiffusionModel.encode_prompt:
            raise NotImplementedError(f"model {self.spec.name}: added tokens (textual inversion) need a single CLIP "
                                      f"text encoder (SD 1.x/2.x, toy, tiny)")
        dim = self.word_embeddings().weight.shape[1]
        if not self.tokens:
            self.tokenizer = copy.deepcopy(self._base_tokenizer)
        for text, vec in tokens.items():
            if vec.numel() != dim or vec.dim() > 2:
                raise ValueError(f"token {text!r}: expected one vector of {dim} values ([{dim}] or [1, {dim}]), got "
                                 f"shape {list(vec.shape)}")
            if text in self.tokenizer.get_vocab():
                raise ValueError(f"token {text!r} is already in the tokenizer's vocabulary")
            self.tokenizer.add_tokens([text])
            self.tokens[text] = vec.detach().reshape(-1).to(self.device, torch.float32)
        return self.tokenizer.convert_tokens_to_ids(list(tokens))

    def drop_tokens(self) -> None:
        """Back to the base vocabulary (the weights are untouched)."""
        self.tokens, self.tokenizer = {}, self._base_tokenizer

    def is_token_delta(self, delta: dict[str, torch.Tensor]) -> bool:
        """A textual-inversion file (token text -> vector) rather than weights: no key names a model component."""
        return bool(delta) and not any(k.split(".", 1)[0] in self.modules() for k in delta)

    def word_embeddings(self) -> torch.nn.Embedding:
        """The text encoder's token embedding table (soft prompts live in this space)."""
        return self.text_encoder.get_input_embeddings()

    def encode_embeddings(self, inputs_embeds: torch.Tensor) -> Cond:
        """Condition from word embeddings [B, L, D] instead of token ids: what soft-prompt attacks and AdvUnlearn's
        inner attack optimise. Equals encode_prompt when given the embeddings of the prompt's token ids."""
        from transformers.masking_utils import create_causal_mask

        tm = getattr(self.text_encoder, "text_model", self.text_encoder)
        hidden = tm.embeddings(inputs_embeds=inputs_embeds)
        mask = create_causal_mask(config=tm.config, inputs_embeds=hidden, attention_mask=None, past_key_values=None)
        out = tm.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True)
        return Cond(tm.final_layer_norm(out.last_hidden_state))

    # --- denoising -------------------------------------------------------------------------------------------
    def predict(self, latents: torch.Tensor, t: torch.Tensor | int, cond: Cond, unet: Any = None) -> torch.Tensor:
        """The UNet's raw output (epsilon or v, per prediction_type)."""
        unet = unet or self.unet
        if not torch.is_tensor(t):
            t = torch.tensor([t], device=latents.device)
        t = t.to(latents.device).expand(latents.shape[0]) if t.dim() <= 1 and t.numel() == 1 else t
        kwargs = {"added_cond_kwargs": cond.added} if cond.added is not None else {}
        with self.autocast():
            out = unet(latents, t, encoder_hidden_states=cond.hidden, **kwargs).sample
        return out.float() if self.amp_dtype is not None else out

    def training_target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, scheduler: Any) -> Any:
        """The standard denoising target for this model's prediction type."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return scheduler.get_velocity(latents, noise, t)
        if self.prediction_type == "sample":
            return latents
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")

    def draw_noise(self, latents: torch.Tensor, generator: torch.Generator,
                   scheduler: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and uniformly drawn training timesteps for a batch (drawn on the CPU: device-independent)."""
        scheduler = scheduler or self.noise_scheduler()
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
        return noise, t.to(latents.device)

    def denoising_loss(self, latents: torch.Tensor, cond: Cond, generator: torch.Generator | None = None,
                       scheduler: Any = None, unet: Any = None,
                       noise_t: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Mean-squared denoising loss at uniformly drawn timesteps (the loss SD was trained with).

        unet: another module with the same interface (e.g. a copy being attacked); noise_t: fixed (noise, t)."""
        scheduler = scheduler or self.noise_scheduler()
        noise, t = noise_t if noise_t is not None else self.draw_noise(latents, generator, scheduler)
        noisy = scheduler.add_noise(latents, noise, t)
        target = self.training_target(latents, noise, t, scheduler)
        pred = self.predict(noisy, t, cond, unet=unet)
        dtype = torch.promote_types(pred.dtype, torch.float32)  # losses in fp32 at least (fp64 in gradient checks)
        return torch.nn.functional.mse_loss(pred.to(dtype), target.to(dtype))

    # --- sampling --------------------------------------------------------------------------------------------
    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """One CPU generator per sample: the same (prompt, seed) gives the same image at any batch size/device."""
        noise = [torch.randn(self.latent_shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
        return torch.stack(noise).to(self.device)

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], guidance: float | Sequence[float] | None = None,
               steps: int | None = None, batch_size: int = 16, on_batch: Callable[[int], None] | None = None,
               guidance_hook: SamplingGuidance | None = None) -> np.ndarray:
        """Generate one image per (prompt, seed) with classifier-free guidance; returns uint8 [N,H,W,3].

        guidance_hook: sampling-time guidance (SLD) for this call; None = the model's own `sampling_guidance`."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        g_all = [float(guidance if guidance is not None else self.spec.guidance)] * len(prompts) \
            if guidance is None or isinstance(guidance, int | float) else [float(g) for g in guidance]
        steps = int(steps or self.spec.steps)
        hook = guidance_hook or self.sampling_guidance
        out = []
        for i in range(0, len(prompts), batch_size):
            p, s, g = list(prompts[i:i + batch_size]), seeds[i:i + batch_size], g_all[i:i + batch_size]
            out.append(self._sample_batch(p, s, g, steps, hook))
            if on_batch:
                on_batch(len(p))
        return np.concatenate(out) if out else np.zeros((0, self.resolution, self.resolution, 3), np.uint8)

    def _sample_batch(self, prompts: list[str], seeds: Sequence[int], guidance: list[float], steps: int,
                      hook: SamplingGuidance | None = None) -> np.ndarray:
        latents = self.sample_latents(prompts, seeds, guidance, steps, hook)
        with self.autocast():
            decoded = self.codec.decode(latents)
        if not bool(torch.isfinite(decoded).all()):
            from unlearn_bench.finite import NonFinite

            raise NonFinite(f"decoding {self.spec.name}", "images", None, f"prompts {prompts[:2]}")
        return images_to_uint8(decoded)

    def sample_latents(self, prompts: list[str], seeds: Sequence[int], guidance: list[float], steps: int,
                       hook: SamplingGuidance | None = None) -> torch.Tensor:
        """The denoised latents of one batch. Without a hook: two UNet branches [uncond, prompt]; with one, its
        extra texts are batched after them ([uncond, prompt, safety] for SLD, the order of diffusers' safe
        pipeline) and hook.guide combines the predictions."""
        sched = self.sampler()
        sched.set_timesteps(steps, device=self.device)
        latents = self.initial_noise(seeds) * sched.init_noise_sigma
        cond = self.encode_prompt([""] * len(prompts)).cat(self.encode_prompt(prompts))
        extra_texts = hook.prompts() if hook is not None else []
        for text in extra_texts:  # encoded once and repeated, as diffusers encodes its safety concept
            cond = cond.cat(self.encode_prompt([text]).repeat(len(prompts)))
        branches = 2 + len(extra_texts)
        g = torch.tensor(guidance, device=self.device).view(-1, 1, 1, 1)
        state: dict[str, Any] = {}
        first = 0
        if hook is not None:
            latents, first = hook.begin(latents, prompts, seeds, sched, state)
        for i, t in enumerate(sched.timesteps):
            if i < first:  # a hook started the batch later on the trajectory (completion probe)
                continue
            inp = sched.scale_model_input(torch.cat([latents] * branches), t)
            uncond, text, *extra = self.predict(inp, t, cond).chunk(branches)
            if hook is None:
                latents = sched.step(uncond + g * (text - uncond), t, latents).prev_sample
            else:
                latents = hook.step(sched, hook.guide(uncond, text, extra, g, i, state), t, latents, i, state)
        if not bool(torch.isfinite(latents).all()):  # NaN would become a black image: never a score
            from unlearn_bench.finite import NonFinite

            raise NonFinite(f"sampling {self.spec.name}", "latents", None, f"prompts {prompts[:2]}")
        return latents

    # --- weights deltas --------------------------------------------------------------------------------------
    def snapshot(self) -> None:
        """Remember the original weights once, so deltas can be computed and applied repeatedly."""
        if self._original is None:
            self._original = {k: v.detach().clone() for k, v in self.named_parameters().items()}

    def reset(self) -> None:
        """Return to the original weights (after applying a delta) and the original vocabulary (no added tokens)."""
        self.drop_tokens()
        if self._original is None:
            return
        params = self.named_parameters()
        with torch.no_grad():
            for k, v in self._original.items():
                params[k].copy_(v)

    def delta(self) -> dict[str, torch.Tensor]:
        """Only the tensors that differ from the original: the unlearned model's payload."""
        if self._original is None:
            raise RuntimeError("call snapshot() before training so the delta has a reference")
        return {k: v.detach().cpu().clone() for k, v in self.named_parameters().items()
                if not torch.equal(v.detach(), self._original[k])}

    def apply_delta(self, delta: dict[str, torch.Tensor]) -> None:
        """Replace the named tensors with the delta's values (deltas hold full new values, not differences)."""
        params = self.named_parameters()
        bad = sorted(set(delta) - set(params))
        if bad:
            raise KeyError(f"delta names {len(bad)} tensors this model lacks, e.g. {bad[:3]}")
        with torch.no_grad():
            for k, v in delta.items():
                params[k].copy_(v.to(params[k].device, params[k].dtype))

    def load_state(self, deltas: Sequence[dict[str, torch.Tensor]]) -> None:
        """Reset to the original weights and apply deltas in order (e.g. unlearned, then attacked); a
        textual-inversion file adds its tokens instead."""
        self.snapshot()
        self.reset()
        for d in deltas:
            if self.is_token_delta(d):
                self.add_tokens(d)
            else:
                self.apply_delta(d)


def save_delta(delta: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in delta.items()}, str(path), metadata=metadata or {})


def load_delta(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
