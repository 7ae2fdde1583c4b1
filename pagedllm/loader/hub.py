"""Model ids from the Hugging Face Hub (`ORG/NAME`), resolved through huggingface_hub's cache.

    LLM("HuggingFaceTB/SmolLM2-135M-Instruct")   pagedllm serve HuggingFaceTB/SmolLM2-135M-Instruct

A local file or directory is used as it is. Otherwise the id is looked up in the cache first
(`HF_HOME` / `HF_HUB_CACHE`, or `download_dir`), which needs no network; only if it is not
there, and `HF_HUB_OFFLINE` is not set, is it downloaded. Either way the result is the local
snapshot directory that the loaders read like any other.
"""

from __future__ import annotations

import os
import re

# What a snapshot needs: config, weights, tokenizer, chat template, generation defaults.
_ALLOW = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(model: str) -> bool:
    """`ORG/NAME` that is not a path on this machine."""
    return not os.path.exists(model) and bool(_REPO_ID.match(model))


def resolve_model(model: str, revision: str | None = None,
                  download_dir: str | None = None) -> str:
    """The local path of `model`: itself if it exists, else its Hub snapshot (cached or
    downloaded). Raises FileNotFoundError saying what to do when neither works."""
    if os.path.exists(model):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub ids, but {model!r} is a "
                             "local path")
        return model
    if not _REPO_ID.match(model):
        raise FileNotFoundError(f"model {model!r} is neither a file or directory here nor a "
                                "Hugging Face Hub id (ORG/NAME): pass a .gguf file, a model "
                                "directory (config.json and *.safetensors) or ORG/NAME, or no "
                                "model for the default SmolLM2-135M-Instruct")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    kwargs = dict(revision=revision, cache_dir=download_dir, allow_patterns=_ALLOW)
    try:
        return snapshot_download(model, local_files_only=True, **kwargs)
    except LocalEntryNotFoundError:
        pass
    cache = download_dir or constants.HF_HUB_CACHE
    where = f"{model}{'@' + revision if revision else ''}"
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(
            f"{where} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set. "
            f"Download it where there is network (`hf download {model}`) into this cache, "
            "unset HF_HUB_OFFLINE, or pass a local directory or .gguf file") from None
    try:
        return snapshot_download(model, **kwargs)
    except Exception as exc:  # no network, unknown repo, gated model, ...
        raise FileNotFoundError(
            f"{where} is not in the Hugging Face cache ({cache}) and could not be downloaded "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            f"Download it where there is network (`hf download {model}`) into this cache, "
            "or pass a local directory or .gguf file") from None
