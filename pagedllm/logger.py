"""Logging set-up, and start-up phases that say what the engine is doing while the user waits.

    12:00:01 INFO pagedllm: loading weights from SmolLM2-135M-Instruct.Q4_1.gguf ...
    12:00:03 INFO pagedllm: loading weights from SmolLM2-135M-Instruct.Q4_1.gguf: 2.1 s

Start-up (reading the config, the tokenizer, de-quantizing weights, building the CPU kernel,
sizing the KV cache) takes seconds to minutes on a CPU; one line before and one after each
phase tells a user it is not hung and where the time goes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = ("debug", "info", "warning", "error")

# The engine's periodic throughput/KV-usage line has its own logger, so that a front end that
# writes to the terminal (`pagedllm chat`) can keep it out of a streamed answer.
STATS_LOGGER = "pagedllm.stats"


def configure_logging(level: str | int = logging.INFO) -> None:
    """INFO lines from pagedllm on stderr, for the offline API (`LLM()`), as vLLM does.

    Nothing is changed when the application (or pytest) has configured logging already, or
    with PAGEDLLM_CONFIGURE_LOGGING=0 (vLLM's VLLM_CONFIGURE_LOGGING).
    """
    if os.environ.get("PAGEDLLM_CONFIGURE_LOGGING", "1") == "0":
        return
    pkg = logging.getLogger("pagedllm")
    if logging.getLogger().handlers or pkg.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    pkg.addHandler(handler)
    pkg.setLevel(level)
    # NOTE: not propagated: a root handler added later (logging.basicConfig in the caller's
    # code) would otherwise print every line twice.
    pkg.propagate = False


def configure_process_logging(level: str | None = None, fmt: str = LOG_FORMAT) -> None:
    """Logging for a pagedllm command (`--log-level`) and the processes it spawns: pagedllm's
    loggers at `level`, everyone else's at INFO or above. The level travels to spawned
    processes (the engine core) in PAGEDLLM_LOGGING_LEVEL; None reads it from there."""
    level = (level or os.environ.get("PAGEDLLM_LOGGING_LEVEL") or "info").upper()
    os.environ["PAGEDLLM_LOGGING_LEVEL"] = level.lower()
    logging.basicConfig(level="INFO" if level == "DEBUG" else level, format=fmt)
    logging.getLogger("pagedllm").setLevel(level)


@contextmanager
def log_phase(logger: logging.Logger, message: str, *args) -> Iterator[None]:
    """Log `message ...` before a slow phase and `message: N.N s` after it (not on error:
    the error says what happened)."""
    logger.info(message + " ...", *args)
    start = time.perf_counter()
    yield
    logger.info(message + ": %.1f s", *args, time.perf_counter() - start)
