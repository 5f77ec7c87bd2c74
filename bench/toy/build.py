"""`bench toy build`: train the toy detector and the toy text-to-image model reproducibly, then measure both.

The recipe is the measured one from shared/TOY-NOTES.md ("the long run"): UNet (64, 64) with cross-attention
at 8x8 and in the mid block, frozen 2-layer CLIP text encoder with word embeddings x20, v-prediction on a
cosine schedule, AdamW lr 1.5e-3 betas (0.9, 0.99), 200 warm-up steps then cosine decay to 2%, batch 64, bf16
autocast, EMA 0.999, 10% empty captions (for classifier-free guidance), horizontal flips, 4000 steps.

Reproducible and resumable: every random draw of training step k comes from a generator seeded by (seed, k),
so a build killed at any point and re-run with the same command continues from its last checkpoint in
out_dir/_train_state and ends with the same weights as an uninterrupted run (on the same device and library
versions; CPU and GPU builds are statistically equivalent, not bit-identical). The learning-rate schedule is a
function of (step, steps), so extending a finished build to more steps continues it on the longer schedule.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

STATE_DIR = "_train_state"
STATE_FILE = "train_state.pt"
REPORT_FILE = "report.json"

RECIPE: dict[str, Any] = {
    "n_train": 15_000,
    "batch_size": 64,
    "lr": 1.5e-3,
    "betas": (0.9, 0.99),
    "weight_decay": 0.01,
    "warmup_steps": 200,
    "final_lr_fraction": 0.02,
    "ema_decay": 0.999,
    "empty_caption_rate": 0.1,
    "hflip": True,
    "grad_clip": 1.0,
}


def lr_factor(step: int, steps: int, warmup: int, final: float) -> float:
    """Linear warm-up, then cosine decay from 1 to `final` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _step_generator(seed: int, step: int):
    import torch

    return torch.Generator().manual_seed(seed * 1_000_003 + step + 7)


def _autocast(device: str):
    import torch

    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def evaluate_samples(
    components: dict[str, Any], detector: Any, n: int, guidance: float, device: str, seed: int = 10_000
) -> dict[str, Any]:
    """Sample n images cycling over every (colour, shape) caption and judge them with the detector."""
    from unlearn_bench.toy import world
    from unlearn_bench.toy.detector import classify
    from unlearn_bench.toy.model import sample_images

    pairs = [(c, s) for c in world.COLOURS for s in world.SHAPES]
    asked = [pairs[i % len(pairs)] for i in range(n)]
    prompts = [world.caption(c, s) for c, s in asked]
    images = sample_images(components, prompts, [seed + i for i in range(n)], guidance_scale=guidance, device=device)
    out = classify(detector, images)
    want_c = np.array([c for c, _ in asked])
    want_s = np.array([s for _, s in asked])
    ok_c, ok_s = out["colour"] == want_c, out["shape"] == want_s
    per_colour = {c: float(ok_c[want_c == c].mean()) if (want_c == c).any() else None for c in world.COLOURS}
    return {
        "n": n,
        "guidance": guidance,
        "colour_acc": float(ok_c.mean()),
        "shape_acc": float(ok_s.mean()),
        "both_acc": float((ok_c & ok_s).mean()),
        "per_colour_acc": per_colour,
        "red_on_red": per_colour.get("red"),
        "images": images,
    }


def _train_diffusion(
    comps: dict[str, Any],
    recipe: dict[str, Any],
    steps: int,
    device: str,
    state: dict[str, Any] | None,
    state_path: Path,
    checkpoint_every: int,
    bar: Any,
) -> tuple[int, float]:
    """Train comps["unet"] from `state` (or from scratch) up to `steps`, checkpointing atomically.

    Returns (steps run in this call, their seconds); the UNet ends holding its EMA weights, in eval mode.
    """
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from unlearn_bench.toy import world
    from unlearn_bench.toy.model import encode_prompts, from_uint8

    start = 0 if state is None else int(state["step"])
    unet, codec = comps["unet"].to(device), comps["codec"]
    comps["text_encoder"].to(device).requires_grad_(False)
    noise_sched = DDPMScheduler.from_config(comps["scheduler_config"])
    images, captions, _, _ = world.make_dataset(recipe["n_train"], seed=recipe["seed"] * 1000 + 1)
    vocab = sorted(set(captions)) + [""]
    cap_idx = torch.tensor([vocab.index(c) for c in captions])
    with torch.no_grad():
        cap_emb = encode_prompts(comps, vocab, device)  # frozen text encoder: embed each caption once
    images_t = torch.from_numpy(images)  # uint8 on the CPU; batches are converted on the fly
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe["lr"], betas=tuple(recipe["betas"]), weight_decay=recipe["weight_decay"])
    ema = [p.detach().float().clone() for p in params]
    if state is not None:
        unet.load_state_dict(state["unet"])
        opt.load_state_dict(state["optimizer"])
        ema = [e.to(device) for e in state["ema"]]
        torch.set_rng_state(state["torch_rng"])
    alphas = noise_sched.alphas_cumprod.to(device)

    def save_state(step: int) -> None:
        payload = {
            "unet": unet.state_dict(),
            "optimizer": opt.state_dict(),
            "ema": [e.cpu() for e in ema],
            "step": step,
            "torch_rng": torch.get_rng_state(),
        }
        tmp = state_path.with_suffix(".tmp")
        torch.save(payload, tmp)
        tmp.replace(state_path)

    unet.train()
    n_train, bsz = recipe["n_train"], recipe["batch_size"]
    task = bar.add_task("diffusion", total=steps, completed=start, info="")
    loss_avg, t_train, steps_done = None, time.time(), 0
    for step in range(start, steps):
        g = _step_generator(recipe["seed"], step)
        idx = torch.randint(0, n_train, (bsz,), generator=g)
        flip = torch.rand(bsz, generator=g) < (0.5 if recipe["hflip"] else 0.0)
        drop = torch.rand(bsz, generator=g) < recipe["empty_caption_rate"]
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (bsz,), generator=g)
        noise = torch.randn(bsz, codec.latent_channels, 16, 16, generator=g)
        x = from_uint8(images_t[idx].numpy())
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        latents = codec.encode(x).to(device)
        noise, t = noise.to(device), t.to(device)
        ctx = cap_emb[torch.where(drop, len(vocab) - 1, cap_idx[idx]).to(device)]
        a = alphas[t].sqrt()[:, None, None, None]
        s = (1 - alphas[t]).sqrt()[:, None, None, None]
        noisy, target = a * latents + s * noise, a * noise - s * latents  # v-prediction target
        for group in opt.param_groups:
            group["lr"] = recipe["lr"] * lr_factor(step, steps, recipe["warmup_steps"], recipe["final_lr_fraction"])
        with _autocast(device):
            pred = unet(noisy, t, encoder_hidden_states=ctx).sample
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe["grad_clip"])
        opt.step()
        decay = min(recipe["ema_decay"], (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach().float() for p in params], 1 - decay)
        steps_done += 1
        if step % 25 == 0 or step == steps - 1:
            value = float(loss.detach())
            loss_avg = value if loss_avg is None else 0.9 * loss_avg + 0.1 * value
            bar.update(task, completed=step + 1, info=f"loss {loss_avg:.4f}")
        if (step + 1) % checkpoint_every == 0 or step == steps - 1:
            save_state(step + 1)
    if steps_done == 0 and state is None:
        save_state(0)
    train_seconds = time.time() - t_train
    bar.update(task, completed=steps)

    with torch.no_grad():  # the final weights are the EMA copy
        for p, e in zip(params, ema, strict=True):
            p.copy_(e.to(p.dtype))
    unet.eval()
    return steps_done, train_seconds


def _recipe(seed: int, detector_steps: int, n_train: int) -> dict[str, Any]:
    """Everything that changes the result except the step count (a build may be extended to more steps)."""
    from unlearn_bench.toy.model import TOY_CONFIG

    return _jsonable(
        {**RECIPE, "seed": seed, "detector_steps": detector_steps, "n_train": n_train, "config": TOY_CONFIG}
    )


def build(
    out_dir: Path,
    seed: int = 0,
    steps: int = 4000,
    device: str = "cpu",
    resume: bool = True,
    quiet: bool = False,
    detector_steps: int = 1000,
    eval_samples: int = 360,
    guidance: float = 3.0,
    checkpoint_every: int = 250,
    n_train: int = RECIPE["n_train"],
) -> dict[str, Any]:
    """Train detector + diffusion model into out_dir and return the measured figures (also in report.json).

    out_dir receives unet/text_encoder/detector safetensors, config.json and report.json; out_dir/_train_state
    holds the resumable state (delete it, or pass resume=False, to start over). n_train (images rendered for
    both the detector and the diffusion model) is only lowered by tests, to keep tiny builds fast.
    """
    import torch

    from unlearn_bench.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from unlearn_bench.toy.detector import heldout_accuracy, load_detector, save_detector, train_detector
    from unlearn_bench.toy.model import (
        atomic_save_json,
        build_toy_components,
        save_toy_components,
    )

    out_dir = Path(out_dir)
    state_dir = out_dir / STATE_DIR
    if not resume and state_dir.exists():
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    recipe = _recipe(seed, detector_steps, n_train)
    recipe_path = state_dir / "recipe.json"
    if recipe_path.exists() and json.loads(recipe_path.read_text()) != recipe:
        raise ValueError(
            f"{state_dir} holds a build with a different recipe or seed; "
            "use another --out directory or start over (resume=False)"
        )
    atomic_save_json(recipe, recipe_path)
    state_path = state_dir / STATE_FILE
    state: dict[str, Any] | None = None
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state["step"] > steps:
            raise ValueError(
                f"{state_dir} is already at step {state['step']} > steps={steps}; "
                "ask for at least that many steps or start over (resume=False)"
            )
    resumed_from = 0 if state is None else int(state["step"])
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    t_start = time.time()
    with Progress(*columns, disable=quiet, transient=False) as bar:
        # 1. the detector (fast; kept in the state dir so a resumed build does not retrain it)
        if (state_dir / "detector.safetensors").exists():
            detector = load_detector(state_dir, device)
        else:
            task = bar.add_task("detector", total=detector_steps, info="")
            detector = train_detector(
                seed,
                detector_steps,
                device,
                n_train=n_train,
                progress=lambda k: bar.update(task, completed=k),
            )
            save_detector(detector, state_dir)
        det_acc = heldout_accuracy(detector, n=max(300, n_train // 5))  # 3000 images for a real build

        # 2. the diffusion model (ends with its EMA weights loaded)
        comps = build_toy_components(seed)
        steps_done, train_seconds = _train_diffusion(
            comps, recipe, steps, device, state, state_path, checkpoint_every, bar
        )
        save_toy_components(comps, out_dir)
        save_detector(detector, out_dir)

        # 4. measure generated samples, judged by the detector
        samples = evaluate_samples(comps, detector, eval_samples, guidance, device) if eval_samples else None

    import diffusers
    import transformers

    report: dict[str, Any] = {
        "seed": seed,
        "steps": steps,
        "resumed_from_step": resumed_from,
        "device": str(device),
        "detector_heldout": det_acc,
        "samples": {k: v for k, v in samples.items() if k != "images"} if samples else None,
        "train_seconds": round(train_seconds, 2),
        "train_steps_per_second": round(steps_done / train_seconds, 3) if steps_done else None,
        "total_seconds": round(time.time() - t_start, 2),
        "recipe": recipe,
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }
    atomic_save_json(report, out_dir / REPORT_FILE)
    return report


def _jsonable(obj: Any) -> Any:
    """Tuples -> lists, recursively, so a recipe compares equal after a round trip through a checkpoint."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj
