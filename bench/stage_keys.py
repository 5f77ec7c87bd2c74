"""What a stage key is made of besides the stage's own inputs: a component's identity (implementation, version,
parameters, external content) and the numeric environment (device, GPU model, torch build, CPU threads).

Both decide whether two runs may share a cached result, so they live apart from the runner that uses them: a change
here changes every key, and nowhere else may build these parts of a key.
"""

from __future__ import annotations

from typing import Any

from unlearn_bench.specs import ComponentSpec, thaw


def component_identity(spec: ComponentSpec) -> dict[str, Any]:
    """What makes a component's result differ: its implementation, version and parameters (never its name, so
    esd and esd-u with identical parameters share one cached model)."""
    ident = {"module": _module_identity(spec.module), "version": spec.version,
             "params": {k: v for k, v in thaw(spec.params).items() if k not in spec.location_params}}
    if spec.fingerprint:  # external content (a checkpoint) by digest, never by where it lives
        ident["content"] = spec.fingerprint
    if spec.wrappers:
        ident["wrappers"] = [component_identity(w) for w in spec.wrappers]
    return ident


def _module_identity(ref: str) -> str:
    """A plug-in loaded from a file (`path/to/my_method.py:Class`) is known by its content, not where it lives:
    moving the folder keeps the cache, editing the code recomputes. Importable modules are known by name."""
    from unlearn_bench.plugins import is_file_ref, split_ref

    if not is_file_ref(ref):
        return ref
    from unlearn_bench.digests import file_digest

    path, cls = split_ref(ref)
    return f"file-sha256:{file_digest(path)}:{cls}"


def numerics(device: str, threads: int | None) -> dict[str, Any]:
    """What besides the inputs changes a stage's bytes: device kind and GPU model, the torch build, and on the
    CPU the intra-op thread count (float reductions are split by thread). Measured: 1 vs 2 threads move stored
    pixels by one level; batch size does the same, so stages that sample add it themselves."""
    import torch

    dev = torch.device(device)
    env: dict[str, Any] = {"device": dev.type, "torch": torch.__version__}
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
    else:
        env["threads"] = int(threads or torch.get_num_threads())
    return env
