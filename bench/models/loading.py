"""Build or load a DiffusionModel from a ModelSpec: tiny (random, from config), toy (shipped weights), or real SD.

Real weights load only from a local path or the local Hugging Face cache. `check_available` runs at plan time
(without importing torch) so a missing checkpoint is reported, with what to download, before any work starts.

Why it also inspects the files: pickle weights (.bin, .ckpt, .pt) execute code when loaded, so a downloaded folder
could run anything; they are refused unless the model spec sets allow_pickle. A truncated or garbled safetensors
file (an interrupted copy) would otherwise fail deep inside diffusers after minutes of loading, or, worse, only when
a worker reaches it hours into a run; its header says how many bytes it must hold, which is checked here for free.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from unlearn_bench.registry import RegistryError
from unlearn_bench.specs import ModelSpec

REAL_KINDS = ("sd", "sdxl")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")  # the folders whose weights the harness loads
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit on the JSON header
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
               "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class WeightsMissing(RegistryError):
    """Real model weights are not on this machine (exit status 2, with download instructions)."""


class UnsafeWeights(RegistryError):
    """Only pickle weights are present, and the spec does not allow pickle (exit status 2, with how to convert)."""


class CorruptWeights(RegistryError):
    """A weights file or model_index.json that cannot be what it claims (exit status 2, naming the file)."""


def check_safetensors(path: str | Path) -> None:
    """Raise CorruptWeights unless `path` is a well-formed safetensors file: an 8-byte little-endian header length,
    a JSON header, and exactly as many data bytes as the header's tensors need. Reads the header only (no torch)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with p.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CorruptWeights(f"{p}: not a safetensors file ({size} bytes, shorter than its header)")
            n = int.from_bytes(head, "little")
            if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise CorruptWeights(f"{p}: corrupt safetensors header (declares {n} header bytes, the file has "
                                     f"{size}); the file is truncated or not safetensors")
            raw = fh.read(n)
    except OSError as exc:
        raise CorruptWeights(f"{p}: cannot read ({exc.strerror or exc})") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptWeights(f"{p}: corrupt safetensors header (not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise CorruptWeights(f"{p}: corrupt safetensors header (not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CorruptWeights(f"{p}: corrupt safetensors header (tensor {name!r} has no valid data_offsets)")
        shape, width = info.get("shape"), DTYPE_BYTES.get(str(info.get("dtype")))
        if width and isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape):
            if math.prod(shape) * width != offsets[1] - offsets[0]:
                raise CorruptWeights(f"{p}: corrupt safetensors header (tensor {name!r}: shape {shape} of "
                                     f"{info.get('dtype')} does not fit offsets {offsets})")
        end = max(end, offsets[1])
    data = size - 8 - n
    if end != data:
        raise CorruptWeights(f"{p}: the header describes {end} bytes of tensor data but the file holds {data}; "
                             f"the file is {'truncated' if data < end else 'padded or corrupt'}")


PICKLE_GLOBS = tuple(f"*{s}" for s in PICKLE_SUFFIXES)  # what a download skips: what loading refuses


def download_command(repo: str, *files: str, exclude: tuple[str, ...] = PICKLE_GLOBS) -> str:
    """The shell command that fetches `repo` (or only `files` of it) into the HF cache, for the pinned
    huggingface-hub (its `hf` CLI: huggingface-cli is gone). Each glob gets its own --exclude (the option takes one
    value; a second bare glob would be read as a file name). A test runs every hint with --dry-run offline and
    checks the CLI accepts it."""
    import shlex

    parts = ["hf", "download", repo, *files]
    if not files:
        for glob in exclude:
            parts += ["--exclude", glob]
    return shlex.join(parts)


def _convert_hint(spec: ModelSpec, what: Path, single_file: bool) -> str:
    loader = "StableDiffusionXLPipeline" if spec.kind == "sdxl" else "StableDiffusionPipeline"
    load = (f"P.from_single_file('{what}')" if single_file else f"P.from_pretrained('{what}', use_safetensors=False)")
    hint = (f"convert it once, only if you trust it, to safetensors:\n"
            f"    python -c \"from diffusers import {loader} as P; {load}"
            f".save_pretrained('OUT', safe_serialization=True)\"\n"
            f"and pass --set model.{spec.name}.path=OUT")
    if spec.hub_id:
        hint += f"; or download the safetensors weights: {download_command(spec.hub_id)}"
    return hint


def _check_single_file(spec: ModelSpec, p: Path) -> None:
    """A path to one checkpoint file: refused (pickle), checked then refused (safetensors), as the harness loads
    diffusers folders only."""
    if p.suffix.lower() in PICKLE_SUFFIXES and not spec.allow_pickle:
        raise UnsafeWeights(f"model '{spec.name}': {p} is a pickle checkpoint, which can run arbitrary code when "
                            f"loaded, so it is refused. To use it, {_convert_hint(spec, p, True)}. (Passing "
                            f"--set model.{spec.name}.allow_pickle=true allows pickle weights in diffusers folders.)")
    if p.suffix.lower() == ".safetensors":
        check_safetensors(p)
    raise WeightsMissing(f"model '{spec.name}': {p} is a single checkpoint file; the harness loads diffusers "
                         f"folders (model_index.json, unet/, vae/, ...). To use it, {_convert_hint(spec, p, True)}")


def check_weights_folder(spec: ModelSpec, folder: Path) -> None:
    """Plan-time checks of a local diffusers folder: model_index.json parses; every component it lists that the
    harness loads has weights, in safetensors (pickle only with allow_pickle), each with an intact header."""
    index_path = folder / "model_index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CorruptWeights(f"model '{spec.name}': {index_path} is unreadable or not JSON ({exc})") from exc
    if not isinstance(index, dict):
        raise CorruptWeights(f"model '{spec.name}': {index_path} is not a JSON object")
    for comp in COMPONENTS:
        entry = index.get(comp)
        listed = isinstance(entry, list) and bool(entry) and entry[0] is not None
        cdir = folder / comp
        if not cdir.is_dir():
            if listed:
                raise WeightsMissing(f"model '{spec.name}': {cdir} is missing, but {index_path} lists it")
            continue
        names = sorted(cdir.iterdir())
        safe = [f for f in names if f.suffix == ".safetensors"]
        pickles = [f for f in names if f.suffix.lower() in PICKLE_SUFFIXES]
        for f in safe:
            try:
                check_safetensors(f)
            except CorruptWeights as exc:
                raise CorruptWeights(f"model '{spec.name}': {exc}") from None
        if not safe and pickles and not spec.allow_pickle:
            raise UnsafeWeights(
                f"model '{spec.name}': {pickles[0]} is pickle weights with no .safetensors beside it; pickle can run "
                f"arbitrary code when loaded, so it is refused. To use it, {_convert_hint(spec, folder, False)}. "
                f"If you trust the files, pass --set model.{spec.name}.allow_pickle=true instead.")
        if not safe and not pickles:
            raise WeightsMissing(f"model '{spec.name}': {cdir} holds no weights file (*.safetensors)")


def _local_snapshot(spec: ModelSpec) -> Path | None:
    if spec.path:
        p = Path(os.path.expanduser(spec.path))
        return p if (p / "model_index.json").exists() else None
    if not spec.hub_id:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec.hub_id, revision=spec.revision, local_files_only=True,
                                      allow_patterns=["model_index.json"]))
    except Exception:  # noqa: BLE001 - any miss of the offline cache means "not here"
        return None


def check_available(spec: ModelSpec) -> None:
    """Raise WeightsMissing (naming what to download and where) when a real model is not on disk, UnsafeWeights
    when it is pickle only, CorruptWeights when a file is damaged. Never imports torch."""
    if spec.kind not in REAL_KINDS:
        return
    if spec.path and Path(os.path.expanduser(spec.path)).is_file():
        _check_single_file(spec, Path(os.path.expanduser(spec.path)))
    if spec.allow_download and not spec.path:
        return  # diffusers fetches what is missing (safetensors only, unless allow_pickle)
    snap = _local_snapshot(spec)
    if snap is not None and (snap / "unet").exists():
        check_weights_folder(spec, snap)
        return
    if spec.allow_download:
        return
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME", "~/.cache/huggingface") + "/hub"
    where = f"the local path {spec.path} (no model_index.json there)" if spec.path else f"the HF cache ({cache})"
    raise WeightsMissing(
        f"model '{spec.name}' ({spec.hub_id}) was not found in {where}. Download it on a machine with internet:\n"
        f"    {download_command(spec.hub_id)}\n"
        f"then either keep the HF cache ({cache}) or copy the snapshot folder and pass "
        f"--set model.{spec.name}.path=/path/to/folder (or set BENCH_MODEL_{spec.name.upper()}_PATH). "
        f"To let the harness download it itself, pass --set model.{spec.name}.allow_download=true."
    )


def load_model(spec: ModelSpec, device: str = "cpu") -> Any:
    """Instantiate the DiffusionModel for a spec (imports torch and diffusers)."""
    from unlearn_bench.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    if spec.kind == "tiny":
        from unlearn_bench.models.tiny import build_tiny

        return build_tiny(spec, device)
    if spec.kind == "toy":
        from unlearn_bench.models.toy import load_toy

        return load_toy(spec, device)
    if spec.kind in REAL_KINDS:
        from unlearn_bench.models.sd import load_sd

        check_available(spec)
        return load_sd(spec, device)
    raise RegistryError(f"model '{spec.name}': unknown kind '{spec.kind}'; allowed: tiny, toy, {', '.join(REAL_KINDS)}")
