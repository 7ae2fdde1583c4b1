"""scripts/install_torch.sh (make setup): the CPU build of torch on a machine without an NVIDIA
GPU, whichever index pip is configured with; the CUDA build where nvidia-smi runs."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "install_torch.sh")
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the Linux branches")


def executable(path, text: str) -> str:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def fake_python(tmp_path, resolves_to: str) -> str:
    """A python whose `pip install --dry-run --report -` resolves torch to `resolves_to` (what
    pip's configured index serves); anything else runs the real interpreter."""
    report = json.dumps({"install": [{"metadata": {"name": "torch", "version": resolves_to}}]})
    return executable(tmp_path / "python", f"""#!{sys.executable}
import os, sys
if sys.argv[1:4] == ["-m", "pip", "install"] and "--dry-run" in sys.argv:
    print({report!r})
else:
    os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])
""")


def pip_args(python: str, *args: str, path: str | None = None) -> str:
    env = {**os.environ, "PAGEDLLM_TORCH_DRY_RUN": "1"}
    if path is not None:
        env["PATH"] = path + os.pathsep + env["PATH"]
    out = subprocess.run(["sh", SCRIPT, python, *args], capture_output=True, text=True,
                         env=env, timeout=120, check=True).stdout
    return " ".join(out.split())


def test_public_index_alone_gets_the_cpu_index(tmp_path):
    # PyPI's Linux torch==2.13.0 is the CUDA build (no +cpu): the CPU index is used instead.
    assert pip_args(fake_python(tmp_path, "2.13.0")) == f"pip install {CPU_INDEX} torch==2.13.0"


def test_a_local_cpu_wheel_is_used_as_it_is(tmp_path):
    assert pip_args(fake_python(tmp_path, "2.13.0+cpu")) == "pip install torch==2.13.0"


def test_an_nvidia_gpu_gets_pips_cuda_build(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "nvidia-smi", "#!/bin/sh\nexit 0\n")
    python = fake_python(tmp_path, "2.13.0")
    assert pip_args(python, path=str(bin_dir)) == "pip install torch==2.13.0"


def test_explicit_index_and_spec(tmp_path):
    python = fake_python(tmp_path, "2.13.0")
    url = "https://download.pytorch.org/whl/cu128"
    assert pip_args(python, "torch==2.12.1", url) == f"pip install --index-url {url} torch==2.12.1"
    assert pip_args(python, "torch==2.13.0", "pip") == "pip install torch==2.13.0"


def test_this_machine_is_unchanged():
    """Here pip's configuration serves the CPU wheel, as CI's does: no index is added (the
    install stays offline). Skipped where pip resolves torch otherwise."""
    python = os.path.join(ROOT, ".venv", "bin", "python")
    if not os.path.exists(python):
        pytest.skip("no .venv")
    report = subprocess.run(
        [python, "-m", "pip", "install", "--dry-run", "--quiet", "--no-deps",
         "--ignore-installed", "--report", "-", "torch==2.13.0"],
        capture_output=True, text=True, timeout=120, check=False)
    if report.returncode or "+cpu" not in report.stdout:
        pytest.skip("pip here does not resolve torch to a local CPU wheel")
    assert pip_args(python) == "pip install torch==2.13.0"
