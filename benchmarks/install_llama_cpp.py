"""Install llama.cpp's Python bindings into their own virtualenv for the CPU peer benchmark.

`make llama-cpp` runs this with the system python. PyPI has only the sdist of
llama-cpp-python, so pip compiles llama.cpp here (cmake + a C++ compiler; several minutes):
native CPU code (-march=native: AVX-512, VNNI, BF16 where the CPU has them) and OpenMP
threads, as llama.cpp's own CPU build does, but without AMX: llama.cpp's AMX matmul
(ggml_backend_amx_mul_mat, used when the compiler targets AMX) segfaulted on the first decode
of SmolLM2's Q4_1 GGUF here (Xeon with AMX, 2026-12-02; llama.cpp issue 20824 reports the same
crash, unfixed). The multimodal library (mtmd) is left out: the benchmark runs a text chat
turn, and the bindings load it only when a multimodal chat handler asks for it.
`--sdist PATH` installs from a downloaded sdist instead of fetching it; CMAKE_ARGS and
CMAKE_BUILD_PARALLEL_LEVEL in the environment reach the build (e.g. 2 jobs on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

LLAMA_CPP = "llama-cpp-python==0.3.36"
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # explicit -mno-* beat -march=native
CMAKE_ARGS = (f"-DGGML_NATIVE=ON -DGGML_OPENMP=ON -DLLAVA_BUILD=OFF "
              f"'-DCMAKE_C_FLAGS={NO_AMX}' '-DCMAKE_CXX_FLAGS={NO_AMX}'")


def run(*cmd: str, env: dict | None = None) -> str:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE, env=env).stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("venv", type=Path)
    ap.add_argument("--sdist", type=Path, default=None,
                    help=f"a downloaded sdist of {LLAMA_CPP} (default: fetch it from PyPI)")
    args = ap.parse_args()
    if args.sdist is not None and not args.sdist.is_file():
        raise SystemExit(f"--sdist: no file {args.sdist}")
    py = args.venv / "bin" / "python"
    if not py.exists():
        run(sys.executable, "-m", "venv", str(args.venv))
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    run(*pip, "--upgrade", "pip")
    # The user's CMAKE_ARGS come last so that they can override these defaults.
    env = dict(os.environ, CMAKE_ARGS=" ".join(
        a for a in (CMAKE_ARGS, os.environ.get("CMAKE_ARGS", "")) if a))
    print(f"CMAKE_ARGS={env['CMAKE_ARGS']}", flush=True)
    target = str(args.sdist.resolve()) if args.sdist is not None else LLAMA_CPP
    run(*pip, target, env=env)
    print(run(str(py), "-c", "import llama_cpp; print('llama_cpp', llama_cpp.__version__); "
              "print(llama_cpp.llama_print_system_info().decode())"), end="")


if __name__ == "__main__":
    main()
