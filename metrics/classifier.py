"""Shared by the classifier judges (object-rate, style-rate, clip-zeroshot): the ranking rule, per-concept values,
and finding and loading a local transformers image classifier without touching the network.

Ranking rule (every judge): class c's rank in an image's scores is the number of classes scoring strictly higher,
plus the number scoring exactly the same with a LOWER index - the order of a stable descending sort, and for k = 1
the rule of torch.argmax (the first maximal index wins), which is how UnlearnDiffAtk's object judge picks its
top-1 class (src/tasks/utils/metrics/object_eval.py: logits.argmax(-1)). "c is in the top k" means rank < k. Exact
ties are rare on real logits; the rule only makes the outcome defined (a test pins it).

Why the weights are found here rather than by from_pretrained: from_pretrained would try the network before its
cache (and hang offline), and it fails late, deep inside a run. The lookup below runs at plan time, reads nothing
but file names and safetensors headers, and names what to download when something is missing (exit status 2).
Pickle weights (pytorch_model.bin) can run code when loaded, so a folder holding only those is refused unless the
metric's `allow_pickle` is true, as for models (README "Models and real weights").
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from unlearn_bench.models.loading import check_safetensors, download_command

HF_FILES = ("config.json", "preprocessor_config.json")  # besides the weights, what a classifier folder must hold
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class JudgeUnavailable(RuntimeError):
    """A judge's weights (or a package it needs) are not on this machine; planning turns it into exit status 2."""


def rank_of(scores: np.ndarray, index: int) -> np.ndarray:
    """Per row of scores [N, C], the 0-based rank of class `index` under the module's ranking rule."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or not 0 <= index < s.shape[1]:
        raise ValueError(f"rank_of: class index {index} outside scores of shape {s.shape}")
    own = s[:, index:index + 1]
    return (s > own).sum(1) + (s[:, :index] == own).sum(1)


def in_top_k(scores: np.ndarray, index: int, k: int) -> np.ndarray:
    """Per row: is class `index` among the k best (rank < k)?"""
    if k < 1:
        raise ValueError(f"top-k needs k >= 1, got {k}")
    return rank_of(scores, index) < k


def top_classes(scores: np.ndarray, n: int) -> np.ndarray:
    """Per row, the indices of the n best classes in rank order (a stable descending sort: ties by index)."""
    s = np.asarray(scores, dtype=np.float64)
    return np.argsort(-s, axis=1, kind="stable")[:, :n]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def concept_value(value: Any, concept: Any, what: str) -> Any:
    """A per-concept param's value: a mapping is read by the concept's name, then its target word, then
    `default` (so an entry extending `church` gets church's class); anything else is the value itself."""
    if not isinstance(value, Mapping):
        return value
    for key in (concept.name, concept.target, "default"):
        if key in value:
            return value[key]
    raise ValueError(f"{what} has no value for concept '{concept.name}' and no default (has {', '.join(value)}); "
                     f"add one, e.g. --set {what}.{concept.name}=...")


def _hf_cache() -> str:
    """The HF hub cache folder, read from the environment now (huggingface_hub reads it once, at import)."""
    return os.path.expanduser(os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME", "~/.cache/huggingface")
                              + "/hub")


def _cached_snapshot(repo: str) -> Path | None:
    """The local HF cache's snapshot folder of `repo` holding its config.json, or None; never the network."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo, "config.json", cache_dir=_hf_cache())
    except Exception:  # noqa: BLE001 - a malformed id or an unreadable cache both mean "not here"
        return None
    return Path(hit).parent if isinstance(hit, str) and os.path.isfile(hit) else None


def classifier_folder(model: str, metric: str, param: str, allow_pickle: bool, fetch: str | None = None,
                      resolve: Callable[[str], Path] | None = None) -> Path:
    """The local folder of a transformers image classifier: `model` as a folder path (relative ones through
    `resolve`, the harness's data-path rule), else as an "org/name" hub id found in the local HF cache. Checks
    config.json, preprocessor_config.json and the weights (safetensors headers intact; pickle only with
    allow_pickle). Raises JudgeUnavailable naming what is missing and how to get it; `fetch` is the hint for a
    folder that cannot be downloaded with `hf` (the style classifier)."""
    path = Path(os.path.expanduser(model))
    is_path = path.is_absolute() or model.startswith(".") or path.exists() or model.count("/") != 1
    if is_path and not path.is_absolute() and resolve is not None:
        path = resolve(model)
    folder = path if is_path else _cached_snapshot(model)
    if folder is None or not folder.is_dir():
        if is_path or fetch:
            how = fetch or f"point --set metric.{metric}.{param}= at a transformers classifier folder"
            where = (f"the folder {path} does not exist" if is_path
                     else f"{model} is not in the HF cache ({_hf_cache()})")
            raise JudgeUnavailable(f"{metric}: {where}. {how}")
        hint = download_command(model, "config.json", "model.safetensors", "preprocessor_config.json")
        raise JudgeUnavailable(
            f"{metric}: the classifier {model} is not in the local HF cache ({_hf_cache()}). On a machine with "
            f"internet run\n    {hint}\nand copy the HF cache here, or pass a local folder: "
            f"--set metric.{metric}.{param}=/path/to/folder")
    missing = [f for f in HF_FILES if not (folder / f).is_file()]
    safe = [folder / f for f in SAFE_WEIGHTS if (folder / f).is_file()]
    pickles = [folder / f for f in PICKLE_WEIGHTS if (folder / f).is_file()]
    if not safe and not pickles:
        missing.append("model.safetensors")
    if missing:
        how = fetch or ("" if is_path else "On a machine with internet run\n    " + download_command(
            model, "config.json", "model.safetensors", "preprocessor_config.json"))
        raise JudgeUnavailable(f"{metric}: {folder} lacks {', '.join(missing)} (a transformers image classifier "
                               f"folder holds config.json, preprocessor_config.json and its weights). {how}".rstrip())
    if safe and safe[0].name.endswith(".safetensors"):
        try:
            check_safetensors(safe[0])
        except ValueError as exc:
            raise JudgeUnavailable(f"{metric}: {exc}") from None
    if not safe and not allow_pickle:
        raise JudgeUnavailable(
            f"{metric}: {pickles[0]} is pickle weights with no model.safetensors beside it; pickle can run arbitrary "
            f"code when loaded, so it is refused. Convert it once, only if you trust it:\n    python -c \"from "
            f"transformers import AutoModelForImageClassification as M; M.from_pretrained('{folder}', "
            f"use_safetensors=False).save_pretrained('{folder}')\"\nor pass --set metric.{metric}.allow_pickle=true")
    return folder


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a classifier folder (plan time: no torch, no transformers)."""
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise JudgeUnavailable(f"{folder / 'config.json'} is unreadable or not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise JudgeUnavailable(f"{folder / 'config.json'} is not a JSON object")
    return data


def weights_fingerprint(folder: Path) -> dict[str, str]:
    """sha256 of each weights file (cached by size and times): enters the score key, so replacing the classifier's
    weights re-scores even at the same path."""
    from unlearn_bench.digests import file_digest

    names = [f for f in (*SAFE_WEIGHTS, *PICKLE_WEIGHTS) if (folder / f).is_file()]
    return {f: file_digest(folder / f) for f in names if not f.endswith(".json")} | (
        {"config.json": file_digest(folder / "config.json")} if (folder / "config.json").is_file() else {})


@lru_cache(maxsize=2)
def load_classifier(folder: str, device: str, allow_pickle: bool) -> tuple[Any, Any]:
    """(image processor, model) of a local transformers classifier, cached per process; eval mode, no network."""
    from unlearn_bench.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    safe = any((Path(folder) / f).is_file() for f in SAFE_WEIGHTS)
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    net = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True,
                                                          use_safetensors=safe or not allow_pickle)
    return processor, net.eval().to(device)


def hf_pixels(processor: Any, images: np.ndarray) -> Any:
    """uint8 NHWC images -> the classifier's own pixel tensor [N, 3, H, W] (its resize, crop and normalisation)."""
    from PIL import Image

    return processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")["pixel_values"]


def hf_logits(processor: Any, net: Any, images: np.ndarray, device: str, batch_size: int = 32) -> np.ndarray:
    """Logits [N, C] in float64; batching does not change them beyond float rounding."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            pixels = hf_pixels(processor, images[i:i + batch_size]).to(device)
            out.append(net(pixel_values=pixels).logits.double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, int(net.config.num_labels)))
