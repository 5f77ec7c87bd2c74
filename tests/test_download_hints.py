"""Every download command the harness prints must be one the pinned huggingface-hub's CLI accepts.

The hints are run for real with `--dry-run` and the hub offline: the CLI then fails on the network (exit 1), never on
its own arguments (exit 2, "No such option", a glob read as a file name). This is what caught `huggingface-cli`
(removed from the hub) and `--exclude '*.bin' '*.ckpt'` (the second glob became a file to fetch).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from unlearn_bench.models.loading import WeightsMissing, check_available, download_command
from unlearn_bench.registry import Registry

HF = Path(sys.executable).parent / "hf"


def _hf_accepts(command: str) -> None:
    argv = shlex.split(command)
    assert argv[:2] == ["hf", "download"], command
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HOME": "/nonexistent-hf-home"}
    proc = subprocess.run([str(HF), *argv[1:], "--dry-run"], capture_output=True, text=True, env=env, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 2 and "No such option" not in out and "Usage:" not in out, (command, out[-2000:])


@pytest.mark.skipif(not HF.exists() and not shutil.which("hf"), reason="huggingface-hub's hf CLI is not installed")
def test_printed_download_commands_parse_with_the_pinned_hub(tmp_path: Path) -> None:
    reg = Registry.load(overrides=[f"model.sd14.path={tmp_path / 'nowhere'}"])
    with pytest.raises(WeightsMissing) as err:
        check_available(reg.model("sd14"))
    printed = [line.strip() for line in str(err.value).splitlines() if line.strip().startswith("hf download")]
    assert printed, str(err.value)
    commands = [*printed, download_command("timm/vit_large_patch14_clip_224.openai", "open_clip_model.safetensors")]
    for command in commands:
        _hf_accepts(command)


def test_download_command_gives_each_glob_its_own_option() -> None:
    argv = shlex.split(download_command("org/model"))
    assert argv[:3] == ["hf", "download", "org/model"]
    globs = [argv[i + 1] for i, a in enumerate(argv) if a == "--exclude"]
    assert set(globs) >= {"*.bin", "*.ckpt"} and len(argv) == 3 + 2 * len(globs)
