"""A model's sampling defaults from its generation_config.json, as vLLM applies them
(`--generation-config auto`, its default): the fields a checkpoint sets explicitly become the
defaults of every request that does not set them itself. `vllm` (or `none`) ignores the file;
any other value is a folder to read generation_config.json from. GGUF files carry none."""

from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger("pagedllm")

# generation_config.json key -> SamplingParams field
SAMPLING_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                 "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                 "max_new_tokens": "max_tokens"}


def generation_defaults(model: str, source: str = "auto") -> dict:
    """SamplingParams field -> default value, from `source` (see the module docstring)."""
    if source in ("vllm", "none"):
        return {}
    folder = model if source == "auto" else source
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        if source != "auto":
            raise FileNotFoundError(f"--generation-config {source}: no generation_config.json "
                                    "there")
        return {}
    with open(path) as f:
        config = json.load(f)
    defaults = {ours: config[key] for key, ours in SAMPLING_KEYS.items()
                if config.get(key) is not None}
    if defaults:
        logger.info("sampling defaults from %s (requests may override them): %s", path,
                    defaults)
    return defaults
