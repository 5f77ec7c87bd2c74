"""The plug-in API: what a method, attack or metric - bundled or third-party - may use from unlearn_bench.

A plug-in is a class named by a registry entry's `module:` string (`mypkg.erase:MyMethod`); the runner loads it by
that string only, so the core never imports a plug-in module. The bundled components in methods/, attacks/ and
metrics/ follow the same rule as anyone else: they import from unlearn_bench only the PUBLIC_MODULES below (and each
other: LoRA subclasses Finetune, AdvUnlearn reuses ESD's target), which tests/test_contract.py checks.

Public modules:
- unlearn_bench.api                  this module: the names below, re-exported
- unlearn_bench.methods.base         Method (gradient: trainable + loss; closed-form: apply; hooks prepare, finish,
                                     cleanup, diagnostics, data_requests, train_settings, sampling_guidance;
                                     changes_weights, wrap_refusal, starts_from), NoUnlearning, select_parameters,
                                     encode_images, frozen_conditions
- unlearn_bench.attacks.base         Attack, WeightAttack (steps, run; hooks data_request, eval_prompts;
                                     samples_model), PromptAttack (rewrite; hooks write_files,
                                     sampling_guidance), NoAttack, AttackData
- unlearn_bench.metrics.base         Metric (score; hooks preflight, bind, reference_key, settings, judge),
                                     MetricResult, rate, SCOPES
- unlearn_bench.components           MetricContext (device, numerics, cached, key, resolve_path), MetricResult
- unlearn_bench.specs                ComponentSpec, ConceptSpec, ModelSpec: what a component is configured with
- unlearn_bench.data                 DataRequest, ImageSet, request_for: the image sets methods and attacks ask for
- unlearn_bench.training             train, make_optimizer: the one shared training loop
- unlearn_bench.finite               NonFinite, check_loss, check_tensors, check_value
- unlearn_bench.models.base          DiffusionModel, Cond, SamplingGuidance (a method's sampling-time guidance,
                                     e.g. SLD), sample_seed, uint8_to_images, images_to_uint8
- unlearn_bench.images               IMAGE_SUFFIXES, load_images, save_images
- unlearn_bench.compat               ensure_torchvision_importable (before importing torchvision users)
- unlearn_bench.checkpoints          reading and loading weights made outside the harness (detect, load_into)
- unlearn_bench.digests              content digests of checkpoints (file_digest, cached; fingerprint of a layout)
- unlearn_bench.models.loading       weight-file safety and hints for plug-ins that load their own weights
                                     (check_safetensors, download_command)
- unlearn_bench.toy.world, .toy.judge  the toy world's caption grammar, renderer and detector (toy metrics)

Everything else (registry, plan, runner, store, prompts, execute, cli, ...) is the harness's own and may change.
"""

from __future__ import annotations

from unlearn_bench.attacks.base import Attack, AttackData, NoAttack, PromptAttack, WeightAttack
from unlearn_bench.components import MetricContext, MetricResult
from unlearn_bench.data import DataRequest, ImageSet, request_for
from unlearn_bench.finite import NonFinite, check_loss, check_tensors, check_value
from unlearn_bench.methods.base import Method, NoUnlearning, select_parameters
from unlearn_bench.metrics.base import Metric, rate
from unlearn_bench.specs import ComponentSpec, ConceptSpec, ModelSpec
from unlearn_bench.training import make_optimizer, train

PUBLIC_MODULES = (
    "unlearn_bench.api", "unlearn_bench.methods.base", "unlearn_bench.attacks.base", "unlearn_bench.metrics.base",
    "unlearn_bench.components", "unlearn_bench.specs", "unlearn_bench.data", "unlearn_bench.training",
    "unlearn_bench.finite", "unlearn_bench.models.base", "unlearn_bench.images", "unlearn_bench.compat",
    "unlearn_bench.checkpoints", "unlearn_bench.digests", "unlearn_bench.models.loading",
    "unlearn_bench.toy.world", "unlearn_bench.toy.judge",
)
PLUGIN_PACKAGES = ("unlearn_bench.methods", "unlearn_bench.attacks", "unlearn_bench.metrics")

__all__ = [
    "PLUGIN_PACKAGES", "PUBLIC_MODULES", "Attack", "AttackData", "ComponentSpec", "ConceptSpec", "DataRequest",
    "ImageSet", "Method", "Metric", "MetricContext", "MetricResult", "ModelSpec", "NoAttack", "NoUnlearning",
    "NonFinite", "PromptAttack", "WeightAttack", "check_loss", "check_tensors", "check_value", "make_optimizer",
    "rate", "request_for", "select_parameters", "train",
]
