"""Planning: turn names into fully resolved specs and the list of cells, before any model is loaded.

Everything a user can get wrong (unknown names, bad --set keys, missing real weights, bad seeds) fails here with
exit status 2, so no expensive work starts on a run that cannot finish.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from unlearn_bench.prompts import PromptRow, PromptTable, expand, load_prompt_set
from unlearn_bench.registry import Registry, RegistryError
from unlearn_bench.specs import ComponentSpec, ConceptSpec, ModelSpec, SuiteSpec, thaw

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
    # The catalogue's layers (registry file, plug-in fragments, include files) for run.json: re-scoring or
    # re-running needs the same includes, and a reader needs to know where a plug-in entry came from.
    catalogue: list[dict[str, str]] = field(default_factory=list)
    # Method.starts_from resolved: method name -> the spec of the entry it starts from (RECE -> uce), chains included
    starts: dict[str, ComponentSpec] = field(default_factory=dict)

    def eval_seeds(self, scope: str, seed: int) -> list[int]:
        """Per-image generation seeds: derived from (run seed, scope, prompt, repeat index), so a seed's
        images are independent of batch size, of other prompts, and of the other seeds."""
        from unlearn_bench.models.base import sample_seed

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
        starts = {"starts": {k: thaw(v.__dict__) for k, v in self.starts.items()}} if self.starts else {}
        return {"name": self.name, "model": thaw(self.model.__dict__), "concept": thaw(self.concept.__dict__),
                "methods": [thaw(m.__dict__) for m in self.methods],
                "attacks": [thaw(a.__dict__) for a in self.attacks],
                "metrics": [thaw(m.__dict__) for m in self.metrics], "seeds": self.seeds,
                "prompt_sets": self.prompt_sets, "prompt_sources": self.prompt_sources, "catalogue": self.catalogue,
                **starts}


def _csv_names(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.split(",")
    return tuple(v.strip() for v in value if v.strip())


def _inline(name: str, prompts: tuple[str, ...]) -> PromptTable:
    return PromptTable(name, tuple(PromptRow(p) for p in prompts), source="concept")


def check_request(req: RunRequest) -> None:
    """The request's own shape: names given once each, seeds non-negative integers given once each."""
    for label, names in (("methods", req.methods), ("attacks", req.attacks), ("metrics", req.metrics)):
        if not names:
            raise RegistryError(f"no {label} given")
        dup = sorted({n for n in names if list(names).count(n) > 1})
        if dup:
            raise RegistryError(f"{label} listed twice: {dup}")
    seeds = list(req.seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise RegistryError(f"seeds must be non-negative integers, got {seeds}")
    dup_seeds = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup_seeds:
        raise RegistryError(f"seeds listed twice: {dup_seeds}")


def make_plan(reg: Registry, req: RunRequest, check_weights: bool = True) -> Plan:
    """Resolve every name and parameter (schemas, paths, prompt files) and list the prompts; all user errors raise
    RegistryError here, before check_available/preflight_metrics and before anything imports torch."""
    check_request(req)
    model = reg.model(req.model)
    concept = reg.concept(req.concept)
    from unlearn_bench.external_methods import resolve_external

    methods = [resolve_external(reg.method(m, model), model) for m in req.methods]  # checkpoint checks, digests
    attacks = [reg.attack(a, model) for a in req.attacks]
    metrics = [reg.metric(m, model) for m in req.metrics]
    components = ([(m, "methods") for m in methods] + [(w, "wrappers") for m in methods for w in m.wrappers]
                  + [(a, "attacks") for a in attacks] + [(m, "metrics") for m in metrics])
    problems = [p for spec, section in components for p in reg.per_concept_problems(spec, section, concept.name)]
    if problems:
        raise RegistryError("; ".join(problems))
    plan = Plan(req.name, model, concept, methods, attacks, metrics, list(req.seeds))
    plan.catalogue = [{"kind": s.kind, "source": s.name} | ({"dist": s.dist} if s.dist else {})
                      for s in reg.sources]
    scopes = {m.params.get("scope", "target") for m in metrics}
    missing: list[RegistryError] = []  # prompt files, model and metric weights: every one named in one exit-2 error
    for scope in sorted(scopes):
        if scope == "target":
            table = _collect(missing, load_prompt_set, reg, concept.eval_prompts)
        elif scope == "benign" and concept.params.get("benign_prompts"):  # e.g. coco-10k for FID/CLIP
            table = _collect(missing, load_prompt_set, reg, str(concept.params["benign_prompts"]))
        elif scope == "benign":
            table = _inline(f"{concept.name}:benign", concept.related + concept.unrelated)
        elif scope == "related":
            table = _inline(f"{concept.name}:related", concept.related)
        else:
            raise RegistryError(f"unknown metric scope '{scope}'; allowed: target, benign, related")
        if table is None:
            continue
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
        from unlearn_bench.models.loading import check_available

        _collect(missing, check_available, model)
        for spec in metrics:
            _collect(missing, preflight_metrics, [spec])
    if missing:
        raise missing[0] if len(missing) == 1 else RegistryError("\n".join(map(str, missing)), list(map(str, missing)))
    if check_weights:
        check_component_classes(methods, attacks)
    plan.starts = resolve_starts(reg, methods, model, concept.name)
    return plan


def resolve_starts(reg: Registry, methods: list[ComponentSpec], model: ModelSpec,
                   concept: str) -> dict[str, ComponentSpec]:
    """Method.starts_from for every method, resolved like a --methods name (scaled params, --set overrides,
    external checkpoints) and checked like one, following chains: method name -> the spec it starts from. An
    unknown name (RegistryError with the nearest names) or a loop stops the run here."""
    from unlearn_bench.components import component_class
    from unlearn_bench.external_methods import resolve_external
    from unlearn_bench.methods.base import Method

    starts: dict[str, ComponentSpec] = {}
    for spec in methods:
        chain = [spec.name]
        while spec.name not in starts:
            name = component_class(spec, Method).starts_from(spec)
            if not name:
                break
            if name in chain:
                raise RegistryError(f"method {chain[0]}: its start loops: {' -> '.join([*chain, name])}")
            start = resolve_external(reg.method(name, model), model)
            problems = [p for part, section in [(start, "methods"), *((w, "wrappers") for w in start.wrappers)]
                        for p in reg.per_concept_problems(part, section, concept)]
            if problems:
                raise RegistryError("; ".join(problems))
            check_component_classes([start], [])
            starts[spec.name], spec = start, start
            chain.append(name)
    return starts


def _collect(problems: list[RegistryError], check: Any, *args: Any) -> Any:
    """check(*args), or None with its RegistryError added to problems: a run missing several files (a prompt file,
    the model, a metric's weights) names them all at once instead of one per attempt."""
    try:
        return check(*args)
    except RegistryError as exc:
        problems.append(exc)
        return None


def check_component_classes(methods: list[ComponentSpec], attacks: list[ComponentSpec]) -> None:
    """Every method and wrapper class derives from Method, every attack class from WeightAttack or PromptAttack:
    a plug-in written against the wrong base stops the run at plan time (exit 2), not in each cell."""
    from unlearn_bench.attacks.base import Attack, PromptAttack, WeightAttack, neither_kind
    from unlearn_bench.components import component_class
    from unlearn_bench.methods.base import Method
    from unlearn_bench.methods_runtime import check_wrappable

    for spec in methods:
        for part in (spec, *spec.wrappers):
            component_class(part, Method)
        check_wrappable(spec)  # e.g. sld+meta: SLD changes sampling, there are no weights for +meta to train
    for spec in attacks:
        cls = component_class(spec, Attack)
        if not issubclass(cls, WeightAttack | PromptAttack):
            raise RegistryError(f"attack {spec.name}: {neither_kind(cls)}")


def preflight_metrics(metrics: list[ComponentSpec]) -> None:
    """Metrics that need local files (clip's weights; fid's Inception and reference folder) check them now, so a
    missing download stops the run with exit 2 before hours of generation rather than at the first score. Every
    metric class is checked to be a Metric and its preflight hook called (the base class's is a no-op)."""
    from unlearn_bench.components import DEFAULT_CONTEXT, component_class
    from unlearn_bench.metrics.base import Metric

    for spec in metrics:
        cls = component_class(spec, Metric)
        try:
            cls.preflight(spec, DEFAULT_CONTEXT)
        except (RuntimeError, OSError, ValueError) as exc:
            raise RegistryError(str(exc)) from exc


def _option_names(option: str, value: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-list option: None = the suite's; given but empty (--methods "") is an error, not the suite's."""
    if value is None:
        return default
    names = _csv_names(value)
    if not names:
        raise RegistryError(f"--{option} {value!r}: no names given (leave the option out to use the suite's)")
    return names


def _option_name(option: str, value: str | None, default: str) -> str:
    if value is None:
        return default
    if not value.strip():
        raise RegistryError(f"--{option} {value!r}: no name given (leave the option out to use the suite's)")
    return value.strip()


def parse_seeds(text: str) -> tuple[int, ...]:
    """`--seeds 0,1,2`: non-negative integers, each once."""
    parts = _csv_names(text)
    if not parts:
        raise RegistryError(f"--seeds {text!r}: no seeds given; expected comma-separated non-negative integers, "
                            "e.g. 0,1,2")
    bad = [p for p in parts if not p.isdigit()]
    if bad:
        raise RegistryError(f"--seeds {text!r}: {bad[0]!r} is not a non-negative integer; expected e.g. 0,1,2")
    seeds = tuple(int(p) for p in parts)
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup:
        raise RegistryError(f"--seeds {text!r}: seeds listed twice: {dup}")
    return seeds


def request_from(reg: Registry, suite: str | None, model: str | None, concept: str | None, methods: str | None,
                 attacks: str | None, metrics: str | None, seeds: str | None) -> RunRequest:
    """CLI fields override the suite's (the registry default suite when none is named). An option given empty
    (`--seeds ""`) is an error rather than a silent fall-back to the suite's value."""
    from unlearn_bench.external_methods import define_methods

    suite_name = _option_name("suite", suite, reg.default_suite())
    s = reg.suite(suite_name)
    seed_list = parse_seeds(seeds) if seeds is not None else s.seeds
    custom = any(v is not None for v in (model, concept, methods, attacks, metrics, seeds))
    concept_name = _option_name("concept", concept, s.concept)
    if metrics is not None:
        metric_names = _option_names("metrics", metrics, s.metrics)
    elif concept is not None and reg.concept(concept_name).metrics:
        metric_names = reg.concept(concept_name).metrics  # another concept brings its own judges
    else:
        metric_names = s.metrics
    return RunRequest(
        name=suite_name if (suite or not custom) else "custom",
        model=_option_name("model", model, s.model), concept=concept_name,
        methods=define_methods(reg, _option_names("methods", methods, s.methods)),  # LABEL=path:PATH items
        attacks=_option_names("attacks", attacks, s.attacks),
        metrics=metric_names, seeds=seed_list,
    )
