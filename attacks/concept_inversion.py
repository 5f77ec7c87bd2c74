"""Concept inversion (`concept-inversion`): textual inversion against the erased model - one new token, nothing else.

Pham, Marshall, Cohen, Mittal, Hegde, "Circumventing Concept Erasure Methods For Text-To-Image Generative Models",
ICLR 2024 (NYU-DICE-Lab/circumventing-concept-erasure, esd/concept_inversion.py and {esd,uce,fmn,ac,sld}/train.sh;
the script is diffusers' examples/textual_inversion/textual_inversion.py with the erased weights loaded). A new token
v* (the placeholder, e.g. "<red>") is added to the vocabulary, initialised from the embedding of an initializer word,
and learned with the standard denoising loss on images of the concept made by the ORIGINAL model, the erased UNet,
the VAE and the whole text encoder frozen (the official script restores every other embedding row after each step):
    v* = argmin_v E_{x, c, t, eps} || pred_theta*(x_t, t, tau(c(v))) - target ||^2,
with theta* the erased model, c(v) a caption holding the token, and target eps (or v for v-prediction models).
Evaluation prompts use the token in place of the concept word ("a red circle" -> "a <red> circle"; a prompt without
the word gets the token in front, as the paper's I2P experiment prefixes its special token).

SD defaults (registry; esd/train.sh): 25 images from the original model, 5000 steps, AdamW (weight decay 1e-2),
constant lr 5e-3 with --scale_lr over batch 4 x gradient accumulation 4 on one GPU: lr 0.08 at an effective batch of
16 (accumulating 4 batches of 4 and averaging is one batch of 16 for this loss), captions from the imagenet object
templates ("a photo of a {}", ...). Checkpoints at several steps give a relearning curve (the paper saves only the
last); step 0 is the initializer's embedding.

Each checkpoint is stored as diffusers' textual-inversion file ({placeholder: tensor [1, D]}, what
examples/textual_inversion saves as learned_embeds.safetensors): `pipe.load_textual_inversion(file)` loads it on the
erased pipeline. The harness evaluates a checkpoint by adding the token to a copy of the tokenizer and its vector
after the embedding table (bench.models.base.DiffusionModel.add_tokens), which is what load_textual_inversion does.

Deviations: one vector per token (num_vectors 1, the paper's setting); no random horizontal flips or image resizing
(the data are generated at the model's resolution); captions `data` (each image's own caption through the evaluation
rewrite) is offered besides the templates, and is the toy's default because the toy only knows its caption grammar.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from unlearn_bench.attacks.base import AttackData, WeightAttack
from unlearn_bench.data import DataRequest
from unlearn_bench.models.base import uint8_to_images


class ConceptInversion(WeightAttack):
    """Params: placeholder, initializer, concept_word (per concept), captions (templates | data), templates, lr,
    steps, batch_size, optimizer, weight_decay, grad_clip, n_images, prompts, data_dir."""

    samples_model = False  # trains on data made by the original model (or a folder); never samples itself

    def _per_concept(self, key: str, fallback: str | None = None) -> str:
        value = self.spec.params[key]
        if isinstance(value, Mapping):
            value = value.get(self.concept.name, value.get("default", fallback))
        if not value:
            if fallback is None:
                raise ValueError(f"attack {self.spec.name}: no {key} for concept {self.concept.name!r}")
            value = fallback
        return str(value)

    def steps(self) -> list[int]:
        steps = sorted({int(s) for s in self.spec.params["steps"]})
        if not steps or steps[0] < 0 or steps[-1] <= 0:
            raise ValueError(f"attack {self.spec.name}: steps must be >= 0 with one positive, got {steps}")
        return steps

    def data_request(self) -> DataRequest:
        p = self.spec.params
        return DataRequest(tuple(p.get("prompts") or self.concept.attack_prompts), int(p["n_images"]),
                           p.get("data_dir"))

    # --- prompts ---------------------------------------------------------------------------------------------
    def word(self) -> str:
        return self._per_concept("concept_word", self.concept.target)

    def token(self) -> str:
        return str(self.spec.params["placeholder"]).format(concept=self.concept.name, word=self.word())

    def with_token(self, prompt: str) -> str:
        """The concept word replaced by the token (whole words, any case); prompts without it get the token first."""
        pattern = re.compile(rf"(?<!\w){re.escape(self.word())}(?!\w)", re.IGNORECASE)
        out, n = pattern.subn(lambda _: self.token(), prompt)
        return out if n else f"{self.token()} {prompt}"

    def eval_prompts(self, prompts: Mapping[str, list[str]]) -> dict[str, list[str]]:
        return {"target": [self.with_token(p) for p in prompts["target"]]}

    # --- training --------------------------------------------------------------------------------------------
    def trainable(self, model: Any) -> dict[str, torch.nn.Parameter]:
        return {f"text_encoder.added_tokens.{self.token()}": self.vector}

    def run(self, model: Any, data: AttackData | None, seed: int, save: Callable[..., None],
            progress: Any = None) -> None:
        if data is None or len(data) == 0:
            raise ValueError(f"attack {self.spec.name} needs images of the concept")
        p = self.spec.params
        mode = p["captions"]
        if mode not in ("templates", "data"):
            raise ValueError(f"attack {self.spec.name}: captions must be templates or data, got {mode!r}")
        self.templates = [str(t) for t in p["templates"]]
        if mode == "templates" and (not self.templates or any("{}" not in t for t in self.templates)):
            raise ValueError(f"attack {self.spec.name}: templates must be non-empty, each with a '{{}}' for the token")
        init_ids = model.tokenizer(self._per_concept("initializer"), add_special_tokens=False).input_ids
        if len(init_ids) != 1:
            raise ValueError(f"attack {self.spec.name}: the initializer {self._per_concept('initializer')!r} must be "
                             f"one token, got {len(init_ids)}")
        token = self.token()
        init = model.word_embeddings().weight[init_ids[0]].detach().float().clone()
        model.add_tokens({token: init})
        self.vector = torch.nn.Parameter(init.clone())
        model.tokens[token] = self.vector  # the encoder reads the trained vector itself: gradients reach it
        try:
            with torch.no_grad():
                self.latents = model.codec.encode(uint8_to_images(data.images).to(model.device))
            self.captions = [self.with_token(c) for c in data.captions] if mode == "data" else None
            self.scheduler = model.noise_scheduler()
            self._train(model, seed, save, progress)
        finally:
            model.drop_tokens()

    def _train(self, model: Any, seed: int, save: Callable[..., None], progress: Any) -> None:
        token = self.token()

        def store(step: int) -> None:
            vec = self.vector.detach().float().cpu().clone()[None]  # [1, D]: diffusers' learned_embeds layout
            save(step, {token: vec}, {"format": "pt", "delta_format": "textual_inversion", "token": token,
                                      "initializer": self._per_concept("initializer")})

        self.train_to_checkpoints(model, seed, store, progress)

    def loss(self, model: Any, step: int, generator: torch.Generator) -> torch.Tensor:
        n = len(self.latents)
        bs = int(self.spec.params["batch_size"])
        idx = torch.randint(0, n, (bs,), generator=generator)
        if self.captions is None:
            pick = torch.randint(0, len(self.templates), (bs,), generator=generator)
            captions = [self.templates[int(j)].format(self.token()) for j in pick]
        else:
            captions = [self.captions[int(i)] for i in idx]
        cond = model.encode_prompt(captions)
        return model.denoising_loss(self.latents[idx.to(self.latents.device)], cond, generator, self.scheduler)
