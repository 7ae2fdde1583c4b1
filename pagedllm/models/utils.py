"""Weight loading shared by every model family.

A family's `load_weights` turns the checkpoint's (HF name, tensor) stream into
(parameter name, tensor, shard id) triples (renaming, splitting fused tensors, transposing);
`load_params` hands each to its parameter's `weight_loader`, which keeps this rank's slice.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

Weight = tuple[str, torch.Tensor, object]  # (our parameter name, full HF tensor, shard id)

# HF checkpoint name -> (our fused parameter, shard id), for the Llama-style attention and
# gated MLP that Llama, Mistral, Qwen2/3 and Gemma 3 share.
LLAMA_PACKED_MODULES = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def packed(weights: Iterable[tuple[str, torch.Tensor]], mapping: dict[str, tuple[str, object]]
           ) -> Iterator[Weight]:
    """HF names -> ours through `packed_modules_mapping` ({"q_proj": ("qkv_proj", "q"), ...})."""
    for name, tensor in weights:
        shard_id = None
        for hf_part, (ours, shard) in mapping.items():
            if f".{hf_part}." in name:
                name, shard_id = name.replace(f".{hf_part}.", f".{ours}."), shard
                break
        yield name, tensor, shard_id


def load_params(model: nn.Module, weights: Iterable[Weight]) -> None:
    """Copy each tensor into its parameter (sharded by the parameter's weight_loader).

    A checkpoint tensor we have no place for, or a parameter nobody filled, is an error:
    silently random weights are the worst kind of bug.
    """
    params = dict(model.named_parameters())
    tied = tie_word_embeddings(model.config)
    loaded: set[str] = set()
    for name, tensor, shard_id in weights:
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue  # a buffer derived from the config; a copy of the tied embedding
        if name not in params:
            raise ValueError(
                f"checkpoint tensor {name!r} has no parameter in {type(model).__name__}")
        param = params[name]
        loader = getattr(param, "weight_loader", None)
        if loader is None:
            if param.shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != "
                                 f"parameter shape {tuple(param.shape)}")
            param.data.copy_(tensor)
        else:
            loader(param, tensor.to(param.device), shard_id)
        loaded.add(name)
    missing = set(params) - loaded
    if "lm_head.weight" in missing:
        raise ValueError("checkpoint has no lm_head.weight, and the config says "
                         "tie_word_embeddings=False: the LM head would be random")
    if missing:
        raise ValueError(f"checkpoint is missing weights: {sorted(missing)[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}")


def tie_word_embeddings(hf_config) -> bool:
    return bool(getattr(hf_config, "tie_word_embeddings", False))


_EXPERT = re.compile(r"\.experts\.(\d+)\.(\w+)\.weight$")


def with_experts(weights: Iterable[tuple[str, torch.Tensor]],
                 mapping: dict[str, tuple[str, object]], parts: dict[str, str]
                 ) -> Iterator[Weight]:
    """`packed`, except that each expert's own tensor (`...experts.N.<part>.weight`) goes to
    the stacked MoEExperts parameter with shard id (N, "w1" | "w2" | "w3"), as `parts` maps
    the checkpoint's part names (Mixtral: w1/w2/w3; Qwen2-MoE: gate_proj/down_proj/up_proj)."""
    for name, tensor in weights:
        match = _EXPERT.search(name)
        if match and match.group(2) in parts:
            which = parts[match.group(2)]
            param = "w2_weight" if which == "w2" else "w13_weight"
            yield f"{name[:match.start()]}.experts.{param}", tensor, (int(match.group(1)), which)
        else:
            yield from packed([(name, tensor)], mapping)
