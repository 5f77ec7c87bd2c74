"""The distribution as a user installs it: `pip install .` (not editable) into a fresh venv, then from another folder
`bench ls` and `bench run --suite smoke` work, with the catalogue, the toy weights and the bundled prompt files read
from the installed package, and no generic top-level import names (methods, attacks, metrics) installed.

Why the dependencies come from the test venv (a .pth line to its site-packages) rather than a second download:
what can break in a wheel is the project's own files (what the build includes, and code that looks for files next
to the repository), not its dependencies, and re-installing torch would add minutes to every CI run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _sources(dest: Path) -> Path:
    """The checkout's files as a clean clone has them (tracked + untracked-not-ignored), links kept as links."""
    listing = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                             check=True).stdout.decode().split("\0")
    for rel in filter(None, listing):
        src, dst = REPO / rel, dest / rel
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree
        if rel.startswith("results/"):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst, follow_symlinks=False)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wheel")
    src = _sources(root / "src")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", str(py), "install",
                           "-q", "--no-deps", "--no-build-isolation", "--no-index", str(src)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    work = root / "elsewhere"
    work.mkdir()
    return {"venv": venv, "py": py, "purelib": purelib, "work": work, "root": root}


def _run(inst: dict[str, Path], *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BENCH_REGISTRY", "BENCH_INCLUDE")}
    env |= {"BENCH_CACHE": str(inst["root"] / "store"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(inst["venv"] / "bin" / "bench"), *args], cwd=inst["work"], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_wheel_holds_the_package_data_and_no_generic_names(installed: dict[str, Path]) -> None:
    code = ("import importlib.util as u, unlearn_bench, unlearn_bench.methods.esd as e; "
            "print(unlearn_bench.__file__); print(e.__file__); "
            "print([n for n in ('methods', 'attacks', 'metrics', 'bench') if u.find_spec(n)])")
    out = subprocess.run([str(installed["py"]), "-c", code], cwd=installed["work"], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, check=True).stdout.split("\n")
    pkg = installed["purelib"] / "unlearn_bench"
    assert Path(out[0]).parent == pkg and Path(out[1]).parent == pkg / "methods"
    assert out[2] == "[]", f"generic top-level names importable from the wheel: {out[2]}"
    registry = pkg / "registry.yaml"
    assert registry.is_file() and not registry.is_symlink()
    assert registry.read_bytes() == (REPO / "registry.yaml").read_bytes()
    for rel in ("toy/weights/unet.safetensors", "toy/weights/text_encoder.safetensors",
                "toy/weights/detector.safetensors", "toy/weights/config.json", "prompt_sets/i2p-smoke.csv"):
        assert (pkg / rel).is_file(), rel


def test_installed_cli_lists_and_runs_the_smoke_suite(installed: dict[str, Path]) -> None:
    version = _run(installed, "--version")
    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert version.returncode == 0 and version.stdout.strip() == f"unlearn-bench {expected}", version.stdout
    ls = _run(installed, "ls", "methods")
    assert ls.returncode == 0, ls.stderr
    assert "esd" in ls.stdout and "uce" in ls.stdout
    run = _run(installed, "run", "--suite", "smoke", "--out", "out", "-q")
    assert run.returncode == 0, run.stderr[-3000:]
    records = (installed["work"] / "out" / "records.csv").read_text().splitlines()
    header = records[0].split(",")
    methods = {r.split(",")[header.index("method")] for r in records[1:]}
    assert methods == {"none", "esd"}
    assert not (installed["work"] / "results").exists()  # nothing written beside the (absent) repository
