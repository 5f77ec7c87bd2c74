"""Planning: turn names into fully resolved specs and the list of cells, before any model is loaded.

Everything a user can get wrong (unknown names, bad --set keys, missing real weights, bad seeds) fails here with
exit status 2, so no expensive work starts on a run that cannot finish.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from bench.prompts import PromptRow, PromptTable, expand, load_prompt_set
from bench.registry import Registry, RegistryError
from bench.specs import ComponentSpec, ConceptSpec, ModelSpec, SuiteSpec, thaw

RunRequest = SuiteSpec  # a run is a suite resolved with the CLI's overrides (same fields, same meaning)


@dataclass
class Plan:
    name: str
    model: ModelSpec
    concept: ConceptSpec
    methods: list[ComponentSpec]
    attacks: list[ComponentSpec]
    metrics: list[ComponentSpec]
    seeds: list[int]
    prompts: dict[str, list[str]] = field(default_factory=dict)  # scope -> prompts (one per image)
    prompt_sets: dict[str, str] = field(default_factory=dict)  # scope -> prompt set name
    # Only for prompt files that fix them (I2P/COCO CSVs, bench/prompts.py): scope -> per-image seed (None = derive)
    # and scope -> per-image guidance. Absent for inline sets, so their stage hashes are unchanged.
    fixed_seeds: dict[str, list[int | None]] = field(default_factory=dict)
    guidance: dict[str, list[float]] = field(default_factory=dict)
    prompt_sources: dict[str, dict[str, Any]] = field(default_factory=dict)  # scope -> file, format, sha256

    def eval_seeds(self, scope: str, seed: int) -> list[int]:
        """Per-image generation seeds: derived from (run seed, scope, prompt, repeat index), so a seed's
        images are independent of batch size, of other prompts, and of the other seeds."""
        from bench.models.base import sample_seed

        seen: dict[str, int] = {}
        fixed = self.fixed_seeds.get(scope)
        out = []
        for i, prompt in enumerate(self.prompts[scope]):
            j = seen[prompt] = seen.get(prompt, -1) + 1
            out.append(fixed[i] if fixed and fixed[i] is not None else sample_seed("eval", seed, scope, prompt, j))
        return out

    def eval_guidance(self, scope: str) -> list[float] | None:
        """Per-image guidance from the prompt file (I2P's evaluation_guidance), or None: the model's own."""
        return self.guidance.get(scope)

    def prompts_seeds_hash(self) -> str:
        payload = repr(sorted((s, tuple(p)) for s, p in self.prompts.items())) + repr(self.seeds)
        payload += repr({s: [self.eval_seeds(s, seed) for seed in self.seeds] for s in self.prompts})
        if self.guidance:
            payload += repr(sorted(self.guidance.items()))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def resolved(self) -> dict[str, Any]:
        return {"name": self.name, "model": thaw(self.model.__dict__), "concept": thaw(self.concept.__dict__),
                "methods": [thaw(m.__dict__) for m in self.methods],
                "attacks": [thaw(a.__dict__) for a in self.attacks],
                "metrics": [thaw(m.__dict__) for m in self.metrics], "seeds": self.seeds,
                "prompt_sets": self.prompt_sets, "prompt_sources": self.prompt_sources}


def _csv_names(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.split(",")
    return tuple(v.strip() for v in value if v.strip())


def _inline(name: str, prompts: tuple[str, ...]) -> PromptTable:
    return PromptTable(name, tuple(PromptRow(p) for p in prompts), source="concept")


def make_plan(reg: Registry, req: RunRequest, check_weights: bool = True) -> Plan:
    model = reg.model(req.model)
    concept = reg.concept(req.concept)
    methods = [reg.method(m, model) for m in req.methods]
    attacks = [reg.attack(a, model) for a in req.attacks]
    metrics = [reg.metric(m, model) for m in req.metrics]
    for label, names in (("methods", req.methods), ("attacks", req.attacks), ("metrics", req.metrics)):
        if not names:
            raise RegistryError(f"no {label} given")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise RegistryError(f"{label} listed twice: {dup}")
    if not req.seeds or any(s < 0 for s in req.seeds):
        raise RegistryError(f"seeds must be non-negative integers, got {list(req.seeds)}")
    if model.images_per_prompt < 1:
        raise RegistryError(f"model {model.name}: images_per_prompt must be >= 1")
    plan = Plan(req.name, model, concept, methods, attacks, metrics, list(req.seeds))
    scopes = {m.params.get("scope", "target") for m in metrics}
    for scope in sorted(scopes):
        if scope == "target":
            table = load_prompt_set(reg, concept.eval_prompts)
        elif scope == "benign" and concept.params.get("benign_prompts"):  # e.g. coco-10k for FID/CLIP
            table = load_prompt_set(reg, str(concept.params["benign_prompts"]))
        elif scope == "benign":
            table = _inline(f"{concept.name}:benign", concept.related + concept.unrelated)
        elif scope == "related":
            table = _inline(f"{concept.name}:related", concept.related)
        else:
            raise RegistryError(f"unknown metric scope '{scope}'; allowed: target, benign, related")
        if not table.rows:
            raise RegistryError(f"concept {concept.name}: no prompts for scope '{scope}'")
        counts = dict(concept.params.get("images", {}))
        if scope in counts:  # a fixed number of images for this scope, cycling through the prompts
            n = int(counts[scope])
            if n < 1:
                raise RegistryError(f"concept {concept.name}: params.images.{scope} must be >= 1, got {n}")
            rows, repeats = expand(table, 1, total=n)
        else:
            rows, repeats = expand(table, model.images_per_prompt)
        plan.prompts[scope] = [r.prompt for r in rows]
        if table.has_seeds:  # the file's seed for a row's first image, +1 for each further image of that row
            plan.fixed_seeds[scope] = [None if r.seed is None else r.seed + j for r, j in zip(rows, repeats,
                                                                                           strict=True)]
        if table.has_guidance:
            plan.guidance[scope] = [model.guidance if r.guidance is None else r.guidance for r in rows]
        if table.sha256:
            plan.prompt_sources[scope] = table.describe()
        plan.prompt_sets[scope] = table.name
    if check_weights:
        from bench.models.loading import check_available

        check_available(model)
        preflight_metrics(metrics)
    return plan


def preflight_metrics(metrics: list[ComponentSpec]) -> None:
    """Metrics that need local files (clip's weights; fid's Inception and reference folder) check them now, so a
    missing download stops the run with exit 2 before hours of generation rather than at the first score."""
    from bench.plugins import load_class

    for spec in metrics:
        check = getattr(load_class(spec.module), "preflight", None)
        if check is None:
            continue
        try:
            check(spec)
        except (RuntimeError, OSError, ValueError) as exc:
            raise RegistryError(str(exc)) from exc


def request_from(reg: Registry, suite: str | None, model: str | None, concept: str | None, methods: str | None,
                 attacks: str | None, metrics: str | None, seeds: str | None) -> RunRequest:
    """CLI fields override the suite's (the registry default suite when none is named)."""
    suite_name = suite or reg.default_suite()
    s = reg.suite(suite_name)
    try:
        seed_list = tuple(int(x) for x in _csv_names(seeds)) if seeds else s.seeds
    except ValueError as exc:
        raise RegistryError(f"--seeds '{seeds}': expected comma-separated integers, e.g. 0,1,2") from exc
    custom = any(v is not None for v in (model, concept, methods, attacks, metrics, seeds))
    if metrics:
        metric_names = _csv_names(metrics)
    elif concept and reg.concept(concept).metrics:
        metric_names = reg.concept(concept).metrics  # another concept brings its own judges
    else:
        metric_names = s.metrics
    return RunRequest(
        name=suite_name if (suite or not custom) else "custom",
        model=model or s.model, concept=concept or s.concept,
        methods=_csv_names(methods) if methods else s.methods,
        attacks=_csv_names(attacks) if attacks else s.attacks,
        metrics=metric_names, seeds=seed_list,
    )
