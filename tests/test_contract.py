"""The plug-in contract: a third-party method, attack and metric written against unlearn_bench.api alone, defining
only the required methods, run through the runner on the tiny model (every optional hook falls back to the base
class's no-op); attacks are told apart by class; `none` has no unlearn stage; the core imports no plug-in module
and the bundled plug-ins import only public modules; records.csv keeps its columns."""

from __future__ import annotations

import ast
import json
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from unlearn_bench.specs import ComponentSpec, params

PLUGIN = "contract_plugin"
PLUGIN_SOURCE = '''
"""A third-party plug-in: imports only unlearn_bench.api and defines only what the contract requires."""
import numpy as np
import torch

from unlearn_bench.api import Attack, Method, Metric, MetricResult, PromptAttack, WeightAttack, select_parameters


class ShrinkOut(Method):
    """Gradient method: trainable + loss only (no data, prepare, finish, cleanup or diagnostics)."""

    def trainable(self, model):
        return select_parameters(model.unet, "unet", [r"^conv_out\\.weight$"])

    def loss(self, model, step, generator):
        return model.unet.conv_out.weight.pow(2).sum()


class KeepsWeights(Method):
    """Closed-form and changes nothing, by class: no unlearn stage, like `none`."""

    closed_form = True
    changes_weights = False

    def apply(self, model, seed):
        return None


class ShiftOut(WeightAttack):
    """Weight attack: steps + run only (no data_request, no eval_prompts)."""

    def steps(self):
        return [1, 2]

    def run(self, model, data, seed, save, progress=None):
        for step in self.steps():
            with torch.no_grad():
                model.unet.conv_out.bias.add_(0.5)
            save(step)


class Prefix(PromptAttack):
    """Prompt attack: rewrite only."""

    def rewrite(self, model, prompts, seeds, judge, original, progress=None, guidance=None):
        return [f"zz {p}" for p in prompts], [{"prompt": p} for p in prompts]


class Sideways(Attack):
    """Neither kind: the runner must refuse it."""


class Brightness(Metric):
    """Metric: score only (no preflight, bind, reference_key or judge)."""

    def score(self, images, prompts):
        v = images.reshape(len(images), -1).mean(1) / 255.0
        return MetricResult(float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))), len(v),
                            [{"prompt": p} for p in prompts])
'''
TARGET = ["a photo of a nude woman", "a photo of a man"]


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    import sys

    folder = tmp_path_factory.mktemp("site")
    (folder / f"{PLUGIN}.py").write_text(PLUGIN_SOURCE)
    sys.path.insert(0, str(folder))
    yield PLUGIN
    sys.path.remove(str(folder))
    sys.modules.pop(PLUGIN, None)


def spec(kind: str, name: str, ref: str, **p) -> ComponentSpec:
    return ComponentSpec(kind, name, ref, params(p), higher_is_better=True if kind == "metric" else None)


def make_plan(registry, methods: list[ComponentSpec], attacks: list[ComponentSpec]):
    from unlearn_bench.plan import Plan

    concept = replace(registry.concept("nudity"), metrics=("brightness",))  # the prompt attack's judge
    metric = spec("metric", "brightness", f"{PLUGIN}:Brightness", scope="target")
    return Plan("contract", registry.model("tiny"), concept, methods, attacks, [metric], [0],
                prompts={"target": list(TARGET)}, prompt_sets={"target": "contract"})


@pytest.fixture(scope="module")
def third_party_run(plugin, registry, torch_single_thread, tmp_path_factory):
    from unlearn_bench.runner import Runner
    from unlearn_bench.store import Store

    methods = [spec("method", "shrink", f"{plugin}:ShrinkOut", iterations=3, lr=1e-2),
               spec("method", "none", "unlearn_bench.methods.base:NoUnlearning"),
               spec("method", "keeps", f"{plugin}:KeepsWeights")]
    attacks = [spec("attack", "none", "unlearn_bench.attacks.base:NoAttack"),
               spec("attack", "shift", f"{plugin}:ShiftOut"), spec("attack", "prefix", f"{plugin}:Prefix")]
    store = Store(tmp_path_factory.mktemp("store"))
    return Runner(make_plan(registry, methods, attacks), store).run(), store


def manifests(store, stage: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in (store.root / stage).rglob("manifest.json")]


def test_third_party_components_run_through_the_runner_with_default_hooks(third_party_run):
    from unlearn_bench.results import RECORD_COLUMNS

    rows, store = third_party_run
    got = sorted((r["method"], r["attack"], r["attack_step"]) for r in rows)
    want = sorted((m, a, s) for m in ("shrink", "none", "keeps") for a, s in (("none", 0), ("shift", 1),
                                                                           ("shift", 2), ("prefix", 0)))
    assert got == want  # no diagnostic rows: the default diagnostics are empty
    assert all(list(r) == RECORD_COLUMNS and r["metric"] == "brightness" for r in rows)
    assert all(0.0 < r["value"] < 1.0 and np.isfinite(r["stderr"]) and r["n"] == len(TARGET) for r in rows)
    (unlearned,) = manifests(store, "unlearn")  # only the method that changes weights has an unlearn stage
    meta = unlearned["meta"]
    assert meta["changed_tensors"] == 1 and meta["loss_last"] < meta["loss_first"]
    by = {(r["method"], r["attack"], r["attack_step"]): r for r in rows}
    assert by[("shrink", "shift", 1)]["images_key"] != by[("shrink", "shift", 2)]["images_key"]
    assert by[("none", "none", 0)]["unlearn_key"] == by[("keeps", "none", 0)]["unlearn_key"] == ""
    assert by[("none", "none", 0)]["images_key"] == by[("keeps", "none", 0)]["images_key"]  # the same base model
    rewritten = store.lookup("generate", by[("shrink", "prefix", 0)]["images_key"])
    prompts = json.loads(rewritten.file("images.json").read_text())["prompts"]
    assert prompts == [f"zz {p}" for p in TARGET]  # the prompt attack's rewrites were generated and scored


def test_an_attack_of_neither_kind_is_refused_naming_its_class(plugin, registry):
    from unlearn_bench.runner import Runner
    from unlearn_bench.store import Store

    plan = make_plan(registry, [spec("method", "none", "unlearn_bench.methods.base:NoUnlearning")],
                     [spec("attack", "sideways", f"{plugin}:Sideways")])
    rows, failure = Runner(plan, Store(Path("/nonexistent-store-never-written"))).try_task((0, 0, 0))
    assert rows == [] and failure["stage"] == "setup" and failure["attack"] == "sideways"
    assert f"{plugin}.Sideways" in failure["reason"] and "WeightAttack" in failure["reason"]
    assert "PromptAttack" in failure["reason"]
    sideways = __import__(plugin).Sideways(plan.attacks[0], plan.concept)
    with pytest.raises(TypeError, match="Sideways"):
        _ = sideways.kind


def test_attack_kind_is_derived_from_the_class(registry):
    from unlearn_bench.attacks.base import NoAttack, PromptAttack, WeightAttack
    from unlearn_bench.attacks.lora import LoRA
    from unlearn_bench.attacks.unlearndiffatk import UnlearnDiffAtk

    tiny, concept = registry.model("tiny"), registry.concept("nudity")
    uda = UnlearnDiffAtk(registry.attack("unlearndiffatk", tiny), concept)
    lora = LoRA(registry.attack("lora-r4", tiny), concept)
    assert isinstance(uda, PromptAttack) and uda.kind == "prompts"
    assert isinstance(lora, WeightAttack) and lora.kind == "weights"
    none = NoAttack(registry.attack("none", tiny), concept)
    assert none.steps() == [0] and none.data_request() is None and none.eval_prompts({"target": ["x"]}) == {}
    with pytest.raises(AttributeError):
        none.kind = "prompts"  # read-only


def test_none_has_no_unlearn_stage_and_a_wrapper_around_it_has_one(registry):
    from unlearn_bench.methods.base import Method, NoUnlearning
    from unlearn_bench.methods_runtime import changes_weights

    none = registry.method("none", registry.model("tiny"))
    assert NoUnlearning.changes_weights is False and Method.changes_weights is True
    assert not changes_weights(none)
    assert changes_weights(replace(none, wrappers=(registry.method("esd", registry.model("tiny")),)))
    assert changes_weights(registry.method("uce", registry.model("tiny")))


def test_base_hooks_are_typed_no_ops(registry):
    from unlearn_bench.components import DEFAULT_CONTEXT, MetricContext
    from unlearn_bench.methods.uce import UCE
    from unlearn_bench.metrics.concept_rate import ConceptRate

    tiny, concept = registry.model("tiny"), registry.concept("nudity")
    method = UCE(registry.method("uce", tiny), concept)
    assert method.diagnostics == {} and method.finish(None, 0) is None and method.data_requests() == {}
    method.diagnostics = {"x": 1}
    assert method.diagnostics == {"x": 1}
    metric = ConceptRate(spec("metric", "toy", "unlearn_bench.metrics.concept_rate:ConceptRate"), concept)
    assert metric.context is DEFAULT_CONTEXT and metric.reference_key() is None
    assert ConceptRate.preflight(metric.spec) is None
    bound = MetricContext(device="meta", numerics={"threads": 1})
    metric.bind(bound)
    assert metric.context is bound


def test_metric_context_keys_its_stage_with_the_numerics(tmp_path):
    from unlearn_bench.components import MetricContext
    from unlearn_bench.store import Store, stage_key

    calls = []

    def compute(tmp: Path) -> dict:
        calls.append(tmp)
        (tmp / "x.txt").write_text("hello")
        return {"n": 1}

    env = {"device": "cpu", "threads": 1}
    stored = MetricContext(numerics=env, store=Store(tmp_path / "store"))
    entry = stored.cached("probe", {"a": 1}, compute)
    assert entry.key == stored.key("probe", {"a": 1}) == stage_key("probe", {"a": 1, "numerics": env})
    assert entry.file("x.txt").read_text() == "hello" and entry.meta["n"] == 1
    detached = MetricContext()  # no store: computed once per process, keyed without numerics
    first, again = detached.cached("probe", {"a": 2}, compute), detached.cached("probe", {"a": 2}, compute)
    assert first.key == again.key == stage_key("probe", {"a": 2}) and len(calls) == 2
    assert detached.resolve_path("/abs/folder") == Path("/abs/folder")


def test_preflight_refuses_a_class_that_is_not_a_metric(plugin):
    from unlearn_bench.plan import preflight_metrics
    from unlearn_bench.registry import RegistryError

    preflight_metrics([spec("metric", "brightness", f"{plugin}:Brightness")])  # the default preflight: nothing
    with pytest.raises(RegistryError, match=rf"metric oops: '{plugin}:ShiftOut' is not a subclass of .*Metric"):
        preflight_metrics([spec("metric", "oops", f"{plugin}:ShiftOut")])


# --- imports ---------------------------------------------------------------------------------------------------
def _is_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # the parent is a module, not a package: `name` is an attribute
        return False


def imported_modules(path: Path) -> set[str]:
    """The unlearn_bench modules the import statements of `path` import: `import a.b` -> a.b; `from a.b import c`
    -> a.b.c when that is a submodule (`from unlearn_bench.toy import world`), else a.b."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if node.module.startswith("unlearn_bench") and _is_module(sub) else node.module)
    return {m for m in out if m == "unlearn_bench" or m.startswith("unlearn_bench.")}


def package_dir(name: str) -> Path:
    import importlib

    return Path(importlib.import_module(name).__file__).parent


def test_the_core_imports_no_plugin_module():
    from unlearn_bench.api import PLUGIN_PACKAGES

    bases = {f"{p}.base" for p in PLUGIN_PACKAGES}
    bad = {}
    for path in sorted(package_dir("unlearn_bench").rglob("*.py")):
        hits = {m for m in imported_modules(path) if any(m == p or m.startswith(p + ".") for p in PLUGIN_PACKAGES)}
        hits -= bases
        if hits:
            bad[str(path)] = sorted(hits)
    assert not bad, f"the core imports plug-in modules (use the registry's module: strings): {bad}"


# Bundled plug-ins that still import a harness-internal module (known debt, each with where it should come from).
PENDING: dict[str, set[str]] = {}  # file name -> non-public imports still to move (none)


def test_bundled_plugins_import_only_public_modules():
    from unlearn_bench.api import PLUGIN_PACKAGES, PUBLIC_MODULES

    bad = {}
    for package in PLUGIN_PACKAGES:
        for path in sorted(package_dir(package).glob("*.py")):
            hits = {m for m in imported_modules(path) if m not in PUBLIC_MODULES
                    and not any(m.startswith(p + ".") for p in PLUGIN_PACKAGES)}  # plug-ins may build on each other
            hits -= PENDING.get(path.name, set())
            if hits:
                bad[f"{package}/{path.name}"] = sorted(hits)
    assert not bad, f"bundled plug-ins import non-public modules (see unlearn_bench.api): {bad}"


def test_runner_probes_no_hooks():
    """The runner calls every hook unconditionally: no hasattr/getattr on plug-in objects."""
    for name in ("runner.py", "methods_runtime.py"):
        tree = ast.parse((package_dir("unlearn_bench") / name).read_text())
        probes = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                  and n.func.id in ("hasattr", "getattr")]
        assert not probes, f"{name} probes attributes at lines {probes}"


def test_api_exports_exist_and_name_the_public_modules():
    import importlib

    import unlearn_bench.api as api

    assert all(hasattr(api, n) for n in api.__all__)
    for module in api.PUBLIC_MODULES:
        importlib.import_module(module)
        assert module.removeprefix("unlearn_bench.") in textwrap.dedent(api.__doc__)


# --- result rows -----------------------------------------------------------------------------------------------
def test_result_row_is_the_records_csv_columns_in_order(tmp_path):
    from unlearn_bench.results import RECORD_COLUMNS, ResultRow, read_records, variant_rows, write_records

    assert RECORD_COLUMNS == [
        "suite", "model", "concept", "method", "attack", "attack_step", "metric", "seed", "value", "stderr", "n",
        "higher_is_better", "metric_version", "cell_hash", "prompt_set", "sampler", "steps", "guidance",
        "images_per_prompt", "resolution", "metric_settings", "unlearn_key", "attack_key", "images_key"]
    row = ResultRow("s", "tiny", "nudity", "esd", "ft", 2, "nudenet", 0, 0.25, float("nan"), 8, False, "1", "k",
                    "p", "ddim", 4, "per-prompt", 2, 32, "{}", "u", "a", "i")
    meta = {"variants": {"nudenet@0.5": {"value": 0.125, "stderr": 0.1, "n": 8, "settings": {"threshold": 0.5}}}}
    typed = variant_rows(row, meta)
    assert [r.as_record() for r in typed] == variant_rows(row.as_record(), meta)
    write_records(tmp_path / "a.csv", typed)
    write_records(tmp_path / "b.csv", [r.as_record() for r in typed])
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    back = read_records(tmp_path / "a.csv")
    assert back[1]["metric"] == "nudenet@0.5" and back[1]["value"] == "0.125" and back[0]["stderr"] == "nan"


def test_plan_time_refuses_plugin_classes_on_the_wrong_base(plugin):
    """A plug-in attack of neither kind, or a 'method' that is not a Method, stops planning (exit 2) instead of
    failing every cell at setup."""
    from unlearn_bench.plan import check_component_classes
    from unlearn_bench.registry import RegistryError

    none = spec("method", "none", "unlearn_bench.methods.base:NoUnlearning")
    check_component_classes([none], [spec("attack", "none", "unlearn_bench.attacks.base:NoAttack")])
    with pytest.raises(RegistryError, match=rf"attack sideways: .*{plugin}.Sideways.*WeightAttack.*PromptAttack"):
        check_component_classes([none], [spec("attack", "sideways", f"{plugin}:Sideways")])
    with pytest.raises(RegistryError, match=rf"method oops: '{plugin}:ShiftOut' is not a subclass of .*Method"):
        check_component_classes([spec("method", "oops", f"{plugin}:ShiftOut")], [])
