"""Registry loading, name resolution with suggestions, typed overrides, and the torch-free CLI start-up."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.registry import Registry, RegistryError, parse_value


def test_shipped_registry_validates(registry):
    assert registry.validate() == []


def test_unknown_method_suggests_nearest(registry):
    with pytest.raises(RegistryError, match="did you mean esd") as exc:
        registry.method("esdd")
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
    code = ("import sys; from bench.cli import app\n"
            "try:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('TORCH' if 'torch' in sys.modules else 'NOTORCH', file=sys.stderr); raise\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [["--help"], ["ls"], ["ls", "attacks"], ["validate"]])
def test_cli_light_commands_do_not_import_torch(args):
    proc = _run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "NOTORCH" in proc.stderr


def test_run_with_unknown_method_exits_2_before_loading():
    proc = _run_cli("run", "--methods", "esdd", "--quiet")
    assert proc.returncode == 2
    assert "did you mean esd" in proc.stderr.lower()
    assert "NOTORCH" in proc.stderr  # nothing heavy was imported before the error


def test_missing_real_weights_exit_2_naming_the_download(tmp_path):
    env_cmd = _run_cli("run", "--model", "sd14", "--methods", "none", "--attacks", "none", "--quiet",
                       "--out", str(tmp_path / "o"), "--set", f"model.sd14.path={tmp_path / 'nowhere'}")
    assert env_cmd.returncode == 2
    assert "CompVis/stable-diffusion-v1-4" in env_cmd.stderr and "huggingface-cli download" in env_cmd.stderr


def test_esd_variants_keep_their_parameter_set_on_every_model():
    """`esd` on toy defaults to ESD-x (scaled.toy); the named variants must not inherit that choice."""
    reg = Registry.load()
    for model in ("toy", "tiny", "sd14"):
        for variant in ("esd-u", "esd-x", "esd-all"):
            assert reg.method(variant, reg.model(model)).p("train") == variant, (model, variant)
    assert reg.method("esd", reg.model("toy")).p("train") == "esd-x"
    assert reg.method("esd", reg.model("sd14")).p("train") == "esd-u"
