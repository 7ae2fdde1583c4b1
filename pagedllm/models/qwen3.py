"""Qwen3: the Llama decoder with an RMSNorm over each attention head's q and k before RoPE.

    q, k, v = x Wq, x Wk, x Wv                         # [T, H, D] each (GQA: fewer K/V heads)
    q, k = RMSNorm_D(q), RMSNorm_D(k)                  # per head, over its D features
    q, k = RoPE(q), RoPE(k)

No q/k/v bias unless `attention_bias` (then o_proj has one too, as in HF); the rest is Llama
(layers and weight names alike), so the model is `LlamaForCausalLM` with `qk_norm` on.
"""

from __future__ import annotations

from pagedllm.models.config_check import Supports
from pagedllm.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
    supports = Supports(activations=("silu",), rope_types=("default", "linear", "llama3"))
