"""Narrow compatibility fixes for the CPU install, applied once before torch-based libraries are imported.

Why: on CPU-only machines the only torchvision wheel on PyPI that matches torch 2.13.0 is a CUDA build. Its compiled
ops fail to load, and its Python import then raises "operator torchvision::nms does not exist" (pytorch/vision#9085)
while registering fake kernels. transformers, diffusers, peft and torchmetrics import torchvision when it is present,
so that one failure breaks every model import. We register the two op schemas torchvision's meta registrations refer
to, *only* when its compiled library cannot be loaded, so its pure-Python parts (transforms) import. A working
torchvision (any GPU install) is left untouched.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_state: dict[str, object] = {}


def ensure_torchvision_importable() -> None:
    """Make `import torchvision` succeed on a CPU torch with a CUDA-only torchvision wheel (idempotent)."""
    if "done" in _state or "torchvision" in sys.modules:
        return
    _state["done"] = True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    import torch

    lib_path = next(Path(spec.origin).parent.glob("_C*.so"), None)
    if lib_path is None:
        return
    try:
        torch.ops.load_library(str(lib_path))
        return  # the compiled ops load: nothing to fix
    except (OSError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")  # noqa: TOR901 - kept alive below
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
    _state["lib"] = lib
