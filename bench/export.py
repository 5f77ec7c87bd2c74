"""`bench export RESULTS_DIR`: take any model state a run evaluated out of the store as a standard diffusers model.

Why: unlearned and attacked models exist only as deltas in the content-addressed store (an unlearn delta, then an
attack checkpoint: full tensor values, or LoRA factors, or adversarial prompts), readable only by the harness. A
user who wants to inspect, share or re-evaluate one elsewhere needs an ordinary diffusers folder.

How: the state is rebuilt exactly as the runner builds it for generation (Runner.model: load_model(spec), then the
deltas in order, LoRA factors merged), so the exported weights are the evaluated weights, not a re-implementation
of them. The selection (method, attack, step, seed) is resolved against records.csv (the stage keys the run
scored) and every input is checked - results dir, names, store entries, destination - before any model is loaded.
The folder is written beside the destination and renamed into place, so a failed export leaves nothing behind.

Layouts: SD 1.x/2.x and tiny -> a StableDiffusionPipeline folder (safety checker omitted: the harness evaluates
the weights without one); SDXL -> its loaded pipeline, saved as is; the toy model has no VAE (a lossless Haar
codec), so only its unet/text_encoder/tokenizer/scheduler folders are written, with a README saying so.
`only_changed` writes just the components whose weights differ from the base (AdvUnlearn's text-encoder layout).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearn_bench.errors import RegistryError, suggest

FORMAT = "unlearn-bench-export-v1"
ORDER = ("unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler", "vae")


@dataclass
class Selection:
    """One evaluated state of a run: which cell it is and the store keys it was built from."""

    method: str
    attack: str
    step: int
    seed: int
    unlearn_key: str
    attack_key: str
    images: dict[str, str] = field(default_factory=dict)  # scope -> generate key the run scored


def _choose(kind: str, value: Any, have: list[Any], where: str, option: str) -> Any:
    """The requested value, or the only one there is; else a RegistryError listing what is allowed."""
    if value is None:
        if len(have) == 1:
            return have[0]
        raise RegistryError(f"{where} has several {kind}s {have}: pass {option} with one of them")
    if str(value) not in [str(h) for h in have]:
        hint = suggest(str(value), [str(h) for h in have])
        raise RegistryError(f"{option} {value!r}: not in {where}.{hint} Available: {', '.join(map(str, have))}")
    return next(h for h in have if str(h) == str(value))


def select(results: Path, run: dict[str, Any], records: list[dict[str, str]], method: str, attack: str,
           step: int | None, seed: int | None) -> Selection:
    """Resolve the user's choice against the rows the run wrote (failed cells have none: say so, with why)."""
    where = f"{results}/records.csv"
    rows = [r for r in records if not r["metric"].startswith("meta-")]  # diagnostics are not evaluated states
    if not rows:
        raise RegistryError(f"{where} has no rows: the run evaluated no state to export")
    failed = [f for f in run.get("failures", []) if f.get("method") == method and f.get("attack") == attack]
    if failed and not any(r["method"] == method and r["attack"] == attack for r in rows):
        f = failed[0]
        raise RegistryError(f"{method} x {attack} failed in this run (seed {f.get('seed')}, {f.get('stage')}: "
                            f"{f.get('reason')}); nothing to export. Re-run `bench run` to retry it")
    method = _choose("method", method, list(dict.fromkeys(r["method"] for r in rows)), where, "--method")
    rows = [r for r in rows if r["method"] == method]
    attack = _choose("attack", attack, list(dict.fromkeys(r["attack"] for r in rows)), f"{where} for {method}",
                     "--attack")
    rows = [r for r in rows if r["attack"] == attack]
    seeds = sorted({int(r["seed"]) for r in rows})
    seed = _choose("seed", seed, seeds, f"{where} for {method} x {attack}", "--seed")
    rows = [r for r in rows if int(r["seed"]) == seed]
    steps = sorted({int(r["attack_step"]) for r in rows})
    step = _choose("step", step, steps, f"{where} for {method} x {attack} seed {seed}", "--step")
    rows = [r for r in rows if int(r["attack_step"]) == step]
    keys = {(r["unlearn_key"], r["attack_key"]) for r in rows}
    if len(keys) != 1:
        raise RegistryError(f"{where}: the rows of {method} x {attack}@{step} seed {seed} name different store "
                            f"keys {sorted(keys)}; the file was edited or merged from several runs")
    scope_of = {m["name"]: m.get("params", {}).get("scope", "target") for m in run["plan"]["metrics"]}
    images = {scope_of[r["metric"]]: r["images_key"] for r in rows if r["metric"] in scope_of and r["images_key"]}
    (ukey, akey), = keys
    return Selection(method, attack, step, seed, ukey, akey, images)


def store_roots(results: Path, run: dict[str, Any], store: Path | None) -> list[Path]:
    """Where the run's entries may be: --store alone if given, else the store run.json names, $BENCH_CACHE and
    the `bench run` default beside the results (the first two are what `bench report`/`bench score` use)."""
    if store is not None:
        return [store]
    roots = [Path(run["store"])] if run.get("store") else []
    if os.environ.get("BENCH_CACHE"):
        roots.append(Path(os.environ["BENCH_CACHE"]))
    roots.append(results.resolve().parent / ".store")
    return list(dict.fromkeys(roots))


def find_entries(sel: Selection, roots: list[Path]) -> tuple[Any, list[Path], Path | None]:
    """(store, delta files in the runner's order, prompts file or None) from the first root holding every entry
    the state needs; else a RegistryError naming the missing key and every place looked."""
    from unlearn_bench.store import Store

    misses = []
    for root in roots:
        store = Store(root)
        files: list[Path] = []
        prompts: Path | None = None
        missing = None
        if sel.unlearn_key:
            entry = store.lookup("unlearn", sel.unlearn_key)
            if entry is None:
                missing = f"unlearn entry {sel.unlearn_key} (looked in {store.path('unlearn', sel.unlearn_key)})"
            else:
                files.append(entry.file("delta.safetensors"))
        if missing is None and sel.attack_key:
            entry = store.lookup("attack", sel.attack_key)
            listed = set(entry.manifest.get("files", {})) if entry else set()
            if entry is None:
                missing = f"attack entry {sel.attack_key} (looked in {store.path('attack', sel.attack_key)})"
            elif "prompts.json" in listed:
                prompts = entry.file("prompts.json")
            elif f"step-{sel.step}.safetensors" in listed:
                files.append(entry.file(f"step-{sel.step}.safetensors"))
            else:
                have = sorted(n for n in listed if n.startswith("step-"))
                missing = f"step-{sel.step}.safetensors of attack entry {sel.attack_key} (it holds {have})"
        if missing is None:
            return store, files, prompts
        misses.append(f"{root}: no {missing}")
    raise RegistryError(f"the store entries of {sel.method} x {sel.attack}@{sel.step} seed {sel.seed} were not "
                        f"found: " + "; ".join(misses) + ". Pass --store, or re-run `bench run` to recompute them")


def check_destination(dest: Path, force: bool) -> None:
    """Refuse to overwrite anything but an empty folder or, with force, a previous export (a folder holding
    export.json): a mistyped --to must never delete a results dir or a checkpoint."""
    if not dest.exists():
        return
    if not dest.is_dir():
        raise RegistryError(f"--to {dest}: exists and is not a directory")
    entries = sorted(p.name for p in dest.iterdir())
    if not entries:
        return
    if not force:
        raise RegistryError(f"--to {dest}: exists and is not empty ({', '.join(entries[:5])}"
                            f"{', ...' if len(entries) > 5 else ''}); pass --force to replace a previous export")
    if "export.json" not in entries:
        raise RegistryError(f"--to {dest}: --force replaces only a previous export (a folder with export.json); "
                            f"this one holds other files ({', '.join(entries[:5])}). Choose another --to")


def build_state(run: dict[str, Any], store: Any, files: list[Path], device: str) -> Any:
    """The model exactly as the runner evaluates this state (Runner.model: base, then deltas, LoRA merged)."""
    from unlearn_bench.plan import Plan
    from unlearn_bench.runner import Runner
    from unlearn_bench.score import concept_from, model_from

    plan_d = run["plan"]
    plan = Plan(plan_d["name"], model_from(plan_d["model"]), concept_from(plan_d["concept"]), [], [], [],
                list(plan_d["seeds"]))
    return Runner(plan, store, device=device).model(files)


def changed_components(model: Any) -> list[str]:
    """The trainable components with any tensor different from the base model's (the runner's snapshot)."""
    import torch

    model.snapshot()  # a no-op after load_state; the base weights are what `_original` holds
    original = model._original
    changed = {k.split(".", 1)[0] for k, v in model.named_parameters().items()
               if not torch.equal(v.detach(), original[k].to(v.device))}
    return [c for c in ORDER if c in changed]


def _scheduler(model: Any) -> Any:
    """The base model's scheduler class from its config (SD, tiny), else the harness's sampler (the toy model's
    config names no class: it trains with DDPM and samples with the spec's sampler)."""
    import diffusers

    cls = getattr(diffusers, str(model.scheduler_config.get("_class_name", "")), None)
    if isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin):
        return cls.from_config(model.scheduler_config)
    return model.sampler()


def _save(obj: Any, folder: Path) -> None:
    """save_pretrained in safetensors (transformers 5 always writes them and takes no safe_serialization)."""
    import inspect

    kwargs = {"safe_serialization": True} if "safe_serialization" in inspect.signature(obj.save_pretrained).parameters \
        else {}
    obj.save_pretrained(str(folder), **kwargs)


@contextmanager
def _quiet_saving() -> Iterator[None]:
    """transformers 5 draws a progress bar per saved model; the command prints its own one-line summary."""
    from transformers.utils import logging as tlog

    was = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tlog.enable_progress_bar()


def write_weights(model: Any, dest: Path, only: list[str] | None) -> str:
    """Write the model's components under dest; returns the layout ('StableDiffusionPipeline',
    'StableDiffusionXLPipeline', or 'components' for only-changed exports and the VAE-less toy model)."""
    from unlearn_bench.models.codecs import VAECodec

    pipe = getattr(model, "pipe", None)  # SDXL keeps its loaded pipeline; its modules are the model's
    if pipe is None and isinstance(model.codec, VAECodec):
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(vae=model.codec.vae, text_encoder=model.text_encoder,
                                       tokenizer=model.tokenizer, unet=model.unet, scheduler=_scheduler(model),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    layout = type(pipe).__name__ if pipe is not None and only is None else "components"
    with _quiet_saving():
        if layout != "components":
            pipe.save_pretrained(str(dest), safe_serialization=True)
        else:
            modules = model.modules()
            for name in only if only is not None else list(modules):
                _save(modules[name], dest / name)
            if only is None:  # the toy model: its text side and scheduler too: a whole model but for the VAE
                _save(model.tokenizer, dest / "tokenizer")
                _save(_scheduler(model), dest / "scheduler")
    pickles = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.suffix in (".bin", ".pt", ".ckpt"))
    if pickles:  # a library that changed its default must not silently hand users pickle files
        raise RuntimeError(f"a component was saved as pickle, not safetensors: {pickles}")
    return layout


def _readme(info: dict[str, Any]) -> str:
    s = info["state"]
    head = (f"# {s['method']} x {s['attack']}@{s['step']} (seed {s['seed']}), model {info['base_model']['name']}\n\n"
            f"Exported by `bench export` from {info['results_dir']}; provenance and checksums in export.json.\n\n")
    if info["loadable_with"]:
        body = (f"Load it with `diffusers.{info['loadable_with']}.from_pretrained(\"<this folder>\")`. "
                "There is no safety checker: the benchmark evaluates the weights alone.\n")
    elif info["only_changed"]:
        body = (f"Only the components whose weights differ from the base model are here: "
                f"{', '.join(info['components_written']) or 'none'}. Load each with its class's from_pretrained "
                f"(e.g. `UNet2DConditionModel.from_pretrained(folder, subfolder=\"unet\")`) and pass it to the "
                f"base pipeline's from_pretrained (e.g. `unet=unet`).\n")
    else:
        body = ("THIS IS NOT A StableDiffusionPipeline: the toy model has no VAE. Its latents are a lossless "
                f"{info['codec']['name']} transform of the image ({info['codec']['latent_channels']} channels at "
                f"1/{info['codec']['scale_factor']} resolution); decode them with "
                "`unlearn_bench.toy.model.CODECS[name]().decode(latents)`. The unet/, text_encoder/, tokenizer/ and "
                "scheduler/ folders load with UNet2DConditionModel, CLIPTextModel, CLIPTokenizer and the scheduler "
                "class named in scheduler/scheduler_config.json.\n")
    sm = info["sampling"]
    body += (f"\nThe benchmark sampled it with {sm['sampler']}, {sm['steps']} steps, guidance {sm['guidance']}, at "
             f"{sm['resolution']}x{sm['resolution']}.\n")
    if info["prompts_file"]:
        body += (f"\n{info['prompts_file']}: the adversarial prompts the attack found ('rewrites', one per original "
                 f"prompt in 'prompts'); the weights are the unlearned model's, which the attack did not change.\n")
    return head + body


def _files(root: Path) -> dict[str, dict[str, Any]]:
    from unlearn_bench.store import sha256_file

    return {str(p.relative_to(root)): {"sha256": sha256_file(p), "size": p.stat().st_size}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in ("export.json", "README.md")}


def _place(tmp: Path, dest: Path) -> None:
    """Rename the finished export into place (a previous export is moved aside first, then deleted)."""
    old = None
    if dest.exists():
        if any(dest.iterdir()):
            old = dest.with_name(f".{dest.name}.replaced-{os.getpid()}-{time.time_ns()}")
            os.replace(dest, old)
        else:
            dest.rmdir()
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_state(results: Path, method: str, to: Path, attack: str = "none", step: int | None = None,
                 seed: int | None = None, only_changed: bool = False, force: bool = False,
                 store: Path | None = None, device: str = "cpu") -> dict[str, Any]:
    """Export one evaluated state of `results` to `to`; returns what export.json holds. Bad input raises
    RegistryError before a model is loaded (all but --only-changed on an unchanged state, known only after)."""
    from unlearn_bench.score import load_run

    if not results.is_dir():
        raise RegistryError(f"results dir {results}: no such directory (a `bench run --out` folder)")
    run, records = load_run(results)
    sel = select(results, run, records, method, attack, step, seed)
    st, files, prompts = find_entries(sel, store_roots(results, run, store))
    check_destination(to, force)
    try:
        to.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{to.name}.export-", dir=to.parent))
    except OSError as exc:
        raise RegistryError(f"--to {to}: cannot write beside it ({exc.strerror or exc})") from exc
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make a shared export unreadable to others
    try:
        model = build_state(run, st, files, device)
        changed = changed_components(model)
        if only_changed and not changed:
            raise RegistryError(f"--only-changed: {sel.method} x {sel.attack}@{sel.step} has the base model's "
                                f"weights (nothing changed), so there is nothing to write; export without it")
        layout = write_weights(model, tmp, changed if only_changed else None)
        if prompts is not None:
            shutil.copyfile(prompts, tmp / "prompts.json")
        info = provenance(results, run, sel, st, model, layout, changed, only_changed, prompts is not None, device)
        info["files"] = _files(tmp)
        info["components_written"] = [c for c in ORDER if (tmp / c).is_dir()]
        (tmp / "README.md").write_text(_readme(info), encoding="utf-8")
        (tmp / "export.json").write_text(json.dumps(info, indent=1, sort_keys=True, default=str), encoding="utf-8")
        _place(tmp, to)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def provenance(results: Path, run: dict[str, Any], sel: Selection, store: Any, model: Any, layout: str,
               changed: list[str], only_changed: bool, has_prompts: bool, device: str) -> dict[str, Any]:
    """export.json: which run and cell, the stage keys, the base model, what changed, how to load it."""
    from unlearn_bench.results import code_version

    plan = run["plan"]
    loadable = None if layout == "components" else layout
    info: dict[str, Any] = {
        "format": FORMAT, "layout": layout, "loadable_with": loadable, "only_changed": only_changed,
        "results_dir": str(results.resolve()), "run_id": run.get("run_id"), "suite": plan.get("name"),
        "run_device": run.get("device", {}).get("requested"), "export_device": device,
        "state": {"method": sel.method, "attack": sel.attack, "step": sel.step, "seed": sel.seed,
                  "concept": plan["concept"].get("name")},
        "stage_keys": {"unlearn": sel.unlearn_key or None, "attack": sel.attack_key or None,
                       "generate": sel.images},
        "store": str(store.root.resolve()),
        "base_model": model.spec.identity(),
        "method_spec": _spec(plan["methods"], sel.method), "attack_spec": _spec(plan["attacks"], sel.attack),
        "sampling": model.spec.sampling(),
        "components_changed": changed,
        "prompts_file": "prompts.json" if has_prompts else None,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code_version": code_version(),
    }
    if layout == "components" and not only_changed:
        codec = getattr(model.codec, "codec", model.codec)
        name = next((k for k, v in _toy_codecs().items() if type(codec) is v), type(codec).__name__)
        info["codec"] = {"name": name, "scale_factor": model.codec.scale_factor,
                         "latent_channels": model.codec.latent_channels, "resolution": model.resolution}
    return info


def _spec(specs: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """A method's or attack's resolved spec as the run used it (e.g. DreamBooth's trigger word is a parameter)."""
    found = next((s for s in specs if s.get("name") == name), None)
    return None if found is None else {k: found.get(k) for k in ("name", "module", "version", "params", "wrappers")}


def _toy_codecs() -> dict[str, type]:
    from unlearn_bench.toy.model import CODECS

    return dict(CODECS)


def summary(info: dict[str, Any], to: Path) -> str:
    """What the command prints: where, what, and - for the toy model - that it is not a pipeline."""
    s = info["state"]
    lines = [f"exported {s['method']} x {s['attack']}@{s['step']} seed {s['seed']} to {to}",
             f"  changed from the base: {', '.join(info['components_changed']) or 'nothing'}; "
             f"written: {', '.join(info['components_written']) or 'no weights'}"]
    if info["loadable_with"]:
        lines.append(f"  load with diffusers.{info['loadable_with']}.from_pretrained({str(to)!r})")
    elif info["only_changed"]:
        lines.append("  only the changed components: load each with its class's from_pretrained (see README.md)")
    else:
        lines.append("  NOTE: not a StableDiffusionPipeline - the toy model has no VAE (see README.md in the folder)")
    if info["prompts_file"]:
        lines.append(f"  adversarial prompts: {to / info['prompts_file']}")
    return "\n".join(lines)
