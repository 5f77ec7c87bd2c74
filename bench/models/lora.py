"""LoRA files as model states: recognise a file of low-rank factors and merge it into a loaded model.

Core code (the runner evaluates LoRA checkpoints, and an external LoRA file can be an unlearned model), so it lives
here rather than in the LoRA attack, which only writes such files. Key layouts, each optionally behind a pipeline
component prefix ('unet.', 'text_encoder.', 'text_encoder_2.'):
  - diffusers: '<module>.lora.down.weight' / '.lora.up.weight' (StableDiffusionPipeline.save_lora_weights);
  - peft: '<module>.lora_A.weight' / '.lora_B.weight' (a leading 'base_model.model.' is dropped);
  - diffusers' older layouts: '<attn>.processor.to_q_lora.down.weight' (to_out_lora = to_out.0) and
    '<module>.lora_linear_layer.down.weight' (text encoders);
  - '<module>.alpha' scalars (kohya-style network alphas as diffusers stores them).
Scale of a module: scale * alpha / rank, with alpha from its '.alpha' tensor, else from peft's LoraConfig that
diffusers stores in the safetensors metadata ('lora_adapter_metadata': '<component>.lora_alpha', alpha_pattern,
use_rslora), else alpha = rank (scale 1: what diffusers assumes without alphas, and what the LoRA attack writes).

Key parsing is torch-free (plan-time checks of external LoRA files read only safetensors headers); torch is imported
inside the functions that touch tensors.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_DOWN, _UP = ".lora.down.weight", ".lora.up.weight"
SUFFIXES = {_DOWN: "down", _UP: "up", ".lora_A.weight": "down", ".lora_B.weight": "up", ".alpha": "alpha",
            ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up"}
_PROCESSOR = re.compile(r"^(?P<attn>.*)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight$")
PEFT_PREFIX = "base_model.model."
TEXT_MODEL = "text_model."  # transformers 4 names CLIP text weights 'text_model.<...>'; transformers 5 drops it


def lora_role(key: str) -> tuple[str, str] | None:
    """(module, role) of a LoRA key, role one of down/up/alpha; None for a key that is no LoRA factor."""
    key = key.removeprefix(PEFT_PREFIX)
    m = _PROCESSOR.match(key)
    if m:
        proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
        return f"{m['attn']}.{proj}", m["role"]
    for suffix, role in SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def is_lora_delta(tensors: Mapping[str, Any]) -> bool:
    """True for a file of LoRA factors (diffusers or peft key layout, alphas allowed), False for full tensors."""
    roles = [lora_role(k) for k in tensors]
    return bool(tensors) and all(r is not None for r in roles) and any(r[1] != "alpha" for r in roles if r)


def lora_modules(keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """module -> {role: key} for every LoRA key; a key of another kind raises ValueError naming it."""
    out: dict[str, dict[str, str]] = {}
    for key in keys:
        found = lora_role(key)
        if found is None:
            raise ValueError(f"tensor {key!r} is not a LoRA factor (expected <module>.lora.down/up.weight, "
                             f"<module>.lora_A/lora_B.weight or <module>.alpha)")
        module, role = found
        if role in out.setdefault(module, {}):
            raise ValueError(f"LoRA module {module!r} has two {role} tensors ({out[module][role]!r}, {key!r})")
        out[module][role] = key
    incomplete = sorted(m for m, f in out.items() if not {"down", "up"} <= set(f))
    if incomplete:
        raise ValueError(f"LoRA module {incomplete[0]!r} lacks its {'up' if 'down' in out[incomplete[0]] else 'down'}"
                         f" factor ({len(incomplete)} incomplete modules)")
    return out


def resolve_name(name: str, names: Mapping[str, Any] | set[str], prefixed: bool = True) -> str | None:
    """`name` as the target spells it: as is, or with the CLIP 'text_model.' level added or dropped (weights
    saved by transformers 4 and loaded by 5, or the reverse); None when neither form exists. prefixed: the name
    starts with its component ('text_encoder.text_model...'), so the level is toggled after it."""
    if name in names:
        return name
    head, rest = name.split(".", 1) if prefixed and "." in name else ("", name)
    alt = rest.removeprefix(TEXT_MODEL) if rest.startswith(TEXT_MODEL) else TEXT_MODEL + rest
    candidate = f"{head}.{alt}" if head else alt
    return candidate if candidate in names else None


def metadata_alphas(metadata: Mapping[str, str] | None) -> dict[str, dict[str, Any]]:
    """component -> {lora_alpha, alpha_pattern, use_rslora} from diffusers' 'lora_adapter_metadata'."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        cfg = json.loads(raw)
    except ValueError:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for key, value in cfg.items() if isinstance(cfg, dict) else ():
        comp, _, field = key.rpartition(".")
        if field in ("lora_alpha", "alpha_pattern", "use_rslora", "use_dora") and comp:
            out.setdefault(comp, {})[field] = value
    return out


def module_scale(module: str, rank: int, alpha: float | None, config: Mapping[str, Any] | None) -> float:
    """alpha / rank (alpha / sqrt(rank) under rsLoRA) of one module; 1 without any alpha."""
    config = config or {}
    if alpha is None and config.get("lora_alpha") is not None:
        alpha = float(config["lora_alpha"])
        local = module.split(".", 1)[1] if "." in module else module
        for pattern, value in (config.get("alpha_pattern") or {}).items():  # peft's rule: a suffix match
            if re.match(rf"(.*\.)?({pattern})$", local):
                alpha = float(value)
                break
    if alpha is None:
        return 1.0
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def merge_lora(model: Any, tensors: dict[str, torch.Tensor], scale: float = 1.0,
               metadata: Mapping[str, str] | None = None) -> int:
    """W += scale * (alpha / rank) * up @ down for every adapted Linear or Conv2d of `model` (its current weights:
    base or unlearned). Keys carry the component prefix ('unet.', 'text_encoder.'). Returns the number of weights
    changed; a module the model lacks, or factors whose shapes do not fit its weight, raise KeyError."""
    import torch

    params = model.named_parameters()
    try:
        modules = lora_modules(tensors)
    except ValueError as exc:
        raise KeyError(f"not a LoRA file: {exc}") from None
    configs = metadata_alphas(metadata)
    if any(c.get("use_dora") for c in configs.values()):
        raise KeyError("DoRA adapters (use_dora) are not supported; merge them with peft and pass the merged weights")
    targets = {m: resolve_name(f"{m}.weight", params) for m in modules}
    missing = sorted(m for m, t in targets.items() if t is None)
    if missing or not modules:
        raise KeyError(f"LoRA file does not match the model: {len(missing)} modules, e.g. {missing[:3]}")
    with torch.no_grad():
        for module, f in modules.items():
            w = params[targets[module]]  # type: ignore[index]
            down, up = tensors[f["down"]].float(), tensors[f["up"]].float()
            rank = down.shape[0]
            alpha = float(tensors[f["alpha"]].item()) if "alpha" in f else None
            s = scale * module_scale(module, rank, alpha, configs.get(module.split(".", 1)[0]))
            update = up.flatten(1) @ down.flatten(1)
            if update.numel() != w.numel() or up.shape[0] != w.shape[0]:
                raise KeyError(f"LoRA module {module}: up {list(up.shape)} @ down {list(down.shape)} does not fit "
                               f"the weight {list(w.shape)}")
            w.add_((s * update).reshape(w.shape).to(w.device, w.dtype))
    return len(modules)
