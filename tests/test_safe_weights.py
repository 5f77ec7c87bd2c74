"""Weights are checked at plan time, without torch: pickle-only folders are refused unless allow_pickle, damaged
safetensors files and model_index.json are named, and `bench run` turns each into exit status 2, not a traceback."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

from unlearn_bench.models.loading import (
    CorruptWeights,
    UnsafeWeights,
    WeightsMissing,
    check_available,
    check_safetensors,
)
from unlearn_bench.registry import RegistryError
from unlearn_bench.specs import ModelSpec

WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


def tiny_safetensors(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, dtype=np.float16)}, str(path))
    return path


def sd_folder(root: Path) -> Path:
    """A diffusers-shaped SD folder whose weights are real (tiny) safetensors files."""
    root.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"],
             "safety_checker": [None, None]}
    (root / "model_index.json").write_text(json.dumps(index))
    for comp, stem in WEIGHT_NAMES.items():
        (root / comp).mkdir()
        (root / comp / "config.json").write_text("{}")
        tiny_safetensors(root / comp / f"{stem}.safetensors")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.json").write_text("{}")
    return root


def spec(path: Path, **kw) -> ModelSpec:
    return ModelSpec(name="sd14", kind="sd", defaults="sd", family="sd1", hub_id="CompVis/stable-diffusion-v1-4",
                     path=str(path), **kw)


def to_pickle(folder: Path, comp: str, suffix: str = ".bin") -> Path:
    """Replace a component's safetensors with pickle-looking bytes (never loaded, so arbitrary bytes do)."""
    (folder / comp / f"{WEIGHT_NAMES[comp]}.safetensors").unlink()
    target = folder / comp / f"{WEIGHT_NAMES[comp]}{suffix}"
    target.write_bytes(b"\x80\x04\x95not really a pickle")
    return target


def test_a_valid_folder_passes_and_pickle_beside_safetensors_is_ignored(tmp_path):
    folder = sd_folder(tmp_path / "m")
    check_available(spec(folder))
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"junk")  # safetensors is what loads
    check_available(spec(folder))


def test_pickle_only_component_is_refused_unless_allowed(tmp_path):
    folder = sd_folder(tmp_path / "m")
    bad = to_pickle(folder, "unet")
    with pytest.raises(UnsafeWeights) as info:
        check_available(spec(folder))
    msg = str(info.value)
    assert str(bad) in msg and "allow_pickle=true" in msg and "safe_serialization=True" in msg
    assert isinstance(info.value, RegistryError)
    check_available(spec(folder, allow_pickle=True))
    tiny_safetensors(folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(CorruptWeights):  # allow_pickle does not excuse a damaged safetensors file
        check_available(spec(folder, allow_pickle=True))


def test_truncated_and_garbage_safetensors_are_named(tmp_path):
    good = tiny_safetensors(tmp_path / "good.safetensors")
    check_safetensors(good)
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-5])
    with pytest.raises(CorruptWeights, match="truncated") as info:
        check_safetensors(cut)
    assert str(cut) in str(info.value)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(CorruptWeights, match="junk.safetensors"):
        check_safetensors(junk)


def test_files_written_by_torch_pass_including_bf16(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    p = tmp_path / "t.safetensors"
    save_torch({"a": torch.zeros(3, 5, dtype=torch.bfloat16), "b": torch.ones(7, dtype=torch.int64),
                "c": torch.zeros(0)}, str(p), metadata={"format": "pt"})
    check_safetensors(p)


def test_plan_time_check_does_not_import_torch(tmp_path):
    folder = sd_folder(tmp_path / "m")
    to_pickle(folder, "text_encoder")
    code = ("import sys; from unlearn_bench.models.loading import check_available, UnsafeWeights; "
            "from unlearn_bench.specs import ModelSpec\n"
            f"s = ModelSpec(name='x', kind='sd', defaults='sd', family='sd1', path={str(folder)!r})\n"
            "try:\n    check_available(s)\nexcept UnsafeWeights as e:\n    print('refused', e)\n"
            "assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.startswith("refused") and "text_encoder/model.bin" in out


def test_load_sd_asks_diffusers_for_safetensors_only(monkeypatch):
    """The loader's own guard: diffusers refuses pickle when use_safetensors=True, and prefers safetensors but may
    fall back to pickle when it is None (allow_pickle); False would ignore safetensors that exist."""
    pytest.importorskip("torch")
    import types

    from unlearn_bench.models import sd

    seen = []

    class Stop(Exception):
        pass

    class FakePipe:
        @staticmethod
        def from_pretrained(source, **kwargs):
            seen.append(kwargs["use_safetensors"])
            raise Stop

    monkeypatch.setitem(sys.modules, "diffusers", types.SimpleNamespace(StableDiffusionPipeline=FakePipe,
                                                                         StableDiffusionXLPipeline=FakePipe))
    for allow in (False, True):
        with pytest.raises(Stop):
            sd.load_sd(spec(Path("/nowhere"), allow_pickle=allow))
    assert seen == [True, None]


# --- through the CLI: each case breaks a valid folder one way and names the file the message must point at --------
def _header(folder: Path, header: bytes) -> Path:
    p = folder / "unet" / "diffusion_pytorch_model.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 24)
    return p


def _edit_header(folder: Path, edit) -> Path:
    p = folder / "vae" / "diffusion_pytorch_model.safetensors"
    raw = p.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.dumps(edit(json.loads(raw[8:8 + n]))).encode()
    p.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n:])
    return p


def _truncate(p: Path, keep: int) -> Path:
    p.write_bytes(p.read_bytes()[:keep])
    return p


def _single(folder: Path, name: str, data: bytes) -> Path:
    p = folder.parent / name
    p.write_bytes(data)
    return p


CASES = {  # name -> (break the folder, return the path to pass as model path (None: the folder), the file named)
    "unet pickle .bin": lambda f: (None, to_pickle(f, "unet")),
    "text encoder pickle .bin": lambda f: (None, to_pickle(f, "text_encoder")),
    "vae pickle .ckpt": lambda f: (None, to_pickle(f, "vae", ".ckpt")),
    "unet pickle .pt": lambda f: (None, to_pickle(f, "unet", ".pt")),
    "unet pickle .pth": lambda f: (None, to_pickle(f, "unet", ".pth")),
    "vae pickle .pkl": lambda f: (None, to_pickle(f, "vae", ".pkl")),
    "truncated safetensors": lambda f: (None, _truncate(f / "unet" / "diffusion_pytorch_model.safetensors", -7)),
    "safetensors shorter than its length field": lambda f: (None, _truncate(f / "vae" /
                                                                            "diffusion_pytorch_model.safetensors", 5)),
    "header length beyond the file": lambda f: (None, _truncate(f / "unet" / "diffusion_pytorch_model.safetensors",
                                                                20)),
    "garbage header": lambda f: (None, _header(f, b"\xde\xad\xbe\xef" * 8)),
    "header not an object": lambda f: (None, _header(f, b"[1, 2, 3]")),
    "bytes appended": lambda f: (None, _append(f)),
    "shape does not fit offsets": lambda f: (None, _edit_header(f, lambda h: h | {"w": h["w"] | {"shape": [9]}})),
    "offsets missing": lambda f: (None, _edit_header(f, lambda h: h | {"b": {"dtype": "F16", "shape": [3]}})),
    "model_index.json not JSON": lambda f: (None, _write(f / "model_index.json", "{'unet': ")),
    "model_index.json not an object": lambda f: (None, _write(f / "model_index.json", "[]")),
    "listed component folder missing": lambda f: (None, _rmtree(f / "vae")),
    "component without weights": lambda f: (None, _rm(f / "unet" / "diffusion_pytorch_model.safetensors").parent),
    "single-file .ckpt": lambda f: _twice(_single(f, "sd-v1-4.ckpt", b"\x80\x04junk")),
    "single-file .bin": lambda f: _twice(_single(f, "model.bin", b"\x80\x04junk")),
    "single-file truncated .safetensors": lambda f: _twice(_truncate(
        tiny_safetensors(f.parent / "one.safetensors"), -3)),
}


def _append(folder: Path) -> Path:
    p = folder / "vae" / "diffusion_pytorch_model.safetensors"
    with p.open("ab") as fh:
        fh.write(b"\x00" * 16)
    return p


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


def _rm(p: Path) -> Path:
    p.unlink()
    return p


def _rmtree(p: Path) -> Path:
    import shutil

    shutil.rmtree(p)
    return p


def _twice(p: Path) -> tuple[Path, Path]:
    return p, p


@pytest.mark.parametrize("case", sorted(CASES))
def test_bench_run_exits_2_naming_the_bad_weights_file(tmp_path, case):
    from unlearn_bench.cli import app

    folder = sd_folder(tmp_path / "model")
    model_path, named = CASES[case](folder)
    result = CliRunner().invoke(app, [
        "run", "--model", "sd14", "--set", f"model.sd14.path={model_path or folder}", "--concept", "nudity",
        "--methods", "none", "--attacks", "none", "--metrics", "nudenet", "--seeds", "0",
        "--out", str(tmp_path / "out"), "--store", str(tmp_path / "store")])
    assert result.exit_code == 2, result.output
    assert str(named) in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "store").exists()  # refused before any work


def test_error_classes_are_registry_errors():
    assert all(issubclass(c, RegistryError) for c in (UnsafeWeights, CorruptWeights, WeightsMissing))


def test_allow_pickle_is_a_model_setting_of_the_registry(tmp_path):
    from unlearn_bench.registry import Registry

    folder = sd_folder(tmp_path / "m")
    to_pickle(folder, "unet")
    reg = Registry.load(None, [f"model.sd14.path={folder}", "model.sd14.allow_pickle=true"])
    model = reg.model("sd14")
    assert model.allow_pickle is True and "allow_pickle" not in model.identity()  # not part of any stage key
    check_available(model)
    with pytest.raises(UnsafeWeights):
        check_available(Registry.load(None, [f"model.sd14.path={folder}"]).model("sd14"))
