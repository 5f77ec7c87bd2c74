"""`bench show KIND NAME`: every parameter's resolved value per model group and where it was written (registry
line, scaled group, include file, --set), the fields of models/concepts/suites/prompt sets, JSON, did-you-mean
errors, and no torch import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from unlearn_bench.cli import app
from unlearn_bench.registry import DEFAULT_REGISTRY, Registry
from unlearn_bench.specs import ModelSpec, thaw

REGISTRY_LINES = DEFAULT_REGISTRY.read_text(encoding="utf-8").splitlines()


def line_of(text: str, after: str) -> int:
    """1-based line of the first line starting with `text` (stripped) below the line `after` (exact, unstripped)."""
    start = REGISTRY_LINES.index(after)
    return next(i + 1 for i in range(start, len(REGISTRY_LINES)) if REGISTRY_LINES[i].strip().startswith(text))


def show(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["show", *args], env={"COLUMNS": "80", **(env or {})})
    return result.exit_code, result.output


def show_json(*args: str) -> dict:
    code, out = show(*args, "--json")
    assert code == 0, out
    return json.loads(out)


def values(data: dict, param: str) -> dict:
    return next(p for p in data["params"] if p["name"] == param)["values"]


def test_method_shows_every_group_value_with_its_registry_line():
    data = show_json("method", "esd")
    assert data["module"] == "unlearn_bench.methods.esd:ESD" and data["paper"].startswith("Gandikota")
    assert data["defined_at"] == f"registry.yaml:{line_of('esd:', 'methods:')}"
    lr = values(data, "lr")
    assert lr["params"] == {"value": 1e-5, "source": "params", "at": f"registry.yaml:{line_of('lr:', '  esd:')}",
                            "via": None}
    assert lr["tiny"]["value"] == 1e-3 and lr["tiny"]["source"] == "scaled.tiny"
    assert lr["tiny"]["at"] == f"registry.yaml:{line_of('tiny:', '  esd:')}"
    assert lr["toy"]["value"] == 3e-4 and lr["toy"]["source"] == "scaled.toy"
    assert lr["sd"] == lr["params"]  # SD models have no scaled group: the paper default
    assert next(p for p in data["params"] if p["name"] == "train")["type"] == \
        "per-concept[choice(esd-u|esd-x|esd-x-strict|esd-all)]"
    assert values(data, "grad_clip")["params"]["at"]  # a written null is located too
    assert set(data["groups"]["sd"]) == {"sd14", "sd15", "sd21", "sdxl"} and data["groups"]["toy"] == ["toy"]


@pytest.mark.parametrize(("section", "kind", "name"), [
    ("methods", "method", "esd"), ("methods", "method", "esd-u"), ("wrappers", "wrapper", "meta"),
    ("attacks", "attack", "ft-lr5e-5"), ("metrics", "metric", "nudenet")])
def test_shown_values_are_what_a_run_resolves(section, kind, name):
    reg = Registry.load()
    data = show_json(kind, name)
    for group in ("params", "sd", "tiny", "toy"):
        model = None if group == "params" else ModelSpec(name="m", kind="tiny", defaults=group, family=group)
        spec = reg.component(section, name, model)
        assert {p["name"]: p["values"][group]["value"] for p in data["params"]} == thaw(spec.params)


def test_model_option_shows_only_that_models_group():
    data = show_json("attack", "ft-lr1e-5", "--model", "toy")
    assert data["model"] == "toy" and list(data["groups"]) == ["toy"]
    assert all(list(p["values"]) == ["toy"] for p in data["params"])
    assert values(data, "steps")["toy"]["value"] == [25, 50, 100]
    assert values(data, "optimizer")["toy"]["source"] == "params"  # toy's group does not change it
    sd = show_json("attack", "ft-lr1e-5", "--model", "sd14")
    assert values(sd, "steps")["sd"] == {"value": [50, 100, 200, 300], "source": "params",
                                         "at": f"registry.yaml:{line_of('steps:', '  ft-lr1e-5:')}", "via": None}


def test_inherited_values_name_the_parent_entry():
    data = show_json("attack", "ft-lr5e-5")
    assert data["extends"] == ["ft-lr1e-5"]
    assert values(data, "lr")["params"]["value"] == 5e-5 and values(data, "lr")["params"]["via"] is None
    batch = values(data, "batch_size")["params"]
    assert batch["via"] == "from ft-lr1e-5" and batch["at"] == f"registry.yaml:{line_of('batch_size:', '  ft-lr1e-5:')}"


def test_set_overrides_are_shown_as_the_source_in_every_group():
    data = show_json("method", "esd", "--set", "method.esd.lr=1e-4")
    for group, v in values(data, "lr").items():
        assert v["value"] == 1e-4 and v["source"] == "--set" and "method.esd.lr" in v["at"], group
    assert values(data, "eta")["params"]["source"] == "params"


def test_include_file_entries_and_overrides_cite_the_include(tmp_path):
    inc = tmp_path / "mine.yaml"
    inc.write_text("methods:\n"
                   "  esd-mine:\n"
                   "    extends: esd\n"
                   "    params: {eta: 2.0}\n"
                   "override:\n"
                   "  methods:\n"
                   "    esd:\n"
                   "      scaled:\n"
                   "        toy: {lr: 5.0e-4}\n", encoding="utf-8")
    data = show_json("method", "esd-mine", "--include", str(inc))
    assert data["defined_at"].endswith("mine.yaml:2") and "mine.yaml" in data["from"]
    assert values(data, "eta")["params"]["at"].endswith("mine.yaml:4")
    toy_lr = values(data, "lr")["toy"]
    assert toy_lr["value"] == 5e-4 and toy_lr["source"] == "scaled.toy" and toy_lr["at"].endswith("mine.yaml:9")
    assert toy_lr["via"] == "from esd, override"
    base = show_json("method", "esd", "--include", str(inc))
    assert values(base, "lr")["toy"]["via"] == "override" and "override in" in base["from"]


def test_composed_method_shows_the_base_and_each_wrapper():
    data = show_json("method", "esd+meta", "--model", "tiny")
    assert data["composed"] == "esd+meta" and data["name"] == "esd"
    [meta] = data["wrappers"]
    assert meta["kind"] == "wrapper" and meta["name"] == "meta"
    assert values(meta, "n_per_split")["tiny"]["value"] == 4
    code, out = show("method", "esd+meta")
    assert code == 0 and "method esd+meta" in out and "wrapper meta" in out


def test_model_concept_suite_and_prompt_set_fields():
    model = {r["name"]: r for r in show_json("model", "sd14")["fields"]}
    assert model["precision"]["value"] == "bf16"
    assert model["precision"]["at"] == f"registry.yaml:{line_of('precision:', '  sd14:')}"
    assert model["sampler"] == {"name": "sampler", "type": "choice(ddim|dpm|euler|lms)", "value": "ddim",
                                "source": "default", "at": "ModelSpec", "via": None}
    concept = show_json("concept", "nudity-i2p")
    fields = {r["name"]: r for r in concept["fields"]}
    assert concept["extends"] == ["nudity"] and fields["eval_prompts"]["value"] == "i2p-nudity-142"
    assert fields["eval_prompts"]["source"] == "file" and fields["eval_prompts"]["via"] is None
    assert fields["target"]["value"] == "nudity" and fields["target"]["via"] == "from nudity"
    suite = {r["name"]: r["value"] for r in show_json("suite", "toy")["fields"]}
    assert suite["model"] == "toy" and suite["seeds"] == [0, 1, 2]
    pset = show_json("prompt-set", "i2p-smoke")
    assert pset["file"]["exists"] and pset["file"]["path"].endswith("i2p-smoke.csv")
    code, out = show("model", "sd14", "--json", env={"BENCH_MODEL_SD14_PATH": "/models/sd14"})
    path = next(r for r in json.loads(out)["fields"] if r["name"] == "path")
    assert code == 0 and path["value"] == "/models/sd14" and path["source"] == "environment"
    assert path["at"] == "$BENCH_MODEL_SD14_PATH"


@pytest.mark.parametrize("args", [["method", "esd"], ["attack", "ft-lr1e-5", "--model", "toy"],
                                  ["metric", "nudenet"], ["concept", "nudity"], ["suite", "toy"], ["model", "sd14"],
                                  ["wrapper", "meta"], ["prompt-set", "toy-red"]])
def test_text_output_fits_80_columns(args):
    code, out = show(*args)
    assert code == 0, out
    assert max(len(line.rstrip()) for line in out.splitlines()) <= 80
    assert f"{args[0]} {args[1]}" in out.splitlines()[0]
    assert "registry.yaml:" in out


def test_text_output_names_groups_and_sources():
    code, out = show("method", "esd")
    assert code == 0
    assert "scaled.tiny" not in out  # the group column already says it: rows show just the file and line
    assert "esd-x" in out and "0.0003" in out  # the toy row of train and of lr
    code, out = show("method", "esd", "--model", "toy")
    assert "scaled.toy" in out and "params" in out and "uses the parameter group toy" in out
    code, out = show("metric", "nudenet")
    assert "list[float[0,1)]" in out  # schema types print as written (not eaten as markup)


@pytest.mark.parametrize(("args", "needle"), [
    (["methd", "esd"], "did you mean method?"),
    (["method", "ucee"], "did you mean uce?"),
    (["method", "meta"], "bench show wrapper meta"),
    (["method", "esd+metaa"], "did you mean meta?"),
    (["attack", "ft-lr1e5"], "did you mean ft-lr1e-5?"),
    (["method", "esd", "--model", "sd144"], "did you mean sd14?"),
    (["concept", "nudity", "--model", "toy"], "only methods, wrappers, attacks and metrics"),
    (["method", "esd", "--set", "method.esd.lrr=1"], "unknown parameter 'lrr'"),
])
def test_unknown_names_exit_2_with_did_you_mean(args, needle):
    code, out = show(*args)
    assert code == 2 and needle in out, out


def test_ls_caption_points_at_bench_show():
    result = CliRunner().invoke(app, ["ls", "methods"], env={"COLUMNS": "120"})
    assert result.exit_code == 0 and "bench show method NAME" in result.output


@pytest.mark.parametrize("args", [["show", "method", "esd+meta", "--model", "toy"],
                                  ["show", "model", "sd14", "--json"]])
def test_show_does_not_import_torch(args):
    code = ("import sys; from unlearn_bench.cli import app\n"
            "try:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('TORCH' if 'torch' in sys.modules else 'NOTORCH', file=sys.stderr); raise\n")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert "NOTORCH" in proc.stderr


def test_composed_method_shows_the_wrappers_settings_for_its_inner_method():
    """esd+meta on SD trains ESD as the official meta script does: show says so and cites the wrapper."""
    data = show_json("method", "esd+meta", "--model", "sd14")
    eta = values(data, "eta")["sd"]
    assert eta["value"] == 3.0 and eta["source"] == "wrapper" and "wrappers.meta.inner.esd" in eta["at"]
    plain = show_json("method", "esd", "--model", "sd14")
    assert values(plain, "eta")["sd"]["value"] == 1.0
