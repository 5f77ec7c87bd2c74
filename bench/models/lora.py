"""LoRA files as model states: recognise a file of low-rank factors and merge it into a loaded model.

Core code (the runner evaluates LoRA checkpoints, and an external LoRA file can be an unlearned model), so it lives
here rather than in the LoRA attack, which only writes such files. Layouts: diffusers ('<module>.lora.down.weight' /
'.lora.up.weight', what StableDiffusionPipeline.save_lora_weights writes) and peft ('.lora_A.weight' /
'.lora_B.weight'); keys carry the pipeline component prefix ('unet.', 'text_encoder.').
"""

from __future__ import annotations

from typing import Any

import torch

_DOWN, _UP = ".lora.down.weight", ".lora.up.weight"


def is_lora_delta(tensors: dict[str, torch.Tensor]) -> bool:
    """True for a stored LoRA checkpoint (diffusers or peft key layout), False for full tensor values."""
    return bool(tensors) and all(".lora." in k or ".lora_A." in k or ".lora_B." in k for k in tensors)


def merge_lora(model: Any, tensors: dict[str, torch.Tensor], scale: float = 1.0) -> int:
    """W += scale * up @ down for every adapted Linear of `model` (its current weights: base or unlearned).

    Accepts diffusers ('.lora.down/.up.weight') and peft ('.lora_A/.lora_B.weight') keys. Returns the number of
    weights changed. scale = alpha / r is 1 for every file this module writes."""
    params = model.named_parameters()
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        for down, up in ((_DOWN, _UP), (".lora_A.weight", ".lora_B.weight")):
            if k.endswith(down):
                pairs.setdefault(k[: -len(down)], {})["down"] = v
            elif k.endswith(up):
                pairs.setdefault(k[: -len(up)], {})["up"] = v
    missing = sorted(m for m, f in pairs.items() if len(f) != 2 or f"{m}.weight" not in params)
    if missing or not pairs:
        raise KeyError(f"LoRA file does not match the model: {len(missing)} modules, e.g. {missing[:3]}")
    with torch.no_grad():
        for module, f in pairs.items():
            w = params[f"{module}.weight"]
            w.add_((scale * f["up"].float() @ f["down"].float()).to(w.device, w.dtype))
    return len(pairs)
