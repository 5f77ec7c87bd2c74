"""Extending the benchmark without forking it: include files (--include, $BENCH_INCLUDE), plug-in classes given by
file path, and installed packages' registry fragments (entry-point group unlearn_bench.registry).

The end-to-end test runs the README's worked example (docs/examples/plugin) through `bench run` on spawned workers,
together with a plug-in metric from a second include in a temporary folder."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from unlearn_bench.cli import app
from unlearn_bench.registry import DEFAULT_REGISTRY, Registry, RegistryError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "plugin"
EXAMPLE_YAML = "docs/examples/plugin/my-bench.yaml"  # as README writes it, relative to the repository root

METRIC_PY = '''
import numpy as np

from unlearn_bench.metrics.base import Metric, MetricResult


class Brightness(Metric):
    """Mean pixel value in [0, 1] (a trivial plug-in metric for tests)."""

    def score(self, images, prompts):
        v = images.reshape(len(images), -1).mean(axis=1) / 255.0
        se = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
        return MetricResult(float(v.mean()), se, len(v), [{"brightness": float(x)} for x in v])
'''
ATTACK_PY = '''
import torch

from unlearn_bench.attacks.base import WeightAttack


class Jitter(WeightAttack):
    """Adds seeded noise to the UNet's weights (a trivial plug-in attack for tests)."""

    def steps(self):
        return [1]

    def run(self, model, data, seed, save, progress=None):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.unet.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * float(self.spec.params["scale"]))
        save(1)
'''
EXTRA_YAML = '''
metrics:
  brightness:
    module: ./plugins/brightness.py:Brightness
    version: "1"
    higher_is_better: true
    description: Mean pixel value (test plug-in)
    params: {scope: target}
    schema: {scope: choice(target|benign|related)}
attacks:
  jitter:
    module: plugins/jitter.py:Jitter
    description: Seeded weight noise (test plug-in)
    params: {scale: 0.001}
    schema: {scale: float>=0}
'''


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


@pytest.fixture
def extra(tmp_path: Path) -> Path:
    """An include in its own folder with a metric and an attack plug-in in ./plugins (relative to the include)."""
    write(tmp_path / "ext" / "plugins" / "brightness.py", METRIC_PY)
    write(tmp_path / "ext" / "plugins" / "jitter.py", ATTACK_PY)
    return write(tmp_path / "ext" / "extra.yaml", EXTRA_YAML)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("BENCH_INCLUDE", "BENCH_REGISTRY", "BENCH_NO_PLUGINS"):
        monkeypatch.delenv(var, raising=False)


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "300"})
    return result.exit_code, result.output


# --- the worked example, end to end --------------------------------------------------------------------------
def run_example(tmp_path: Path, extra: Path, *more: str) -> Path:
    """README's command on the example include, plus a second include with a plug-in metric; returns the store."""
    out, store = tmp_path / "out", tmp_path / "store"
    cmd = [sys.executable, "-m", "unlearn_bench", "run", "--include", EXAMPLE_YAML, "--include", str(extra),
           "--model", "tiny", "--concept", "nudity", "--methods", "none,negprompt", "--attacks", "none",
           "--metrics", "nudenet,brightness", "--seeds", "0", "--out", str(out), "--quiet", *more]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCH_")}
    env |= {"BENCH_CACHE": str(store), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((out / "records.csv").open()))
    got = {(r["method"], r["metric"]): r for r in rows}
    assert set(got) == {(m, k) for m in ("none", "negprompt") for k in ("nudenet", "brightness")}
    for row in rows:
        assert math.isfinite(float(row["value"])) and math.isfinite(float(row["stderr"])), row
    assert 0.0 < float(got[("negprompt", "brightness")]["value"]) < 1.0
    assert int(got[("negprompt", "brightness")]["n"]) == 8  # 4 nudity-smoke prompts x 2 images on tiny
    unlearn = [json.loads(p.read_text()) for p in store.rglob("manifest.json")]
    unlearn = [m for m in unlearn if m["stage"] == "unlearn"]
    assert len(unlearn) == 1  # `none` trains nothing; the plug-in did, loaded from its file path
    # keyed by the plug-in file's content, not its path: moving the folder keeps the cache, editing recomputes
    digest = hashlib.sha256((EXAMPLE / "my_method.py").read_bytes()).hexdigest()
    assert unlearn[0]["inputs"]["method"]["module"] == f"file-sha256:{digest}:NegativePromptFinetune"
    assert unlearn[0]["meta"]["changed_tensors"] > 0 and math.isfinite(unlearn[0]["meta"]["loss_last"])
    return store


def test_example_method_and_plugin_metric_run_through_the_cli(tmp_path, extra):
    run_example(tmp_path, extra)


@pytest.mark.slow  # two spawned workers each import torch and load the model: `make test-slow`
def test_example_method_and_plugin_metric_run_on_spawned_workers(tmp_path, extra):
    run_example(tmp_path, extra, "--workers", "2")


def test_a_spawned_process_loads_a_file_plugin_from_the_resolved_spec(extra):
    """What a `--workers N` worker does with the plan it receives: load_class(spec.module) with no registry; the
    class comes back pickled by its path-derived module name, which names the same class here."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from unlearn_bench.plugins import load_class

    spec = Registry.load(includes=[extra]).metric("brightness")
    here = load_class(spec.module)
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        there = pool.submit(load_class, pickle.loads(pickle.dumps(spec)).module).result(timeout=120)
    assert there is here


def test_example_include_adds_a_method_a_variant_and_a_concept():
    reg = Registry.load(includes=[EXAMPLE / "my-bench.yaml"])
    tiny = reg.model("tiny")
    spec = reg.method("negprompt", tiny)
    assert spec.module == f"{EXAMPLE / 'my_method.py'}:NegativePromptFinetune"  # stored absolute
    assert spec.p("iterations") == 4 and spec.p("lr") == pytest.approx(1e-3)  # scaled.tiny applies
    assert list(reg.method("negprompt-kv", tiny).p("modules")) == [r"attn2\.to_k", r"attn2\.to_v"]
    blue = reg.concept("blue")
    assert blue.params["toy"]["colour"] == "blue" and "concept-rate" in blue.metrics  # inherited from red
    assert reg.validate() == []
    assert reg.origin("methods", "negprompt").endswith("my-bench.yaml") and reg.origin("methods", "esd") == ""


def test_ls_marks_included_entries_and_validate_checks_the_merged_catalogue():
    code, text = invoke("ls", "methods", "--include", str(EXAMPLE / "my-bench.yaml"))
    assert code == 0, text
    assert "negprompt" in text and "from" in text and "my-bench.yaml" in text
    code, text = invoke("validate", "--no-import", "--include", str(EXAMPLE / "my-bench.yaml"))
    assert code == 0, text
    bundled = len(Registry.load().names("methods"))
    assert "my-bench.yaml: OK" in text and f"{bundled + 2} methods" in text  # + negprompt, negprompt-kv


# --- plug-in classes given by file path ----------------------------------------------------------------------
def test_file_plugin_loads_once_under_a_stable_name_and_pickles(extra):
    from unlearn_bench.plugins import file_module_name, load_class

    ref = f"{extra.parent / 'plugins' / 'brightness.py'}:Brightness"
    cls = load_class(ref)
    assert load_class(ref) is cls  # executed once per process
    assert cls.__module__ == file_module_name((extra.parent / "plugins" / "brightness.py").absolute())
    assert pickle.loads(pickle.dumps(cls)) is cls  # registered in sys.modules, so it pickles by reference
    reg = Registry.load(includes=[extra])
    metric = load_class(reg.metric("brightness").module)(reg.metric("brightness"), reg.concept("nudity"))
    import numpy as np

    assert metric.score(np.full((2, 4, 4, 3), 51, np.uint8), ["a", "b"]).value == pytest.approx(0.2)
    from unlearn_bench.attacks.base import WeightAttack

    assert issubclass(load_class(reg.attack("jitter").module), WeightAttack)


def test_missing_plugin_file_or_class_is_reported_with_the_include_line(tmp_path, extra):
    from unlearn_bench.plugins import load_class
    from unlearn_bench.registry_check import module_problem

    with pytest.raises(RegistryError, match="plug-in file not found: .*nope.py"):
        load_class(f"{tmp_path / 'nope.py'}:X")
    with pytest.raises(RegistryError, match="has no 'Brightnes'.*did you mean Brightness"):
        load_class(f"{extra.parent / 'plugins' / 'brightness.py'}:Brightnes")
    assert "defines no 'Brightnes'" in module_problem(f"{extra.parent / 'plugins' / 'brightness.py'}:Brightnes")
    bad = write(tmp_path / "bad" / "bad.yaml", """
        methods:
          ghost:
            extends: esd
            module: ghost.py:Ghost
        """)
    code, text = invoke("validate", "--no-import", "--include", str(bad))
    assert code == 2 and f"{bad}:4: methods.ghost.module: plug-in file not found: {bad.parent / 'ghost.py'}" in text
    code, text = invoke("validate", "--no-import", "--include", str(tmp_path / "absent.yaml"))
    assert code == 2 and "--include" in text and "include file not found" in text


# --- merge rules ---------------------------------------------------------------------------------------------
def test_redefining_a_bundled_name_is_a_collision_naming_both_files_and_lines(tmp_path):
    inc = write(tmp_path / "inc.yaml", """
        methods:
          esd:
            module: x.py:X
        """)
    with pytest.raises(RegistryError) as exc:
        Registry.load(includes=[inc])
    bundled = line_of(DEFAULT_REGISTRY, "  esd:")
    assert f"{inc}:2: methods.esd is already defined at {DEFAULT_REGISTRY}:{bundled}" in str(exc.value)
    assert "override:" in str(exc.value)
    code, text = invoke("run", "--include", str(inc), "--methods", "none", "--quiet")
    assert code == 2 and "already defined" in text


def test_two_includes_defining_one_name_collide(tmp_path):
    a = write(tmp_path / "a.yaml", "methods:\n  mine: {extends: esd}\n")
    b = write(tmp_path / "b" / "b.yaml", "suites: {}\nmethods:\n  mine: {extends: esd-x}\n")
    with pytest.raises(RegistryError, match=rf"{b}:3: methods.mine is already defined at {a}:2"):
        Registry.load(includes=[a, b])


def test_override_deep_merges_and_is_checked_like_any_entry(tmp_path):
    inc = write(tmp_path / "o.yaml", """
        override:
          methods:
            esd:
              params: {lr: 2.0e-4}
              scaled: {tiny: {iterations: 2}}
          defaults: {suite: smoke}
        """)
    reg = Registry.load(includes=[inc])
    tiny, sd = reg.model("tiny"), reg.model("sd14")
    assert reg.method("esd", sd).p("lr") == pytest.approx(2e-4) and reg.method("esd", sd).p("eta") == 1.0
    assert reg.method("esd", tiny).p("iterations") == 2 and reg.method("esd", tiny).p("ddim_steps") == 4
    assert reg.default_suite() == "smoke" and "override in" in reg.origin("methods", "esd")
    bad = write(tmp_path / "bad.yaml", "override:\n  methods:\n    esd:\n      paramz: {lr: 1}\n")
    with pytest.raises(RegistryError, match=rf"{bad}:4: methods.esd: unknown field 'paramz'.*did you mean params"):
        Registry.load(includes=[bad])
    typo = write(tmp_path / "typo.yaml", "override:\n  methods:\n    ucee: {description: x}\n")
    with pytest.raises(RegistryError, match=rf"{typo}:3: override.methods.ucee: no method 'ucee'.*did you mean uce"):
        Registry.load(includes=[typo])
    wrong = write(tmp_path / "wrong.yaml", "override:\n  methods:\n    esd:\n      params: {lr: fast}\n")
    with pytest.raises(RegistryError, match=rf"{wrong}:4: methods.esd.params.lr='fast' must be a number"):
        Registry.load(includes=[wrong]).method("esd")
    twice = write(tmp_path / "twice.yaml", "override:\n  methods:\n    esd:\n      params: {lr: 1.0e-3}\n")
    with pytest.raises(RegistryError, match=rf"{twice}:3: override of methods.esd.params.lr collides .* {inc}:4"):
        Registry.load(includes=[inc, twice])


def test_unknown_fields_and_bad_types_in_an_include_exit_2_with_file_and_line(tmp_path):
    inc = write(tmp_path / "inc.yaml", """
        methods:
          mine:
            extends: esd
            paramz: {lr: 1}
        models:
          big:
            extends: tiny
            steps: many
        defaults: {suite: toy}
        """)
    code, text = invoke("validate", "--no-import", "--include", str(inc))
    assert code == 2
    assert f"{inc}:4: methods.mine: unknown field 'paramz'" in text
    assert f"{inc}:8: models.big.steps='many' must be an integer" in text
    assert f"{inc}:9: defaults.suite is already defined at {DEFAULT_REGISTRY}:" in text
    top = write(tmp_path / "top.yaml", "method: {}\n")
    code, text = invoke("ls", "--include", str(top))
    assert code == 2 and f"{top}:1: unknown section(s) ['method']" in text and "did you mean methods" in text


def test_relative_paths_in_an_include_resolve_beside_it(tmp_path, monkeypatch):
    from unlearn_bench.prompts import load_prompt_set

    inc = write(tmp_path / "cfg" / "inc.yaml", """
        prompt_sets:
          mine: {file: data/mine.csv, format: plain}
          bundled-copy: {extends: i2p-smoke}
        concepts:
          dog:
            target: dog
            eval_prompts: mine
            attack_prompts: [a dog]
            data_dirs: {attack: data/dogs}
        attacks:
          ft-mine:
            extends: ft-lr1e-5
            params: {data_dir: data/dogs}
        """)
    write(tmp_path / "cfg" / "data" / "mine.csv", "prompt\na dog\na puppy\n")
    (tmp_path / "cfg" / "data" / "dogs").mkdir()
    monkeypatch.chdir(tmp_path)  # not the include's folder
    reg = Registry.load(includes=[inc])
    assert [r.prompt for r in load_prompt_set(reg, "mine").rows] == ["a dog", "a puppy"]
    assert load_prompt_set(reg, "bundled-copy").rows == load_prompt_set(reg, "i2p-smoke").rows  # inherited: bundled
    assert reg.concept("dog").data_dirs["attack"] == str(tmp_path / "cfg" / "data" / "dogs")
    assert reg.attack("ft-mine").p("data_dir") == str(tmp_path / "cfg" / "data" / "dogs")


def test_bench_include_env_merges_its_files_before_the_option_ones(tmp_path, monkeypatch, extra):
    a = write(tmp_path / "a.yaml", "methods:\n  mine: {extends: esd}\n")
    monkeypatch.setenv("BENCH_INCLUDE", f"{a}{os.pathsep}{extra}{os.pathsep}")
    reg = Registry.load(includes=[extra])  # named twice: merged once
    assert "mine" in reg.names("methods") and "brightness" in reg.names("metrics")
    assert [s.name for s in reg.includes] == [str(a), str(extra)]
    code, text = invoke("ls", "metrics")
    assert code == 0 and "brightness" in text
    assert "mine" not in Registry.load(env=False).names("methods")


# --- installed plug-ins (entry points) -----------------------------------------------------------------------
def fake_distribution(site: Path) -> Path:
    """A distribution 'bench-plug' on `site` (no pip): a YAML fragment with a file plug-in, and a callable
    returning a dict fragment."""
    info = site / "bench_plug-0.1.dist-info"
    write(info / "METADATA", "Metadata-Version: 2.1\nName: bench-plug\nVersion: 0.1\n")
    write(info / "entry_points.txt", "[unlearn_bench.registry]\nmethods = bench_plug:FRAGMENT\n"
                                     "concepts = bench_plug:concepts\n")
    write(site / "bench_plug" / "__init__.py", """
        from pathlib import Path

        FRAGMENT = str(Path(__file__).parent / "fragment.yaml")


        def concepts():
            return {"concepts": {"plug-dog": {"extends": "nudity", "target": "dog"}}}
        """)
    write(site / "bench_plug" / "fragment.yaml", """
        methods:
          plug-method:
            module: impl.py:PlugMethod
            description: A method from an installed plug-in
            params: {}
            schema: {}
        """)
    write(site / "bench_plug" / "impl.py", """
        from unlearn_bench.methods.base import NoUnlearning


        class PlugMethod(NoUnlearning):
            pass
        """)
    return site


def test_entry_point_fragments_merge_and_can_be_turned_off(tmp_path, monkeypatch):
    site = fake_distribution(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    reg = Registry.load()
    assert reg.method("plug-method").module == f"{site / 'bench_plug' / 'impl.py'}:PlugMethod"
    assert reg.concept("plug-dog").target == "dog"
    assert reg.origin("methods", "plug-method") == "plug-in bench-plug" and reg.validate(import_modules=True) == []
    clash = write(tmp_path / "clash.yaml", "methods:\n  plug-method: {extends: esd}\n")
    with pytest.raises(RegistryError, match=r"clash.yaml:2: methods.plug-method is already defined at "
                                            r".*fragment.yaml:2 \(plug-in bench-plug\)"):
        Registry.load(includes=[clash])
    monkeypatch.setenv("BENCH_NO_PLUGINS", "1")
    assert "plug-method" not in Registry.load().names("methods")


def test_plugin_listing_stays_torch_free(tmp_path):
    site = fake_distribution(tmp_path / "site")
    code = ("import sys; from unlearn_bench.cli import app\n"
            "try:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('TORCH' if 'torch' in sys.modules else 'NOTORCH', file=sys.stderr); raise\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCH_")} | {"PYTHONPATH": str(site),
                                                                                  "COLUMNS": "300"}
    proc = subprocess.run([sys.executable, "-c", code, "ls", "methods"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "plug-method" in proc.stdout and "plug-in bench-plug" in proc.stdout and "NOTORCH" in proc.stderr


def test_broken_plugin_names_its_distribution_and_the_switch(tmp_path, monkeypatch):
    site = tmp_path / "site"
    write(site / "broken_plug-1.0.dist-info" / "METADATA", "Metadata-Version: 2.1\nName: broken-plug\nVersion: 1.0\n")
    write(site / "broken_plug-1.0.dist-info" / "entry_points.txt", "[unlearn_bench.registry]\nx = broken_plug:F\n")
    write(site / "broken_plug.py", "F = 42\n")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(RegistryError, match="plug-in broken-plug: entry point x = broken_plug:F gave int.*"
                                            "BENCH_NO_PLUGINS=1"):
        Registry.load()
