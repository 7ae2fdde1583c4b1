"""`pagedllm serve` as a child process for benchmarks: a free loopback port, wait for /health,
terminate on exit. (benchmarks/ is not a package: scripts import this by path.)"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time

import httpx


@contextlib.contextmanager
def served(serve_args: list[str], log, timeout_s: float = 400.0, cwd: str | None = None):
    """Run `pagedllm serve *serve_args` (stdout and stderr to the file `log`); yields
    (url, seconds it took to answer /health)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", *serve_args,
           "--host", "127.0.0.1", "--port", str(port), "--uvicorn-log-level", "warning"]
    print("$", " ".join(cmd), flush=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}): see its log "
                                   f"({getattr(log, 'name', 'captured')})")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > timeout_s:
                raise RuntimeError(f"the server did not come up in {timeout_s:.0f} s")
            time.sleep(0.25)
        yield url, time.perf_counter() - t0
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
