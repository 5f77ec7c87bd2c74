"""Registry loading, name resolution with suggestions, typed overrides, and the torch-free CLI start-up."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from unlearn_bench.registry import DEFAULT_REGISTRY, Registry, RegistryError, parse_value


def test_shipped_registry_validates(registry):
    assert registry.validate() == []


def test_unknown_method_suggests_nearest(registry):
    with pytest.raises(RegistryError, match="did you mean uce") as exc:
        registry.method("ucee")
    assert "Known methods" in str(exc.value)


def test_scaled_defaults_apply_per_model_group(registry):
    sd = registry.method("esd", registry.model("sd14"))
    tiny = registry.method("esd", registry.model("tiny"))
    assert sd.p("iterations") == 1000 and sd.p("lr") == pytest.approx(1e-5)
    assert tiny.p("iterations") < sd.p("iterations")
    assert isinstance(sd.p("lr"), float)  # 1.0e-5 must not be read as a string


def test_extends_inherits_and_overrides(registry):
    x = registry.method("esd-x", registry.model("sd14"))
    assert x.p("train") == "esd-x" and x.p("lr") == pytest.approx(1e-5)


def test_set_overrides_are_typed_and_checked():
    reg = Registry.load(overrides=["method.esd.lr=2e-4", "attack.ft-lr1e-5.steps=5,10", "esd.eta=3"])
    assert reg.method("esd").p("lr") == pytest.approx(2e-4)
    assert reg.method("esd").p("eta") == 3.0 and isinstance(reg.method("esd").p("eta"), float)
    assert list(reg.attack("ft-lr1e-5").p("steps")) == [5, 10]
    with pytest.raises(RegistryError, match="unknown parameter 'lrr'.*lr"):
        Registry.load(overrides=["method.esd.lrr=1"]).method("esd")
    with pytest.raises(RegistryError, match="must be a number"):
        Registry.load(overrides=["method.esd.lr=fast"]).method("esd")
    with pytest.raises(RegistryError, match="ambiguous"):
        Registry.load(overrides=["none.x=1"])


def test_parse_value():
    assert parse_value("1e-5") == pytest.approx(1e-5)
    assert parse_value("true") is True and parse_value("50,100") == [50, 100] and parse_value("esd-x") == "esd-x"


def test_specs_are_frozen_and_hashable(registry):
    spec = registry.method("esd")
    with pytest.raises(AttributeError):
        spec.name = "x"  # type: ignore[misc]
    assert hash(spec) == hash(registry.method("esd"))


def test_validate_reports_a_bad_file(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("models: {}\nmethodz: {}\n")
    with pytest.raises(RegistryError, match="did you mean methods"):
        Registry.load(bad)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    code = ("import sys; from unlearn_bench.cli import app\n"
            "try:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('TORCH' if 'torch' in sys.modules else 'NOTORCH', file=sys.stderr); raise\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [["--help"], ["ls"], ["ls", "attacks"], ["validate", "--no-import"]])
def test_cli_light_commands_do_not_import_torch(args):
    proc = _run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "NOTORCH" in proc.stderr


def test_run_with_unknown_method_exits_2_before_loading():
    proc = _run_cli("run", "--methods", "ucee", "--quiet")
    assert proc.returncode == 2
    assert "did you mean uce" in proc.stderr.lower()
    assert "NOTORCH" in proc.stderr  # nothing heavy was imported before the error


def test_missing_real_weights_exit_2_naming_the_download(tmp_path):
    env_cmd = _run_cli("run", "--model", "sd14", "--methods", "none", "--attacks", "none", "--quiet",
                       "--out", str(tmp_path / "o"), "--set", f"model.sd14.path={tmp_path / 'nowhere'}")
    assert env_cmd.returncode == 2
    assert "hf download CompVis/stable-diffusion-v1-4 --exclude" in env_cmd.stderr


def test_esd_variants_keep_their_parameter_set_on_every_model():
    """`esd` on toy defaults to ESD-x (scaled.toy); the named variants must not inherit that choice."""
    reg = Registry.load()
    for model in ("toy", "tiny", "sd14"):
        for variant in ("esd-u", "esd-x", "esd-all"):
            assert reg.method(variant, reg.model(model)).p("train") == variant, (model, variant)
    assert reg.method("esd", reg.model("toy")).p("train") == "esd-x"
    # SD: ESD-u, except ESD-x for the artistic style (per concept)
    assert dict(reg.method("esd", reg.model("sd14")).p("train")) == {"default": "esd-u", "vangogh": "esd-x"}


# --- the schema language (bench/schema.py) -------------------------------------------------------------------
ACCEPT = [  # (type, value as written in registry.yaml)
    ("float>0", 1e-5), ("float>0", 3), ("float>=0", 0.0), ("float[0,1)", 0.0), ("float[0,1]", 1),
    ("float(0,1)", 0.5), ("int>=1", 1), ("int[1,1000]", 1000), ("int<0", -3), ("bool", False), ("str", ""),
    ("str|null", None), ("choice(esd-u|esd-x)", "esd-x"), ("choice(1|2)", 2), ("list[int>=1]", []),
    ("list[int>=1]{1,}", [50, 100]), ("list[float>=0]{2}", [0.1, 0.0]), ("list[str]{1,2}", ["a", "b"]),
    ("list[regex]", ["attn2", r"^time_embedding"]), ("per-concept[int>=1]", 3),
    ("per-concept[int>=1]", {"default": 3, "nudity": 5}), ("per-concept[str]", {"red": "shape"}),
    ("str|list[str]", ["a", "b"]), ("list[choice(a|b)]", ["b", "a"]), ("dir|null", None), ("str{1,}", "x"),
]
REJECT = [  # (type, value, words the message must contain)
    ("float>0", 0, "a number > 0"), ("float>0", float("nan"), "nan and inf"), ("float>0", float("inf"), "nan"),
    ("float>0", "1e-5", "a number"), ("float>0", True, "a number"), ("float[0,1)", 1.0, "in [0, 1)"),
    ("float(0,1)", 0, "in (0, 1)"), ("int>=1", 0, ">= 1"), ("int>=1", 2.0, "an integer"), ("int", None, "integer"),
    ("bool", "yes", "true or false"), ("bool", 1, "true or false"), ("str", None, "a string"), ("str", 3, "string"),
    ("choice(esd-u|esd-x)", "esd-xx", "did you mean esd-x"), ("choice(1|2)", "1", "one of 1, 2"),
    ("list[int>=1]", 5, "a list"), ("list[int>=1]", [1, 0], "[1]=0"), ("list[str]{1,}", [], "at least 1"),
    ("list[float>=0]{2}", [0.1], "exactly 2"), ("list[str]{1,2}", ["a", "b", "c"], "at most 2"),
    ("list[regex]", ["("], "regular expression"), ("per-concept[int>=1]", {"nudity": 0}, ".nudity=0"),
    ("per-concept[int>=1]", {"nudty": 3}, "unknown concept 'nudty'. did you mean nudity"),
    ("str|list[str]", [1], "[0]=1"), ("dir", "/nonexistent/dir", "does not exist"), ("file", "/", "is not one"),
    ("prompt-set", "nope", "unknown prompt set 'nope'"), ("method", "esd+metaa", "unknown wrapper 'metaa'"),
]
SYNTAX = [("flaot>0", "did you mean float"), ("int>>1", "bad bound"), ("list[int", "unbalanced"),
          ("choice()", "choice needs"), ("int[2,1]", "empty interval"), ("list[str]{a}", "bad length"),
          ("str{x}", "bad length"), ("per-concept[int]x", "unexpected"), ("", "non-empty"), ("float>1e999", "finite")]


def _ctx():
    from unlearn_bench.schema import Ctx

    return Ctx({"concept": ("nudity", "red"), "prompt-set": ("toy-red",), "method": ("esd",), "wrapper": ("meta",)})


@pytest.mark.parametrize(("text", "value"), ACCEPT, ids=[f"{t}:{v!r}" for t, v in ACCEPT])
def test_schema_accepts_and_returns_registry_values_unchanged(text, value):
    from unlearn_bench.schema import parse_type

    out = parse_type(text).check(value, _ctx())
    assert out == value and type(out) is type(value)  # never converted: stage hashes depend on these values


@pytest.mark.parametrize(("text", "value", "words"), REJECT, ids=[f"{t}:{v!r}" for t, v, _ in REJECT])
def test_schema_rejects_naming_the_value(text, value, words):
    from unlearn_bench.schema import SchemaError, parse_type

    with pytest.raises(SchemaError) as exc:
        parse_type(text).check(value, _ctx())
    assert words in exc.value.message("p")


@pytest.mark.parametrize(("text", "words"), SYNTAX, ids=[t for t, _ in SYNTAX])
def test_schema_syntax_errors_say_what_is_wrong(text, words):
    from unlearn_bench.schema import SchemaSyntaxError, parse_type

    with pytest.raises(SchemaSyntaxError, match=re.escape(words)):
        parse_type(text)


CLI = [  # --set text -> typed value
    ("float>0", "1e-5", 1e-5), ("float>0", "3", 3.0), ("int>=1", "1e3", 1000), ("list[int>=1]", "50,100", [50, 100]),
    ("list[int>=1]", "[5, 10]", [5, 10]), ("list[int>=1]", "7", [7]), ("list[str]", "a, b", ["a", "b"]),
    ("list[str]", '"a, b"', ["a, b"]), ("list[str]", "", []), ("str", "nude body, photograph", "nude body, photograph"),
    ("str", "none", "none"), ("str", "2020", "2020"), ("str", "a: b", "a: b"), ("str", "", ""), ("str|null", "~", None),
    ("str|null", "null", None), ("bool", "no", False), ("bool", "true", True), ("choice(1|2)", "2", 2),
    ("str|list[str]", "a, b", "a, b"), ("str|list[str]", "[a, b]", ["a", "b"]), ("float>0|null", "", None),
    ("per-concept[int>=1]", "{default: 3, red: 2}", {"default": 3, "red": 2}),
    ("list[float>=0]", "[1, 0.5]", [1.0, 0.5]),
]


@pytest.mark.parametrize(("text", "value", "expected"), CLI, ids=[f"{t}:{v}" for t, v, _ in CLI])
def test_set_values_are_read_as_yaml_then_typed(text, value, expected):
    from unlearn_bench.schema import from_cli, parse_type

    out = from_cli(parse_type(text), value, _ctx())
    assert out == expected and type(out) is type(expected)


def test_toy_attribute_choices_match_the_toy_world():
    """bench.catalogue copies the toy world's colours and shapes so reading the registry never imports numpy."""
    from unlearn_bench.catalogue import TOY_COLOURS, TOY_SHAPES
    from unlearn_bench.toy import world

    assert TOY_COLOURS == tuple(world.COLOURS) and TOY_SHAPES == tuple(world.SHAPES)


def test_duplicate_keys_are_refused_with_both_lines(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("methods:\n  esd:\n    module: a:B\n  esd:\n    module: c:D\n")
    with pytest.raises(RegistryError, match=r"line 4: duplicate key 'esd' in methods \(first at line 2"):
        Registry.load(path)


def test_validate_module_check_finds_or_imports():
    from unlearn_bench.registry_check import module_problem

    assert module_problem("unlearn_bench.errors:RegistryError") is None
    assert module_problem("unlearn_bench.errors:RegistryError", import_modules=True) is None
    assert "is not a class" in module_problem("unlearn_bench.errors:suggest", import_modules=True)
    assert "no module named" in module_problem("unlearn_bench.nope:X")
    assert "defines no 'Registr'" in module_problem("unlearn_bench.registry:Registr")


def test_every_shipped_component_declares_a_schema_for_each_param(registry):
    for section in ("methods", "wrappers", "attacks", "metrics"):
        for name in registry.names(section):
            raw = registry.entry(section, name)
            assert set(raw.get("schema") or {}) == set(raw.get("params") or {}), (section, name)


def test_validate_imports_every_module_by_default(tmp_path):
    """`bench validate` imports what the registry names: a module whose own import fails is reported."""
    pkg = tmp_path / "brokenpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text("import no_such_dependency_xyz\nclass M:\n    pass\n")
    text = Path(DEFAULT_REGISTRY).read_text().replace("module: unlearn_bench.methods.uce:UCE",
                                                      "module: brokenpkg.mod:M", 1)
    path = tmp_path / "r.yaml"
    path.write_text(text)
    env = os.environ | {"PYTHONPATH": str(tmp_path)}
    fast = subprocess.run([sys.executable, "-m", "unlearn_bench", "validate", "--no-import", str(path)], env=env,
                          capture_output=True, text=True, timeout=120)
    full = subprocess.run([sys.executable, "-m", "unlearn_bench", "validate", str(path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert fast.returncode == 0, fast.stderr  # parsing finds the class
    assert full.returncode == 2 and "no_such_dependency_xyz" in full.stderr and "Traceback" not in full.stderr


@pytest.mark.parametrize("name, train, eta", [("esd-u-1", "esd-u", 1.0), ("esd-u-3", "esd-u", 3.0),
                                              ("esd-f-3", "esd-all", 3.0)])
def test_meta_unlearning_esd_variants_name_their_parameter_set_and_negative_guidance(name, train, eta):
    """ESD-u-1 / ESD-u-3 / ESD-f-3: the parameter set (u = no cross-attention, f = full) and eta in the name, on SD
    with the Meta-Unlearning script's optimiser settings, and on the toy with the toy scale of esd."""
    reg = Registry.load()
    sd, toy = reg.method(name, reg.model("sd14")), reg.method(name, reg.model("toy"))
    for spec in (sd, toy):
        assert (spec.params["train"], spec.params["eta"]) == (train, eta)
    assert (sd.params["optimizer"], sd.params["weight_decay"], sd.params["grad_clip"]) == ("adamw", 1e-4, 1.0)
    assert sd.params["iterations"] == 1000 and sd.params["lr"] == 1e-5
    assert toy.params["iterations"] == reg.method("esd", reg.model("toy")).params["iterations"]


def test_esd_variant_toy_calibration_grid_varies_only_the_lr_and_holds_each_chosen_lr():
    """docs/calibration/esd-variants-toy.yaml is the grid the named ESD variants' toy lr was picked from: each point
    must be its variant with the lr alone changed (else the README's calibration table compares more than lr), and
    each variant's toy lr must be one of its own grid points (the choice came from the grid, not outside it)."""
    grid_file = Path(__file__).resolve().parents[1] / "docs" / "calibration" / "esd-variants-toy.yaml"
    reg = Registry.load(includes=[grid_file], env=False)
    toy = reg.model("toy")
    points = [n for n in reg.names("methods") if re.fullmatch(r"esd-[uf]-[13]-lr\d+e-\d+", n)]
    lrs: dict[str, set[float]] = {}
    for name in points:
        variant = name.rsplit("-lr", 1)[0]
        point, base = reg.method(name, toy).params, reg.method(variant, toy).params
        assert {k for k in point if point[k] != base[k]} <= {"lr"}, name
        assert point["lr"] == float(name.rsplit("-lr", 1)[1]), name
        lrs.setdefault(variant, set()).add(point["lr"])
    assert set(lrs) == {"esd-u-1", "esd-u-3", "esd-f-3"} and all(len(v) >= 4 for v in lrs.values())
    for variant, grid in lrs.items():
        assert reg.method(variant, toy).params["lr"] in grid, variant
