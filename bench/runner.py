"""Execute a plan: unlearn -> attack -> generate -> score, each a memoised stage in the artifact store.

The same unlearned model is computed once and reused by every attack; the same images are scored by every metric;
a changed metric re-scores without regenerating. The model is loaded only when some stage actually has to be
computed, so a fully cached re-run takes seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.images import load_images, read_caption_folder, save_images
from bench.plan import Plan
from bench.plugins import load_class
from bench.progress import Progress
from bench.specs import ComponentSpec, thaw
from bench.store import Entry, Store, sha256_file


def component_identity(spec: ComponentSpec) -> dict[str, Any]:
    """What makes a component's result differ: its implementation, version and parameters (never its name, so
    esd and esd-u with identical parameters share one cached model)."""
    ident = {"module": spec.module, "version": spec.version, "params": thaw(spec.params)}
    if spec.wrappers:
        ident["wrappers"] = [component_identity(w) for w in spec.wrappers]
    return ident


@dataclass
class State:
    """A model state to evaluate: the base weights plus an unlearning delta and/or an attack checkpoint."""

    method: str
    attack: str
    step: int
    unlearn_key: str | None
    attack_key: str | None
    files: list[Path] = field(default_factory=list)


class Runner:
    def __init__(self, plan: Plan, store: Store, device: str = "cpu", batch_size: int = 16,
                 progress: Progress | None = None) -> None:
        self.plan = plan
        self.store = store
        self.device = device
        self.batch_size = batch_size
        self.progress = progress or Progress(quiet=True)
        self._model: Any = None
        self.model_id = plan.model.identity()

    # --- model -----------------------------------------------------------------------------------------------
    def model(self, deltas: list[Path] | None = None) -> Any:
        from bench.models.base import load_delta
        from bench.models.loading import load_model

        if self._model is None:
            self.progress.log(f"loading model [bold]{self.plan.model.name}[/bold] on {self.device}")
            self._model = load_model(self.plan.model, self.device)
        self._model.load_state([load_delta(p) for p in deltas or []])
        return self._model

    # --- stages ----------------------------------------------------------------------------------------------
    def unlearn(self, method: ComponentSpec, seed: int) -> Entry | None:
        if method.module == "methods.base:NoUnlearning" and not method.wrappers:
            return None
        c = self.plan.concept
        inputs = {"model": self.model_id, "method": component_identity(method), "seed": seed,
                  "concept": {"target": c.target, "related": list(c.related), "unrelated": list(c.unrelated),
                              "params": thaw(c.params)}}

        def compute(tmp: Path) -> dict[str, Any]:
            from bench.methods_runtime import run_method

            model = self.model()
            history = run_method(model, method, c, seed, self.progress)
            from bench.models.base import save_delta

            delta = model.delta()
            save_delta(delta, tmp / "delta.safetensors", {"method": method.name})
            return {"loss_first": history[0] if history else None, "loss_last": history[-1] if history else None,
                    "changed_tensors": len(delta)}

        return self.store.get_or_compute("unlearn", inputs, compute)

    def attack_data(self, attack: Any, seed: int) -> Entry | None:
        req = attack.data_request()
        if req is None:
            return None
        p = self.plan.model
        if req.get("data_dir"):
            folder = Path(req["data_dir"]).expanduser()
            files = sorted(f for f in folder.iterdir() if f.is_file()) if folder.is_dir() else []
            inputs = {"folder": {f.name: sha256_file(f) for f in files}, "resolution": p.resolution}
        else:
            prompts = [req["prompts"][i % len(req["prompts"])] for i in range(req["n_images"])]
            inputs = {"model": self.model_id, "sampling": p.sampling(), "prompts": prompts, "seed": seed}

        def compute(tmp: Path) -> dict[str, Any]:
            from bench.models.base import sample_seed

            if req.get("data_dir"):
                images, captions = read_caption_folder(Path(req["data_dir"]), p.resolution)
            else:
                captions = inputs["prompts"]
                seeds = [sample_seed("attack-data", seed, i) for i in range(len(captions))]
                images = self._generate(captions, seeds, "attack data")
            names = save_images(tmp / "images", images)
            (tmp / "captions.json").write_text(json.dumps({"files": names, "captions": captions}, indent=1))
            return {"n": len(names)}

        return self.store.get_or_compute("data", inputs, compute)

    def attack(self, attack_spec: ComponentSpec, unlearned: Entry | None, method: ComponentSpec,
               seed: int) -> list[State]:
        attack = load_class(attack_spec.module)(attack_spec, self.plan.concept)
        base_files = [unlearned.file("delta.safetensors")] if unlearned else []
        ukey = unlearned.key if unlearned else None
        steps = attack.steps()
        if steps == [0]:
            return [State(method.name, attack_spec.name, 0, ukey, None, base_files)]
        data_entry = self.attack_data(attack, seed)
        inputs = {"model": self.model_id, "unlearned": ukey, "attack": component_identity(attack_spec),
                  "data": data_entry.key if data_entry else None, "seed": seed}

        def compute(tmp: Path) -> dict[str, Any]:
            from attacks.base import AttackData
            from bench.models.base import save_delta

            data = None
            if data_entry is not None:
                cap = json.loads(data_entry.file("captions.json").read_text())
                data = AttackData(load_images(data_entry.file("images"), cap["files"]), cap["captions"])
            model = self.model(base_files)

            def save(step: int) -> None:
                save_delta(model.delta(), tmp / f"step-{step}.safetensors", {"step": str(step)})

            attack.run(model, data, seed, save, self.progress)
            return {"steps": steps}

        entry = self.store.get_or_compute("attack", inputs, compute)
        return [State(method.name, attack_spec.name, s, ukey, entry.key, [entry.file(f"step-{s}.safetensors")])
                for s in steps]

    def _generate(self, prompts: list[str], seeds: list[int], label: str) -> Any:
        task = self.progress.add(label, len(prompts))
        try:
            return self._model.sample(prompts, seeds, batch_size=self.batch_size,
                                      on_batch=lambda n: self.progress.advance(task, n))
        finally:
            self.progress.done(task)

    def generate(self, state: State, scope: str, seed: int) -> Entry:
        prompts = self.plan.prompts[scope]
        seeds = self.plan.eval_seeds(scope, seed)
        inputs = {"model": self.model_id, "state": [state.unlearn_key, state.attack_key, state.step],
                  "sampling": self.plan.model.sampling(), "prompts": prompts, "seeds": seeds}

        def compute(tmp: Path) -> dict[str, Any]:
            self.model(state.files)
            images = self._generate(prompts, seeds, f"generate {state.method}/{state.attack}@{state.step}")
            names = save_images(tmp / "images", images)
            (tmp / "images.json").write_text(json.dumps({"files": names, "prompts": prompts, "seeds": seeds},
                                                        indent=1))
            return {"n": len(names)}

        return self.store.get_or_compute("generate", inputs, compute)

    def score(self, images: Entry, metric_spec: ComponentSpec) -> Entry:
        inputs = {"images": images.key, "metric": component_identity(metric_spec),
                  "concept": self.plan.concept.target}

        def compute(tmp: Path) -> dict[str, Any]:
            metric = load_class(metric_spec.module)(metric_spec, self.plan.concept)
            info = json.loads(images.file("images.json").read_text())
            arr = load_images(images.file("images"), info["files"])
            result = metric.score(arr, info["prompts"])
            (tmp / "per_image.json").write_text(json.dumps(result.per_image, indent=1, default=str))
            return {"value": result.value, "stderr": result.stderr, "n": result.n, "settings": metric.settings()}

        return self.store.get_or_compute("score", inputs, compute)

    # --- the matrix ------------------------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        plan = self.plan
        rows: list[dict[str, Any]] = []
        for seed in plan.seeds:
            for method in plan.methods:
                unlearned = self.unlearn(method, seed)
                for attack_spec in plan.attacks:
                    for state in self.attack(attack_spec, unlearned, method, seed):
                        for scope in sorted(plan.prompts):
                            images = self.generate(state, scope, seed)
                            for metric_spec in plan.metrics:
                                if metric_spec.params.get("scope", "target") != scope:
                                    continue
                                scored = self.score(images, metric_spec)
                                rows.append(self._row(state, metric_spec, scored, images, seed, scope))
        return rows

    def _row(self, state: State, metric: ComponentSpec, scored: Entry, images: Entry, seed: int,
             scope: str) -> dict[str, Any]:
        m, meta = self.plan.model, scored.meta
        return {
            "suite": self.plan.name, "model": m.name, "concept": self.plan.concept.name, "method": state.method,
            "attack": state.attack, "attack_step": state.step, "metric": metric.name, "seed": seed,
            "value": meta["value"], "stderr": meta["stderr"], "n": meta["n"],
            "higher_is_better": bool(metric.higher_is_better), "metric_version": metric.version,
            "cell_hash": scored.key, "prompt_set": self.plan.prompt_sets[scope], "sampler": m.sampler,
            "steps": m.steps, "guidance": m.guidance, "images_per_prompt": m.images_per_prompt,
            "resolution": m.resolution, "metric_settings": json.dumps(meta.get("settings", {}), sort_keys=True),
            "unlearn_key": state.unlearn_key or "", "attack_key": state.attack_key or "", "images_key": images.key,
        }
