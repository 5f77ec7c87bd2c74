"""Every malformed input stops `bench` at plan time: exit status 2, a message naming the bad value, no traceback,
and (checked in a subprocess) without importing torch. One table per input kind: CLI options, --set overrides,
registry files, prompt CSVs."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

import unlearn_bench.execute
from unlearn_bench.cli import app

# A small valid registry: every case below breaks one thing in it (or in the shipped one).
BASE: dict[str, Any] = {
    "version": 1,
    "defaults": {"suite": "s"},
    "models": {"tiny": {"kind": "tiny", "defaults": "tiny", "family": "tiny", "resolution": 32, "steps": 2,
                        "guidance": 3.0, "images_per_prompt": 1}},
    "prompt_sets": {"p": {"prompts": ["a photo"]}},
    "concepts": {"c": {"target": "nudity", "eval_prompts": "p", "attack_prompts": ["a nude photo"],
                       "related": ["a photo of a man"], "metrics": ["m"]}},
    "methods": {"none": {"module": "unlearn_bench.methods.base:NoUnlearning", "params": {}, "schema": {}},
                "esd": {"module": "unlearn_bench.methods.esd:ESD", "params": {"lr": 1.0e-5, "train": "esd-u"},
                        "schema": {"lr": "float>0", "train": "choice(esd-u|esd-x)"},
                        "scaled": {"tiny": {"lr": 0.001}}}},
    "attacks": {"none": {"module": "unlearn_bench.attacks.base:NoAttack", "params": {}, "schema": {}}},
    "metrics": {"m": {"module": "unlearn_bench.metrics.concept_rate:ConceptRate", "higher_is_better": False,
                      "params": {"scope": "target"}, "schema": {"scope": "choice(target|benign|related)"}}},
    "suites": {"s": {"model": "tiny", "concept": "c", "methods": ["none", "esd"], "attacks": ["none"],
                     "metrics": ["m"], "seeds": [0]}},
}


@pytest.fixture(autouse=True)
def no_execution(monkeypatch):
    """A case that plans successfully must fail fast here instead of running the whole suite."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("planning accepted a bad input")

    monkeypatch.setattr(unlearn_bench.execute, "execute", refuse)


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output + (repr(result.exception) if result.exit_code not in (0, 2) else "")


def assert_refused(code: int, output: str, *needles: str) -> None:
    assert code == 2, output
    assert "Traceback" not in output
    for needle in needles:
        assert needle in output, output


# --- CLI options --------------------------------------------------------------------------------------------
OPTION_CASES = [
    (["--device", "tpu"], "'tpu'"),
    (["--device", "cuda:x"], "'cuda:x'"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--workers", "0"], "--workers 0"),
    (["--executor", "slurmm"], "did you mean slurm"),
    (["--gpus", "0,a"], "'0,a'"),
    (["--gpus-per-job", "0"], "--gpus-per-job 0"),
    (["--time", "0"], "--time 0"),
    (["--seeds", ""], "--seeds ''"),
    (["--seeds", "abc"], "'abc'"),
    (["--seeds=-1"], "'-1'"),
    (["--seeds", "0,1.5"], "'1.5'"),
    (["--seeds", "0,0"], "listed twice: [0]"),
    (["--methods", ""], "--methods ''"),
    (["--attacks", " , "], "--attacks ' , '"),
    (["--metrics", ""], "--metrics ''"),
    (["--model", ""], "--model ''"),
    (["--methods", "ucee"], "did you mean uce"),
    (["--methods", "esd+metaa"], "'metaa'"),
    (["--methods", "esd,esd"], "listed twice: ['esd']"),
    (["--attacks", "ft-lr1e-55"], "'ft-lr1e-55'"),
    (["--metrics", "nudenett"], "did you mean nudenet"),
    (["--model", "tinyy"], "did you mean tiny"),
    (["--concept", "nudityy"], "did you mean nudity"),
    (["--suite", "toyy"], "did you mean toy"),
    (["--attacks", "unlearndiffatk", "--set", "attack.unlearndiffatk.k={nudity: 5}"],
     "k has no value for concept 'red' and no default"),
    (["--methods", "esd+meta", "--set", "wrapper.meta.inner_lr=0"], "inner_lr=0 must be a number > 0"),
]


@pytest.mark.parametrize(("args", "needle"), OPTION_CASES, ids=[" ".join(a) for a, _ in OPTION_CASES])
def test_bad_run_options_exit_2(args, needle):
    assert_refused(*invoke("run", "--quiet", *args), needle)


@pytest.mark.parametrize(("option", "make", "needle"), [
    ("--out", lambda t: t / "afile", "exists and is not a directory"),
    ("--out", lambda t: t / "afile" / "sub", "cannot be created or written"),
    ("--store", lambda t: t / "afile", "exists and is not a directory"),
    ("--store", lambda t: t / "afile" / "store", "cannot be created or written"),
])
def test_unusable_out_or_store_exits_2(tmp_path, option, make, needle):
    (tmp_path / "afile").write_text("not a folder")
    other = "--store" if option == "--out" else "--out"
    bad = make(tmp_path)
    code, output = invoke("run", "--quiet", "--model", "tiny", "--concept", "nudity", "--methods", "none",
                          "--attacks", "none", "--metrics", "nudenet", "--seeds", "0", option, str(bad),
                          other, str(tmp_path / "ok"))
    assert_refused(code, output, f"{option} {bad}: {needle}")


# --- --set overrides ----------------------------------------------------------------------------------------
SET_CASES = [
    ("attack.ft-lr1e-5.steps=-1", "steps[0]=-1 must be an integer >= 1"),
    ("attack.ft-lr1e-5.steps=50,x", "steps[1]='x'"),
    ("method.esd.train=bogus", "'bogus' must be one of esd-u"),
    ("method.esd.optimizer=rmsprop", "'rmsprop' must be one of adam, adamw, sgd"),
    ("metric.nudenet.threshold=2", "threshold=2 must be a number in [0, 1)"),
    ("metric.nudenet.thresholds=0.5,1.5", "thresholds[1]=1.5"),
    ("metric.nudenet.classes=FOO", "classes[0]='FOO'"),
    ("attack.ft-lr1e-5.data_dir=/nonexistent", "'/nonexistent' must be an existing directory"),
    ("attack.ft-lr1e-5.batch_size=0", "batch_size=0 must be an integer >= 1"),
    ("model.tiny.steps=abc", "steps='abc' must be an integer"),
    ("method.esd.lr=nan", "lr='nan'"),
    ("method.esd.lr=.inf", "lr=inf"),
    ("method.esd.lr=-1e-5", "lr=-1e-05 must be a number > 0"),
    ("method.esd.lr=fast", "lr='fast' must be a number"),
    ("method.esd.iterations=1.5", "iterations=1.5 must be an integer"),
    ("method.esd.anchor=null", "anchor=null must be a string"),
    ("method.esd.lrr=1", "unknown parameter 'lrr'. did you mean lr?"),
    ("method.esdd.lr=1", "unknown method 'esdd'"),
    ("methodz.esd.lr=1", "methodz"),
    ("method.esd.lr", "'method.esd.lr': expected section.name.key=value"),
    ("method.esd.grad_clip=-1", "grad_clip=-1"),
    ("model.sd14.allow_download=maybe", "allow_download='maybe' must be true or false"),
    ("model.tiny.precision=fp16", "'fp16' must be one of fp32, bf16"),
    ("model.tiny.sampler=ddpm", "'ddpm'"),
    ("model.tiny.foo=1", "unknown field 'foo'"),
    ("concept.nudity.foo=1", "unknown field 'foo'"),
    ("concept.nudity.eval_prompts=nope", "unknown prompt set 'nope'"),
    ("concept.nudity.metrics=nudenet,foo", "unknown metric 'foo'"),
    ("concept.red.params.toy.colour=purple", "'purple' must be one of red"),
    ("concept.red.params.images.targt=5", "unknown scope 'targt'"),
    ("concept.nudity.data_dirs.forget=/nonexistent", "'/nonexistent' must be an existing directory"),
    ("concept.nudity.attack_prompts=", "attack_prompts=[] must be a list of at least 1 item"),
    ("concept.red.target=", "target='' must be a string of at least 1 character"),
    ("attack.dreambooth.class_noun.red=", "class_noun.red='' must be a string of at least 1 character"),
    ("model.tiny.resolution=4", "resolution=4 must be an integer >= 8"),
    ("prompt_set.i2p-smoke.format=xml", "'xml' must be one of auto, i2p, coco, plain"),
    ("prompt_set.i2p-smoke.limit=0", "limit=0"),
    ("prompt_set.i2p-smoke.bogus=1", "unknown key 'bogus'"),
    ("wrapper.meta.gamma1=[0.1]", "gamma1=[0.1] must be a list of exactly 2 items"),
    ("wrapper.meta.order=3", "order=3 must be one of 1, 2"),
    ("attack.unlearndiffatk.k.nudityy=5", "unknown concept 'nudityy'"),
    ("attack.unlearndiffatk.k=0", "k=0"),
    ("attack.unlearndiffatk.timesteps=5000", "timesteps=5000 must be an integer in [1, 1000]"),
    ("attack.dreambooth.class_noun={nudty: person}", "unknown concept 'nudty'"),
    ("attack.ft-lr1e-5.modules=attn2,(bad", "modules[1]='(bad' must be a regular expression"),
    ("method.advunlearn.layers=-1", "layers[0]=-1"),
    ("method.uce.tokens=first", "'first' must be one of last, all"),
    ("metric.fid.feature=100", "feature=100 must be one of 64, 192, 768, 2048"),
    ("metric.fid.reference=/nonexistent/coco", "'/nonexistent/coco' must be an existing directory"),
    ("method.esd.prompt=[a, b]", "prompt=['a', 'b'] must be a string"),
]


@pytest.mark.parametrize(("item", "needle"), SET_CASES, ids=[i for i, _ in SET_CASES])
def test_bad_set_values_exit_2(item, needle):
    assert_refused(*invoke("run", "--quiet", "--set", item), needle)


def test_set_values_are_typed_by_the_schema():
    """The comma/YAML rules: lists split, strings keep commas, none is a string, no is false."""
    from unlearn_bench.registry import Registry

    reg = Registry.load(None, ["method.esd.prompt=nude body, photograph", "method.esd.anchor=none",
                               "attack.ft-lr1e-5.steps=50,100", "attack.ft-lr1e-5.prompts=a, b",
                               "model.sd14.allow_download=no", "method.uce.guide=\"x, y\"",
                               "attack.ft-lr1e-5.lr=1e-4", "attack.unlearndiffatk.k.red=2"])
    esd = reg.method("esd")
    assert esd.p("prompt") == "nude body, photograph" and esd.p("anchor") == "none"
    ft = reg.attack("ft-lr1e-5")
    assert list(ft.p("steps")) == [50, 100] and list(ft.p("prompts")) == ["a", "b"] and ft.p("lr") == 1e-4
    assert reg.model("sd14").allow_download is False
    assert reg.method("uce").p("guide") == "x, y"
    assert dict(reg.attack("unlearndiffatk").p("k")) == {"default": 3, "nudity": 5, "red": 2}
    assert Registry.load(None, ["model.sd14.allow_download=yes"]).model("sd14").allow_download is True


# --- registry files -----------------------------------------------------------------------------------------
def _set(path: str, value: Any) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        *parents, last = path.split("/")
        for p in parents:
            data = data[p]
        data[last] = value
    return edit


def _drop(path: str) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        *parents, last = path.split("/")
        for p in parents:
            data = data[p]
        del data[last]
    return edit


REGISTRY_CASES = [
    ("section-is-list", _set("methods", ["esd", "none"]), "section 'methods' must be a mapping"),
    ("entry-not-mapping", _set("methods/esd", 3), "methods.esd: the entry must be a mapping of fields, got 3"),
    ("params-string", _set("methods/esd/params", "lr=1"), "methods.esd.params must be a mapping, got 'lr=1'"),
    ("scaled-list", _set("methods/esd/scaled", ["tiny"]), "methods.esd.scaled must be a mapping"),
    ("scaled-group-string", _set("methods/esd/scaled/tiny", "fast"), "methods.esd.scaled.tiny must be a mapping"),
    ("schema-list", _set("methods/esd/schema", ["float>0"]), "methods.esd.schema must be a mapping"),
    ("schema-syntax", _set("methods/esd/schema/lr", "flaot>0"), "unknown type 'flaot>0'. did you mean float?"),
    ("extends-unknown", _set("methods/esd2", {"extends": "esdd"}), "unknown method 'esdd'. did you mean esd?"),
    ("extends-cycle", lambda d: d["methods"].update(a={"extends": "b"}, b={"extends": "a"}), "`extends` cycle"),
    ("missing-module", _drop("methods/esd/module"), "methods.esd.module: missing"),
    ("module-format", _set("methods/esd/module", "methods.esd"), "module='methods.esd' must be 'package.module:Class'"),
    ("concept-no-target", _drop("concepts/c/target"), "missing required field 'target'"),
    ("concept-no-eval", _drop("concepts/c/eval_prompts"), "missing required field 'eval_prompts'"),
    ("concept-no-attack", _drop("concepts/c/attack_prompts"), "missing required field 'attack_prompts'"),
    ("concept-unknown-field", _set("concepts/c/relatd", []), "unknown field 'relatd'. did you mean related?"),
    ("suite-no-seeds", _drop("suites/s/seeds"), "missing required field 'seeds'"),
    ("seeds-abc", _set("suites/s/seeds", ["abc"]), "seeds[0]='abc' must be an integer >= 0"),
    ("seeds-negative", _set("suites/s/seeds", [-1]), "seeds[0]=-1 must be an integer >= 0"),
    ("entry-unknown-field", _set("methods/esd/desription", "x"),
     "unknown field 'desription'. did you mean description?"),
    ("metric-no-direction", _drop("metrics/m/higher_is_better"), "higher_is_better=null must be declared"),
    ("model-kind", _set("models/tiny/kind", "flux"), "kind='flux' must be one of tiny, toy, sd, sdxl"),
    ("model-steps", _set("models/tiny/steps", "abc"), "models.tiny.steps='abc' must be an integer >= 1"),
    ("prompt-set-empty", _set("prompt_sets/p", {"description": "x"}), "needs `prompts` (a list) or `file`"),
    ("prompt-set-format", _set("prompt_sets/p/format", "xml"), "format='xml' must be one of auto"),
    ("version-string", _set("version", "one"), "version='one' must be an integer"),
    # values: the SD default is refused even where the model's scaled group would replace it
    ("default-off-schema", _set("methods/esd/params/lr", -1), "params.lr=-1 must be a number > 0"),
    ("scaled-off-schema", _set("methods/esd/scaled/tiny/lr", float("nan")), "scaled.tiny.lr=nan"),
]


def write_registry(tmp_path: Path, edit: Callable[[dict], None] | None = None, text: str | None = None) -> Path:
    data = copy.deepcopy(BASE)
    if edit:
        edit(data)
    path = tmp_path / "registry.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def test_the_base_registry_is_valid(tmp_path):
    code, output = invoke("validate", str(write_registry(tmp_path)))
    assert code == 0, output


@pytest.mark.parametrize(("edit", "needle"), [c[1:] for c in REGISTRY_CASES], ids=[c[0] for c in REGISTRY_CASES])
def test_malformed_registry_files_exit_2(tmp_path, edit, needle):
    path = write_registry(tmp_path, edit)
    assert_refused(*invoke("validate", str(path)), needle)
    assert_refused(*invoke("run", "--quiet", "--registry", str(path)), needle)


RAW_CASES = [
    ("duplicate-key", yaml.safe_dump(BASE, sort_keys=False).replace("lr: 1.0e-05\n", "lr: 1.0e-05\n      lr: 2\n"),
     "duplicate key 'lr' in methods.esd.params (first at line"),
    ("not-yaml", "methods: [\n", "not valid YAML"),
    ("top-level-list", "- models\n", "top level must be a mapping"),
    ("unknown-section", "methodz: {}\n", "unknown section(s) ['methodz']. did you mean methods?"),
]


@pytest.mark.parametrize(("text", "needle"), [c[1:] for c in RAW_CASES], ids=[c[0] for c in RAW_CASES])
def test_unparseable_registry_files_exit_2(tmp_path, text, needle):
    assert_refused(*invoke("validate", str(write_registry(tmp_path, text=text))), needle)


VALIDATE_CASES = [
    ("param-without-schema", _drop("methods/esd/schema/train"), "params without a schema entry: ['train']"),
    ("schema-without-param", _set("methods/esd/schema/eta", "float"), "schema entries without a param: ['eta']"),
    ("scaled-unused-group", _set("methods/esd/scaled/tyni", {}), "scaled.tyni: no model uses this group"),
    ("module-missing", _set("methods/esd/module", "unlearn_bench.methods.nope:ESD"),
     "no module named 'unlearn_bench.methods.nope'"),
    ("class-missing", _set("methods/esd/module", "unlearn_bench.methods.esd:ESDD"),
     "'unlearn_bench.methods.esd' defines no 'ESDD'. did you mean ESD?"),
    ("suite-unknown-method", _set("suites/s/methods", ["none", "esdd"]), "unknown method 'esdd'"),
    ("suite-duplicate", _set("suites/s/attacks", ["none", "none"]), "attacks listed twice: ['none']"),
    ("concept-unknown-prompts", _set("concepts/c/eval_prompts", "q"), "unknown prompt set 'q'"),
    ("default-suite", _set("defaults/suite", "t"), "defaults.suite: unknown suite 't'"),
]


@pytest.mark.parametrize(("edit", "needle"), [c[1:] for c in VALIDATE_CASES], ids=[c[0] for c in VALIDATE_CASES])
def test_validate_reports_semantic_problems(tmp_path, edit, needle):
    assert_refused(*invoke("validate", str(write_registry(tmp_path, edit))), needle)


def test_validate_lists_every_problem_at_once(tmp_path):
    def edit(data: dict) -> None:
        data["methods"]["esd"]["params"] = "x"
        data["suites"]["s"]["seeds"] = ["abc"]
    code, output = invoke("validate", str(write_registry(tmp_path, edit)))
    assert_refused(code, output, "2 problem(s)", "methods.esd.params", "seeds[0]='abc'")


def test_missing_registry_file_exits_2(tmp_path):
    assert_refused(*invoke("run", "--registry", str(tmp_path / "nope.yaml")), "nope.yaml")


# --- prompt CSVs --------------------------------------------------------------------------------------------
CSV_CASES = [
    ("missing", None, "file not found"),
    ("no-prompt-column", "text,seed\na,1\n", "no 'prompt' column"),
    ("bad-seed", "prompt,seed\na,1\nb,abc\n", ":3: bad seed 'abc'"),
    ("negative-seed", "prompt,seed\na,-4\n", "bad seed '-4'"),
    ("bad-guidance", "prompt,evaluation_seed,evaluation_guidance\na,1,high\n", "bad evaluation_guidance 'high'"),
    ("nan-guidance", "prompt,evaluation_seed,evaluation_guidance\na,1,nan\n", "bad evaluation_guidance 'nan'"),
    ("empty-file", "", "empty file"),
    ("header-only", "prompt,seed\n", "no prompts"),
    ("empty-prompt", "prompt\na\n\" \"\n", ":3: empty prompt"),
    ("not-utf8", b"prompt\n\xff\xfe\n", "not a UTF-8 text file"),
]


@pytest.mark.parametrize(("content", "needle"), [c[1:] for c in CSV_CASES], ids=[c[0] for c in CSV_CASES])
def test_broken_prompt_files_exit_2(tmp_path, content, needle):
    csv = tmp_path / "prompts.csv"
    if isinstance(content, bytes):
        csv.write_bytes(content)
    elif content is not None:
        csv.write_text(content, encoding="utf-8")
    path = write_registry(tmp_path, _set("prompt_sets/p", {"file": str(csv)}))
    assert_refused(*invoke("run", "--quiet", "--registry", str(path)), needle, str(csv))


# --- in a fresh interpreter: exit 2, no traceback, and torch never imported ----------------------------------
WRAPPER = ("import sys, runpy\nsys.argv = ['bench', *sys.argv[1:]]\n"
           "try:\n    runpy.run_module('unlearn_bench', run_name='__main__')\nexcept SystemExit:\n"
           "    print('TORCH' if 'torch' in sys.modules else 'NOTORCH', file=sys.stderr)\n    raise\n")


@pytest.mark.parametrize("args", [
    ["run", "--quiet", "--set", "method.esd.lr=nan"],
    ["run", "--quiet", "--set", "attack.ft-lr1e-5.steps=-1", "--model", "sd14"],
    ["run", "--quiet", "--device", "tpu"],
    ["run", "--quiet", "--seeds", ""],
], ids=["lr-nan", "steps-negative-sd14", "device", "empty-seeds"])
def test_bad_input_exits_2_without_importing_torch(args):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", WRAPPER, *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "NOTORCH" in proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    assert "unlearn_bench.registry" in imported and not {m for m in imported if m.split(".")[0] == "torch"}
