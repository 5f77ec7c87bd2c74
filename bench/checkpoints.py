"""Reading unlearned models made outside the harness: where their tensors are, which component they belong to,
whether they fit the base model, and loading them into it.

Accepted (param `format`; `auto` detects and says what it found):
  - pipeline: a diffusers pipeline folder (model_index.json). Only unet/, text_encoder/ (and text_encoder_2/ on
    SDXL) are read; every other component (vae, scheduler, tokenizer, safety checker, ...) is ignored, because
    unlearning methods change only those weights and the harness keeps the base model's others;
  - unet: a UNet folder (config.json + diffusion_pytorch_model.safetensors, or shards with their index json);
  - text_encoder: a text-encoder folder (config.json + model.safetensors, or shards), e.g. AdvUnlearn's CLIPTextModel
    subfolder - give its path, or the repository's path plus the `subfolder` param;
  - state_dict: one .safetensors file of UNet and/or text-encoder tensors, all of them or only the changed ones;
    keys either bare diffusers names (the component is found by matching names against the base model) or
    prefixed 'unet.' / 'text_encoder.' (the harness's own delta files);
  - lora: a diffusers/peft LoRA file (or a folder holding pytorch_lora_weights.safetensors), merged into the base
    with alpha / rank (bench.models.lora).
Pickle files (.bin, .ckpt, .pt, .pth) can run code when loaded and are refused unless `allow_pickle` is set.

Plan-time checks read only safetensors headers (names, shapes), never tensors. Torch is imported only by the
functions that load tensors, since the CLI imports this module while planning.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearn_bench.errors import RegistryError
from unlearn_bench.models.loading import PICKLE_SUFFIXES, CorruptWeights, check_safetensors
from unlearn_bench.models.lora import PEFT_PREFIX, lora_modules, lora_role, resolve_name

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
FORMATS = ("auto", "pipeline", "unet", "text_encoder", "state_dict", "lora")
LORA_FILE = "pytorch_lora_weights.safetensors"
STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")  # diffusers / transformers weight file names
Shapes = dict[str, dict[str, tuple[int, ...]]]  # component -> tensor name -> shape


class CheckpointError(RegistryError):
    """An external checkpoint that cannot be used (exit status 2 at plan time, naming the path)."""


@dataclass(frozen=True)
class Part:
    """One weights file and the components its tensors may belong to (empty: decided by key prefix or name)."""

    file: Path
    candidates: tuple[str, ...] = ()
    config: Path | None = None


@dataclass(frozen=True)
class Layout:
    """A checkpoint found on disk: its root, detected format and weights files."""

    root: Path
    format: str
    parts: tuple[Part, ...]

    def describe(self) -> str:
        kinds = {"pipeline": "diffusers pipeline folder", "unet": "UNet folder", "text_encoder": "text-encoder folder",
                 "state_dict": "state-dict file", "lora": "LoRA file"}
        n = len(self.parts)
        return f"{kinds[self.format]} ({n} weights file{'s' if n != 1 else ''})"


def _pickle_refused(p: Path, where: str) -> CheckpointError:
    return CheckpointError(
        f"{where}{p} is a pickle file, which can run arbitrary code when loaded, so it is refused. Convert it once, "
        f"only if you trust it: python -c \"import torch; from safetensors.torch import save_file; "
        f"save_file(torch.load('{p}', map_location='cpu'), 'OUT.safetensors')\" (a diffusers folder: "
        f"from_pretrained(..., use_safetensors=False).save_pretrained(OUT)); or set the method's allow_pickle: true")


def _index_shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted({str(v) for v in weight_map.values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index}: not a readable shard index (needs a weight_map): {exc}") from None
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise CheckpointError(f"{index} names shard {missing[0]}, which is missing from {index.parent}")
    return [index.parent / s for s in shards]


def component_files(folder: Path, allow_pickle: bool = False, where: str = "") -> list[Path]:
    """The weights files of one component folder: a shard index, else the standard single file, else the one
    *.safetensors there; pickle (.bin) only with allow_pickle. Raises CheckpointError naming the folder."""
    for suffix in (".safetensors", ".bin"):
        indexes = sorted(folder.glob(f"*{suffix}.index.json"))
        files = [folder / f"{s}{suffix}" for s in STEMS if (folder / f"{s}{suffix}").is_file()]
        if not indexes and not files:
            files = sorted(f for f in folder.glob(f"*{suffix}") if f.is_file())
        chosen = _index_shards(indexes[0]) if indexes else files
        if len(chosen) > 1 and not indexes:
            raise CheckpointError(f"{where}{folder} holds several weights files ({', '.join(f.name for f in chosen)})"
                                  f"; point path at the one to use")
        if chosen and suffix == ".bin" and not allow_pickle:
            raise _pickle_refused(chosen[0], where)
        if chosen:
            return chosen
    raise CheckpointError(f"{where}{folder} holds no weights file (*.safetensors)")


def _folder_kind(folder: Path) -> str | None:
    """unet / text_encoder from a component folder's config.json (diffusers writes _class_name, transformers
    model_type), else from its weights file names; None when it is not a component folder."""
    cfg = folder / "config.json"
    if cfg.is_file():
        try:
            data = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        if isinstance(data, dict) and "_class_name" in data:
            return "unet"
        if isinstance(data, dict) and ("model_type" in data or "architectures" in data):
            return "text_encoder"
    if any(folder.glob("diffusion_pytorch_model*")):
        return "unet"
    if any(folder.glob("model*.safetensors")) or any(folder.glob("pytorch_model*.bin")):
        return "text_encoder"
    return None


def detect(path: str, fmt: str = "auto", subfolder: str | None = None, allow_pickle: bool = False,
           where: str = "") -> Layout:
    """Find an external checkpoint's weights files (no tensor is read). `where` prefixes every error."""
    if fmt not in FORMATS:
        raise CheckpointError(f"{where}format {fmt!r} is unknown; allowed: {', '.join(FORMATS)}")
    given = Path(os.path.expanduser(str(path)))
    p = given / subfolder if subfolder else given
    if not p.exists():
        extra = f" (path {given} + subfolder {subfolder})" if subfolder else ""
        if not given.is_absolute() and str(path).count("/") == 1:  # looks like a hub id: nothing is downloaded
            extra += f"; to use the hub repository {path}, download it first: hf download {path} --local-dir DIR"
        raise CheckpointError(f"{where}{p} does not exist{extra}")
    p = p.resolve()
    try:
        layout = (_file_layout if p.is_file() else _folder_layout)(p, fmt, allow_pickle, where)
        for part in layout.parts:
            if part.file.suffix == ".safetensors":
                check_safetensors(part.file)
    except CorruptWeights as exc:
        raise CheckpointError(f"{where}{exc}") from None
    return layout


def _file_layout(p: Path, fmt: str, allow_pickle: bool, where: str) -> Layout:
    suffix = p.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise _pickle_refused(p, where)
    if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{where}{p} is not a weights file: expected a folder, a .safetensors file (or, with "
                              f"allow_pickle, {'/'.join(PICKLE_SUFFIXES)})")
    if fmt == "pipeline":
        raise CheckpointError(f"{where}format pipeline needs a folder with model_index.json, got the file {p}")
    if fmt == "auto":
        is_lora = any(lora_role(k) is not None and lora_role(k)[1] != "alpha" for k in tensor_shapes(p))
        fmt = "lora" if is_lora else "state_dict"
    candidates = {"unet": ("unet",), "text_encoder": TEXT_ENCODERS}.get(fmt, ())
    return Layout(p, "lora" if fmt == "lora" else "state_dict", (Part(p, candidates),))


def _folder_layout(p: Path, fmt: str, allow_pickle: bool, where: str) -> Layout:
    if fmt == "auto":
        if (p / "model_index.json").is_file():
            fmt = "pipeline"
        elif (p / LORA_FILE).is_file():
            fmt = "lora"
        elif _folder_kind(p) is not None:
            fmt = _folder_kind(p)  # type: ignore[assignment]
        elif any((p / c).is_dir() for c in COMPONENTS):
            fmt = "pipeline"  # unet/ or text_encoder/ without model_index.json: a partial pipeline
        else:
            subs = sorted(d.name for d in p.iterdir() if d.is_dir() and _folder_kind(d) is not None)
            files = sorted(f.name for f in p.glob("*.safetensors"))
            hint = f"; subfolders with weights: {', '.join(subs)} (set the method's subfolder param)" if subs else ""
            hint += f"; to read {files[0]} as a state dict, point path at that file" if files else ""
            raise CheckpointError(f"{where}{p} holds no weights the harness reads: no model_index.json, no component "
                                  f"config.json with weights, no {LORA_FILE}{hint}")
    if fmt == "state_dict":
        raise CheckpointError(f"{where}format state_dict needs a .safetensors file, got the folder {p}")
    if fmt == "lora":
        files = [p / LORA_FILE] if (p / LORA_FILE).is_file() else sorted(p.glob("*.safetensors"))
        if len(files) != 1:
            raise CheckpointError(f"{where}{p}: expected one LoRA file ({LORA_FILE}), found "
                                  f"{', '.join(f.name for f in files) or 'none'}")
        return Layout(p, "lora", (Part(files[0]),))
    if fmt == "pipeline":
        parts = []
        for comp in COMPONENTS:
            if (p / comp).is_dir():
                cfg = p / comp / "config.json"
                parts += [Part(f, (comp,), cfg if cfg.is_file() else None)
                          for f in component_files(p / comp, allow_pickle, where)]
        if not parts:
            raise CheckpointError(f"{where}{p} is a pipeline folder without unet/ or text_encoder/ weights")
        return Layout(p, "pipeline", tuple(parts))
    cfg = p / "config.json"
    candidates = ("unet",) if fmt == "unet" else TEXT_ENCODERS
    return Layout(p, fmt, tuple(Part(f, candidates, cfg if cfg.is_file() else None)
                                for f in component_files(p, allow_pickle, where)))


# --- names and shapes ----------------------------------------------------------------------------------------
def safetensors_header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (checked for consistency first); no tensor is read."""
    check_safetensors(file)
    with file.open("rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return json.loads(fh.read(n).decode("utf-8"))


def tensor_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape: from the header of a safetensors file, by loading a pickle (allow_pickle only)."""
    if file.suffix == ".safetensors":
        return {k: tuple(v["shape"]) for k, v in safetensors_header(file).items() if k != "__metadata__"}
    return {k: tuple(v.shape) for k, v in read_tensors(file).items()}


def read_tensors(file: Path) -> dict[str, Any]:
    """All tensors of one weights file, on the CPU (a pickle's {'state_dict': ...} wrapper is opened)."""
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    import torch

    try:
        obj = torch.load(str(file), map_location="cpu", mmap=True, weights_only=False)
    except RuntimeError:  # an old, non-zip pickle cannot be memory-mapped
        obj = torch.load(str(file), map_location="cpu", weights_only=False)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{file}: holds a {type(obj).__name__}, not a state dict of tensors")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _foreign_hint(key: str) -> str:
    if key.startswith(("model.diffusion_model.", "cond_stage_model.", "first_stage_model.")):
        return (" (this is an original CompVis/A1111 checkpoint: convert it to diffusers first, e.g. "
                "StableDiffusionPipeline.from_single_file(FILE).save_pretrained(OUT))")
    if key.startswith(("lora_unet_", "lora_te_")):
        return " (kohya-style LoRA names: load it into a diffusers pipeline and save_lora_weights it first)"
    return ""


def _component_of(keys: list[str], candidates: tuple[str, ...], base: Shapes, what: str, where: str) -> str:
    """The candidate component whose names hold every key (the best one, for the error, when none does)."""
    present = tuple(c for c in candidates or COMPONENTS if c in base)
    if not present:
        raise CheckpointError(f"{where}{what}: the base model has no {' or '.join(candidates)}")
    scores = {c: sum(resolve_name(k, base[c], prefixed=False) is not None for k in keys) for c in present}
    best = max(present, key=lambda c: scores[c])
    if scores[best] < len(keys):
        bad = next(k for k in keys if resolve_name(k, base[best], prefixed=False) is None)
        raise CheckpointError(f"{where}{what}: tensor {bad!r} is not in the base model's {best} "
                              f"({scores[best]} of {len(keys)} names match){_foreign_hint(bad)}")
    return best


def split_keys(part: Part, keys: list[str], base: Shapes, where: str = "") -> dict[str, tuple[str, str]]:
    """key -> (component, name in the base model) for a file of full tensors; raises CheckpointError naming the
    file and the first key that fits no component. Keys are all prefixed ('unet.') or all bare."""
    out: dict[str, tuple[str, str]] = {}
    prefixed = {k: next((c for c in COMPONENTS if k.startswith(f"{c}.")), None) for k in keys}
    if not part.candidates and any(prefixed.values()):
        bare = next((k for k, c in prefixed.items() if c is None), None)
        if bare is not None:
            raise CheckpointError(f"{where}{part.file}: tensor {bare!r} has no component prefix while others do "
                                  f"(write all keys as 'unet.<name>' / 'text_encoder.<name>', or none)")
        groups: dict[str, list[str]] = {}
        for k, c in prefixed.items():
            groups.setdefault(c, []).append(k)  # type: ignore[arg-type]
        for comp, ks in groups.items():
            names = [k[len(comp) + 1:] for k in ks]
            _component_of(names, (comp,), base, str(part.file), where)
            out |= {k: (comp, resolve_name(n, base[comp], prefixed=False)) for k, n in zip(ks, names, strict=True)}
        return out  # type: ignore[return-value]
    comp = _component_of(keys, part.candidates, base, str(part.file), where)
    return {k: (comp, resolve_name(k, base[comp], prefixed=False)) for k in keys}  # type: ignore[misc]


def check_fits(layout: Layout, base: Shapes, model_name: str, where: str = "") -> dict[str, int]:
    """Names and shapes of every tensor against the base model (headers only); tensors per component."""
    if layout.format == "lora":
        return check_lora_fits(layout.parts[0].file, base, model_name, where)
    counts: dict[str, int] = {}
    for part in layout.parts:
        shapes = tensor_shapes(part.file)
        if not shapes:
            raise CheckpointError(f"{where}{part.file} holds no tensors")
        for key, (comp, name) in split_keys(part, sorted(shapes), base, where).items():
            if tuple(shapes[key]) != tuple(base[comp][name]):
                raise CheckpointError(f"{where}{part.file}: tensor {key!r} has shape {list(shapes[key])} but the "
                                      f"base model '{model_name}' has {list(base[comp][name])} ({comp}.{name})")
            counts[comp] = counts.get(comp, 0) + 1
    return counts


def lora_keys(keys: list[str], base: Shapes, file: Path, where: str = "") -> dict[str, str]:
    """LoRA key -> the same key with its component prefix (bare peft/diffusers keys get theirs by module name)."""
    stripped = {k: k.removeprefix(PEFT_PREFIX) for k in keys}
    if all(any(s.startswith(f"{c}.") for c in COMPONENTS) for s in stripped.values()):
        return stripped
    try:
        modules = lora_modules(stripped.values())
    except ValueError as exc:
        raise CheckpointError(f"{where}{file}: {exc}{_foreign_hint(next(iter(stripped.values()), ''))}") from None
    comp = _component_of([f"{m}.weight" for m in modules], (), base, str(file), where)
    return {k: f"{comp}.{s}" for k, s in stripped.items()}


def check_lora_fits(file: Path, base: Shapes, model_name: str, where: str = "") -> dict[str, int]:
    """Every LoRA module exists in the base model and its factors fit the weight: down [r, in, ...], up [out, r]."""
    shapes = tensor_shapes(file)
    named = {new: shapes[old] for old, new in lora_keys(sorted(shapes), base, file, where).items()}
    try:
        modules = lora_modules(named)
    except ValueError as exc:
        raise CheckpointError(f"{where}{file}: {exc}{_foreign_hint(next(iter(named), ''))}") from None
    counts: dict[str, int] = {}
    for module, f in sorted(modules.items()):
        comp, _, local = module.partition(".")
        target = resolve_name(f"{local}.weight", base.get(comp, {}), prefixed=False)
        if comp not in COMPONENTS or target is None:
            raise CheckpointError(f"{where}{file}: LoRA module {module!r} is not a weight of the base model "
                                  f"'{model_name}'{_foreign_hint(module)}")
        w, down, up = base[comp][target], named[f["down"]], named[f["up"]]
        fits = (len(down) >= 2 and len(up) >= 2 and up[1] == down[0] and up[0] == w[0] and down[1] == w[1]
                and tuple(down[2:]) == tuple(w[2:]))
        if not fits:
            raise CheckpointError(f"{where}{file}: LoRA module {module!r}: down {list(down)} and up {list(up)} do "
                                  f"not fit the base model '{model_name}' weight {list(w)} (out, in)")
        counts[comp] = counts.get(comp, 0) + 1
    return counts


def lora_metadata(file: Path) -> dict[str, str]:
    if file.suffix != ".safetensors":
        return {}
    meta = safetensors_header(file).get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


# --- loading -------------------------------------------------------------------------------------------------
def live_shapes(model: Any) -> Shapes:
    """component -> name -> shape of a loaded DiffusionModel (parameters and persistent buffers, like a file)."""
    return {c: {n: tuple(t.shape) for n, t in m.state_dict().items()} for c, m in model.modules().items()}


def _iter_tensors(file: Path) -> Any:
    """(key, tensor) pairs, one tensor in memory at a time for safetensors (a 3.4 GB UNet is never held twice)."""
    if file.suffix != ".safetensors":
        yield from read_tensors(file).items()
        return
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as fh:
        for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
            yield key, fh.get_tensor(key)


def load_into(model: Any, layout: Layout, scale: float = 1.0, where: str = "") -> int:
    """Write the checkpoint's tensors into `model` (base weights on entry); returns how many were written.

    Full tensors replace the model's; a tensor stored at a lower precision that equals the base weight rounded to
    that precision is the base weight and is left alone (so an fp16 export of a model changes only what its
    author changed). Buffers in the file (CLIP position_ids) are fixed by the architecture and skipped. LoRA
    factors are merged with alpha / rank times `scale`."""
    import torch

    from unlearn_bench.models.lora import merge_lora

    base = live_shapes(model)
    if layout.format == "lora":
        file = layout.parts[0].file
        raw = read_tensors(file)
        keys = lora_keys(sorted(raw), base, file, where)
        return merge_lora(model, {keys[k]: v for k, v in raw.items()}, scale, lora_metadata(file))
    params = model.named_parameters()
    written = 0
    for part in layout.parts:
        keys = sorted(tensor_shapes(part.file))
        mapping = split_keys(part, keys, base, where)
        with torch.no_grad():
            for key, t in _iter_tensors(part.file):
                comp, name = mapping[key]
                p = params.get(f"{comp}.{name}")
                if p is None:
                    continue
                if tuple(t.shape) != tuple(p.shape):
                    raise CheckpointError(f"{where}{part.file}: tensor {key!r} has shape {list(t.shape)}, the "
                                          f"model's {comp}.{name} {list(p.shape)}")
                if t.dtype != p.dtype and t.is_floating_point() and torch.equal(p.detach().cpu().to(t.dtype), t):
                    continue
                p.copy_(t.to(p.device, p.dtype))
                written += 1
    return written
