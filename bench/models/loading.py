"""Build or load a DiffusionModel from a ModelSpec: tiny (random, from config), toy (shipped weights), or real SD.

Real weights load only from a local path or the local Hugging Face cache. `check_available` runs at plan time
(without importing torch) so a missing checkpoint is reported, with what to download, before any work starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.registry import RegistryError
from bench.specs import ModelSpec

REAL_KINDS = ("sd", "sdxl")


class WeightsMissing(RegistryError):
    """Real model weights are not on this machine (exit status 2, with download instructions)."""


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
    """Raise WeightsMissing (naming what to download and where) when a real model is not on disk."""
    if spec.kind not in REAL_KINDS or spec.allow_download:
        return
    snap = _local_snapshot(spec)
    if snap is not None and (snap / "unet").exists():
        return
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME", "~/.cache/huggingface") + "/hub"
    where = f"the local path {spec.path} (no model_index.json there)" if spec.path else f"the HF cache ({cache})"
    raise WeightsMissing(
        f"model '{spec.name}' ({spec.hub_id}) was not found in {where}. Download it on a machine with internet:\n"
        f"    huggingface-cli download {spec.hub_id} --exclude '*.ckpt' '*.bin'\n"
        f"then either keep the HF cache ({cache}) or copy the snapshot folder and pass "
        f"--set model.{spec.name}.path=/path/to/folder (or set BENCH_MODEL_{spec.name.upper()}_PATH). "
        f"To let the harness download it itself, pass --set model.{spec.name}.allow_download=true."
    )


def load_model(spec: ModelSpec, device: str = "cpu") -> Any:
    """Instantiate the DiffusionModel for a spec (imports torch and diffusers)."""
    from bench.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    if spec.kind == "tiny":
        from bench.models.tiny import build_tiny

        return build_tiny(spec, device)
    if spec.kind == "toy":
        from bench.models.toy import load_toy

        return load_toy(spec, device)
    if spec.kind in REAL_KINDS:
        from bench.models.sd import load_sd

        check_available(spec)
        return load_sd(spec, device)
    raise RegistryError(f"model '{spec.name}': unknown kind '{spec.kind}'; allowed: tiny, toy, {', '.join(REAL_KINDS)}")
