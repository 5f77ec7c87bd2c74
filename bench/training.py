"""The one training loop shared by gradient-based unlearning methods and finetuning attacks.

Why shared: a method or attack only says which parameters train and what the loss is; seeding, optimiser
construction, gradient clipping, progress and checkpoint callbacks live here once, so `+meta` (and later mixed
precision or accelerate placement) can wrap every method without copying any of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from unlearn_bench.finite import check_loss, check_tensors, describe_params
from unlearn_bench.progress import Progress


class Trainable(Protocol):
    def trainable(self, model: Any) -> dict[str, torch.nn.Parameter]: ...

    def loss(self, model: Any, step: int, generator: torch.Generator) -> torch.Tensor: ...


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    table = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name not in table:
        raise ValueError(f"unknown optimizer '{name}'; allowed: adam, adamw, sgd")
    return table[name](params, lr=lr, weight_decay=weight_decay, betas=betas)


def train(model: Any, task: Trainable, *, steps: int, lr: float, seed: int, optimizer: str = "adam",
          weight_decay: float = 0.0, grad_clip: float | None = None, progress: Progress | None = None,
          label: str = "train", on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Run `steps` optimiser steps of task.loss over task.trainable(model); return the loss history.

    on_step(step_number_1_based, loss) runs after each step (checkpointing at attack steps uses it).
    A nan/inf loss, or nan/inf weights at the end, raise bench.finite.NonFinite naming `label`, the trained
    parameter set and the step, so a diverged run fails its stage instead of being stored.
    """
    named = task.trainable(model)
    if not named:
        raise ValueError(f"{label}: no trainable parameters selected")
    for module in model.modules().values():
        module.requires_grad_(False)
    for p in named.values():
        p.requires_grad_(True)
    params = list(named.values())
    param_set = describe_params(list(named))
    opt = make_optimizer(optimizer, params, lr, weight_decay)
    gen = torch.Generator("cpu").manual_seed(int(seed))
    history: list[float] = []
    task_name = progress.add(label, steps) if progress else None
    try:
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = task.loss(model, step, gen)
            value = check_loss(loss, label, step + 1, param_set)  # before backward: a nan loss never steps
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            history.append(value)
            if progress:
                progress.advance(task_name, loss=history[-1])
            if on_step:
                on_step(step + 1, history[-1])
        check_tensors(named, label, "weights after training", steps)
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        if progress:
            progress.done(task_name)
    return history
