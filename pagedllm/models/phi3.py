"""Phi-3: the Llama decoder, with q/k/v and gate/up fused in the checkpoint itself.

    self_attn.qkv_proj.weight   [(Hq + 2 Hkv) D, hidden]   rows: q | k | v
    mlp.gate_up_proj.weight     [2 I, hidden]              rows: gate | up

Our QKVParallelLinear and MergedColumnParallelLinear hold the same fused layout, but sharded:
rank r keeps ITS q heads, ITS k/v heads and ITS slice of gate and of up, which are not one
contiguous block of the checkpoint tensor. So each fused tensor is cut back into its parts
(views, no copy) and every part goes through the layer's own weight_loader with its shard id,
exactly as a Llama checkpoint's q_proj/k_proj/... would.

Partial rotary (`partial_rotary_factor` < 1, as in Phi-4-mini) rotates the first
part of each head only. longrope/su scaling (the 128k variants) is refused at load.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from pagedllm.models.config_check import Supports
from pagedllm.models.llama import LlamaForCausalLM
from pagedllm.models.utils import load_params, packed


class Phi3ForCausalLM(LlamaForCausalLM):
    supports = Supports(activations=("silu",), rope_types=("default",), partial_rotary=True,
                        sliding_window=True)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_params(self, packed(self._unfuse(weights), self.packed_modules_mapping))

    def _unfuse(self, weights: Iterable[tuple[str, torch.Tensor]]
                ) -> Iterator[tuple[str, torch.Tensor]]:
        """Phi-3's fused tensors -> Llama's separate q/k/v and gate/up names."""
        c = self.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        q_size = c.num_attention_heads * head_dim
        kv_size = (getattr(c, "num_key_value_heads", None) or c.num_attention_heads) * head_dim
        for name, tensor in weights:
            if ".qkv_proj." in name:
                q, k, v = tensor.split([q_size, kv_size, kv_size], dim=0)
                for part, t in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    yield name.replace(".qkv_proj.", f".{part}."), t
            elif ".gate_up_proj." in name:
                gate, up = tensor.chunk(2, dim=0)
                yield name.replace(".gate_up_proj.", ".gate_proj."), gate
                yield name.replace(".gate_up_proj.", ".up_proj."), up
            else:
                yield name, tensor
