"""Execute a plan: unlearn -> attack -> generate -> score, each a memoised stage in the artifact store.

The same unlearned model is computed once and reused by every attack; the same images are scored by every metric;
a changed metric re-scores without regenerating. The model is loaded only when some stage actually has to be
computed, so a fully cached re-run takes seconds.

Every stage key also holds the numeric environment (`numerics`: device, GPU model, torch version, CPU threads,
and for stages that sample, the generation batch size): those change the stored bytes, so a cache filled under
one setting is never silently reused under another. A task (seed, method, attack) that fails at any stage is
returned as a failure record and produces no rows; the other tasks go on.

Plug-ins are reached only through their contract (unlearn_bench.methods/attacks/metrics .base, bench.components):
classes come from registry `module:` strings, every hook is called unconditionally (the base classes define the
no-ops), attacks are dispatched by class (WeightAttack / PromptAttack), and a metric's own cached stage goes through
the MetricContext it is bound to. Rows are ResultRows (bench.results), handed on in their records.csv dict form.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from unlearn_bench.attacks.base import Attack, PromptAttack, WeightAttack, neither_kind
from unlearn_bench.components import MetricContext, MetricResult, build_component
from unlearn_bench.data import DataRequest, ImageSet
from unlearn_bench.finite import check_tensors, check_value
from unlearn_bench.images import load_images, read_caption_folder, save_images
from unlearn_bench.metrics.base import Metric
from unlearn_bench.plan import Plan
from unlearn_bench.progress import Progress
from unlearn_bench.results import diagnostic_rows, score_row, variant_rows
from unlearn_bench.specs import ComponentSpec, thaw
from unlearn_bench.stage_keys import component_identity, numerics
from unlearn_bench.store import Entry, NotCached, StageFailed, Store, sha256_file


class CellFailed(RuntimeError):
    """A stage of a cell failed: which stage, for what, and why (the original error's type and message)."""

    def __init__(self, stage: str, label: str, reason: str) -> None:
        self.stage, self.label, self.reason = stage, label, reason
        super().__init__(f"{stage} ({label}): {reason}")


def failure_record(plan: Plan, task: tuple[int, int, int], stage: str, what: str, reason: str) -> dict[str, Any]:
    """A failed cell as run.json lists it: which (seed, method, attack), at which stage, for what, and why."""
    seed, mi, ai = task
    return {"seed": seed, "method": plan.methods[mi].name, "attack": plan.attacks[ai].name, "stage": stage,
            "what": what, "reason": reason}


@dataclass
class State:
    """A model state to evaluate: the base weights plus an unlearning delta and/or an attack checkpoint."""

    method: str
    attack: str
    step: int
    unlearn_key: str | None
    attack_key: str | None
    files: list[Path] = field(default_factory=list)
    prompts: dict[str, list[str]] = field(default_factory=dict)  # scope -> rewritten prompts (prompt attacks)
    guidance: Any = None  # the method's sampling-time guidance (SLD), applied to every image of this state


class Runner:
    def __init__(self, plan: Plan, store: Store, device: str = "cpu", batch_size: int = 16,
                 progress: Progress | None = None, threads: int | None = None) -> None:
        self.plan = plan
        self.store = store
        self.device = device
        self.batch_size = batch_size
        self.progress = progress or Progress(quiet=True)
        self._model: Any = None
        self.model_id = plan.model.identity()
        self.numerics = numerics(device, threads)
        self.sampling_numerics = self.numerics | {"batch_size": batch_size}
        self._guidance: dict[str, Any] = {}

    def _stage(self, stage: str, inputs: dict[str, Any], compute: Any, label: str,
               sampling: bool = False) -> Entry:
        """store.get_or_compute with the numeric environment in the key; any failure becomes CellFailed naming
        the stage and what it was for (nothing is stored for it: the store only renames finished entries)."""
        inputs = inputs | {"numerics": self.sampling_numerics if sampling else self.numerics}
        try:
            return self.store.get_or_compute(stage, inputs, compute)
        except (CellFailed, NotCached):
            raise
        except StageFailed as exc:  # the same stage already failed in this run (another task or worker)
            raise CellFailed(stage, label, exc.reason) from exc
        except Exception as exc:  # noqa: BLE001 - every failure of a cell is recorded, none stops the matrix
            raise CellFailed(stage, label, f"{type(exc).__name__}: {exc}") from exc

    # --- model -----------------------------------------------------------------------------------------------
    def guidance(self, method: ComponentSpec | str) -> tuple[Any, dict[str, Any]]:
        """The method's sampling-time guidance (Method.sampling_guidance, e.g. SLD; built without training) or None,
        and what every stage that samples the model under it adds to its key: the method's identity and the resolved
        guidance (its text depends on the concept), so `none` and `sld` never share images ({} without one)."""
        spec = method if isinstance(method, ComponentSpec) else next(m for m in self.plan.methods if m.name == method)
        if spec.name not in self._guidance:
            from unlearn_bench.methods_runtime import sampling_guidance

            hook = sampling_guidance(spec, self.plan.concept)
            self._guidance[spec.name] = hook, {} if hook is None else {"sampling_guidance": {
                "method": component_identity(spec), "resolved": hook.describe()}}
        return self._guidance[spec.name]

    def model(self, deltas: list[Path] | None = None, guidance: Any = None) -> Any:
        """Base weights + deltas, sampling with `guidance` (None for the original model and the data it makes)."""
        from unlearn_bench.models.base import load_delta
        from unlearn_bench.models.loading import load_model

        if self._model is None:
            self.progress.log(f"loading model [bold]{self.plan.model.name}[/bold] on {self.device}")
            self._model = load_model(self.plan.model, self.device)
        from unlearn_bench.models.lora import is_lora_delta, merge_lora

        loaded = [load_delta(p) for p in deltas or []]
        self._model.load_state([d for d in loaded if not is_lora_delta(d)])
        for d in loaded:  # LoRA checkpoints (attacks/lora.py) are merged on top of the base + unlearned weights
            if is_lora_delta(d):
                merge_lora(self._model, d)
        self._model.sampling_guidance = guidance
        return self._model

    # --- stages ----------------------------------------------------------------------------------------------
    def data(self, req: DataRequest, seed: int, label: str) -> Entry:
        """A captioned image set: generated by the original model (seeded per image) or read from a folder."""
        p = self.plan.model
        if req.data_dir:
            folder = Path(req.data_dir).expanduser()
            files = sorted(f for f in folder.iterdir() if f.is_file()) if folder.is_dir() else []
            if not files:
                raise FileNotFoundError(f"{label}: data_dir {folder} is missing or empty")
            inputs: dict[str, Any] = {"folder": {f.name: sha256_file(f) for f in files}, "resolution": p.resolution}
        else:
            inputs = {"model": self.model_id, "sampling": p.sampling(), "prompts": req.captions(), "seed": seed,
                      "role": req.role}

        def compute(tmp: Path) -> dict[str, Any]:
            from unlearn_bench.models.base import sample_seed

            if req.data_dir:
                images, captions = read_caption_folder(Path(req.data_dir), p.resolution)
            else:
                captions = req.captions()
                self.model()
                seeds = [sample_seed("data", req.role, seed, c, i) for i, c in enumerate(captions)]
                images = self._generate(captions, seeds, label)
            names = save_images(tmp / "images", images)
            (tmp / "captions.json").write_text(json.dumps({"files": names, "captions": captions}, indent=1))
            return {"n": len(names)}

        return self._stage("data", inputs, compute, label, sampling=not req.data_dir)

    @staticmethod
    def image_set(entry: Entry) -> ImageSet:
        cap = json.loads(entry.file("captions.json").read_text())
        return ImageSet(load_images(entry.file("images"), cap["files"]), cap["captions"])

    def unlearn(self, method: ComponentSpec, seed: int) -> Entry | None:
        """The unlearned weights' delta, or None for a method whose class changes no weights (`none`)."""
        from unlearn_bench.methods_runtime import build_method, changes_weights

        if not changes_weights(method):
            return None

        c = self.plan.concept
        requests = build_method(method, c).data_requests()
        data = {role: self.data(req, seed, f"{role} data") for role, req in sorted(requests.items())}
        # Method.starts_from (RECE starts from uce): that entry's own cached stage first, its key one of our inputs
        start = self.plan.starts.get(method.name)
        start_entry = self.unlearn(start, seed) if start is not None else None
        start_files = [start_entry.file("delta.safetensors")] if start_entry else []
        inputs = {"model": self.model_id, "method": component_identity(method), "seed": seed,
                  "concept": {"target": c.target, "related": list(c.related), "unrelated": list(c.unrelated),
                              "params": thaw(c.params)},
                  "data": {role: e.key for role, e in data.items()}}
        if start_entry is not None:
            inputs["start"] = start_entry.key

        def compute(tmp: Path) -> dict[str, Any]:
            from unlearn_bench.methods_runtime import run_method
            from unlearn_bench.models.base import save_delta

            model = self.model(start_files)  # the delta stays relative to the original (it holds the start's too)
            sets = {role: self.image_set(e) for role, e in data.items()}
            result = run_method(model, method, c, seed, self.progress, data=sets)
            delta = model.delta()
            check_tensors(delta, f"unlearn {method.name}", "unlearned weights")
            save_delta(delta, tmp / "delta.safetensors", {"method": method.name})
            history = result["history"]
            return {"loss_first": history[0] if history else None, "loss_last": history[-1] if history else None,
                    "changed_tensors": len(delta), **result["diagnostics"]}

        return self._stage("unlearn", inputs, compute, f"unlearn {method.name} seed {seed}")

    def build_attack(self, spec: ComponentSpec) -> WeightAttack | PromptAttack:
        """The attack object, which must be a WeightAttack or a PromptAttack (the runner dispatches on which)."""
        attack = build_component(spec, Attack, self.plan.concept)
        if not isinstance(attack, WeightAttack | PromptAttack):
            raise TypeError(f"attack {spec.name}: {neither_kind(type(attack))}")
        return attack

    def attack(self, attack_spec: ComponentSpec, unlearned: Entry | None, method: ComponentSpec,
               seed: int) -> list[State]:
        attack = self.build_attack(attack_spec)
        base_files = [unlearned.file("delta.safetensors")] if unlearned else []
        ukey = unlearned.key if unlearned else None
        hook, hook_key = self.guidance(method)
        eval_prompts = dict(attack.eval_prompts(self.plan.prompts))  # {} = the plan's (DreamBooth: its own)
        if isinstance(attack, PromptAttack):
            return [self.prompt_attack(attack, attack_spec, method, unlearned, seed, eval_prompts)]
        steps = attack.steps()
        if steps == [0]:
            return [State(method.name, attack_spec.name, 0, ukey, None, base_files, dict(eval_prompts), hook)]
        req = attack.data_request()
        data_entry = self.data(req, seed, "attack data") if req is not None else None
        # guidance in the key only for an attack that samples the model under attack (DreamBooth's class images):
        # finetuning under `sld` trains the same weights as under `none` and shares its checkpoints
        inputs = {"model": self.model_id, "unlearned": ukey, "attack": component_identity(attack_spec),
                  "data": data_entry.key if data_entry else None, "seed": seed}
        if attack.samples_model:
            inputs |= hook_key

        def compute(tmp: Path) -> dict[str, Any]:
            from unlearn_bench.models.base import save_delta

            data = self.image_set(data_entry) if data_entry is not None else None
            label = f"attack {attack_spec.name} on {method.name}"
            model = self.model(base_files, hook)

            def save(step: int, tensors: dict | None = None, metadata: dict[str, str] | None = None) -> None:
                # default: the changed base tensors; an attack may store its own tensors instead (LoRA factors)
                payload = model.delta() if tensors is None else tensors
                check_tensors(payload, label, "checkpoint weights", step)
                save_delta(payload, tmp / f"step-{step}.safetensors", {**(metadata or {}), "step": str(step)})

            attack.run(model, data, seed, save, self.progress)
            return {"steps": steps}

        entry = self._stage("attack", inputs, compute, f"attack {attack_spec.name} on {method.name} seed {seed}")
        # base_files first: a checkpoint may hold only what the attack adds (LoRA factors, or nothing at step 0)
        return [State(method.name, attack_spec.name, s, ukey, entry.key,
                      [*base_files, entry.file(f"step-{s}.safetensors")], dict(eval_prompts), hook) for s in steps]

    def metric(self, spec: ComponentSpec) -> Metric:
        """The metric object, bound to this runner's context (device, numeric environment, store)."""
        metric = build_component(spec, Metric, self.plan.concept)
        metric.bind(MetricContext(device=self.device, numerics=self.numerics, store=self.store))
        return metric

    def judge(self) -> Any:
        """The concept's first binary metric, as a per-image judge for prompt attacks."""
        name = (self.plan.concept.metrics or ("",))[0]
        spec = next((m for m in self.plan.metrics if m.name == name), None)
        if spec is None:
            raise ValueError(f"prompt attacks need the concept's judge metric '{name}' in --metrics")
        return self.metric(spec).judge

    def prompt_attack(self, attack: PromptAttack, spec: ComponentSpec, method: ComponentSpec,
                      unlearned: Entry | None, seed: int, eval_prompts: dict[str, list[str]]) -> State:
        """Adversarial rewrites of the target prompts (the attack's eval_prompts' if it gives them), found against
        the unlearned model."""
        base_files = [unlearned.file("delta.safetensors")] if unlearned else []
        prompts, seeds = eval_prompts.get("target", self.plan.prompts["target"]), self.plan.eval_seeds("target", seed)
        judge_name = (self.plan.concept.metrics or ("",))[0]
        guidance = self.plan.eval_guidance("target")  # per-prompt (I2P files) or None = the model's guidance
        inputs = {"model": self.model_id, "unlearned": unlearned.key if unlearned else None,
                  "attack": component_identity(spec), "prompts": prompts, "seeds": seeds, "seed": seed,
                  "sampling": self.plan.model.sampling(), "judge": judge_name}
        if guidance is not None:
            inputs["guidance"] = guidance
        judge_spec = next((m for m in self.plan.metrics if m.name == judge_name), None)
        if judge_spec is not None and set(judge_spec.params) - {"scope"}:  # its settings decide where the attack
            inputs["judge_spec"] = component_identity(judge_spec)  # stops (a top-k, a classifier); none: key kept
        hook, hook_key = self.guidance(method)  # the attacked model samples (pre-check, judge loop) with it
        inputs |= hook_key

        def compute(tmp: Path) -> dict[str, Any]:
            model = self.model(base_files, hook)
            rewrites, info = attack.rewrite(model, prompts, seeds, self.judge(),
                                            original=lambda: self.model([]), progress=self.progress,
                                            guidance=guidance)
            self.model(base_files, hook)
            attack.write_files(tmp)  # what evaluating the rewrites needs besides them (a probe's start latents)
            (tmp / "prompts.json").write_text(json.dumps({"prompts": prompts, "rewrites": rewrites, "info": info},
                                                         indent=1, default=str))
            return {"n": len(rewrites)}

        entry = self._stage("attack", inputs, compute, f"attack {spec.name} on {method.name} seed {seed}")
        found = json.loads(entry.file("prompts.json").read_text())
        hook = attack.sampling_guidance(found["info"], entry.file, hook)  # the method's own unless a probe's
        return State(method.name, spec.name, 0, unlearned.key if unlearned else None, entry.key, base_files,
                     eval_prompts | {"target": found["rewrites"]}, hook)

    def _generate(self, prompts: list[str], seeds: list[int], label: str, guidance: list[float] | None = None) -> Any:
        task = self.progress.add(label, len(prompts))
        try:
            return self._model.sample(prompts, seeds, guidance=guidance, batch_size=self.batch_size,
                                      on_batch=lambda n: self.progress.advance(task, n))
        finally:
            self.progress.done(task)

    def generate(self, state: State, scope: str, seed: int) -> Entry:
        prompts = state.prompts.get(scope, self.plan.prompts[scope])
        seeds = self.plan.eval_seeds(scope, seed)
        guidance = self.plan.eval_guidance(scope)  # per-prompt (I2P files) or None = the model's guidance
        inputs = {"model": self.model_id, "state": [state.unlearn_key, state.attack_key, state.step],
                  "sampling": self.plan.model.sampling(), "prompts": prompts, "seeds": seeds}
        if guidance is not None:
            inputs["guidance"] = guidance
        inputs |= self.guidance(state.method)[1]
        hooked = {} if state.guidance is None else {"sampling_guidance": state.guidance.describe()}

        def compute(tmp: Path) -> dict[str, Any]:
            self.model(state.files, state.guidance)
            images = self._generate(prompts, seeds, f"generate {state.method}/{state.attack}@{state.step}", guidance)
            names = save_images(tmp / "images", images)
            info = {"files": names, "prompts": prompts, "seeds": seeds} | ({"guidance": guidance} if guidance else {})
            (tmp / "images.json").write_text(json.dumps(info | hooked, indent=1))
            return {"n": len(names)} | hooked

        label = f"generate {state.method}/{state.attack}@{state.step} seed {seed}"
        return self._stage("generate", inputs, compute, label, sampling=True)

    def score(self, images: Entry, metric_spec: ComponentSpec) -> Entry:
        inputs = {"images": images.key, "metric": component_identity(metric_spec),
                  "concept": self.plan.concept.target}
        metric = self.metric(metric_spec)
        reference = metric.reference_key()  # data outside the params (fid: its reference folder's features key)
        if reference is not None:
            inputs["reference"] = reference

        def compute(tmp: Path) -> dict[str, Any]:
            info = json.loads(images.file("images.json").read_text())
            arr = load_images(images.file("images"), info["files"])
            result = metric.score(arr, info["prompts"])
            if not isinstance(result, MetricResult):
                raise TypeError(f"metric {metric_spec.name}: score() returned {type(result).__name__}, not a "
                                f"MetricResult (unlearn_bench.metrics.base)")
            check_value(result.value, f"metric {metric_spec.name}", "value")
            (tmp / "per_image.json").write_text(json.dumps(result.per_image, indent=1, default=str))
            meta = {"value": result.value, "stderr": result.stderr, "n": result.n, "settings": metric.settings()}
            return meta | result.extra_meta()

        return self._stage("score", inputs, compute, f"score {metric_spec.name}")

    # --- the matrix ------------------------------------------------------------------------------------------
    @staticmethod
    def task_list(plan: Plan) -> list[tuple[int, int, int]]:
        """Units of work in canonical order: (seed, method index, attack index). Each depends only on stages a
        lock-protected store already shares (data, unlearn), so any set of workers may take them in any order."""
        return [(s, m, a) for s in plan.seeds for m in range(len(plan.methods)) for a in range(len(plan.attacks))]

    def tasks(self) -> list[tuple[int, int, int]]:
        return self.task_list(self.plan)

    def run_task(self, task: tuple[int, int, int]) -> list[dict[str, Any]]:
        """Rows of one (seed, method, attack): unlearn (cached/shared), attack, generate, score."""
        plan = self.plan
        seed, mi, ai = task
        method, attack_spec = plan.methods[mi], plan.attacks[ai]
        unlearned = self.unlearn(method, seed)
        rows = diagnostic_rows(plan, method.name, unlearned, seed) if ai == 0 else []
        for state in self.attack(attack_spec, unlearned, method, seed):
            for scope in sorted(plan.prompts):
                images = self.generate(state, scope, seed)
                for metric_spec in plan.metrics:
                    if metric_spec.params.get("scope", "target") != scope:
                        continue
                    scored = self.score(images, metric_spec)
                    row = score_row(plan, state, metric_spec, scored, images, seed, scope)
                    if state.guidance is not None:  # e.g. sampler "ddim+sld"; the parameters: generate manifest
                        row = replace(row, sampler=f"{row.sampler}+{state.guidance.name}")
                    rows += variant_rows(row, scored.meta)
        return [r.as_record() for r in rows]

    def run(self) -> list[dict[str, Any]]:
        """Every task's rows; the first failure raises (library use and tests; `bench run` uses run_all)."""
        rows: list[dict[str, Any]] = []
        for task in self.tasks():
            rows += self.run_task(task)
        return rows

    def task_result(self, task: tuple[int, int, int]) -> tuple:
        """try_task plus what the task did to the store: (task, rows, failure, counts delta, entries used) - the
        one record every executor (in-process, workers, submitit jobs) hands to the collector."""
        before, seen = dict(self.store.counts), set(self.store.touched)
        rows, failure = self.try_task(task)
        counts = {k: v - before.get(k, 0) for k, v in self.store.counts.items()}
        return task, rows, failure, counts, sorted(self.store.touched - seen)

    def try_task(self, task: tuple[int, int, int]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """(rows, None) or ([], failure record): a failed cell yields no rows at all, not even its finished
        steps, so a partly diverged relearning curve can never be read as a shorter, complete one."""
        try:
            return self.run_task(task), None
        except CellFailed as exc:
            return [], self.failure(task, exc.stage, exc.label, exc.reason)
        except NotCached:
            raise
        except Exception as exc:  # noqa: BLE001 - outside any stage (building the attack or metric objects)
            return [], self.failure(task, "setup", "building the cell", f"{type(exc).__name__}: {exc}")

    def failure(self, task: tuple[int, int, int], stage: str, label: str, reason: str) -> dict[str, Any]:
        return failure_record(self.plan, task, stage, label, reason)


__all__ = ["CellFailed", "Runner", "State", "component_identity", "failure_record", "numerics", "variant_rows"]
