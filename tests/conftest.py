"""Shared fixtures. Tests run torch on one thread: on a 2-core machine that shares its cores, OpenMP's spinning
threads can slow small kernels by two orders of magnitude, and one thread keeps results reproducible."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def torch_single_thread():
    import torch

    torch.set_num_threads(1)
    return torch


@pytest.fixture(scope="session")
def registry():
    from unlearn_bench.registry import Registry

    return Registry.load()


@pytest.fixture(scope="session")
def tiny_model(torch_single_thread, registry):
    from unlearn_bench.compat import ensure_torchvision_importable
    from unlearn_bench.models.loading import load_model

    ensure_torchvision_importable()
    return load_model(registry.model("tiny"), "cpu")
