"""HF-style directories: *.safetensors shards, streamed one tensor at a time."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from glob import glob

import torch
from safetensors import safe_open

_INDEX = "model.safetensors.index.json"


def safetensors_files(model_dir: str) -> list[str]:
    """The shards that hold the HF weights of `model_dir` (empty if there are none).

    The index names the shards when there is one. NOTE: some repos (Mistral's) also ship a
    `consolidated.safetensors` in the original, non-HF naming next to the HF shards, so a
    bare glob is the last resort, not the first.
    """
    index = os.path.join(model_dir, _INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, shard) for shard in shards]
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    return sorted(glob(os.path.join(model_dir, "*.safetensors")))


def iter_safetensors_weights(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, CPU tensor in the checkpoint's dtype), reading each only when asked."""
    files = safetensors_files(model_dir)
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                # Old Llama checkpoints store the rotary inverse frequencies: derived from the
                # config, a buffer rather than a weight.
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                yield name, f.get_tensor(name)
