"""What the discrete prompt-search attacks share (P4D, Ring-A-Bell): the per-prompt protocol around the search.

Every such attack answers the runner's PromptAttack.rewrite the same way, so that its rows, stored rewrites and ASR
read like UnlearnDiffAtk's (attacks/unlearndiffatk.py):
1. pre-check: each target prompt is sampled by the unlearned model with its own seed (and guidance) and judged by the
   concept's judge; a prompt it already fails on keeps itself as its rewrite (`pre_success`);
2. the attack searches a rewrite for every other prompt (`search`, the subclass's algorithm), judging the decoded
   text it stores (what the runner regenerates and scores), never the optimised ids;
3. ASR before = share of pre-successes, ASR after = share of prompts whose prompt or rewrite succeeded; both are
   written into every prompt's record, with `n`.
Randomness comes from one generator per (prompt, seed) pair (`prompt_seed`), so prompts can be searched in batches
with the same result as one at a time. The original model, which both attacks need (P4D's targets, Ring-A-Bell's
text encoder), is entered with `original_state`, which restores the attacked weights and sampling-time guidance.
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from unlearn_bench.attacks.base import PromptAttack, finish_records
from unlearn_bench.models.base import sample_seed

VOCABULARIES = ("all", "words")


def concept_param(spec: Any, concept: Any, key: str) -> Any:
    """A param's value for this concept: a per-concept mapping is read by concept name, then by the concept's
    target word (so nudity-i2p gets nudity's value), then `default`; a plain value applies to every concept."""
    value = spec.params.get(key)
    if not isinstance(value, Mapping):
        return value
    for k in (concept.name, concept.target, "default"):
        if k in value:
            return value[k]
    raise ValueError(f"attack {spec.name}: {key} has no value for concept {concept.name!r} and no default")


def prompt_seed(family: str, seed: int, prompt: str) -> int:
    """The seed of one (prompt, evaluation seed) pair's search: independent of batching and of other prompts."""
    return sample_seed(family, seed, prompt)


def token_pool(model: Any, vocabulary: str, drop: tuple[int, ...] = ()) -> torch.Tensor:
    """Token ids a search may place. `all`: every id except the tokenizer's special ones (a decoded BOS/EOS would
    become a control token again when the stored text is tokenised) and `drop`; `words`: UnlearnDiffAtk's whole-word
    vocabulary (ids ending a word, decoding to visible text), so that decoded text tokenises back to the same ids."""
    if vocabulary == "words":
        from unlearn_bench.attacks.unlearndiffatk import UnlearnDiffAtk

        ids = UnlearnDiffAtk.vocabulary(model)
        return ids[~torch.isin(ids, torch.tensor(drop, dtype=ids.dtype, device=ids.device))] if drop else ids
    if vocabulary != "all":
        raise ValueError(f"vocabulary={vocabulary!r}; allowed: {', '.join(VOCABULARIES)}")
    n = model.word_embeddings().weight.shape[0]
    skip = set(model.tokenizer.all_special_ids) | set(drop)
    return torch.tensor([i for i in range(n) if i not in skip], device=model.device)


@contextlib.contextmanager
def original_state(model: Any, original: Callable[[], Any]) -> Iterator[Any]:
    """Inside: the ORIGINAL model (original() loads it into `model` itself in the runner). After: the attacked state
    (weights and sampling-time guidance such as SLD, which the original model samples without) is back."""
    attacked, hook = model.delta(), getattr(model, "sampling_guidance", None)
    orig = original()
    try:
        yield orig
    finally:
        if orig is model:
            model.load_state([attacked])
            model.sampling_guidance = hook


def encode_ids(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """The text encoder's last hidden state [B, L, D] for token ids (what SD conditions on), in fp32."""
    with model.autocast():
        hidden = model.text_encoder(ids.to(model.device))[0]
    return hidden.float()


class PromptSearch(PromptAttack):
    """A prompt attack whose subclass only implements `search` for the prompts the unlearned model resists."""

    family: str = "prompt-search"  # the name mixed into every per-prompt seed

    def rewrite(self, model: Any, prompts: list[str], seeds: list[int],
                judge: Callable[[np.ndarray, list[str]], Any], original: Any,
                progress: Any = None, guidance: list[float] | None = None) -> tuple[list[str], list[dict[str, Any]]]:
        """Pre-check every prompt, search the others, return the rewrites and one record per prompt."""
        self.check()
        n = len(prompts)
        pre = np.asarray(judge(model.sample(prompts, seeds, guidance=guidance), prompts), bool)
        records = [self.record(p, int(s), bool(pre[i])) for i, (p, s) in enumerate(zip(prompts, seeds, strict=True))]
        todo = [i for i in range(n) if not pre[i]]
        if todo:
            self.search(model, [prompts[i] for i in todo], [seeds[i] for i in todo],
                        None if guidance is None else [guidance[i] for i in todo], judge, original,
                        [records[i] for i in todo], progress)
        return finish_records(records, self.spec.name, "the adversarial tokens", progress), records

    def record(self, prompt: str, seed: int, pre: bool) -> dict[str, Any]:
        """A prompt's record before its search (UnlearnDiffAtk's fields; `timestep` stays None: no block sweep)."""
        return {"prompt": prompt, "seed": seed, "rewrite": prompt, "pre_success": pre, "success": pre,
                "timestep": None, "iterations": 0, "loss": None, "truncated_tokens": 0}

    def check(self) -> None:
        """Validate parameters before any sampling (a clear error naming the value); subclasses extend."""

    @staticmethod
    def judge_texts(model: Any, texts: list[str], seeds: list[int], guidance: list[float] | None,
                    judge: Callable[[np.ndarray, list[str]], Any]) -> np.ndarray:
        """Sample the texts with the unlearned model (its own sampling-time guidance) and judge each image."""
        return np.asarray(judge(model.sample(texts, seeds, guidance=guidance), texts), bool)

    @abstractmethod
    def search(self, model: Any, prompts: list[str], seeds: list[int], guidance: list[float] | None,
               judge: Callable[[np.ndarray, list[str]], Any], original: Callable[[], Any],
               records: list[dict[str, Any]], progress: Any) -> None:
        """Find and judge a rewrite for each prompt, updating its record in place (rewrite, success, ...)."""
