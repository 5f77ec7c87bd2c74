"""External unlearned models as methods: `--methods LABEL=path:PATH`, and the plan-time resolution of every method
built on the registry entry `external` (methods/external.py).

Why at plan time: a missing path, a folder without weights, pickle weights or tensors that do not fit the base model
must stop the run with exit status 2 before any model loads, and the checkpoint's identity in every stage key must
be a digest of its content (ComponentSpec.fingerprint), never its path, so moving a folder keeps the cache and
changing one tensor recomputes. Shapes are compared from safetensors headers; the base model's names and shapes come
from the tiny model built from config (under a second), the toy's shipped headers, or the local SD folder's headers -
SD weights are never loaded here. Torch is imported only when the tiny model is built.
"""

from __future__ import annotations

import re
import sys
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from unlearn_bench.checkpoints import (
    Layout,
    Shapes,
    check_fits,
    component_files,
    detect,
    live_shapes,
    tensor_shapes,
)
from unlearn_bench.digests import fingerprint
from unlearn_bench.errors import RegistryError
from unlearn_bench.registry import Registry
from unlearn_bench.specs import ComponentSpec, ModelSpec

EXTERNAL = "external"  # the registry entry every external method extends
EXTERNAL_MODULE = "unlearn_bench.methods.external:External"
# Params that say where the checkpoint lives or how to find it: not in any stage key (the content digest is).
LOCATION_PARAMS = ("path", "subfolder", "format", "allow_pickle")
LABEL = re.compile(r"[a-z0-9][a-z0-9_.-]*")
SYNTAX = ("LABEL=path:PATH (LABEL: lower-case letters, digits, '_', '.', '-', starting with a letter or digit; "
          "e.g. mine=path:/models/my-esd-nudity)")
TOY_WEIGHTS = Path(__file__).resolve().parent / "toy" / "weights"


# --- --methods LABEL=path:PATH ------------------------------------------------------------------------------
def define_methods(reg: Registry, names: tuple[str, ...]) -> tuple[str, ...]:
    """Each `LABEL=path:PATH` item adds the method LABEL (extends `external`, params.path = PATH) to this run's
    registry data and becomes LABEL in the returned names; other items (which may use LABEL, e.g. LABEL+meta)
    pass through. Defining a label again with the same path is a no-op, so this may run twice on one registry."""
    out = []
    for item in names:
        if "=" not in item:
            out.append(item)
            continue
        label, _, value = (s.strip() for s in item.partition("="))
        if not LABEL.fullmatch(label):
            raise RegistryError(f"--methods item {item!r}: bad label {label!r}; write {SYNTAX}")
        kind, sep, path = (s.strip() for s in value.partition(":"))
        if kind != "path" or not sep or not path:
            raise RegistryError(f"--methods item {item!r}: unknown syntax {value!r}; write {SYNTAX}")
        if EXTERNAL not in reg.data["methods"]:
            raise RegistryError(f"--methods item {item!r}: the registry {reg.path} has no '{EXTERNAL}' method to "
                                f"build on")
        entry = {"extends": EXTERNAL, "params": {"path": path}, "description": f"external checkpoint {path}"}
        known = reg.data["methods"].get(label)
        if known is not None and known != entry:
            raise RegistryError(f"--methods item {item!r}: label {label!r} is already a method of the registry "
                                f"({reg.path}); choose another label")
        reg.data["methods"][label] = entry
        out.append(label)
    return tuple(out)


def registry_for_run(path: str | Path | None, overrides: list[str], methods: str | None,
                     includes: list[str | Path] | None = None) -> Registry:
    """The registry with this run's `--methods LABEL=path:PATH` labels defined BEFORE the --set overrides are
    applied, so `--set method.LABEL.allow_pickle=true` finds LABEL (Registry.load applies overrides at once).
    `bench run` loads its registry with this; request_from defines the same labels again (idempotent), so library
    callers that skip this function still get them."""
    reg = Registry.load(path, (), includes or ())
    if methods:
        define_methods(reg, tuple(m.strip() for m in methods.split(",") if m.strip()))
    for item in overrides:
        reg.add_override(item)
    return reg


# --- plan time ------------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def base_shapes(model: ModelSpec) -> Shapes | None:
    """component -> tensor name -> shape of the base model, without loading real weights; None when unknown
    (an SD model not on disk: check_available reports that)."""
    if model.kind == "tiny":
        import torch

        from unlearn_bench.models.loading import load_model

        with torch.random.fork_rng(devices=[]):  # building draws random weights: leave the caller's RNG alone
            return live_shapes(load_model(model, "cpu"))
    try:
        if model.kind == "toy":
            folder = Path(model.path).expanduser() if model.path else TOY_WEIGHTS
            return {c: tensor_shapes(folder / f"{c}.safetensors") for c in ("unet", "text_encoder")}
        from unlearn_bench.models.loading import _local_snapshot

        snap = _local_snapshot(model)
        if snap is None:
            return None
        comps = ("unet", "text_encoder", "text_encoder_2") if model.kind == "sdxl" else ("unet", "text_encoder")
        out: Shapes = {}
        for comp in comps:
            out[comp] = {}
            for f in component_files(snap / comp):
                out[comp] |= tensor_shapes(f)
        return out
    except (OSError, RegistryError):  # damaged or pickle-only base weights: the model's own checks name them
        return None


def layout_of(spec: ComponentSpec) -> Layout:
    """Where an external method's checkpoint is and what it holds (CheckpointError names the problem)."""
    p = spec.params
    where = f"method {spec.name}: "
    if not p.get("path"):
        raise RegistryError(f"{where}no checkpoint path: `{EXTERNAL}` needs params.path. Write --methods "
                            f"{SYNTAX}, or a registry entry {{extends: {EXTERNAL}, params: {{path: PATH}}}}")
    return detect(str(p["path"]), str(p.get("format") or "auto"), p.get("subfolder") or None,
                  bool(p.get("allow_pickle")), where)


def resolve_external(spec: ComponentSpec, model: ModelSpec) -> ComponentSpec:
    """For a method built on `external`: check its checkpoint against the base model and set its content
    fingerprint and location params; say what was detected. Any other method is returned unchanged."""
    if spec.module != EXTERNAL_MODULE:
        return spec
    where = f"method {spec.name}: "
    layout = layout_of(spec)
    if layout.format != "lora" and float(spec.params.get("scale", 1.0)) != 1.0:
        raise RegistryError(f"{where}scale={spec.params['scale']} applies to LoRA files only; {layout.root} is a "
                            f"{layout.describe()}")
    base = base_shapes(model)
    counts = check_fits(layout, base, model.name, where) if base is not None else {}
    digest = fingerprint(layout)
    held = ", ".join(f"{n} {c} tensors" for c, n in sorted(counts.items())) or "not checked against the base model"
    text = f"external checkpoint {layout.root}: {layout.describe()}, {held}, sha256 {digest[:12]}"
    print(f"method {spec.name}: {text}", file=sys.stderr)
    return replace(spec, fingerprint=digest, location_params=LOCATION_PARAMS, description=text)
