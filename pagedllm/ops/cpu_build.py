"""Builds and opens the C++ CPU kernels of ops/csrc: one shared library per source file.

Each library is JIT-compiled with torch.utils.cpp_extension on first use (a few seconds; cached
in torch's extensions directory under a hash of its source, so later processes only open it)
and called through ctypes (csrc/paged_decode_cpu.cpp says why). If a library cannot be built or
opened, for any reason, one warning is logged and its callers keep their PyTorch twins: the
package never needs a compiler. PAGEDLLM_CPU_KERNELS=0 turns every library off (read at
import).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
_ENABLED = os.environ.get("PAGEDLLM_CPU_KERNELS", "1") != "0"


class CppLibrary:
    """One csrc/ source built into one library, loaded once; `declare(lib)` sets the argtypes
    of its entry points."""

    def __init__(self, name: str, source: str, what: str,
                 declare: Callable[[ctypes.CDLL], None]) -> None:
        self.name, self.source, self.what, self._declare = name, CSRC / source, what, declare
        self.lib: ctypes.CDLL | None = None
        self._error: str | None = None if _ENABLED else "disabled by PAGEDLLM_CPU_KERNELS=0"

    def load(self) -> bool:
        """Build (or open the cached build of) the library once; True if it is usable."""
        if self.lib is not None or self._error is not None:
            return self.lib is not None
        try:
            lib = ctypes.CDLL(self._build())
            self._declare(lib)
            self.lib = lib
        except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a build error, a bad cache...
            self._error = f"{type(e).__name__}: {e}"
            logger.warning("pagedllm: the C++ %s is unavailable, using its PyTorch twin (%s)",
                           self.what, self._error.splitlines()[0])
        return self.lib is not None

    def error(self) -> str | None:
        """Why the library is not in use (None while it is, or before the first load)."""
        return self._error

    def _build(self) -> str:
        from torch.utils.cpp_extension import load as load_extension

        build = self._build_directory()
        built = build / f"{self.name}.so"
        # NOTE: a finished build is opened directly. cpp_extension takes a lock file around
        # every load, even a no-op one, and a process killed while holding it (a TP worker
        # killed mid-step) would leave every later load waiting on it.
        if built.exists():
            return str(built)
        _put_ninja_on_path()
        logger.info("building the C++ %s (once per machine; cached in %s) ...", self.what, build)
        start = time.perf_counter()
        path = load_extension(
            name=self.name,
            sources=[str(self.source)],
            build_directory=str(build),
            # No -march=native (CI machines differ): vector paths are picked at run time.
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        logger.info("built the C++ %s in %.1f s", self.what, time.perf_counter() - start)
        return path

    def _build_directory(self) -> Path:
        """Under torch's extensions root (TORCH_EXTENSIONS_DIR, as cpp_extension reads it), one
        directory per Python and torch version (the library links against libtorch) and source
        (with the shared headers).
        A lock file left by a killed build would make every later load wait on it forever: one
        older than any real build is removed."""
        from torch.utils.cpp_extension import get_default_build_root

        version = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}"
        # a change to the source or to a header the sources share (csrc/*.h) rebuilds
        text = self.source.read_bytes() + b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))
        digest = hashlib.sha256(text).hexdigest()[:12]
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
        path = Path(root) / f"{self.name}_{version.replace('+', '_')}_{digest}"
        path.mkdir(parents=True, exist_ok=True)
        lock = path / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > 300:
            logger.warning("pagedllm: removing a stale build lock %s", lock)
            lock.unlink(missing_ok=True)
        return path


def _put_ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH; a venv used without activation has the pip-installed
    one (a dependency of this package) off PATH."""
    if shutil.which("ninja") is None:
        import ninja  # the pip package: its binary's directory

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
